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

import json
import shutil
from pathlib import Path

from .config import ModelConfig
from .convert import CODEC_DIR, save_processor
from .loading import DTYPES, FLAG_NAMES, load_stack

MANIFEST = "higgs_accel_export.json"


def merge_adapter(model):
    """A PeftModel's base + adapter merged into plain weights (load it in fp32, so the sum loses nothing before any
    cast).

    ``merge_and_unload`` folds every LoRA delta into its layer and replaces each ``modules_to_save`` wrapper
    (e.g. the fully trained audio_lm_head / text_lm_head) with the adapter's trained copy."""
    merged = model.merge_and_unload()
    if any("lora_" in n or "modules_to_save" in n or "original_module" in n for n, _ in merged.named_parameters()):
        raise RuntimeError("merge_and_unload left adapter parameters behind")
    return merged


def export(base: str, adapter: str, out: str | Path, text_tokenizer: str | None = None,
           audio_tokenizer: str | None = None, dtype: str = "fp32") -> Path:
    """Write the merged model, its tokenizer and (if given) the codec to ``out``; return ``out``."""
    out = Path(out)
    sources = ModelConfig(base=base, audio_tokenizer=audio_tokenizer or "", text_tokenizer=text_tokenizer or "",
                          dtype="fp32")
    stack = load_stack(sources, adapter, names=FLAG_NAMES)
    merged = merge_adapter(stack.model).to(DTYPES[dtype])
    out.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(out)
    stack.tokenizer.save_pretrained(out)
    info = {"base": base, "adapter": adapter, "text_tokenizer": text_tokenizer or base,
            "audio_tokenizer": audio_tokenizer, "dtype": dtype, "use_text_head": True, "processor": None}
    if stack.codec is not None:
        codec_dir = out / CODEC_DIR
        if codec_dir.exists():
            shutil.rmtree(codec_dir)
        stack.codec.save_pretrained(codec_dir)
        info["processor"] = save_processor(out, stack.tokenizer, codec_dir)
    (out / MANIFEST).write_text(json.dumps(info, indent=2) + "\n")
    return out
