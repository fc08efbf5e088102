"""Loading transformers' own Higgs Audio v2 parts, one way for training, generation and export: the model with its
text head (and a PEFT adapter on top when given), the text tokenizer and the codec. A missing dir or a failed load
is one line naming the config key or flag it came from."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from .config import ConfigError, ModelConfig, check_model_ref

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def load_ref(name: str, what: str, ref: str, loader):
    """``loader(ref)``, with a missing dir or a failed load as one line naming ``name`` (a config key in quotes,
    or a command-line flag) and the first line of the reason."""
    check_model_ref(name, ref)
    try:
        return loader(ref)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"{name}: cannot load {what} from '{ref}': {first}") from None


def load_model(ref: str, adapter: str | None = None, dtype: str = "fp32", attn_implementation: str = "sdpa",
               name: str = "--base"):
    """HiggsAudioV2ForConditionalGeneration with its text head (so a text loss exists; never trust_remote_code),
    and the PEFT adapter at ``adapter`` on top (a PeftModel) when given."""
    from transformers import HiggsAudioV2ForConditionalGeneration

    model = load_ref(name, "HiggsAudioV2ForConditionalGeneration", ref,
                     lambda r: HiggsAudioV2ForConditionalGeneration.from_pretrained(
                         r, use_text_head=True, dtype=DTYPES[dtype], attn_implementation=attn_implementation))
    if adapter:
        from peft import PeftModel

        if not (Path(adapter) / "adapter_config.json").is_file():
            raise ConfigError(f"--adapter: {adapter} is not a PEFT adapter dir (no adapter_config.json)")
        model = PeftModel.from_pretrained(model, adapter)
    return model.eval()


def load_tokenizer(ref: str, name: str = "--base"):
    from transformers import AutoTokenizer

    return load_ref(name, "the text tokenizer", ref, AutoTokenizer.from_pretrained)


def load_codec_dir(ref: str, name: str = "--audio-tokenizer"):
    """The HiggsAudioV2TokenizerModel codec, frozen, in eval mode."""
    from transformers import HiggsAudioV2TokenizerModel

    codec = load_ref(name, "HiggsAudioV2TokenizerModel", ref, HiggsAudioV2TokenizerModel.from_pretrained)
    return codec.eval().requires_grad_(False)


def resolve_checkpoints(cfg: ModelConfig, base_name: str = "'model.base'",
                        codec_name: str = "'model.audio_tokenizer'") -> tuple[ModelConfig, dict]:
    """``cfg`` with the base model and codec references led to transformers-format dirs (an original-layout
    checkpoint is converted once into the cache: convert.py), the text tokenizer defaulting to the resolved base
    (a converted copy carries the pad token and chat template); and run_start's ``checkpoints`` record. Wrong
    things (a codec as the base, an unrelated model, an empty dir, an unreachable hub id) are refused here, before
    any model is built. With several processes, call it on the main process first: it may convert."""
    from .convert import resolve_base, resolve_codec

    found = {}
    if cfg.base:
        found["model.base"] = resolve_base(cfg.base, name=base_name)
    if cfg.audio_tokenizer:
        found["model.audio_tokenizer"] = resolve_codec(cfg.audio_tokenizer, name=codec_name)
    base = found["model.base"].path if cfg.base else ""
    codec = found["model.audio_tokenizer"].path if cfg.audio_tokenizer else ""
    own_tokenizer = cfg.text_tokenizer if cfg.text_tokenizer != cfg.base else ""  # the base's: the resolved one
    resolved = dataclasses.replace(cfg, base=base, audio_tokenizer=codec, text_tokenizer=own_tokenizer or base)
    return resolved, {key: r.event() for key, r in found.items()}


# ---------------------------------------------------------------- from the training config


def load_base_model(cfg: ModelConfig):
    return load_model(cfg.base, dtype=cfg.dtype, attn_implementation=cfg.attn_implementation, name="'model.base'")


def load_base_config(cfg: ModelConfig):
    """The base model's HiggsAudioV2Config alone (no weights): what ``higgs-accel prepare`` needs to screen samples
    the way training will (codebook count, ``max_position_embeddings``)."""
    from transformers import HiggsAudioV2Config

    return load_ref("'model.base'", "HiggsAudioV2Config", cfg.base, HiggsAudioV2Config.from_pretrained)


def load_text_tokenizer(cfg: ModelConfig):
    ref = cfg.text_tokenizer or cfg.base
    tok = load_tokenizer(ref, "'model.text_tokenizer'")
    if tok.pad_token_id is None:  # batches are padded with it
        raise ConfigError(f"'model.text_tokenizer': the tokenizer at '{ref}' has no pad token")
    return tok


def load_codec(cfg: ModelConfig):
    return load_codec_dir(cfg.audio_tokenizer, "'model.audio_tokenizer'")
