"""Merge a LoRA adapter into its base model and save a standalone model dir that transformers loads directly (a
Higgs TTS 3 base: the released layout the runtimes load, ``export_tts3``).

Layout of the export dir::

    DIR/                    HiggsAudioV2ForConditionalGeneration (config, safetensors, generation config) with the
                            adapter merged in and text_lm_head kept; the text tokenizer files next to it
    DIR/audio_tokenizer/    the HiggsAudioV2TokenizerModel codec, when one is known (--audio-tokenizer or the run's)
    DIR/processor_config.json     with the codec: ``AutoProcessor.from_pretrained(DIR)`` gives transformers'
                            HiggsAudioV2Processor (its codec path is absolute: re-export, or edit it, after a move)
    DIR/higgs_accel_export.json   where it came from

The merge is ``merge.py``'s: one tensor at a time (read in the base's dtype, the LoRA delta added in fp32, cast),
so memory stays near one shard; the saved dtype is the base checkpoint's unless asked otherwise, and the codec is
copied as it is.

``HiggsAudioV2ForConditionalGeneration.from_pretrained(DIR, use_text_head=True)`` then needs neither PEFT nor the
base model (without ``use_text_head`` transformers drops the text head, which generation does not use).
"""

from __future__ import annotations

import json
from pathlib import Path

from .config import ModelConfig
from .convert import CODEC_DIR, MODEL, save_processor, source_dir
from .loading import DTYPES, FLAG_NAMES, load_tokenizer, resolve_checkpoints
from .merge import MergePlan, check_disk, dtype_name, merge, plan_merge

MANIFEST = "higgs_accel_export.json"


def plan_export(base: str, adapter: str, out: str | Path, text_tokenizer: str | None = None,
                audio_tokenizer: str | None = None, dtype: str | None = None) -> tuple[MergePlan, ModelConfig]:
    """What the export will write and its peak memory, the disk checked, nothing written; and the resolved sources
    (an original-layout base converted, the text tokenizer defaulting to the resolved base). ``dtype`` None: the
    base checkpoint's."""
    sources, _ = resolve_checkpoints(ModelConfig(base=base, audio_tokenizer=audio_tokenizer or "",
                                                 text_tokenizer=text_tokenizer or ""),
                                     FLAG_NAMES.base, FLAG_NAMES.audio_tokenizer)
    # A hub id (transformers layout) stays an id after resolving: the merge reads files, so fetch its snapshot.
    codec = source_dir(sources.audio_tokenizer, MODEL, FLAG_NAMES.audio_tokenizer) if audio_tokenizer else None
    plan = plan_merge(source_dir(sources.base, MODEL, FLAG_NAMES.base), adapter, DTYPES[dtype] if dtype else None,
                      codec)
    check_disk(plan, out)
    return plan, sources


def export(plan: MergePlan, out: str | Path, text_tokenizer: str) -> Path:
    """Write the merged model, the text tokenizer and the plan's codec to ``out``; return ``out``."""
    out = Path(out)
    merge(plan, out, CODEC_DIR)
    tokenizer = load_tokenizer(text_tokenizer, FLAG_NAMES.text_tokenizer)
    tokenizer.save_pretrained(out)
    info = {"base": str(plan.base), "adapter": str(plan.adapter), "text_tokenizer": text_tokenizer,
            "audio_tokenizer": str(plan.codec) if plan.codec else None, "dtype": dtype_name(plan.dtype),
            "use_text_head": True, "processor": None}
    if plan.codec is not None:
        info["processor"] = save_processor(out, tokenizer, out / CODEC_DIR)
    (out / MANIFEST).write_text(json.dumps(info, indent=2) + "\n")
    return out


def export_tts3(base: str, adapter: str, out: str | Path, text_tokenizer: str | None = None,
                audio_tokenizer: str | None = None, dtype: str | None = None) -> Path:
    """The Higgs TTS 3 export: base + adapter merged (PEFT's ``merge_and_unload``, trained ``modules_to_save``
    included) and written in the released layout and key names (``tts3.HiggsTts3.save_pretrained``) with the codec
    bundled under the release's prefix and the text tokenizer beside it, which is what SGLang-Omni and vLLM-Omni
    load. ``dtype`` None: the base checkpoint's. The whole model is held in memory once (8 GB in bf16 for the 4B
    release); the bounded, tensor-by-tensor merge of ``merge.py`` is v2's alone so far."""
    from .loading import load_tts3_stack, with_adapter
    from .tts3 import HiggsTts3
    from .tts3 import load_codec as bundled_codec

    sources = ModelConfig(base=base, audio_tokenizer=audio_tokenizer or "", text_tokenizer=text_tokenizer or base)
    stack = load_tts3_stack(sources, weights=False, names=FLAG_NAMES)
    codec = stack.codec if stack.codec is not None else bundled_codec(stack.sources.base)
    model = HiggsTts3.from_pretrained(stack.sources.base, dtype=DTYPES[dtype] if dtype else None)
    merged = with_adapter(model, adapter).merge_and_unload()
    out = merged.save_pretrained(out, codec=codec)
    stack.tokenizer.save_pretrained(out)
    info = {"base": str(base), "adapter": str(adapter), "text_tokenizer": stack.sources.text_tokenizer,
            "audio_tokenizer": audio_tokenizer or f"{base} (bundled)", "dtype": dtype or "the base's",
            "layout": "released (Higgs TTS 3)", "use_text_head": None, "processor": None}
    (out / MANIFEST).write_text(json.dumps(info, indent=2) + "\n")
    return out
