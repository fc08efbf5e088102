"""``higgs-accel export``: merge a LoRA adapter into its base model and save a standalone model dir
(``export.export``)."""

from __future__ import annotations

import argparse
import json
import sys

from ..config import ConfigError
from . import check_out_dir

QUIET_LIBRARIES = True


def add_parser(subparsers):
    p = subparsers.add_parser(
        "export", help="merge a LoRA adapter into the base model and save it",
        description="Merge a PEFT LoRA adapter (and its fully trained modules_to_save) into the base model and save "
                    "a standalone HiggsAudioV2ForConditionalGeneration dir with the text tokenizer and the codec (a "
                    "Higgs TTS 3 base: its released layout, codec bundled).",
        epilog="Examples:\n  higgs-accel export --run runs/demo --out exported/demo\n"
               "  higgs-accel export --base BASE --adapter runs/demo/adapter --audio-tokenizer CODEC --out DIR",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", help="finished run dir: base and codec from its config.yaml, adapter from RUN_DIR/adapter")
    p.add_argument("--base", help="HiggsAudioV2ForConditionalGeneration: local dir or hub id")
    p.add_argument("--adapter", help="PEFT adapter dir (RUN_DIR/adapter or RUN_DIR/checkpoints/step-N/adapter)")
    p.add_argument("--audio-tokenizer", help="codec to save under DIR/audio_tokenizer (default: the run's)")
    p.add_argument("--dtype", choices=["fp32", "bf16"],
                   help="dtype of the saved weights (each LoRA delta is added in fp32); default: the base "
                        "checkpoint's, bf16 for the released model (fp32 doubles the files and serves no better)")
    p.add_argument("--out", required=True, help="output dir")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty --out")
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    from ..export import MANIFEST, export, plan_export
    from ..family import V3
    from ..run_dir import resolve_sources

    src = resolve_sources(args.run, args.base, args.audio_tokenizer, args.adapter)
    if not src.adapter:
        raise ConfigError("--adapter (or --run) is required: there is nothing to merge without one")
    out = check_out_dir(args.out, args.overwrite)
    m = src.model
    plan = plan_export(m.base, src.adapter, out, m.text_tokenizer, m.audio_tokenizer or None, args.dtype)
    print(f"export: {plan.summary()}", file=sys.stderr, flush=True)
    export(plan, out)
    layout = " (Higgs TTS 3, released layout, codec bundled)" if plan.family == V3 else ""
    print(f"exported {m.base} + {src.adapter} to {out}{layout}", file=sys.stderr)
    info = json.loads((out / MANIFEST).read_text())
    if info["processor"] not in (None, "saved"):
        print(f"processor config {info['processor']}", file=sys.stderr)
    return 0
