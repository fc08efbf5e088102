"""``higgs-accel dataset SRC... --out DIR``: raw recordings -> voice-activity segmentation -> transcription where no
text came with them -> loudness-normalised 24 kHz mono clips -> train.jsonl / val.jsonl the trainer reads
(``dataset_dir.build``). Rerun the same command to resume."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from ..config import ConfigError, check_model_ref
from ..recordings import CutSettings

QUIET_LIBRARIES = True

EPILOG = """\
Examples:
  higgs-accel dataset recordings/ --out data/voice --asr-model openai/whisper-large-v3 --language en
  higgs-accel dataset LJSpeech-1.1 --out data/lj --workers 8          (text from metadata.csv: no ASR)
  higgs-accel train data.train_manifest=data/voice/train.jsonl data.val_manifest=data/voice/val.jsonl
Interrupted? Run the same command again: finished sources are kept. See docs/dataset.md.
"""


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "dataset", help="turn recordings into clips and train/val manifests",
        description="Cut recordings (files or folders, any rate, channels and length) into clips at the pauses a "
                    "voice-activity model (silero-vad) hears, transcribe clips without text (an ASR model through "
                    "transformers' pipeline), normalise their loudness and write DIR/clips, DIR/train.jsonl, "
                    "DIR/val.jsonl and a summary (DIR/summary.md, DIR/events.jsonl). Text that comes with the audio "
                    "(LJSpeech metadata.csv, Common Voice TSV, a .txt beside each file) is kept.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sources", nargs="+", metavar="SRC", help="audio files or folders (searched recursively)")
    p.add_argument("--out", required=True, help="output dir (rerunning into it resumes)")
    p.add_argument("--speaker", help="speaker of every clip (default: Common Voice's client_id, else the first "
                                     "sub-folder under SRC)")
    p.add_argument("--asr-model", default="", help="ASR model for clips without text: hub id or dir, e.g. "
                                                    "openai/whisper-large-v3")
    p.add_argument("--language", default="", help="language a Whisper --asr-model is told, e.g. en (default: it "
                                                  "detects it)")
    p.add_argument("--asr-batch-size", type=int, default=8, help="clips per ASR call; default: 8")
    p.add_argument("--device", help="device of the ASR model (default: cuda if available, else cpu)")
    p.add_argument("--workers", type=int, default=1, help="processes decoding and segmenting in parallel; default: 1")
    p.add_argument("--val-fraction", type=float, default=0.05,
                   help="fraction of the source files held out for val.jsonl; default: 0.05")
    p.add_argument("--seed", type=int, default=0, help="which sources are held out; default: 0")
    p.add_argument("--max-chars-per-second", type=float, default=None,
                   help="reject transcripts longer than this per second of audio; default: 25")
    p.add_argument("--strict", action="store_true",
                   help="exit 2 listing every source that could not be read, instead of skipping them")
    for f in dataclasses.fields(CutSettings):
        p.add_argument(f"--{f.name.replace('_', '-')}", type=float, default=f.default,
                       help=f"{f.metadata['doc']}; default: {f.default:g}")
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    from ..dataset_dir import BuildOptions, build, run_id
    from ..events import EventLog
    from ..recordings import find_sources
    from ..sinks.parquet import ParquetSink
    from . import device_of

    cut = CutSettings(**{f.name: getattr(args, f.name) for f in dataclasses.fields(CutSettings)})
    cut.check()
    if args.workers < 1 or args.asr_batch_size < 1:
        raise ConfigError("--workers and --asr-batch-size must be at least 1")
    if not 0 <= args.val_fraction < 1:
        raise ConfigError(f"--val-fraction must be in [0, 1), got {args.val_fraction}")
    if args.asr_model:
        check_model_ref("--asr-model", args.asr_model)
    opts = BuildOptions(cut=cut, asr_model=args.asr_model, language=args.language,
                        val_fraction=args.val_fraction, seed=args.seed, workers=args.workers,
                        asr_batch_size=args.asr_batch_size, device=str(device_of(args.device)), strict=args.strict,
                        **({"max_chars_per_second": args.max_chars_per_second}
                           if args.max_chars_per_second is not None else {}))
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out: {out} is a file")
    sources = find_sources(args.sources, args.speaker)
    if not sources:
        raise ConfigError(f"no audio files under {' '.join(args.sources)}")
    out.mkdir(parents=True, exist_ok=True)
    log = EventLog(out, run_id(out), sinks=[ParquetSink(out / "events")])
    bar = _Progress()
    try:
        built = build(sources, out, opts, log, bar)
    finally:
        bar.close()
        log.close()
    s = built.summary
    print(f"{out}: {s['clips']} clips ({s['train_clips']} train, {s['val_clips']} val), {s['hours_kept']:.2f} h "
          f"kept of {s['hours_in']:.2f} h in; {built.processed} sources processed now, {built.reused} already done"
          f"{_reasons(s)}", file=sys.stderr)
    for source, reason, detail in built.skips:
        print(f"skipped {source}: {reason}: {detail}", file=sys.stderr)
    print(f"train: higgs-accel train data.train_manifest={out / 'train.jsonl'} "
          f"data.val_manifest={out / 'val.jsonl'}", file=sys.stderr)
    return 0


def _reasons(summary: dict) -> str:
    rejected = summary["rejected_by_reason"]
    return f"; rejected: {', '.join(f'{k} {v}' for k, v in rejected.items())}" if rejected else ""


class _Progress:
    """A tqdm bar on stderr in hours of audio, with the ETA; started when the build says how much there is."""

    def __init__(self):
        self.bar = None

    def __call__(self, seconds: float, total: float) -> None:
        from tqdm import tqdm

        if self.bar is None:
            self.bar = tqdm(total=total, unit_scale=1 / 3600, file=sys.stderr, dynamic_ncols=True,
                            bar_format="{l_bar}{bar}| {n:.2f}/{total:.2f} h of audio [{elapsed}<{remaining}]")
        self.bar.update(min(seconds, self.bar.total - self.bar.n))  # durations from headers can round low

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
