"""Merge a LoRA adapter into its base model and save a standalone model dir: transformers' Higgs Audio v2 layout, or
for a Higgs TTS 3 base its released layout, which SGLang-Omni and vLLM-Omni serve.

Layout of a v2 export dir::

    DIR/                    HiggsAudioV2ForConditionalGeneration (config, safetensors, generation config) with the
                            adapter merged in and text_lm_head kept; the text tokenizer files next to it
    DIR/audio_tokenizer/    the HiggsAudioV2TokenizerModel codec, when one is known (--audio-tokenizer or the run's)
    DIR/processor_config.json     with the codec: ``AutoProcessor.from_pretrained(DIR)`` gives transformers'
                            HiggsAudioV2Processor (its codec path is absolute: re-export, or edit it, after a move)
    DIR/higgs_accel_export.json   where it came from

A Higgs TTS 3 export dir is the base's layout: its config and shards with the released key names, the codec bundled
in the weights under the release's prefix (the base's own bundle carried as it is, or the codec the run names
bundled in its place), the codec's config where ``audio_tokenizer_id`` names a dir inside the checkpoint, the text
tokenizer and the manifest.

The merge is ``merge.py``'s for both: one tensor at a time (read in the base's dtype, the LoRA delta added in fp32,
cast), so memory stays near one shard; the saved dtype is the base checkpoint's unless asked otherwise, and the
codec is copied as it is.

``HiggsAudioV2ForConditionalGeneration.from_pretrained(DIR, use_text_head=True)`` then needs neither PEFT nor the
base model (without ``use_text_head`` transformers drops the text head, which generation does not use).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .config import ModelConfig
from .convert import CODEC_DIR, MODEL, save_processor, source_dir
from .family import V2, V3
from .loading import DTYPES, FLAG_NAMES, load_tokenizer, load_tts3_stack, model_family, resolve_checkpoints
from .merge import KeyMap, MergePlan, check_disk, dtype_name, merge, plan_merge

MANIFEST = "higgs_accel_export.json"


@dataclass
class ExportPlan:
    """What ``export`` will write, known before anything is written (``plan_export``)."""
    merge: MergePlan
    sources: ModelConfig  # resolved: the text tokenizer defaults to the base
    family: str           # family.V2 or family.V3
    tokenizer: object     # the text tokenizer saved beside the model
    codec_dir: str        # where the plan's codec dir (or, bundled, its config) goes inside the export
    codec_config: object | None = None  # v3 with a codec bundled from elsewhere: its config, written at codec_dir

    def summary(self) -> str:
        return self.merge.summary()


def plan_export(base: str, adapter: str, out: str | Path, text_tokenizer: str | None = None,
                audio_tokenizer: str | None = None, dtype: str | None = None) -> ExportPlan:
    """What the export will write and its peak memory, the disk checked, nothing written; the sources resolved (an
    original-layout base converted, the text tokenizer defaulting to the resolved base). ``dtype`` None: the base
    checkpoint's."""
    out_dtype = DTYPES[dtype] if dtype else None
    if model_family(base, FLAG_NAMES.base) == V3:
        plan = _plan_tts3(base, adapter, text_tokenizer, audio_tokenizer, out_dtype)
    else:
        sources, _ = resolve_checkpoints(ModelConfig(base=base, audio_tokenizer=audio_tokenizer or "",
                                                     text_tokenizer=text_tokenizer or ""),
                                         FLAG_NAMES.base, FLAG_NAMES.audio_tokenizer)
        # A hub id (transformers layout) stays an id after resolving: the merge reads files, so fetch its snapshot.
        codec = source_dir(sources.audio_tokenizer, MODEL, FLAG_NAMES.audio_tokenizer) if audio_tokenizer else None
        merged = plan_merge(source_dir(sources.base, MODEL, FLAG_NAMES.base), adapter, out_dtype, codec)
        plan = ExportPlan(merged, sources, V2, load_tokenizer(sources.text_tokenizer, FLAG_NAMES.text_tokenizer),
                          CODEC_DIR)
    check_disk(plan.merge, out)
    return plan


def tts3_keys(config) -> KeyMap:
    """How the merge meets Higgs TTS 3's released layout: ``tts3.HiggsTts3``'s parameter names renamed to the
    release's, a head copy the release may store beside a tied embedding merged as that embedding is, the bundled
    codec carried as it is."""
    from .tts3 import AUDIO_EMBEDDING, AUDIO_HEAD, CODEC, TEXT_EMBEDDING, TEXT_HEAD, released_key

    tied = {}
    if config.tie_audio_head:
        tied[AUDIO_HEAD + "weight"] = AUDIO_EMBEDDING + "weight"
    if config.qwen3().tie_word_embeddings:
        tied[TEXT_HEAD + "weight"] = TEXT_EMBEDDING + "weight"
    return KeyMap(rename=released_key, tied=tied, carried=(CODEC,))


def _plan_tts3(base: str, adapter: str, text_tokenizer: str | None, audio_tokenizer: str | None,
               dtype) -> ExportPlan:
    """The base's own codec bundle is carried through; a codec named apart from the base (or, when the base bundles
    none, the one its ``audio_tokenizer_id`` names) is bundled in its place."""
    from .tts3 import CODEC, is_inside, load_codec, resolve_dir, weight_files

    root = resolve_dir(base)
    if audio_tokenizer and resolve_dir(audio_tokenizer).resolve() == root.resolve():
        audio_tokenizer = None  # the base's own bundle
    sources = ModelConfig(base=base, audio_tokenizer=audio_tokenizer or "", text_tokenizer=text_tokenizer or base)
    stack = load_tts3_stack(sources, weights=False, names=FLAG_NAMES)
    keys = tts3_keys(stack.config)
    codec = stack.codec
    if codec is None and not _has_prefix(weight_files(root), CODEC):
        codec = load_codec(root)
    inside = stack.config.audio_tokenizer_id if is_inside(stack.config.audio_tokenizer_id) else ""
    bundle = {CODEC + k: v for k, v in codec.state_dict().items()} if codec is not None else None
    copied = root / inside if inside and codec is None and (root / inside).is_dir() else None
    merged = plan_merge(root, adapter, dtype, copied, keys, bundle)
    return ExportPlan(merged, stack.sources, V3, stack.tokenizer, inside,
                      codec.config if codec is not None and inside else None)


def _has_prefix(files: list[Path], prefix: str) -> bool:
    from safetensors import safe_open

    for path in files:
        with safe_open(str(path), framework="pt") as f:
            if any(k.startswith(prefix) for k in f.keys()):
                return True
    return False


def export(plan: ExportPlan, out: str | Path) -> Path:
    """Write the merged model, the text tokenizer and the plan's codec to ``out``; return ``out``."""
    out = Path(out)
    merge(plan.merge, out, plan.codec_dir or None)
    if plan.codec_config is not None:
        plan.codec_config.save_pretrained(out / plan.codec_dir)
    plan.tokenizer.save_pretrained(out)
    m = plan.merge
    info = {"base": str(m.base), "adapter": str(m.adapter), "text_tokenizer": plan.sources.text_tokenizer,
            "audio_tokenizer": str(m.codec) if m.codec else None, "dtype": dtype_name(m.dtype),
            "use_text_head": True, "processor": None}
    if plan.family == V3:
        info.update(layout="released (Higgs TTS 3)", use_text_head=None,
                    audio_tokenizer=plan.sources.audio_tokenizer or f"{m.base} (bundled)")
    elif m.codec is not None:
        info["processor"] = save_processor(out, plan.tokenizer, out / CODEC_DIR)
    (out / MANIFEST).write_text(json.dumps(info, indent=2) + "\n")
    return out
