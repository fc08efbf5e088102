"""Checkpoints in the authors' original layout: detected, converted once, loaded by plain transformers with the same
outputs as the same weights saved natively; wrong dirs refused in one line before any model is built."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from higgs_accel import convert, original_layout
from higgs_accel import generate as gen
from higgs_accel.chat import SpecialIds, chat_prompt
from higgs_accel.cli import main, parse_args
from higgs_accel.config import ConfigError
from higgs_accel.tiny import speech_like

SPLIT_AT = 7  # rows in the frozen half of the authors' partially frozen embedding and heads


def call_cli(*argv) -> int:
    args = parse_args([str(a) for a in argv])
    return args.func(args)


# ---------------------------------------------------------------- a model in the authors' layout


def to_original_model_weights(state: dict) -> dict:
    """A transformers state dict under the authors' names (HiggsAudioModel: no ``model.`` prefix, heads in
    ``audio_decoder_proj``, audio embeddings in ``audio_codebook_embeddings``), split the way their freezing code
    splits the text embedding and both heads, plus the buffers they save that are not weights."""
    out = {}
    for key, value in state.items():
        if key.startswith("model.embed_audio_tokens.embed_audio_tokens."):
            key = "audio_codebook_embeddings." + key.split(".")[-1]
        elif key.startswith("model."):
            key = key[len("model."):]
        else:
            key = "audio_decoder_proj." + key
        out[key] = value.clone()
    for module, (frozen, trainable) in (("embed_tokens", ("embedding_frozen", "embedding_trainable")),
                                        ("audio_decoder_proj.text_lm_head", ("linear_frozen", "linear_trainable")),
                                        ("audio_decoder_proj.audio_lm_head", ("linear_frozen", "linear_trainable"))):
        weight = out.pop(f"{module}.weight")
        out[f"{module}.{frozen}.weight"], out[f"{module}.{trainable}.weight"] = weight[:SPLIT_AT], weight[SPLIT_AT:]
    out["layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    out["audio_codebook_weights"] = torch.full((8,), 1 / 8)
    return out


def original_model_config(cfg) -> dict:
    """The authors' HiggsAudioConfig keys for a transformers config (text backbone as a Llama text_config)."""
    rope = dict(cfg.rope_parameters)
    return {
        "architectures": ["HiggsAudioModel"], "model_type": "higgs_audio",
        "audio_adapter_type": "dual_ffn_fast_forward", "audio_dual_ffn_layers": list(range(cfg.num_hidden_layers)),
        "audio_decoder_proj_num_layers": 0, "audio_embed_avg": False, "audio_codebook_size": cfg.codebook_size - 2,
        "audio_num_codebooks": cfg.num_codebooks,
        "audio_stream_bos_id": cfg.audio_stream_bos_id, "audio_stream_eos_id": cfg.audio_stream_eos_id,
        "audio_out_token": "<|AUDIO_OUT|>", "audio_out_token_idx": cfg.audio_token_id,
        "audio_out_bos_token": "<|audio_out_bos|>", "audio_out_bos_token_id": cfg.audio_bos_token_id,
        "skip_audio_tower": True, "use_delay_pattern": True, "use_audio_out_self_attention": 0,
        "use_audio_out_embed_projector": False, "use_rq_transformer": False, "pad_token_id": cfg.pad_token_id,
        "text_config": {
            "model_type": "llama", "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
            "intermediate_size": cfg.intermediate_size, "num_hidden_layers": cfg.num_hidden_layers,
            "num_attention_heads": cfg.num_attention_heads, "num_key_value_heads": cfg.num_key_value_heads,
            "head_dim": cfg.head_dim, "max_position_embeddings": cfg.max_position_embeddings,
            "rms_norm_eps": cfg.rms_norm_eps, "hidden_act": "silu", "tie_word_embeddings": True,
            "rope_theta": rope.pop("rope_theta"), "rope_scaling": rope},
    }


@pytest.fixture(scope="module")
def native(tiny):
    from transformers import AutoTokenizer, HiggsAudioV2ForConditionalGeneration

    model = HiggsAudioV2ForConditionalGeneration.from_pretrained(tiny["model.base"], use_text_head=True).eval()
    return model, AutoTokenizer.from_pretrained(tiny["model.base"])


@pytest.fixture(scope="module")
def original_model(native, tmp_path_factory) -> Path:
    """The tiny model's weights in the authors' layout: config, split safetensors shards, a tokenizer like the
    authors' (eos <|end_of_text|>, no pad token, no chat template)."""
    from transformers import AutoTokenizer

    model, _ = native
    out = tmp_path_factory.mktemp("original-model")
    weights = to_original_model_weights(model.state_dict())
    keys = sorted(weights)
    save_file({k: weights[k] for k in keys[: len(keys) // 2]}, out / "model-00001-of-00002.safetensors")
    save_file({k: weights[k] for k in keys[len(keys) // 2:]}, out / "model-00002-of-00002.safetensors")
    (out / "config.json").write_text(json.dumps(original_model_config(model.config)))
    tok = AutoTokenizer.from_pretrained(model.config.name_or_path)
    tok.pad_token, tok.eos_token = None, "<|end_of_text|>"
    tok.save_pretrained(out)
    assert json.loads((out / "tokenizer_config.json").read_text()).get("pad_token") is None
    return out


def heads(lm, tokenizer, config):
    """Audio and text logits of a prompt with reference audio (so both the text and the audio path run)."""
    ids = SpecialIds.from_parts(tokenizer, config)
    codes = np.random.default_rng(0).integers(0, 1024, (8, 6)).astype(np.int16)
    prompt = gen.build_prompt(tokenizer, ids, "Quiet rivers hum.", codes, "Bright stars.")
    batch = {"input_ids": prompt["input_ids"][None], "attention_mask": torch.ones(1, len(prompt["input_ids"])),
             "audio_input_ids": prompt["audio_input_ids"][None],
             "audio_input_ids_mask": torch.ones(1, len(prompt["audio_input_ids"]), dtype=torch.bool)}
    with torch.no_grad():
        hidden = lm.model(**batch).last_hidden_state
        return lm.audio_lm_head(hidden), lm.text_lm_head(hidden)


def assert_same_logits(loaded, native):
    model, tok = native
    for got, want in zip(heads(loaded, tok, loaded.config), heads(model, tok, model.config)):
        assert got.dtype == torch.float32
        assert torch.allclose(got, want, atol=1e-6, rtol=0), (got - want).abs().max()


def test_original_model_converts_once_and_gives_the_native_logits(original_model, native, tmp_path):
    from transformers import AutoTokenizer, HiggsAudioV2ForConditionalGeneration

    resolved = convert.resolve_base(str(original_model), cache_dir=tmp_path)
    assert (resolved.layout, resolved.converted, resolved.source) == ("original", "now", str(original_model))
    assert Path(resolved.path).parent == tmp_path and resolved.event()["path"] == resolved.path
    loaded = HiggsAudioV2ForConditionalGeneration.from_pretrained(resolved.path, use_text_head=True).eval()
    assert_same_logits(loaded, native)
    assert loaded.config.codebook_size == 1026 and loaded.config.audio_token_id == native[0].config.audio_token_id

    tok = AutoTokenizer.from_pretrained(resolved.path)
    assert tok.pad_token == "<|end_of_text|>" and tok.chat_template == original_layout.CHAT_TEMPLATE
    gen_cfg = loaded.generation_config
    assert gen_cfg.eos_token_id == tok.convert_tokens_to_ids("<|eot_id|>") != tok.eos_token_id
    assert gen_cfg.pad_token_id == tok.convert_tokens_to_ids("<|end_of_text|>")
    assert (gen_cfg.ras_win_len, gen_cfg.ras_win_max_num_repeat, gen_cfg.use_text_head) == (7, 2, True)
    record = json.loads((Path(resolved.path) / convert.RECORD).read_text())
    assert set(record["dropped"]) == {"audio_codebook_weights", "layers.0.self_attn.rotary_emb.inv_freq"}

    again = convert.resolve_base(str(original_model), cache_dir=tmp_path)
    assert (again.path, again.converted) == (resolved.path, "reused")
    assert len(list(tmp_path.iterdir())) == 1  # no temporary dir left behind


def test_transformers_layout_is_used_as_it_is(tiny, tmp_path):
    resolved = convert.resolve_base(tiny["model.base"], cache_dir=tmp_path)
    assert (resolved.path, resolved.layout, resolved.converted) == (tiny["model.base"], "transformers", None)
    codec = convert.resolve_codec(tiny["model.audio_tokenizer"], cache_dir=tmp_path)
    assert (codec.path, codec.layout) == (tiny["model.audio_tokenizer"], "transformers")
    assert not list(tmp_path.iterdir())


def test_a_changed_source_is_converted_again(original_model, tmp_path):
    copy = tmp_path / "copy"
    copy.mkdir()
    for f in original_model.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    first = convert.resolve_base(str(copy), cache_dir=tmp_path / "cache")
    assert first.path == convert.resolve_base(str(original_model), cache_dir=tmp_path / "cache").path  # content key
    config = json.loads((copy / "config.json").read_text())
    config["text_config"]["rms_norm_eps"] = 1e-6
    (copy / "config.json").write_text(json.dumps(config))
    second = convert.resolve_base(str(copy), cache_dir=tmp_path / "cache")
    assert second.converted == "now" and second.path != first.path


def test_unsupported_original_architectures_are_refused(original_model, tmp_path):
    config = json.loads((original_model / "config.json").read_text())
    for key, value, says in (("audio_adapter_type", "stack", "audio_adapter_type 'stack'"),
                             ("audio_dual_ffn_layers", [0], "every one of the 2 layers"),
                             ("use_audio_out_self_attention", 1, "use_audio_out_self_attention=1")):
        bad = tmp_path / key
        bad.mkdir()
        (bad / "config.json").write_text(json.dumps({**config, key: value}))
        with pytest.raises(ConfigError, match=re.escape(says)):
            convert.resolve_base(str(bad), cache_dir=tmp_path / "cache")


# ---------------------------------------------------------------- the audio tokenizer in the authors' layout

RES = ("snake1", "conv1", "snake2", "conv2")


def to_original_codec_key(key: str, n_blocks: int) -> str:
    """The authors' name (HiggsAudioTokenizer: DAC ``encoder`` / ``decoder_2`` as nn.Sequential, ``vq.layers``,
    ``fc_prior`` / ``fc_post1`` / ``fc_post2``, semantic convs wrapped one level deeper) of a transformers key."""
    ends = {"conv1": 0, "snake1": n_blocks + 1, "conv2": n_blocks + 2}  # around the blocks of the Sequential
    # Encoder block: residual units at 0-2, then snake (3) + conv (4); decoder: snake (0) + conv_t (1), units at 2-4.
    inner = {"encoder": {"snake1": 3, "conv1": 4}, "decoder": {"snake1": 0, "conv_t1": 1}}
    m = re.match(r"acoustic_(encoder|decoder)\.(.*)", key)
    if m:
        side, rest = m[1], m[2]
        seq = "encoder.block" if side == "encoder" else "decoder_2.model"
        if m := re.match(r"(conv1|snake1|conv2)\.(.*)", rest):
            return f"{seq}.{ends[m[1]]}.{m[2]}"
        if m := re.match(r"block\.(\d+)\.res_unit(\d)\.(\w+)\.(.*)", rest):
            unit = int(m[2]) - 1 + (0 if side == "encoder" else 2)
            return f"{seq}.{int(m[1]) + 1}.block.{unit}.block.{RES.index(m[3])}.{m[4]}"
        m = re.match(r"block\.(\d+)\.(\w+)\.(.*)", rest)
        return f"{seq}.{int(m[1]) + 1}.block.{inner[side][m[2]]}.{m[3]}"
    if m := re.match(r"quantizer\.quantizers\.(\d+)\.(.*)", key):
        return f"quantizer.vq.layers.{m[1]}.{m[2].replace('codebook.', '_codebook.')}"
    if m := re.match(r"(encoder|decoder)_semantic\.(.*)", key):
        wrapped = re.sub(r"(^|\.)(conv|conv1)\.(weight|bias)$", r"\1\2.conv.\3", m[2])
        if m[1] == "decoder":
            wrapped = re.sub(r"^conv2\.weight$", "conv2.conv.weight", wrapped)
        return f"{m[1]}_semantic.{wrapped}"
    for new, old in (("fc.", "fc_prior."), ("fc1.", "fc_post1."), ("fc2.", "fc_post2.")):
        if key.startswith(new):
            return old + key[len(new):]
    return key.replace(".parametrizations.weight.original0", ".weight_g").replace(
        ".parametrizations.weight.original1", ".weight_v")


def to_original_codec_weights(state: dict, n_blocks: int) -> dict:
    """The authors' model.pth: their names, every DAC conv weight-normalised (weight_g / weight_v, norm over all dims
    but the first, as torch's weight_norm does by default), an unused ninth quantizer and a stray fc1."""
    out = {}
    for key, value in state.items():
        name = to_original_codec_key(key, n_blocks)
        if key.startswith("acoustic_") and re.search(r"\.(conv\d|conv_t1)\.weight$", key):
            base = name[: -len(".weight")]
            out[f"{base}.weight_g"] = value.norm(dim=list(range(1, value.dim())), keepdim=True)
            out[f"{base}.weight_v"] = value.clone()
        else:
            out[name] = value.clone()
    out.update({f"quantizer.vq.layers.8.{k.split('.', 4)[-1]}": v.clone() for k, v in out.items()
                if k.startswith("quantizer.vq.layers.0.")})
    out["fc1.weight"] = torch.zeros(2, 2)
    return out


@pytest.fixture(scope="module")
def codec_pair(tmp_path_factory):
    """A tiny native codec and the same weights in the authors' layout (config.json with their keys + model.pth)."""
    from transformers import HiggsAudioV2TokenizerConfig, HiggsAudioV2TokenizerModel

    torch.manual_seed(1)
    ratios = [8, 5, 4, 2, 3]
    cfg = HiggsAudioV2TokenizerConfig(
        target_bandwidths=[0.5, 1, 1.5, 2], codebook_dim=8,
        acoustic_model_config=dict(encoder_hidden_size=8, decoder_hidden_size=64, hidden_size=16,
                                   downsampling_ratios=ratios, upsampling_ratios=ratios),
        # HuBERT settings the weights do not show (12 heads, conv strides) stay HuBERT base's.
        semantic_model_config=dict(hidden_size=24, num_hidden_layers=1, intermediate_size=32, conv_dim=[16] * 7,
                                   num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2))
    native = HiggsAudioV2TokenizerModel(cfg).eval()
    for q in native.quantizer.quantizers:
        q.codebook.embed.normal_(0.0, 0.02)
    out = tmp_path_factory.mktemp("original-codec")
    torch.save(to_original_codec_weights(native.state_dict(), len(ratios)), out / "model.pth")
    (out / "config.json").write_text(json.dumps({
        "n_filters": 32, "D": 16, "codebook_dim": 8, "target_bandwidths": [0.5, 1, 1.5, 2, 4], "ratios": ratios,
        "sample_rate": 24000, "bins": 1024, "n_q": 8, "semantic_techer": "hubert_base_general"}))
    return native, out


def test_original_codec_converts_and_encodes_and_decodes_like_its_twin(codec_pair, tmp_path):
    from transformers import AutoFeatureExtractor, HiggsAudioV2TokenizerModel

    native, original = codec_pair
    resolved = convert.resolve_codec(str(original), cache_dir=tmp_path)
    assert (resolved.layout, resolved.converted) == ("original", "now")
    codec = HiggsAudioV2TokenizerModel.from_pretrained(resolved.path).eval()
    assert (codec.config.num_quantizers, codec.config.hop_length, codec.config.frame_rate) == (8, 960, 25)
    wave = torch.from_numpy(speech_like("quiet rivers hum softly", np.random.default_rng(0)))[None, None]
    with torch.no_grad():
        want, got = native.encode(wave).audio_codes, codec.encode(wave).audio_codes
        assert got.shape == want.shape == (1, 8, math.ceil(wave.shape[-1] / 960)) and torch.equal(got, want)
        assert len(set(want[0, 0].tolist())) > 1  # the codebooks are spread: a wrong weight changes codes
        decoded, twin = codec.decode(want).audio_values, native.decode(want).audio_values
    assert torch.allclose(decoded, twin, atol=1e-6, rtol=1e-4), (decoded - twin).abs().max()
    features = AutoFeatureExtractor.from_pretrained(resolved.path)
    assert (features.sampling_rate, features.hop_length) == (24000, 960)
    record = json.loads((Path(resolved.path) / convert.RECORD).read_text())
    assert "fc1.weight" in record["dropped"] and any(k.startswith("quantizer.vq.layers.8.") for k in record["dropped"])
    assert convert.resolve_codec(str(original), cache_dir=tmp_path).converted == "reused"


class _Payload:
    """Unpickling this runs code: it creates the file it names."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return Path.touch, (self.path,)


def test_a_pth_holding_a_pickled_object_is_refused_without_running_it(codec_pair, tmp_path):
    _, original = codec_pair
    evil = tmp_path / "evil"
    evil.mkdir()
    (evil / "config.json").write_text((original / "config.json").read_text())
    marker = tmp_path / "code-ran"
    torch.save({"encoder.block.0.weight_g": _Payload(marker)}, evil / "model.pth")
    with pytest.raises(ConfigError, match="holds more than tensors.*must never run code"):
        convert.resolve_codec(str(evil), cache_dir=tmp_path / "cache")
    assert not marker.exists()
    torch.load(evil / "model.pth", weights_only=False)  # the payload is live: plain unpickling runs it
    assert marker.exists()


# ---------------------------------------------------------------- wrong things, refused early


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory, native) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("llama")
    LlamaForCausalLM(LlamaConfig(vocab_size=len(native[1]), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1)).save_pretrained(out)
    native[1].save_pretrained(out)
    return out


@pytest.fixture
def no_model_built(monkeypatch):
    """Building a Higgs Audio v2 model (or codec) fails the test: refusals must come before."""
    import transformers

    def refuse(*a, **k):
        raise AssertionError("a model was built")

    for cls in (transformers.HiggsAudioV2ForConditionalGeneration, transformers.HiggsAudioV2TokenizerModel):
        monkeypatch.setattr(cls, "__init__", refuse)


@pytest.mark.parametrize("kind,says", [
    ("codec", "is an audio tokenizer (codec), not the Higgs Audio v2 model; it belongs in 'model.audio_tokenizer'"),
    ("original_codec", "is an audio tokenizer (codec)"),
    ("llama", "is a 'llama' checkpoint, not a Higgs Audio v2 model"),
    ("empty", "is a dir without config.json, not a Higgs Audio v2 model"),
])
def test_wrong_dirs_as_model_base_are_refused_in_one_line(kind, says, tiny, codec_pair, llama_dir, tmp_path,
                                                          no_model_built, capsys):
    ref = {"codec": tiny["model.audio_tokenizer"], "original_codec": str(codec_pair[1]), "llama": str(llama_dir),
           "empty": str(tmp_path)}[kind]
    with pytest.raises(ConfigError, match=re.escape(says)) as e:
        convert.resolve_base(ref, cache_dir=tmp_path / "cache")
    assert str(e.value).startswith("'model.base': ") and "\n" not in str(e.value)
    if kind in ("llama", "empty"):  # a codec is a fine SRC for convert
        assert main(["convert", ref, "--out", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith(f"higgs-accel: error: SRC: '{ref}' is ")


def test_a_model_given_as_the_audio_tokenizer_is_refused(tiny, original_model, tmp_path, no_model_built):
    for ref in (tiny["model.base"], str(original_model)):
        with pytest.raises(ConfigError, match="is the Higgs Audio v2 model, not its audio tokenizer; it belongs in "
                                              "'model.base'"):
            convert.resolve_codec(ref, cache_dir=tmp_path)


def test_an_unreachable_hub_id_is_one_line(monkeypatch, tmp_path, no_model_built):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(ConfigError, match=r"^'model.base': cannot get hub id 'nobody/no-such-model' \(.*\); without a "
                                          "network, give a local dir, or set HF_HUB_OFFLINE=1") as e:
        convert.resolve_base("nobody/no-such-model", cache_dir=tmp_path)
    assert "\n" not in str(e.value)


def test_an_unreachable_hub_endpoint_fails_at_once_in_one_line(tmp_path):
    """No hub (a closed loopback port): one look at the endpoint, then one line, without the hub client's retries."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_CACHE": str(tmp_path / "hub")}
    env.pop("HF_HUB_OFFLINE", None)
    done = subprocess.run([sys.executable, "-m", "higgs_accel", "convert", "nobody/no-such-model", "--out",
                           str(tmp_path / "out")], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr == ("higgs-accel: error: SRC: cannot get hub id 'nobody/no-such-model' (http://127.0.0.1:9 "
                           "unreachable: ConnectError: [Errno 111] Connection refused); without a network, give a "
                           "local dir, or set HF_HUB_OFFLINE=1 with the repo already in the hub cache\n"), done.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("text, cut", [
    ("Short enough.", "Short enough."),
    ("One sentence here. " + "word " * 60, "One sentence here."),
    ("no sentence end " * 20, "no sentence end " * 12 + "no ..."),
])
def test_a_long_hub_reason_is_cut_after_a_sentence_or_a_word(text, cut):
    assert convert._sentence(text) == cut


def test_an_original_hub_repo_in_the_offline_hub_cache_converts(original_model, native, monkeypatch, tmp_path):
    """HF_HUB_OFFLINE=1 with the authors' repo already downloaded: read from the hub cache, converted once."""
    import hashlib
    import os

    import huggingface_hub.constants
    from transformers import HiggsAudioV2ForConditionalGeneration

    hub = tmp_path / "hub"
    repo = hub / "models--bosonai--higgs-audio-v2-generation-3B-base"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "blobs").mkdir()
    (repo / "snapshots" / commit).mkdir(parents=True)
    for f in original_model.iterdir():  # the hub cache's layout: blobs named by content, linked from the snapshot
        blob = repo / "blobs" / hashlib.sha256(f.read_bytes()).hexdigest()
        blob.write_bytes(f.read_bytes())
        os.symlink(os.path.relpath(blob, repo / "snapshots" / commit), repo / "snapshots" / commit / f.name)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub))

    resolved = convert.resolve_base("bosonai/higgs-audio-v2-generation-3B-base", cache_dir=tmp_path / "cache")
    assert (resolved.layout, resolved.converted) == ("original", "now")
    assert_same_logits(HiggsAudioV2ForConditionalGeneration.from_pretrained(resolved.path, use_text_head=True), native)
    again = convert.resolve_base("bosonai/higgs-audio-v2-generation-3B-base", cache_dir=tmp_path / "cache")
    assert (again.converted, again.path) == ("reused", resolved.path)


# ---------------------------------------------------------------- higgs-accel convert


def test_convert_cli_writes_a_checkpoint_plain_transformers_loads(original_model, codec_pair, native, tmp_path):
    from transformers import AutoProcessor, HiggsAudioV2ForConditionalGeneration, HiggsAudioV2TokenizerModel

    out = tmp_path / "out"
    assert call_cli("convert", original_model, "--audio-tokenizer", codec_pair[1], "--out", out) == 0
    assert_same_logits(HiggsAudioV2ForConditionalGeneration.from_pretrained(out, use_text_head=True).eval(), native)
    codec = HiggsAudioV2TokenizerModel.from_pretrained(out / "audio_tokenizer")
    embed = codec_pair[0].quantizer.quantizers[3].codebook.embed
    assert torch.equal(codec.quantizer.quantizers[3].codebook.embed, embed)

    processor = AutoProcessor.from_pretrained(out)
    assert type(processor).__name__ == "HiggsAudioV2Processor"
    assert processor.chat_template == original_layout.CHAT_TEMPLATE
    conversation = [{"role": "system", "content": [{"type": "text", "text": "Generate audio following instruction."}]},
                    {"role": "scene", "content": [{"type": "text", "text": "A quiet room."}]},
                    {"role": "user", "content": [{"type": "text", "text": "Bright stars."}]},
                    {"role": "assistant", "content": [{"type": "audio", "path": "ref.wav"}]},
                    {"role": "user", "content": [{"type": "text", "text": "Quiet rivers hum."}]}]
    text = processor.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    prompt = chat_prompt("Quiet rivers hum.", "Generate audio following instruction.", scene="A quiet room.",
                         ref_text="Bright stars.")
    assert text == prompt + "<|audio_out_bos|>"
    wave = speech_like("bright stars", np.random.default_rng(1))
    batch = processor(text=text, audio=[wave], return_tensors="pt")
    assert batch["audio_input_ids"].shape[-1] == 8

    assert main(["convert", str(original_model), "--audio-tokenizer", str(codec_pair[1]), "--out", str(out)]) == 2
    assert main(["convert", str(out), "--out", str(tmp_path / "again")]) == 2  # already transformers' layout
    assert main(["convert", str(original_model), "--out", str(tmp_path / "nocodec")]) == 2


def test_convert_cli_converts_an_audio_tokenizer(codec_pair, tmp_path):
    from transformers import HiggsAudioV2TokenizerModel

    out = tmp_path / "codec"
    assert call_cli("convert", codec_pair[1], "--out", out) == 0
    codec = HiggsAudioV2TokenizerModel.from_pretrained(out)
    assert torch.equal(codec.fc.weight, codec_pair[0].fc.weight)


# ---------------------------------------------------------------- training on an original-format base


def test_training_runs_on_the_converted_copy_of_an_original_base(original_model, tiny, codes_cache, tmp_path):
    from tests.conftest import of, train_run

    first = convert.resolve_base(str(original_model), cache_dir=tmp_path / "cache")
    events = train_run(tmp_path / "run", tiny, codes_cache, model__base=first.path, train__max_steps=2,
                       train__eval_every=0, train__save_every=0, log__eval_audio_samples=0)
    steps = of(events, "train_step")
    assert len(steps) == 2 and all(math.isfinite(e["loss"]) and e["text_targets"] > 0 for e in steps)
    again = convert.resolve_base(str(original_model), cache_dir=tmp_path / "cache")
    assert (again.converted, again.path) == ("reused", first.path)


def test_training_on_an_original_base_converts_once_and_says_so(original_model, tiny, codes_cache, tmp_path,
                                                               monkeypatch):
    from tests.conftest import of, train_run

    monkeypatch.setenv("HIGGS_ACCEL_CACHE", str(tmp_path / "cache"))
    seen = []
    for run in ("a", "b"):
        events = train_run(tmp_path / run, tiny, codes_cache, model__base=str(original_model), train__max_steps=1,
                           train__eval_every=0, train__save_every=0, log__eval_audio_samples=0)
        [start] = of(events, "run_start")
        seen.append(start["checkpoints"]["model.base"])
    assert [s["layout"] for s in seen] == ["original", "original"]
    assert [s["converted"] for s in seen] == ["now", "reused"] and seen[0]["path"] == seen[1]["path"]


def test_train_refuses_an_unrelated_model_before_building_one(llama_dir, tiny, codes_cache, tmp_path, no_model_built,
                                                              capsys):
    keys = {**tiny, "model.base": str(llama_dir), "data.codes_cache": str(codes_cache),
            "train.output_dir": str(tmp_path / "run"), "train.max_steps": 1}
    assert main(["train", "--no-report", *[f"{k}={v}" for k, v in keys.items()]]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (f"higgs-accel: error: 'model.base': '{llama_dir}' is a 'llama' checkpoint, not a Higgs Audio "
                       "v2 model (model_type 'higgs_audio_v2', or the authors' 'higgs_audio')")


# ---------------------------------------------------------------- the tiny preset's text tokenizer


def test_the_tiny_tokenizer_splits_text_like_llama_3(native):
    _, tok = native
    pieces = [p for p, _ in tok.backend_tokenizer.pre_tokenizer.pre_tokenize_str("Hi there, I'm 12345 ok!!\n\nGo")]
    # Llama 3: contractions apart, digits in threes, a lone space before digits, punctuation with its newlines.
    assert pieces == ["Hi", "Ġthere", ",", "ĠI", "'m", "Ġ", "123", "45", "Ġok", "!!ĊĊ", "Go"]
    header = tok("<|start_header_id|>system<|end_header_id|>\n\nGenerate audio", add_special_tokens=False)
    tokens = tok.convert_ids_to_tokens(header["input_ids"])
    assert tokens[:4] == ["<|start_header_id|>", "system", "<|end_header_id|>", "ĊĊ"]  # "\n\n" is one token
