"""Loading transformers' own Higgs Audio v2 parts, one way for training, prepare, generation, evaluation and export:
``load_stack`` resolves the checkpoints (converting an original-layout one), then loads the text tokenizer, the codec
and the model with its text head (and a PEFT adapter on top when given), and builds the special ids. A missing dir
or a failed load is one line naming the config key or flag it came from."""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch

from .chat import SpecialIds
from .config import ConfigError, ModelConfig, check_model_ref, first_line
from .convert import read_config, resolve_base, resolve_codec
from .family import V2, V3, family_of

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def load_ref(name: str, what: str, ref: str, loader):
    """``loader(ref)``, with a missing dir or a failed load as one line naming ``name`` (a config key in quotes,
    or a command-line flag) and the first line of the reason."""
    check_model_ref(name, ref)
    try:
        return loader(ref)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{name}: cannot load {what} from '{ref}': {first_line(e) or type(e).__name__}") from None


def model_family(ref: str, name: str = "'model.base'") -> str:
    """``family.V3`` for a Higgs TTS 3 checkpoint (local dir or hub id), else ``family.V2``; a ref whose config
    cannot be read is V2's, whose loading then says why in one line."""
    try:
        return family_of(read_config(ref, name)) if ref else V2
    except ConfigError:
        return V2


def load_model(ref: str, adapter: str | None = None, dtype: str = "fp32", attn_implementation: str = "sdpa",
               name: str = "--base"):
    """HiggsAudioV2ForConditionalGeneration with its text head (so a text loss exists; never trust_remote_code),
    and the PEFT adapter at ``adapter`` on top (a PeftModel) when given."""
    from transformers import HiggsAudioV2ForConditionalGeneration

    model = load_ref(name, "HiggsAudioV2ForConditionalGeneration", ref,
                     lambda r: HiggsAudioV2ForConditionalGeneration.from_pretrained(
                         r, use_text_head=True, dtype=DTYPES[dtype], attn_implementation=attn_implementation))
    return with_adapter(model, adapter).eval()


def with_adapter(model, adapter: str | None):
    """``model`` with the PEFT adapter at ``adapter`` on top (a PeftModel); ``model`` itself when None."""
    if not adapter:
        return model
    from peft import PeftModel

    if not (Path(adapter) / "adapter_config.json").is_file():
        raise ConfigError(f"--adapter: {adapter} is not a PEFT adapter dir (no adapter_config.json)")
    return PeftModel.from_pretrained(model, adapter)


def load_tokenizer(ref: str, name: str = "--base", model_config=None):
    """``model_config``: the config the tokenizer belongs to, for a checkpoint whose own config.json transformers
    cannot read (Higgs TTS 3: its Qwen3 backbone's)."""
    from transformers import AutoTokenizer

    return load_ref(name, "the text tokenizer", ref, lambda r: AutoTokenizer.from_pretrained(r, config=model_config))


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


# ---------------------------------------------------------------- the whole stack


@dataclass(frozen=True)
class Names:
    """What a one-line error calls each source: config keys (training, prepare, evaluate) or flags."""

    base: str
    audio_tokenizer: str
    text_tokenizer: str


CONFIG_NAMES = Names("'model.base'", "'model.audio_tokenizer'", "'model.text_tokenizer'")
FLAG_NAMES = Names("--base", "--audio-tokenizer", "--base")


@dataclass
class ModelStack:
    """A model's parts, loaded from its sources."""

    sources: ModelConfig  # the references led to transformers-format dirs (``resolve_checkpoints``)
    checkpoints: dict  # run_start's record of them
    tokenizer: object  # the text tokenizer
    codec: object | None  # HiggsAudioV2TokenizerModel, frozen; None when the sources name none
    model: torch.nn.Module | None  # HiggsAudioV2ForConditionalGeneration (PeftModel with an adapter); None: config only
    config: object  # the model's HiggsAudioV2Config: codebook count, special ids, max_position_embeddings
    ids: SpecialIds


def load_stack(cfg: ModelConfig, adapter: str | None = None, *, weights: bool = True, names: Names = CONFIG_NAMES,
               pad_required: bool = False, device: torch.device | str | None = None, state=None,
               check=None) -> ModelStack:
    """Resolve the checkpoints ``cfg`` names, load the text tokenizer, the codec (when ``cfg`` names one) and the
    model in ``cfg.dtype`` with ``adapter`` on top (with ``weights`` off, its config alone), and build the special
    ids. ``pad_required``: the tokenizer must have a pad token (``load_text_tokenizer``). ``device``: where
    codec and model go. ``state`` (an Accelerator or PartialState): its main process resolves first, since
    resolving may convert into the shared cache. ``check(sources, config, tokenizer, codec)``: called before the
    weights load, so a stack that cannot work is refused before the long part."""
    if model_family(cfg.base, names.base) == V3:
        return load_tts3_stack(cfg, adapter, weights=weights, names=names, pad_required=pad_required, device=device,
                               check=check)
    with state.main_process_first() if state is not None else contextlib.nullcontext():
        sources, checkpoints = resolve_checkpoints(cfg, names.base, names.audio_tokenizer)
    tokenizer = load_text_tokenizer(sources, names.text_tokenizer, pad_required)
    codec = load_codec_dir(sources.audio_tokenizer, names.audio_tokenizer) if sources.audio_tokenizer else None
    from transformers import HiggsAudioV2Config

    config = load_ref(names.base, "HiggsAudioV2Config", sources.base, HiggsAudioV2Config.from_pretrained)
    if check is not None:
        check(sources, config, tokenizer, codec)
    model = None
    if weights:
        model = load_model(sources.base, adapter, sources.dtype, sources.attn_implementation, names.base)
        config = model.config
    if device is not None:
        codec = codec.to(device) if codec is not None else None
        model = model.to(device) if model is not None else None
    return ModelStack(sources, checkpoints, tokenizer, codec, model, config, SpecialIds.from_parts(tokenizer, config))


def load_tts3_stack(cfg: ModelConfig, adapter: str | None = None, *, weights: bool = True,
                    names: Names = CONFIG_NAMES, pad_required: bool = False,
                    device: torch.device | str | None = None, check=None) -> ModelStack:
    """``load_stack`` for a Higgs TTS 3 checkpoint (``family.V3``): the released layout is read as it is (no
    conversion); the codec is the one bundled in ``model.audio_tokenizer`` when that names a Higgs TTS 3 checkpoint
    (the base itself, usually), else a ``HiggsAudioV2TokenizerModel`` dir or hub id as for v2."""
    from .tts3 import HiggsTts3, Tts3Config, load_codec, resolve_dir
    from .tts3_prompt import Tts3Ids

    base = str(load_ref(names.base, "Higgs TTS 3", cfg.base, resolve_dir))
    own_tokenizer = cfg.text_tokenizer if cfg.text_tokenizer != cfg.base else ""
    sources = dataclasses.replace(cfg, base=base, text_tokenizer=own_tokenizer or base)
    checkpoints = {"model.base": {"source": cfg.base, "layout": "released", "path": base, "converted": None}}
    config = Tts3Config.from_file(Path(base) / "config.json")
    tokenizer = load_text_tokenizer(sources, names.text_tokenizer, pad_required, config.qwen3())
    codec = None
    if cfg.audio_tokenizer and model_family(cfg.audio_tokenizer, names.audio_tokenizer) == V3:
        codec = load_ref(names.audio_tokenizer, "the bundled codec", cfg.audio_tokenizer, load_codec)
        codec = codec.requires_grad_(False)
        checkpoints["model.audio_tokenizer"] = {"source": cfg.audio_tokenizer, "layout": "bundled",
                                                "path": str(resolve_dir(cfg.audio_tokenizer)), "converted": None}
    elif cfg.audio_tokenizer:  # a v2 codec of its own (converted if in the authors' layout)
        found = resolve_codec(cfg.audio_tokenizer, name=names.audio_tokenizer)
        checkpoints["model.audio_tokenizer"] = found.event()
        sources = dataclasses.replace(sources, audio_tokenizer=found.path)
        codec = load_codec_dir(found.path, names.audio_tokenizer)
    if check is not None:
        check(sources, config, tokenizer, codec)
    model = None
    if weights:
        model = load_ref(names.base, "Higgs TTS 3", base,
                         lambda r: HiggsTts3.from_pretrained(r, dtype=DTYPES[sources.dtype]))
        model = with_adapter(model, adapter).eval()
    if device is not None:
        codec = codec.to(device) if codec is not None else None
        model = model.to(device) if model is not None else None
    return ModelStack(sources, checkpoints, tokenizer, codec, model, config, Tts3Ids.from_parts(tokenizer, config))


def load_text_tokenizer(cfg: ModelConfig, name: str = CONFIG_NAMES.text_tokenizer, pad_required: bool = True,
                        model_config=None):
    """The text tokenizer ``cfg`` names (its base model's by default); ``pad_required``: it must have a pad token,
    since training pads batches with it. ``model_config``: as ``load_tokenizer`` takes it."""
    ref = cfg.text_tokenizer or cfg.base
    tokenizer = load_tokenizer(ref, name, model_config)
    if pad_required and tokenizer.pad_token_id is None:
        raise ConfigError(f"{name}: the tokenizer at '{ref}' has no pad token")
    return tokenizer


def load_codec(cfg: ModelConfig):
    """The codec a training config names (tests and benchmarks load it alone)."""
    return load_codec_dir(cfg.audio_tokenizer, CONFIG_NAMES.audio_tokenizer)


def load_base_model(cfg: ModelConfig):
    """The base model a training config names, without adapter (tests and benchmarks load it alone)."""
    return load_model(cfg.base, dtype=cfg.dtype, attn_implementation=cfg.attn_implementation, name=CONFIG_NAMES.base)
