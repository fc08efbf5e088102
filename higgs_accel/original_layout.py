"""The authors' original layout (boson-ai/higgs-audio) of the Higgs Audio v2 model and audio tokenizer, converted
to transformers' (``HiggsAudioV2ForConditionalGeneration``, ``HiggsAudioV2TokenizerModel``).

The key maps and the weight-norm merge follow transformers' conversion scripts (``convert_higgs_audio_v2_to_hf.py``,
``convert_higgs_audio_v2_tokenizer_to_hf.py``, in its source tree, not in the wheel); the model config is read
from the source rather than assumed, and sizes the authors' code hard-codes are read off the weights. Each
conversion checks that the weights fill transformers' model exactly before anything is written.
"""

from __future__ import annotations

import json
import math
import pickle
import re
from pathlib import Path

import torch

from .chat import AUDIO_PLACEHOLDER
from .config import ConfigError

VERSION = "1"  # of the conversion: part of the cache key, so a changed conversion never reuses an old copy

# The Higgs chat layout of transformers' processor (and of chat.chat_prompt): a system turn, an optional scene in
# it, then user / assistant turns, where an assistant turn (and an audio item elsewhere) is an audio placeholder.
CHAT_TEMPLATE = (
    "{%- macro text(content) -%}"
    "{%- if content is string -%}{{- content | trim -}}"
    "{%- else -%}{%- for item in content -%}"
    "{%- if item['type'] == 'text' -%}{{- item['text'] | trim -}}"
    "{%- elif item['type'] == 'audio' -%}{{- '<|audio_out_bos|><|AUDIO_OUT|><|audio_eos|>' -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- endmacro -%}"
    "{%- if messages[0]['role'] != 'system' -%}{{- raise_exception('The first message must be the system turn') -}}"
    "{%- endif -%}"
    "{{- bos_token + '<|start_header_id|>system<|end_header_id|>\\n\\n' + text(messages[0]['content']) -}}"
    "{%- set rest = messages[1:] -%}"
    "{%- if rest and rest[0]['role'] == 'scene' -%}"
    "{{- '\\n\\n<|scene_desc_start|>\\n' + text(rest[0]['content']) + '\\n<|scene_desc_end|>' -}}"
    "{%- set rest = rest[1:] -%}"
    "{%- endif -%}"
    "{{- '<|eot_id|>' -}}"
    "{%- for message in rest -%}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' -}}"
    "{%- if message['role'] == 'assistant' -%}{{- '<|audio_out_bos|><|AUDIO_OUT|><|audio_eos|>' -}}"
    "{%- else -%}{{- text(message['content']) -}}{%- endif -%}"
    "{{- '<|eot_id|>' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n<|audio_out_bos|>' -}}"
    "{%- endif -%}"
)


# ---------------------------------------------------------------- reading weights without running code


def read_tensors(path: Path, name: str) -> dict[str, torch.Tensor]:
    """The tensors of a .safetensors file, or of a torch pickle (.pth/.bin) loaded with ``weights_only=True``: a
    file that holds anything but tensors and plain containers is refused before any of it runs."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0]
        raise ConfigError(f"{name}: {path} holds more than tensors ({first[:200]}); refused: a checkpoint file must "
                          "never run code") from None
    except (RuntimeError, EOFError, OSError) as e:
        raise ConfigError(f"{name}: {path} is not a readable torch checkpoint ({e})") from None
    if not (isinstance(state, dict) and all(isinstance(v, torch.Tensor) for v in state.values())):
        raise ConfigError(f"{name}: {path} is not a flat state dict of tensors")
    return state


def check_keys(name: str, got: dict, expected: dict, what: str) -> None:
    """``got`` must hold exactly the tensors ``expected`` (name -> tensor or shape) has, in the same shapes."""
    missing, extra = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
    bad = [k for k in expected if k in got and tuple(got[k].shape) != tuple(expected[k].shape)]
    if missing or extra or bad:
        parts = [f"{label} {len(keys)} ({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''})"
                 for label, keys in (("missing", missing), ("unexpected", extra), ("of another shape", bad)) if keys]
        raise ConfigError(f"{name}: the weights do not fit transformers' {what}: {'; '.join(parts)}")


# ---------------------------------------------------------------- the model

# Architecture options of the authors' HiggsAudioConfig that transformers' model has no counterpart for, with the
# value it implies; a checkpoint that sets another value cannot be converted without changing what it computes.
FIXED_OPTIONS = {"audio_decoder_proj_num_layers": 0, "use_audio_out_self_attention": False,
                 "use_audio_out_embed_projector": False, "audio_embed_avg": False, "use_delay_pattern": True,
                 "use_rq_transformer": False}
DROPPED_SUFFIXES = ("rotary_emb.inv_freq", "rotary_emb.original_inv_freq", "audio_codebook_weights")
# The Whisper tower reads <|AUDIO|> features for audio understanding; transformers' model generates only.
DROPPED_PREFIXES = ("audio_tower.", "audio_encoder_proj.")
MODEL_KEY_MAP = ((r"^audio_codebook_embeddings\.", "model.embed_audio_tokens.embed_audio_tokens."),
                 (r"^(embed_tokens|layers|norm)\.", r"model.\1."),
                 (r"^audio_decoder_proj\.", ""))
SPLIT_HALVES = (("embedding_frozen", "embedding_trainable"), ("linear_frozen", "linear_trainable"))


def check_original_model_config(config: dict, name: str) -> dict:
    """The authors' config, checked for what transformers' model can represent; returns its text_config."""
    text = config.get("text_config")
    if not isinstance(text, dict):
        raise ConfigError(f"{name}: the original config has no text_config")
    n_layers = text.get("num_hidden_layers")
    adapter = config.get("audio_adapter_type")
    if adapter not in ("dual_ffn", "dual_ffn_fast_forward") or sorted(config.get("audio_dual_ffn_layers") or []) != \
            list(range(n_layers or 0)):
        raise ConfigError(f"{name}: audio_adapter_type '{adapter}' with audio_dual_ffn_layers "
                          f"{config.get('audio_dual_ffn_layers')} cannot be converted: transformers' Higgs Audio v2 "
                          f"has the dual FFN in every one of the {n_layers} layers")
    for key, value in FIXED_OPTIONS.items():
        if key in config and bool(config[key]) != bool(value):
            raise ConfigError(f"{name}: {key}={config[key]!r} cannot be converted: transformers' Higgs Audio v2 "
                              f"implies {value!r}")
    return text


def _token_id(tokenizer, token: str, name: str) -> int:
    tid = tokenizer.convert_tokens_to_ids(token)
    if tid is None or tid == tokenizer.unk_token_id:
        raise ConfigError(f"{name}: the text tokenizer has no {token} token")
    return tid


def model_config_from_original(config: dict, tokenizer, name: str, dtype: torch.dtype):
    """transformers' HiggsAudioV2Config for the authors' config; special-token ids come from the tokenizer."""
    from transformers import HiggsAudioV2Config

    text = check_original_model_config(config, name)
    # The delay-pattern filler is transformers' (the authors' config names none); a turn ends with <|eot_id|>,
    # which is where generation stops.
    tokens = {"audio_token_id": config.get("audio_out_token", AUDIO_PLACEHOLDER),
              "audio_bos_token_id": config.get("audio_out_bos_token", "<|audio_out_bos|>"),
              "audio_delay_token_id": "<|reserved_special_token_6|>",
              "bos_token_id": "<|begin_of_text|>",
              "eos_token_id": "<|eot_id|>"}
    ids = {key: _token_id(tokenizer, token, name) for key, token in tokens.items()}
    if "audio_out_token_idx" in config and config["audio_out_token_idx"] != ids["audio_token_id"]:
        raise ConfigError(f"{name}: audio_out_token_idx {config['audio_out_token_idx']} is not the tokenizer's "
                          f"<|AUDIO_OUT|> ({ids['audio_token_id']})")
    scaling = dict(text.get("rope_scaling") or {})
    rope = {"rope_type": scaling.pop("rope_type", scaling.pop("type", "default")), **scaling,
            "rope_theta": text.get("rope_theta", 10000.0)}
    sizes = {key: text[key] for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                        "num_attention_heads") if key in text}
    optional = {key: text[key] for key in ("num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings",
                                           "rms_norm_eps", "attention_bias", "mlp_bias", "attention_dropout")
                if text.get(key) is not None}
    codebook_size = config.get("audio_codebook_size", 1024) + 2  # + stream BOS and EOS
    return HiggsAudioV2Config(
        **sizes, **optional, rope_parameters=rope, tie_word_embeddings=False,
        num_codebooks=config.get("audio_num_codebooks", 8), codebook_size=codebook_size,
        audio_stream_bos_id=config.get("audio_stream_bos_id", codebook_size - 2),
        audio_stream_eos_id=config.get("audio_stream_eos_id", codebook_size - 1),
        pad_token_id=tokenizer.pad_token_id, dtype=dtype, **ids)


def merge_split_halves(state: dict, name: str) -> dict:
    """The authors' partially frozen embedding and heads (``X.embedding_frozen`` + ``X.embedding_trainable``,
    ``X.linear_frozen`` + ``X.linear_trainable``) as the one ``X.weight`` they split: rows frozen, then trainable."""
    out = dict(state)
    for frozen, trainable in SPLIT_HALVES:
        for key in [k for k in state if k.endswith(f".{frozen}.weight")]:
            base = key[: -len(f".{frozen}.weight")]
            other = f"{base}.{trainable}.weight"
            if other not in state:
                raise ConfigError(f"{name}: {key} has no {other} to join")
            out[f"{base}.weight"] = torch.cat([out.pop(key), out.pop(other)], dim=0)
    return out


def model_weights_from_original(state: dict, name: str) -> tuple[dict, list[str]]:
    """The authors' weights under transformers' names; the dropped keys (not weights, or not modelled)."""
    state = merge_split_halves(state, name)
    out, dropped = {}, []
    for key, tensor in state.items():
        if key.endswith(DROPPED_SUFFIXES) or key.startswith(DROPPED_PREFIXES):
            dropped.append(key)
            continue
        for pattern, replacement in MODEL_KEY_MAP:
            key = re.sub(pattern, replacement, key)
        out[key] = tensor
    return out, dropped


def _model_files(src: Path, name: str) -> list[Path]:
    files = sorted(src.glob("*.safetensors")) or sorted(src.glob("pytorch_model*.bin"))
    if not files:
        raise ConfigError(f"{name}: {src} has no weights (*.safetensors or pytorch_model*.bin)")
    return files


def prepare_tokenizer(src: Path, name: str):
    """The source's text tokenizer with what the authors' lacks: a pad token (<|end_of_text|>) and the Higgs chat
    template."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(src)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{name}: cannot load the text tokenizer from {src}: {str(e).splitlines()[0]}") from None
    if tokenizer.pad_token_id is None:
        _token_id(tokenizer, "<|end_of_text|>", name)
        tokenizer.pad_token = "<|end_of_text|>"
    if not tokenizer.chat_template:
        tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def convert_model(src: Path, out: Path, name: str) -> list[str]:
    """Write ``src`` (original layout) to ``out`` as a complete transformers checkpoint: the model with its text
    head, the text tokenizer and the generation config. Returns the source keys left out."""
    from transformers import GenerationConfig, HiggsAudioV2ForConditionalGeneration

    config = json.loads((src / "config.json").read_text())
    check_original_model_config(config, name)
    tokenizer = prepare_tokenizer(src, name)
    state = {}
    for path in _model_files(src, name):
        state.update(read_tensors(path, name))
    weights, dropped = model_weights_from_original(state, name)
    del state
    dtype = next(iter(weights.values())).dtype
    hf_config = model_config_from_original(config, tokenizer, name, dtype)
    with torch.device("meta"):
        model = HiggsAudioV2ForConditionalGeneration(hf_config, use_text_head=True)
    check_keys(name, weights, model.state_dict(), "HiggsAudioV2ForConditionalGeneration")
    model.load_state_dict(weights, strict=True, assign=True)
    # transformers' conversion of the released checkpoint sets these; the ids are this tokenizer's.
    model.generation_config = GenerationConfig(
        bos_token_id=hf_config.bos_token_id, eos_token_id=hf_config.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, ras_win_len=7, ras_win_max_num_repeat=2, use_text_head=True)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return sorted(dropped)


# ---------------------------------------------------------------- the codec

WN_PAIRS = ((".weight_g", ".weight_v"), (".parametrizations.weight.original0", ".parametrizations.weight.original1"))
RES_LAYERS = ("snake1", "conv1", "snake2", "conv2")  # the four modules of a DAC residual unit, in order
SEMANTIC_TEACHERS = ("hubert_base", "hubert_base_general")


def _acoustic_key(key: str, n_blocks: int) -> str | None:
    """transformers' name of a DAC encoder / decoder key of the authors' codec (their nn.Sequential indices)."""
    m = re.match(r"(encoder\.block|decoder_2\.model)\.(\d+)\.(.*)", key)
    if not m:
        return None
    side, i, rest = ("acoustic_encoder" if m[1] == "encoder.block" else "acoustic_decoder"), int(m[2]), m[3]
    ends = {0: "conv1", n_blocks + 1: "snake1", n_blocks + 2: "conv2"}  # around the blocks
    if i in ends:
        return f"{side}.{ends[i]}.{rest}"
    # Encoder block: three residual units, then snake + strided conv. Decoder block: snake + transposed conv, then
    # three residual units. A residual unit is snake, conv, snake, conv.
    units, first_unit, head = ("012", 0, {"3": "snake1", "4": "conv1"}) if side == "acoustic_encoder" else \
        ("234", 2, {"0": "snake1", "1": "conv_t1"})
    if m := re.match(rf"block\.([{units}])\.block\.([0-3])\.(.*)", rest):
        return f"{side}.block.{i - 1}.res_unit{int(m[1]) - first_unit + 1}.{RES_LAYERS[int(m[2])]}.{m[3]}"
    if (m := re.match(r"block\.(\d)\.(.*)", rest)) and m[1] in head:
        return f"{side}.block.{i - 1}.{head[m[1]]}.{m[2]}"
    return None


def codec_key(key: str, n_blocks: int, n_q: int) -> str | None:
    """transformers' name for a key of the authors' codec; None for keys their model does not use either."""
    if key.startswith(("encoder.", "decoder_2.")):
        return _acoustic_key(key, n_blocks)
    if m := re.match(r"quantizer\.vq\.layers\.(\d+)\.(.*)", key):
        # The authors' loader builds n_q quantizers and ignores any further ones (strict=False).
        return f"quantizer.quantizers.{m[1]}.{m[2].replace('_codebook.', 'codebook.')}" if int(m[1]) < n_q else None
    if key.startswith(("encoder_semantic.", "decoder_semantic.")):
        # Their semantic convs wrap nn.Conv1d / nn.ConvTranspose1d one level deeper (.conv / .deconv).
        return re.sub(r"\.(conv|conv1|conv2)\.(conv|deconv)\.", r".\1.", key)
    if key.startswith("semantic_model."):
        return key
    for old, new in (("fc_prior.", "fc."), ("fc_post1.", "fc1."), ("fc_post2.", "fc2.")):
        if key.startswith(old):
            return new + key[len(old):]
    return None


def merge_weight_norm(g: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The plain weight of a weight-normalised one: ``g * v / |v|``, the norm over the dims where g has size 1
    (all but torch's weight_norm ``dim``; a size-1 ``dim`` included changes nothing)."""
    dims = [d for d in range(v.dim()) if g.shape[d] == 1]
    return g * v / torch.linalg.vector_norm(v, dim=dims, keepdim=True)


def check_original_codec_config(config: dict, name: str) -> None:
    if not isinstance(config.get("bins"), int):
        raise ConfigError(f"{name}: bins={config.get('bins')!r} is a finite scalar quantizer; transformers' codec has "
                          "only the residual vector quantizer (an integer codebook size)")
    for key, want in (("vq_scale", 1), ("downsample_mode", "step_down")):
        if config.get(key, want) != want:
            raise ConfigError(f"{name}: {key}={config[key]!r} cannot be converted (transformers' codec: {want!r})")
    if config.get("semantic_techer", "hubert_base_general") not in SEMANTIC_TEACHERS:
        raise ConfigError(f"{name}: semantic_techer={config['semantic_techer']!r} cannot be converted: transformers' "
                          f"codec uses HuBERT ({', '.join(SEMANTIC_TEACHERS)})")
    if not config.get("codebook_dim"):
        raise ConfigError(f"{name}: codebook_dim is not set; transformers' codec always projects into the codebook")


def hubert_config_from_weights(state: dict, name: str) -> dict:
    """The HuBERT teacher's config as far as its weights tell (sizes, layers, conv stack, norm style); the rest is
    HuBERT base's, as the authors' hubert_base_general teacher is, and as transformers' conversion assumes."""
    p = "semantic_model."
    if f"{p}feature_projection.projection.weight" not in state:
        raise ConfigError(f"{name}: model.pth holds no semantic_model (HuBERT) weights")
    hidden = state[f"{p}feature_projection.projection.weight"].shape[0]
    convs = sorted(int(m[1]) for k in state if (m := re.match(rf"{p}feature_extractor\.conv_layers\.(\d+)\.conv\."
                                                                 r"weight$", k)))
    layers = {int(m[1]) for k in state if (m := re.match(rf"{p}encoder\.layers\.(\d+)\.", k))}
    pos = next(state[f"{p}encoder.pos_conv_embed.conv{suffix}"] for suffix in
               (".weight_v", ".parametrizations.weight.original1", ".weight")
               if f"{p}encoder.pos_conv_embed.conv{suffix}" in state)
    conv_weights = [state[f"{p}feature_extractor.conv_layers.{i}.conv.weight"] for i in convs]
    return dict(
        hidden_size=hidden, num_hidden_layers=len(layers),
        intermediate_size=state[f"{p}encoder.layers.0.feed_forward.intermediate_dense.weight"].shape[0],
        conv_dim=[w.shape[0] for w in conv_weights], conv_kernel=[w.shape[2] for w in conv_weights],
        num_feat_extract_layers=len(convs), conv_bias=f"{p}feature_extractor.conv_layers.0.conv.bias" in state,
        feat_extract_norm="layer" if f"{p}feature_extractor.conv_layers.1.layer_norm.weight" in state else "group",
        feat_proj_layer_norm=f"{p}feature_projection.layer_norm.weight" in state,
        num_conv_pos_embeddings=pos.shape[2], num_conv_pos_embedding_groups=hidden // pos.shape[1],
        mask_time_prob=0.0)


def _out_channels(state: dict, module: str, name: str) -> int:
    for suffix in (".weight", ".weight_v", ".parametrizations.weight.original1"):
        if module + suffix in state:
            return state[module + suffix].shape[0]
    raise ConfigError(f"{name}: model.pth has no {module} weight")


def codec_config_from_original(config: dict, state: dict, name: str):
    """transformers' HiggsAudioV2TokenizerConfig for the authors' config; the sizes their code hard-codes (the DAC
    encoder and decoder widths) and the HuBERT teacher's are read off the weights."""
    from transformers import HiggsAudioV2TokenizerConfig

    check_original_codec_config(config, name)
    ratios, n_q, bins = list(config["ratios"]), config["n_q"], config["bins"]
    sample_rate = config.get("sample_rate", 16000)
    frame_rate = math.ceil(sample_rate / math.prod(ratios))
    # transformers derives the number of quantizers from the top bandwidth; the authors' encode uses all n_q.
    top = n_q * frame_rate * math.ceil(math.log2(bins)) / 1000
    bandwidths = [b for b in config.get("target_bandwidths") or [] if b < top] + [top]
    hf = HiggsAudioV2TokenizerConfig(
        sample_rate=sample_rate, target_bandwidths=bandwidths, codebook_size=bins,
        codebook_dim=config["codebook_dim"], semantic_sample_rate=config.get("semantic_sample_rate") or 16000,
        acoustic_model_config=dict(
            encoder_hidden_size=_out_channels(state, "encoder.block.0", name),
            decoder_hidden_size=_out_channels(state, "decoder_2.model.0", name),
            hidden_size=config["D"], downsampling_ratios=ratios, upsampling_ratios=ratios),
        semantic_model_config=hubert_config_from_weights(state, name))
    if hf.num_quantizers != n_q:
        raise ConfigError(f"{name}: n_q={n_q} does not follow from the bandwidths {bandwidths}")
    return hf


def _merged_weight_norm(state: dict) -> dict:
    """Weight-normalised pairs (``weight_g``/``weight_v`` or ``parametrizations.weight.original0/1``) as
    ``<module>.weight_norm`` = (g, v); everything else as it is."""
    out = {}
    for key, tensor in state.items():
        for g_suffix, v_suffix in WN_PAIRS:
            if key.endswith(v_suffix):
                break
            if key.endswith(g_suffix):
                base = key[: -len(g_suffix)]
                out[f"{base}.weight_norm"] = (tensor, state[base + v_suffix])
                break
        else:
            out[key] = tensor
    return out


def codec_weights_from_original(state: dict, n_blocks: int, n_q: int, expected: dict) -> tuple[dict, list[str]]:
    """The authors' codec weights under transformers' names; weight-norm pairs merged into plain weights, or kept
    as a pair where transformers' module is weight-normalised too (HuBERT's positional conv). Also the dropped keys."""
    out, dropped = {}, []
    for key, value in _merged_weight_norm(state).items():
        target = codec_key(key, n_blocks, n_q)
        if target is None:
            dropped.append(key)
        elif target.endswith(".weight_norm"):
            base = target[: -len(".weight_norm")]
            g, v = value
            norm = f"{base}.parametrizations.weight.original"
            if f"{norm}0" in expected:
                out[f"{norm}0"], out[f"{norm}1"] = g, v
            else:
                out[f"{base}.weight"] = merge_weight_norm(g, v)
        else:
            out[target] = value
    return out, dropped


def convert_codec(src: Path, out: Path, name: str) -> list[str]:
    """Write the authors' codec (config.json + model.pth) to ``out`` as transformers' HiggsAudioV2TokenizerModel
    with its DacFeatureExtractor. Returns the source keys left out."""
    from transformers import DacFeatureExtractor, HiggsAudioV2TokenizerModel

    config = json.loads((src / "config.json").read_text())
    if not (src / "model.pth").is_file():
        raise ConfigError(f"{name}: {src} has the authors' codec config but no model.pth")
    state = read_tensors(src / "model.pth", name)
    hf_config = codec_config_from_original(config, state, name)
    with torch.device("meta"):
        model = HiggsAudioV2TokenizerModel(hf_config)
    expected = model.state_dict()
    weights, dropped = codec_weights_from_original(state, len(config["ratios"]), config["n_q"], expected)
    check_keys(name, weights, expected, "HiggsAudioV2TokenizerModel")
    model.load_state_dict(weights, strict=True, assign=True)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    DacFeatureExtractor(feature_size=1, sampling_rate=hf_config.sample_rate, hop_length=hf_config.hop_length,
                        padding_value=0.0, return_attention_mask=True).save_pretrained(out)
    return sorted(dropped)
