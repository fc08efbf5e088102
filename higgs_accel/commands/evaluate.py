"""``higgs-accel evaluate``: speak a held-out manifest with a finished run's adapter (or the base model alone) and
score the speech (``quality``): WER/CER of an ASR transcript and speaker similarity to the reference voice."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from ..config import TINY_PRESETS, ConfigError, with_set
from ..generate import DEFAULT_MAX_NEW_TOKENS
from . import device_of

QUIET_LIBRARIES = True


def add_parser(subparsers):
    p = subparsers.add_parser(
        "evaluate", help="speak a held-out manifest with a run's adapter and score it (WER/CER, speaker similarity)",
        description="Generate every text of a held-out manifest with a finished run's adapter (or the base model "
                    "with --baseline), then score the speech: word and character error rate of an ASR transcript "
                    "and speaker similarity to the reference voice (docs/quality.md). Scorers and their settings "
                    "default to the run's eval section. Writes gen-N.wav, ref-N.wav, quality.jsonl and summary.json.",
        epilog="Examples:\n  higgs-accel evaluate --run runs/demo --manifest held_out.jsonl \\\n"
               "      --asr-model openai/whisper-large-v3 --speaker-model microsoft/wavlm-base-plus-sv\n"
               "  higgs-accel evaluate --run runs/demo --manifest held_out.jsonl --baseline",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_argument_group("what to evaluate")
    src.add_argument("--run", required=True, help="finished run dir: base, codec, data fields, system prompt and "
                                                  "eval settings from its config.yaml, adapter from RUN_DIR/adapter")
    src.add_argument("--manifest", required=True, help="held-out samples: any source data.train_manifest takes")
    which = src.add_mutually_exclusive_group()
    which.add_argument("--adapter", help="PEFT adapter dir instead of RUN_DIR/adapter (e.g. a checkpoint's)")
    which.add_argument("--baseline", action="store_true", help="the base model alone, without any adapter")
    src.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    score = p.add_argument_group("scoring (default: the run's eval section)")
    score.add_argument("--asr-model", help="same as eval.asr_model")
    score.add_argument("--speaker-model", help="same as eval.speaker_model")
    score.add_argument("--asr-language", help="same as eval.asr_language")
    score.add_argument("--batch-size", type=int, help="same as eval.batch_size")
    gen = p.add_argument_group("generation")
    gen.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS,
                     help="generation steps per utterance (the codec's frame rate per second of audio); "
                          f"default: {DEFAULT_MAX_NEW_TOKENS}")
    gen.add_argument("--limit", type=int, default=0, help="only the first N samples (0: all)")
    gen.add_argument("--seed", type=int, default=0, help="seed of sample i is SEED + i; default: 0")
    gen.add_argument("--out", help="output dir (default: RUN_DIR/evaluate/<manifest name>[-base])")
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    for flag, value, least in (("--max-new-tokens", args.max_new_tokens, 1), ("--limit", args.limit, 0),
                               ("--batch-size", args.batch_size, 1)):
        if value is not None and value < least:
            raise ConfigError(f"{flag} must be at least {least}, got {value}")
    if not Path(args.manifest).exists():
        raise ConfigError(f"--manifest: file not found: {args.manifest}")
    summary = _evaluate(args)
    print(_summary_line(summary), file=sys.stderr)
    return 0


def _evaluate(args) -> dict:
    """Speak every text of the held-out manifest (any source ``data.train_manifest`` takes, read with the run's field
    names) with the run's adapter (or ``--adapter``; the base model alone with ``--baseline``), then score each
    generation.

    A sample with reference audio is spoken in that voice (cloning) and its similarity is measured against the
    reference; a sample without one is spoken plainly and compared with its own recording, the target voice.
    Writes under ``--out`` (default ``RUN_DIR/evaluate/<manifest name>`` or ``...-base``): ``gen-<i>.wav``,
    ``ref-<i>.wav`` (the voice compared against, at the codec's rate), ``quality.jsonl`` (the ``quality`` event
    fields plus ``source`` and ``line`` of the sample) and ``summary.json`` (the ``quality_summary`` fields plus
    ``manifest``, ``adapter`` and ``gen_s``). Generation is one utterance at a time, scoring ``eval.batch_size`` at
    a time, each with a progress bar on a terminal."""
    from tqdm import tqdm

    from ..data import decode_audio, read_source
    from ..generate import write_generation, write_wav
    from ..loading import load_stack
    from ..quality import QualityScorer, Utterance, summarize_round
    from ..run_dir import EVALUATE_DIR, TINY_DIR, read_run_config, run_sources

    run_dir, manifest = Path(args.run), args.manifest
    src = run_sources(run_dir, need_adapter=not (args.adapter or args.baseline))
    adapter = None if args.baseline else (args.adapter or src.adapter)
    run_cfg = read_run_config(run_dir)
    eval_cfg = with_set(run_cfg.eval, asr_model=args.asr_model, speaker_model=args.speaker_model,
                        asr_language=args.asr_language, batch_size=args.batch_size)
    if not (eval_cfg.asr_model or eval_cfg.speaker_model) and run_cfg.preset in TINY_PRESETS:
        # The demo: scorers as tiny as its model, so the whole pipeline runs; their scores mean nothing.
        from ..tiny import ensure_tiny_scorers

        scorers = ensure_tiny_scorers(run_dir / TINY_DIR / "scorers")
        eval_cfg = with_set(eval_cfg, asr_model=scorers["eval.asr_model"],
                            speaker_model=scorers["eval.speaker_model"])
        print("evaluate: --preset tiny run without scorers: scoring with rigged tiny models (the ASR hears \"a\" "
              "in anything, the speaker model is random), so the scores check the pipeline, not the speech",
              file=sys.stderr)
    if not (eval_cfg.asr_model or eval_cfg.speaker_model):
        raise ConfigError("evaluate needs a scorer: set eval.asr_model and/or eval.speaker_model (in the run's "
                          "config or as flags)")
    # Everything that can be wrong in the input is found before any model loads.
    samples, skips = read_source(str(manifest), run_cfg.data)
    samples = samples[:args.limit] if args.limit else samples
    if not samples:
        raise ConfigError(f"--manifest: {manifest} has no usable sample ({len(skips)} skipped)")
    device = device_of(args.device)
    scorer = QualityScorer.from_config(eval_cfg, device)
    out = Path(args.out) if args.out else run_dir / EVALUATE_DIR / (Path(manifest).stem + ("-base" if args.baseline
                                                                                            else ""))
    out.mkdir(parents=True, exist_ok=True)
    stack = load_stack(src.model, adapter, device=device)
    rate = stack.codec.config.sample_rate
    show = sys.stderr.isatty()

    utterances, gen_start = [], time.perf_counter()
    for i, s in enumerate(tqdm(samples, desc="generating", unit="utt", disable=not show)):
        ref_path = write_wav(out / f"ref-{i}.wav", decode_audio((s.ref_audio or s.audio).read(), rate), rate)
        r = write_generation(stack.model, stack.tokenizer, stack.codec, stack.ids, s.text, out, i,
                             ref_audio=ref_path if s.ref_audio else None, ref_text=s.ref_text, scene=s.scene,
                             system_prompt=s.system or src.system_prompt, max_new_tokens=args.max_new_tokens,
                             seed=args.seed + i)
        utterances.append(Utterance(s.text, r["path"], reference=ref_path, prompt=i, gen_time_s=r["gen_time_s"],
                                    error=r["error"]))
    gen_s = time.perf_counter() - gen_start

    start, rows, step = time.perf_counter(), [], max(1, eval_cfg.batch_size)
    for k in tqdm(range(0, len(utterances), step), desc="scoring", unit="batch", disable=not show):
        rows += scorer.score_batch(utterances[k:k + step])
    rows = [{**row, "baseline": args.baseline, "source": s.source, "line": s.line} for row, s in zip(rows, samples)]
    summary = summarize_round(rows, time.perf_counter() - start, scorer.asr_name, scorer.speaker_name, None,
                              args.baseline, scorer.spell_numbers)
    summary.update(manifest=str(manifest), adapter=adapter, gen_s=gen_s)
    with open(out / "quality.jsonl", "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _summary_line(summary: dict) -> str:
    """One line for the summary: what was scored and how it did."""
    def num(key: str) -> str:
        return "-" if summary.get(key) is None else f"{summary[key]:.3f}"

    model = "the base model" if summary.get("baseline") else (summary.get("adapter") or "the adapter")
    return (f"{model}: {summary['utterances']} utterances ({summary['no_audio']} without audio), WER {num('wer')}, "
            f"CER {num('cer')}, similarity {num('similarity')}, scored in {summary['score_s']:.1f}s")
