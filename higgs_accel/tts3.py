"""Higgs TTS 3 (``model_type: higgs_multimodal_qwen3``) as a thin module on transformers' own ``Qwen3Model``.

transformers has no class for it, so this module adds only what the release has beyond a Qwen3 backbone: one
fused audio embedding of ``num_codebooks x codebook_size`` rows whose per-codebook lookups are summed, and the
fused audio head reading the same rows (tied, unless the config says otherwise). Checkpoints are read and written
in the released layout and key names (``body.``, ``tied.embedding.text_embedding.``,
``tied.embedding.modality_embeddings.0.embedding.``, the codec bundled under ``...modality_embeddings.0.model.``),
which is what SGLang-Omni and vLLM-Omni load. Sources and open points: docs/tts3.md.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .config import ConfigError, first_line

MODEL_TYPE = "higgs_multimodal_qwen3"
ARCHITECTURE = "HiggsMultimodalQwen3ForConditionalGeneration"
DEFAULT_CODEC = "bosonai/higgs-audio-v2-tokenizer"
# The release ships ``rope_theta: null``; Qwen3 is trained at 1e6 and transformers' fallback (1e4) would be wrong.
QWEN3_ROPE_THETA = 1_000_000.0
# Stream BOS/EOS inside each codebook's vocabulary: the codec's 1024 codes, then these two (both runtimes fix them).
STREAM_BOS, STREAM_EOS = 1024, 1025

TEXT_EMBEDDING = "tied.embedding.text_embedding."
BODY = "body."
AUDIO_EMBEDDING = "tied.embedding.modality_embeddings.0.embedding."
AUDIO_HEAD = "tied.head.modality_heads.0."
TEXT_HEAD = "tied.head.text_head."
CODEC = "tied.embedding.modality_embeddings.0.model."
# This module's parameter prefixes -> the release's (the text embedding before the rest of the backbone).
RENAMES = (("backbone.embed_tokens.", TEXT_EMBEDDING), ("backbone.", BODY), ("audio_embedding.", AUDIO_EMBEDDING),
           ("audio_head.", AUDIO_HEAD), ("text_head.", TEXT_HEAD))
WEIGHTS = "model.safetensors"
# The backbone fields a Tts3Config reads through from its text_config.
BACKBONE_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                   "num_key_value_heads", "head_dim", "vocab_size", "max_position_embeddings", "tie_word_embeddings")
WEIGHTS_INDEX = "model.safetensors.index.json"
# The release's backbone (``bosonai/higgs-tts-3-4b``'s text_config): Qwen3-4B's widths, rope_theta null as shipped.
RELEASE_TEXT_CONFIG = dict(model_type="qwen3", hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                           num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=151936,
                           max_position_embeddings=40960, rms_norm_eps=1e-6, rope_theta=None, tie_word_embeddings=True)


@dataclasses.dataclass
class Tts3Config:
    """The released ``config.json``, kept as read (so saving writes it back unchanged) plus the fields this module
    uses, validated when read."""

    text_config: dict
    """The Qwen3 backbone's config as the file has it (``rope_theta`` may be null: read as 1e6)."""
    audio_encoder_config: dict
    """``encoder_type`` "discrete", ``num_codebooks``, ``vocab_size`` (codec codes + stream BOS/EOS), ``out_dim``,
    ``tie_word_embeddings`` (audio head tied to the fused embedding), ``use_delay_pattern``."""
    audio_token_id: int = -100
    """The id that marks audio slots in ``input_ids``: their embedding is the fused audio embedding of that row."""
    extra: dict = dataclasses.field(default_factory=dict)
    """Every other top-level field of the file (``audio_tokenizer_id``, ``architectures``, ...), written back as is."""

    @classmethod
    def from_dict(cls, raw: dict, where: str = "config.json") -> Tts3Config:
        """Validate up front: anything this module cannot represent is one line naming ``where`` and the field."""
        def bad(field: str, why: str) -> ConfigError:
            return ConfigError(f"{where}: '{field}' {why}")

        if raw.get("model_type") != MODEL_TYPE:
            raise bad("model_type", f"is {raw.get('model_type')!r}, not {MODEL_TYPE!r} (Higgs TTS 3)")
        text, audio = raw.get("text_config"), raw.get("audio_encoder_config")
        if not isinstance(text, dict):
            raise bad("text_config", "is missing or not an object")
        if not isinstance(audio, dict):
            raise bad("audio_encoder_config", "is missing or not an object")
        if text.get("model_type", "qwen3") != "qwen3":
            raise bad("text_config.model_type", f"is {text.get('model_type')!r}: only a Qwen3 backbone is supported")
        if audio.get("encoder_type", "discrete") != "discrete":
            raise bad("audio_encoder_config.encoder_type",
                      f"is {audio.get('encoder_type')!r}: only the discrete (TTS) audio path is supported")
        for key in ("num_codebooks", "vocab_size"):
            if not isinstance(audio.get(key), int) or isinstance(audio.get(key), bool) or audio[key] <= 0:
                raise bad(f"audio_encoder_config.{key}", f"must be a positive integer, got {audio.get(key)!r}")
        if audio["vocab_size"] <= STREAM_EOS:
            raise bad("audio_encoder_config.vocab_size",
                      f"is {audio['vocab_size']}: the stream BOS/EOS ids {STREAM_BOS}/{STREAM_EOS} must fit in it")
        if audio.get("use_delay_pattern", True) is not True:
            raise bad("audio_encoder_config.use_delay_pattern", "is not true: only the delay-pattern layout is known")
        hidden = text.get("hidden_size")
        if audio.get("out_dim", hidden) != hidden:
            raise bad("audio_encoder_config.out_dim", f"is {audio.get('out_dim')}, not the hidden_size {hidden}")
        token = raw.get("audio_token_id", -100)
        if not isinstance(token, int) or isinstance(token, bool):
            raise bad("audio_token_id", f"must be an integer, got {token!r}")
        extra = {k: v for k, v in raw.items() if k not in ("text_config", "audio_encoder_config", "audio_token_id")}
        cfg = cls(text_config=dict(text), audio_encoder_config=dict(audio), audio_token_id=token, extra=extra)
        try:
            cfg.qwen3()
        except (TypeError, ValueError) as e:
            raise bad("text_config", f"is not a valid Qwen3 config: {first_line(e)}") from None
        return cfg

    @classmethod
    def from_file(cls, path: str | Path) -> Tts3Config:
        try:
            raw = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"{path}: cannot read the model config: {e}") from None
        return cls.from_dict(raw, str(path))

    def to_dict(self) -> dict:
        return {**self.extra, "text_config": self.text_config, "audio_encoder_config": self.audio_encoder_config,
                "audio_token_id": self.audio_token_id}

    def __getattr__(self, name: str):
        """The backbone's widths (``hidden_size``, ``num_hidden_layers``, ...) read through from ``text_config``,
        so code that sizes a model from its config (``memory``, the data's position limit) reads either family."""
        text = self.__dict__.get("text_config")
        if name in BACKBONE_FIELDS and text is not None:
            return text.get(name) if name != "head_dim" else text.get(name) or (
                text["hidden_size"] // text["num_attention_heads"])
        raise AttributeError(f"'{type(self).__name__}' object has no attribute '{name}'")

    @property
    def num_codebooks(self) -> int:
        return self.audio_encoder_config["num_codebooks"]

    @property
    def codebook_size(self) -> int:
        return self.audio_encoder_config["vocab_size"]

    @property
    def stream_bos(self) -> int:
        return STREAM_BOS

    @property
    def stream_eos(self) -> int:
        return STREAM_EOS

    @property
    def tie_audio_head(self) -> bool:
        return bool(self.audio_encoder_config.get("tie_word_embeddings", True))

    @property
    def audio_tokenizer_id(self) -> str:
        return self.extra.get("audio_tokenizer_id", DEFAULT_CODEC)

    def qwen3(self):
        """The backbone's ``Qwen3Config``, with a null ``rope_theta`` read as Qwen3's 1e6."""
        from transformers import Qwen3Config

        text = {k: v for k, v in self.text_config.items() if k != "model_type"}
        rope = dict(text.get("rope_parameters") or {})
        if text.get("rope_theta") is None and rope.get("rope_theta") is None:
            text["rope_theta"] = QWEN3_ROPE_THETA
            if rope:
                text["rope_parameters"] = {**rope, "rope_theta": QWEN3_ROPE_THETA}
        return Qwen3Config(**text)


def build_config(text_config: dict, **fields) -> Tts3Config:
    """A config in the release's form around ``text_config``: 8 codebooks of the codec's 1024 codes plus stream
    BOS/EOS in one fused audio embedding tied to its head, the delay pattern; ``fields``: other top-level fields
    (``audio_tokenizer_id``, ...)."""
    audio = dict(encoder_type="discrete", num_codebooks=8, vocab_size=STREAM_EOS + 1,
                 out_dim=text_config["hidden_size"], tie_word_embeddings=True, use_delay_pattern=True)
    return Tts3Config.from_dict(dict(model_type=MODEL_TYPE, architectures=[ARCHITECTURE], text_config=text_config,
                                     audio_encoder_config=audio, audio_token_id=-100, **fields))


@dataclasses.dataclass
class Tts3Output:
    hidden_states: torch.Tensor
    """(batch, positions, hidden) after the backbone's final norm."""
    audio_logits: torch.Tensor
    """(batch, positions, num_codebooks, codebook_size): position p predicts the audio row at p + 1."""
    text_logits: torch.Tensor | None = None
    """(batch, positions, vocab), only when asked for (the TTS layout has no text target; see docs/tts3.md)."""


class HiggsTts3(nn.Module):
    """Qwen3 backbone + fused audio embedding and head. Parameter names: ``backbone.*`` (transformers'
    ``Qwen3Model``, so PEFT finds ``q/k/v/o_proj`` and ``gate/up/down_proj``), ``audio_embedding.weight``,
    ``audio_head.weight`` (only when untied), ``text_head.weight`` (only when the text head is untied)."""

    def __init__(self, config: Tts3Config):
        super().__init__()
        from transformers import Qwen3Model

        self.config = config
        qwen3 = config.qwen3()
        self.backbone = Qwen3Model(qwen3)
        rows, hidden = config.num_codebooks * config.codebook_size, qwen3.hidden_size
        self.audio_embedding = nn.Embedding(rows, hidden)
        self.audio_head = None if config.tie_audio_head else nn.Linear(hidden, rows, bias=False)
        self.text_head = None if qwen3.tie_word_embeddings else nn.Linear(hidden, qwen3.vocab_size, bias=False)
        self.register_buffer("codebook_offsets", torch.arange(config.num_codebooks) * config.codebook_size,
                             persistent=False)

    def embed_audio(self, codes: torch.Tensor) -> torch.Tensor:
        """(..., num_codebooks) codes -> (..., hidden): each codebook looks up its own block of rows; summed."""
        return self.audio_embedding(codes + self.codebook_offsets).sum(-2)

    def audio_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., hidden) -> (..., num_codebooks, codebook_size), one linear map over the fused rows."""
        weight = self.audio_embedding.weight if self.audio_head is None else self.audio_head.weight
        return F.linear(hidden, weight).unflatten(-1, (self.config.num_codebooks, self.config.codebook_size))

    def text_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        weight = self.backbone.embed_tokens.weight if self.text_head is None else self.text_head.weight
        return F.linear(hidden, weight)

    def embed(self, input_ids: torch.Tensor, audio_input_ids: torch.Tensor | None = None,
              audio_input_ids_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Text embeddings, with the audio slots (``audio_token_id``) of each sample taking, in order, the fused
        embeddings of its rows of ``audio_input_ids`` ((batch, rows, num_codebooks), padded rows False in
        ``audio_input_ids_mask``), as the runtime pastes them over its placeholders."""
        slots = input_ids == self.config.audio_token_id
        embeds = self.backbone.embed_tokens(input_ids.masked_fill(slots, 0))
        if audio_input_ids is None:
            if slots.any():
                raise ValueError("input_ids has audio slots but no audio_input_ids were given")
            return embeds
        rows = audio_input_ids if audio_input_ids_mask is None else audio_input_ids[audio_input_ids_mask]
        rows = rows.reshape(-1, self.config.num_codebooks)
        if len(rows) != int(slots.sum()):
            raise ValueError(f"{int(slots.sum())} audio slots in input_ids but {len(rows)} audio rows")
        return embeds.masked_scatter(slots.unsqueeze(-1), self.embed_audio(rows).to(embeds.dtype))

    def hidden_states(self, input_ids: torch.Tensor, audio_input_ids: torch.Tensor | None = None,
                      audio_input_ids_mask: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                      position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """(batch, positions, hidden) after the backbone's final norm, no logits (the loss maps only the
        positions that have targets)."""
        embeds = self.embed(input_ids, audio_input_ids, audio_input_ids_mask)
        return self.backbone(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids,
                             use_cache=False).last_hidden_state

    def forward(self, input_ids: torch.Tensor, audio_input_ids: torch.Tensor | None = None,
                audio_input_ids_mask: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, with_text_logits: bool = False) -> Tts3Output:
        hidden = self.hidden_states(input_ids, audio_input_ids, audio_input_ids_mask, attention_mask, position_ids)
        return Tts3Output(hidden, self.audio_logits(hidden), self.text_logits(hidden) if with_text_logits else None)

    def gradient_checkpointing_enable(self, **kwargs) -> None:
        """Recompute the backbone's layers in backward (transformers' own checkpointing of ``Qwen3Model``)."""
        self.backbone.gradient_checkpointing_enable(**kwargs)

    # ------------------------------------------------------------ the released layout

    def released_state_dict(self) -> dict[str, torch.Tensor]:
        """This module's weights under the release's key names."""
        return {released_key(name): tensor for name, tensor in self.state_dict().items()}

    def own_name(self, key: str) -> str | None:
        """A released key -> this module's parameter name; None for keys the runtimes drop too (the codec bundle,
        a head copy of a tied weight)."""
        if key.startswith(CODEC):
            return None
        for own, released in RENAMES:
            if key.startswith(released):
                name = own + key.removeprefix(released)
                tied = (own == "audio_head." and self.audio_head is None) or (own == "text_head." and
                                                                               self.text_head is None)
                return None if tied else name
        raise ConfigError(f"checkpoint weight '{key}' is not part of the Higgs TTS 3 discrete (TTS) path; "
                          "this module cannot represent it")

    @classmethod
    def from_pretrained(cls, source: str | Path, dtype: torch.dtype | None = None) -> HiggsTts3:
        """Load a checkpoint in the released layout from a local dir or a hub id. Weights keep their stored dtype
        unless ``dtype`` is given. Built on the meta device, so the full-size model is never initialised twice."""
        from safetensors import safe_open

        root = resolve_dir(source)
        config = Tts3Config.from_file(root / "config.json")
        with torch.device("meta"):
            model = cls(config)
        params = dict(model.state_dict())
        state = {}
        for path in weight_files(root):
            with safe_open(path, framework="pt") as f:
                for key in f.keys():
                    try:
                        name = model.own_name(key)
                    except ConfigError as e:
                        raise ConfigError(f"{path}: {e}") from None
                    if name is None:
                        continue
                    if name not in params:
                        raise ConfigError(f"{path}: weight '{key}' has no place in the model built from its config")
                    tensor = f.get_tensor(key)
                    if tensor.shape != params[name].shape:
                        raise ConfigError(f"{path}: weight '{key}' has shape {tuple(tensor.shape)}, the config "
                                          f"gives {tuple(params[name].shape)}")
                    state[name] = tensor if dtype is None else tensor.to(dtype)
        missing = sorted(set(params) - set(state))
        if missing:
            raise ConfigError(f"{root}: checkpoint lacks {len(missing)} weight(s) of the model, first "
                              f"'{released_key(missing[0])}'")
        model.load_state_dict(state, strict=True, assign=True)
        # Non-persistent buffers were made on the meta device: make them again for real.
        from transformers.models.qwen3.modeling_qwen3 import Qwen3RotaryEmbedding

        model.backbone.rotary_emb = Qwen3RotaryEmbedding(model.backbone.config)
        model.codebook_offsets = torch.arange(config.num_codebooks) * config.codebook_size
        return model.eval()

    def save_pretrained(self, out_dir: str | Path, codec=None, max_shard_size: int | str = "5GB") -> Path:
        """Write ``config.json`` and the weights in the released layout (``model.safetensors``, or shards of at most
        ``max_shard_size`` with ``model.safetensors.index.json``, as the hub's ``save_torch_state_dict`` names
        them); with ``codec`` (a ``HiggsAudioV2TokenizerModel``) its weights are bundled under the release's codec
        prefix (and its config written where ``audio_tokenizer_id`` names a dir inside the checkpoint)."""
        from huggingface_hub import save_torch_state_dict

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach() for k, v in self.released_state_dict().items()}
        if codec is not None:
            state.update({CODEC + k: v.detach() for k, v in codec.state_dict().items()})
        save_torch_state_dict(state, out, max_shard_size=max_shard_size, metadata={"format": "pt"})
        if codec is not None and is_inside(self.config.audio_tokenizer_id):
            codec.config.save_pretrained(out / self.config.audio_tokenizer_id)
        (out / "config.json").write_text(json.dumps(self.config.to_dict(), indent=2) + "\n")
        return out


def released_key(name: str) -> str:
    own, released = next((o, r) for o, r in RENAMES if name.startswith(o))
    return released + name.removeprefix(own)


def resolve_dir(source: str | Path) -> Path:
    """A local dir as is; anything else is a hub id, fetched (or found in the local cache)."""
    if Path(source).is_dir():
        return Path(source)
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(source)))
    except Exception as e:  # the hub client raises many types; all mean "cannot get it"
        raise ConfigError(f"cannot load Higgs TTS 3 from '{source}': not a local dir and not fetchable "
                          f"({type(e).__name__})") from None


def is_inside(audio_tokenizer_id: str) -> bool:
    """A hub id is "owner/name"; a bare name is a dir inside the checkpoint (the tiny model's convention)."""
    return "/" not in audio_tokenizer_id


def weight_files(root: Path) -> list[Path]:
    index = root / WEIGHTS_INDEX
    if index.is_file():
        return [root / name for name in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    if (root / WEIGHTS).is_file():
        return [root / WEIGHTS]
    raise ConfigError(f"{root}: no {WEIGHTS} or {WEIGHTS_INDEX}")


def load_codec(source: str | Path):
    """The codec of a Higgs TTS 3 checkpoint: a ``HiggsAudioV2TokenizerModel`` whose config comes from the
    checkpoint's ``audio_tokenizer_id`` (a hub id, or a bare name: a dir inside the checkpoint) and whose weights
    come from the bundle under the codec prefix when the checkpoint has one, else from ``audio_tokenizer_id``."""
    from safetensors import safe_open
    from transformers import HiggsAudioV2TokenizerConfig, HiggsAudioV2TokenizerModel

    root = resolve_dir(source)
    ref = Tts3Config.from_file(root / "config.json").audio_tokenizer_id
    ref = str(root / ref) if is_inside(ref) else ref
    state = {}
    for path in weight_files(root):
        with safe_open(path, framework="pt") as f:
            state.update({k.removeprefix(CODEC): f.get_tensor(k) for k in f.keys() if k.startswith(CODEC)})
    try:
        if not state:
            return HiggsAudioV2TokenizerModel.from_pretrained(ref).eval()
        codec = HiggsAudioV2TokenizerModel(HiggsAudioV2TokenizerConfig.from_pretrained(ref))
    except OSError as e:
        raise ConfigError(f"{root}: cannot load the codec from audio_tokenizer_id '{ref}': "
                          f"{first_line(e)}") from None
    result = codec.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        names = result.missing_keys + result.unexpected_keys
        raise ConfigError(f"{root}: the bundled codec does not match HiggsAudioV2TokenizerModel "
                          f"({len(result.missing_keys)} missing, {len(result.unexpected_keys)} unexpected, "
                          f"first '{names[0]}')")
    return codec.eval()

