"""``higgs-accel convert``: an original-format checkpoint (model or audio tokenizer) converted into transformers'
layout, into a dir of one's own (``convert.convert_checkpoint``)."""

from __future__ import annotations

import argparse
import sys

from . import check_out_dir

QUIET_LIBRARIES = True


def add_parser(subparsers):
    p = subparsers.add_parser(
        "convert", help="convert an original-format checkpoint (model or audio tokenizer) to transformers' layout",
        description="Convert a checkpoint in the authors' original layout (boson-ai/higgs-audio) into one that plain "
                    "transformers loads. A model becomes HiggsAudioV2ForConditionalGeneration with its text head, "
                    "text tokenizer (pad token, chat template), generation config and, with --audio-tokenizer, the "
                    "codec under DIR/audio_tokenizer and the processor config; an audio tokenizer (config.json + "
                    "model.pth) becomes HiggsAudioV2TokenizerModel with its feature extractor. Training converts "
                    "on its own (once, into the cache); this command is for a copy of your own.",
        epilog="Today's bosonai repositories (bosonai/higgs-tts-2-3b-base, bosonai/higgs-audio-v2-tokenizer) are in "
               "transformers' layout already; the original layout is in their snapshots from before April 2026 and "
               "in fine-tunes made with the authors' own trainer.\nExamples:\n"
               "  higgs-accel convert ./my-finetune --audio-tokenizer bosonai/higgs-audio-v2-tokenizer --out my-hf\n"
               "  higgs-accel convert ./higgs-audio-v2-original --audio-tokenizer ./codec-original --out higgs-v2-hf\n"
               "  higgs-accel convert ./codec-original --out codec-hf",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", metavar="SRC", help="original-format model or audio tokenizer: local dir or hub id")
    p.add_argument("--out", required=True, help="output dir")
    p.add_argument("--audio-tokenizer", help="codec for the processor config (either layout); required for a model")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty --out")
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    from ..convert import CODEC, convert_checkpoint

    out = check_out_dir(args.out, args.overwrite)
    what, codec_layout = convert_checkpoint(args.src, out, args.audio_tokenizer)
    if what == CODEC:
        print(f"converted the audio tokenizer {args.src} to {out}", file=sys.stderr)
    else:
        print(f"converted {args.src} to {out} (audio tokenizer: {args.audio_tokenizer}, {codec_layout} layout)",
              file=sys.stderr)
    return 0
