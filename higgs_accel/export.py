"""Merge a LoRA adapter into its base model and save a standalone model dir that transformers loads directly.

Layout of the export dir::

    DIR/                    HiggsAudioV2ForConditionalGeneration (config, safetensors, generation config) with the
                            adapter merged in and text_lm_head kept; the text tokenizer files next to it
    DIR/audio_tokenizer/    the HiggsAudioV2TokenizerModel codec, when one is known (--audio-tokenizer or the run's)
    DIR/processor_config.json     with the codec: ``AutoProcessor.from_pretrained(DIR)`` gives transformers'
                            HiggsAudioV2Processor (its codec path is absolute: re-export, or edit it, after a move)
    DIR/higgs_accel_export.json   where it came from

``HiggsAudioV2ForConditionalGeneration.from_pretrained(DIR, use_text_head=True)`` then needs neither PEFT nor the
base model (without ``use_text_head`` transformers drops the text head, which generation does not use).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from .config import ConfigError, ModelConfig
from .generate import resolve_sources
from .loading import DTYPES, load_codec_dir, load_model, load_tokenizer, resolve_checkpoints

CODEC_DIR = "audio_tokenizer"
MANIFEST = "higgs_accel_export.json"


def merge_adapter(base: str, adapter: str):
    """Base + adapter merged into plain weights, in fp32 so the sum loses nothing before any cast.

    ``merge_and_unload`` folds every LoRA delta into its layer and replaces each ``modules_to_save`` wrapper
    (e.g. the fully trained audio_lm_head / text_lm_head) with the adapter's trained copy."""
    model = load_model(base, adapter, "fp32")
    merged = model.merge_and_unload()
    if any("lora_" in n or "modules_to_save" in n or "original_module" in n for n, _ in merged.named_parameters()):
        raise RuntimeError("merge_and_unload left adapter parameters behind")
    return merged


def export(base: str, adapter: str, out: str | Path, text_tokenizer: str | None = None,
           audio_tokenizer: str | None = None, dtype: str = "fp32") -> Path:
    """Write the merged model, its tokenizer and (if given) the codec to ``out``; return ``out``."""
    out = Path(out)
    sources = ModelConfig(base=base, audio_tokenizer=audio_tokenizer or "", text_tokenizer=text_tokenizer or "")
    model_cfg, _ = resolve_checkpoints(sources, base_name="--base", codec_name="--audio-tokenizer")
    tokenizer = load_tokenizer(model_cfg.text_tokenizer)
    codec = load_codec_dir(model_cfg.audio_tokenizer) if audio_tokenizer else None
    merged = merge_adapter(model_cfg.base, adapter).to(DTYPES[dtype])
    out.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(out)
    tokenizer.save_pretrained(out)
    info = {"base": base, "adapter": adapter, "text_tokenizer": text_tokenizer or base,
            "audio_tokenizer": audio_tokenizer, "dtype": dtype, "use_text_head": True, "processor": None}
    if codec is not None:
        codec_dir = out / CODEC_DIR
        if codec_dir.exists():
            shutil.rmtree(codec_dir)
        codec.save_pretrained(codec_dir)
        info["processor"] = save_processor(out, tokenizer, codec_dir)
    (out / MANIFEST).write_text(json.dumps(info, indent=2) + "\n")
    return out


def save_processor(out: Path, tokenizer, codec_dir: Path) -> str:
    """transformers' HiggsAudioV2Processor config next to the model, pointing at the exported codec; returns what
    happened (the model export stands without it, so a failure here is reported, not raised)."""
    try:
        from transformers import DacFeatureExtractor, HiggsAudioV2Processor, HiggsAudioV2TokenizerModel

        # Loaded back from the export so the processor config names the exported codec, not the source.
        codec = HiggsAudioV2TokenizerModel.from_pretrained(codec_dir.resolve())
        features = DacFeatureExtractor(sampling_rate=codec.config.sample_rate, hop_length=codec.config.hop_length)
        HiggsAudioV2Processor(features, tokenizer, codec).save_pretrained(out)
        return "saved"
    except Exception as e:  # noqa: BLE001 - an optional extra; transformers versions differ in processor support
        return f"not saved: {type(e).__name__}: {e}"


# ---------------------------------------------------------------- command line


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "export", help="merge a LoRA adapter into the base model and save it",
        description="Merge a PEFT LoRA adapter (and its fully trained modules_to_save) into the base model and save "
                    "a standalone HiggsAudioV2ForConditionalGeneration dir with the text tokenizer and the codec.",
        epilog="Examples:\n  higgs-accel export --run runs/demo --out exported/demo\n"
               "  higgs-accel export --base BASE --adapter runs/demo/adapter --audio-tokenizer CODEC --out DIR",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", help="finished run dir: base and codec from its config.yaml, adapter from RUN_DIR/adapter")
    p.add_argument("--base", help="HiggsAudioV2ForConditionalGeneration: local dir or hub id")
    p.add_argument("--adapter", help="PEFT adapter dir (RUN_DIR/adapter or RUN_DIR/checkpoints/step-N/adapter)")
    p.add_argument("--audio-tokenizer", help="codec to save under DIR/audio_tokenizer (default: the run's)")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32",
                   help="dtype of the saved weights (merging is always done in fp32); default: fp32")
    p.add_argument("--out", required=True, help="output dir")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty --out")
    p.set_defaults(func=cmd_export)
    return p


def cmd_export(args) -> int:
    src = resolve_sources(args)
    if not src.get("adapter"):
        raise ConfigError("--adapter (or --run) is required: there is nothing to merge without one")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out: {args.out} is a file")
    if out.is_dir() and any(out.iterdir()) and not args.overwrite:
        raise ConfigError(f"--out: {args.out} is not empty (pass --overwrite to write into it)")
    export(src["base"], src["adapter"], out, src["text_tokenizer"], src.get("audio_tokenizer"), args.dtype)
    print(f"exported {src['base']} + {src['adapter']} to {out}", file=sys.stderr)
    info = json.loads((out / MANIFEST).read_text())
    if info["processor"] not in (None, "saved"):
        print(f"processor config {info['processor']}", file=sys.stderr)
    return 0
