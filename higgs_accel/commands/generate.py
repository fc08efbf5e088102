"""``higgs-accel generate``: speak a text with a base model and a LoRA adapter (``generate.generate_speech``), write
a WAV file, and score it when scorers are named."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from ..config import SAMPLING_KEYS, ConfigError, EvalConfig, check_sampling, with_set
from ..generate import DEFAULT_MAX_NEW_TOKENS, DEFAULT_RAS_MAX_REPEAT
from . import device_of

QUIET_LIBRARIES = True


def add_parser(subparsers):
    p = subparsers.add_parser(
        "generate", help="speak a text with a base model and a LoRA adapter",
        description="Generate speech with transformers' HiggsAudioV2ForConditionalGeneration.generate, using the "
                    "training chat layout. Writes a WAV file; exits 1 if no audio came out.",
        epilog="Examples:\n  higgs-accel generate --run runs/demo --text 'Hello there.' --out hello.wav\n"
               "  higgs-accel generate --base BASE --audio-tokenizer CODEC --adapter runs/demo/adapter \\\n"
               "      --text 'Hello.' --ref-audio voice.wav --ref-text 'What the voice says.' --out hello.wav",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_argument_group("model")
    src.add_argument("--run", help="finished run dir: base, codec and system prompt from its config.yaml, "
                                   "adapter from RUN_DIR/adapter")
    src.add_argument("--base", help="HiggsAudioV2ForConditionalGeneration: local dir or hub id")
    src.add_argument("--audio-tokenizer", help="HiggsAudioV2TokenizerModel codec: local dir or hub id (default: the "
                                               "run's, or BASE/audio_tokenizer of an exported or converted --base)")
    src.add_argument("--adapter", help="PEFT adapter dir (e.g. RUN_DIR/adapter); none: the base model alone")
    src.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    src.add_argument("--dtype", choices=["fp32", "bf16"], help="model weights dtype (default: the run's, or fp32)")
    prompt = p.add_argument_group("prompt")
    prompt.add_argument("--text", required=True, help="what to say")
    prompt.add_argument("--ref-audio", help="reference audio whose voice to clone (any soundfile format)")
    prompt.add_argument("--ref-text", default="", help="transcript of --ref-audio")
    prompt.add_argument("--scene", default="", help="scene description added to the system turn")
    prompt.add_argument("--system", help="system prompt (default: the run's data.system_prompt)")
    gen = p.add_argument_group("generation")
    gen.add_argument("--out", required=True, help="output WAV file")
    gen.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS,
                     help="generation steps, one delayed audio frame each: the codec's frame rate per second of "
                          "audio, plus the model's codebook count for the delay pattern; "
                          f"default: {DEFAULT_MAX_NEW_TOKENS}")
    gen.add_argument("--seed", type=int, help="seed for sampling (and for repetition-aware redraws)")
    scoring = p.add_argument_group(
        "scoring", "Score the speech (docs/quality.md): WER/CER against --text, speaker similarity to --ref-audio. "
                   "Defaults: the run's eval.* keys; none set: no scoring.")
    scoring.add_argument("--asr-model", help="ASR model for WER/CER (hub id or local dir)")
    scoring.add_argument("--speaker-model", help="x-vector speaker model for similarity (hub id or local dir)")
    scoring.add_argument("--asr-language", help="language a Whisper ASR model transcribes in")
    knobs = p.add_argument_group(
        "sampling", "Unset options keep the checkpoint's generation_config.json (the authors' tuning: sampling, "
                    "temperature, top-k/top-p, repetition-aware sampling); each one given overrides it.")
    mode = knobs.add_mutually_exclusive_group()
    mode.add_argument("--do-sample", dest="do_sample", action="store_const", const=True,
                      help="sample from the (tempered, top-k/top-p filtered) distribution")
    mode.add_argument("--greedy", dest="do_sample", action="store_const", const=False,
                      help="argmax decoding, without repetition-aware redraws unless --ras-win-len is given")
    knobs.add_argument("--temperature", type=float, help="sampling temperature")
    knobs.add_argument("--top-k", type=int, help="keep the K most likely codes per codebook (0: no limit)")
    knobs.add_argument("--top-p", type=float, help="nucleus sampling mass (1: no limit)")
    knobs.add_argument("--ras-win-len", type=int,
                       help="repetition-aware sampling: redraw a code seen --ras-win-max-num-repeat times in the last "
                            "N frames of its codebook from the untempered distribution (0: off)")
    knobs.add_argument("--ras-win-max-num-repeat", type=int,
                       help=f"repeats in the window that trigger a redraw (default: the checkpoint's, else "
                            f"{DEFAULT_RAS_MAX_REPEAT})")
    p.set_defaults(func=run)
    return p


def _check(args) -> None:
    if args.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if not args.text.strip():
        raise ConfigError("--text must not be empty")
    if args.ref_audio and not Path(args.ref_audio).is_file():
        raise ConfigError(f"--ref-audio: file not found: {args.ref_audio}")
    if args.ref_audio and not args.ref_text:
        raise ConfigError("--ref-audio needs --ref-text (the reference's transcript)")
    check_sampling(vars(args), lambda key: "--" + key.replace("_", "-"))


def _check_special_tokens(args, tokenizer) -> None:
    """The prompt's texts spell out no special token: they would add an audio slot without audio, or end a turn
    (the same screen as training's transcripts)."""
    from ..chat import special_tokens_in

    for flag in ("text", "ref_text", "scene", "system"):
        if found := special_tokens_in(getattr(args, flag) or "", tokenizer):
            raise ConfigError(f"--{flag.replace('_', '-')} contains the special token {found[0]}, which would "
                              "break the prompt's layout")


def run(args) -> int:
    import dataclasses

    from ..convert import CODEC_DIR, bundled_codec
    from ..family import V3
    from ..generate import describe_sampling, generate_speech, write_wav
    from ..loading import FLAG_NAMES, load_stack, model_family
    from ..quality import QualityScorer
    from ..run_dir import read_run_config, resolve_sources

    _check(args)
    src = resolve_sources(args.run, args.base, args.audio_tokenizer, args.adapter)
    v3 = model_family(src.model.base, FLAG_NAMES.base) == V3
    # An export carries its codec: v2's in DIR/audio_tokenizer, Higgs TTS 3's bundled in its weights (as released).
    codec = src.model.audio_tokenizer or (src.model.base if v3 else bundled_codec(src.model.base))
    if not codec:
        raise ConfigError(f"--audio-tokenizer is required (or --run, or a --base dir holding {CODEC_DIR}/, as an "
                          "export does)")
    if v3 and (args.scene or args.system):
        raise ConfigError(f"--{'scene' if args.scene else 'system'}: Higgs TTS 3's prompt has no system turn or "
                          "scene (docs/tts3.md)")
    device = device_of(args.device)
    model_cfg = dataclasses.replace(src.model, audio_tokenizer=codec, dtype=args.dtype or src.model.dtype)
    stack = load_stack(model_cfg, src.adapter, names=FLAG_NAMES, device=device)
    _check_special_tokens(args, stack.tokenizer)
    # The scorers the flags name, else the run's eval.* keys; loaded before generating: a bad scorer dir is one
    # line, not wasted work.
    eval_cfg = read_run_config(args.run).eval if args.run else EvalConfig()
    scorer = QualityScorer.from_config(with_set(eval_cfg, asr_model=args.asr_model, speaker_model=args.speaker_model,
                                                asr_language=args.asr_language), device)
    start = time.perf_counter()
    result = generate_speech(stack.model, stack.tokenizer, stack.codec, stack.ids, args.text, ref_audio=args.ref_audio,
                             ref_text=args.ref_text, scene=args.scene, system_prompt=args.system or src.system_prompt,
                             max_new_tokens=args.max_new_tokens,
                             sampling={key: getattr(args, key) for key in SAMPLING_KEYS}, seed=args.seed)
    if result["error"]:
        print(f"higgs-accel: generation failed: {result['error']}", file=sys.stderr)
        return 1
    path = write_wav(args.out, result["wave"], result["sample_rate"])
    how = "end of audio" if result["stopped"] == "eos" else f"length limit of {args.max_new_tokens} steps"
    print(f"wrote {path}: {result['seconds']:.2f}s, {result['n_frames']} frames (stopped at {how}; "
          f"{describe_sampling(result['sampling'])})", file=sys.stderr)
    if scorer is not None:
        row = scorer.score(result["wave"], result["sample_rate"], args.text, reference_audio=args.ref_audio,
                           gen_time_s=time.perf_counter() - start)
        print(_score_line(row), file=sys.stderr)
    return 0


def _score_line(row: dict) -> str:
    def fmt(v):
        return "-" if v is None else f"{v:.3f}"

    return (f"scored: WER {fmt(row['wer'])}, CER {fmt(row['cer'])}, similarity {fmt(row['similarity'])}, "
            f"transcript {row['transcript']!r}")
