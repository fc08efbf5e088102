"""Higgs TTS 3: the thin module on transformers' Qwen3Model, the released checkpoint layout, the runtime's prompt
layout and targets, and LoRA on the backbone. Everything runs on tiny random models built here."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from higgs_accel.chat import IGNORE
from higgs_accel.config import ConfigError
from higgs_accel.tiny import build_tiny_tts3
from higgs_accel.tts3 import (
    CODEC,
    QWEN3_ROPE_THETA,
    HiggsTts3,
    Tts3Config,
    load_codec,
)
from higgs_accel.tts3_prompt import Tts3Ids, build_example, delayed_rows

B, E = 1024, 1025  # stream BOS / EOS


def tiny_config(tie_audio: bool = True, tie_text: bool = True, **audio) -> Tts3Config:
    text = dict(model_type="qwen3", hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=8, vocab_size=50, max_position_embeddings=256, rope_theta=None,
                tie_word_embeddings=tie_text)
    audio = dict(encoder_type="discrete", num_codebooks=4, vocab_size=1026, out_dim=32, tie_word_embeddings=tie_audio,
                 use_delay_pattern=True, **audio)
    return Tts3Config.from_dict(dict(model_type="higgs_multimodal_qwen3", text_config=text,
                                     audio_encoder_config=audio, audio_token_id=-100))


def random_model(cfg: Tts3Config, seed: int = 0) -> HiggsTts3:
    torch.manual_seed(seed)
    model = HiggsTts3(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny_tts3(tmp_path_factory.mktemp("tiny_v3"))


def test_backbone_equals_transformers_qwen3_on_text():
    from transformers import Qwen3ForCausalLM

    cfg = tiny_config()
    model = random_model(cfg)
    assert model.backbone.config.rope_parameters["rope_theta"] == QWEN3_ROPE_THETA  # null in the file
    reference = Qwen3ForCausalLM(cfg.qwen3()).eval()
    reference.model.load_state_dict(model.backbone.state_dict())
    ids = torch.randint(0, 50, (2, 11))
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    with torch.no_grad():
        ours = model(ids, attention_mask=mask, with_text_logits=True)
        theirs = reference(ids, attention_mask=mask, output_hidden_states=True)
    assert torch.equal(ours.hidden_states, theirs.hidden_states[-1])
    assert torch.equal(ours.text_logits, theirs.logits)  # tied text head, as Qwen3ForCausalLM ties it


@pytest.mark.parametrize("tie", [True, False])
def test_fused_embedding_and_head_are_per_codebook_maps(tie):
    cfg = tiny_config(tie_audio=tie)
    model = random_model(cfg)
    k, v = cfg.num_codebooks, cfg.codebook_size
    codes = torch.randint(0, v, (3, 5, k))
    tables = model.audio_embedding.weight.view(k, v, -1)
    expected = sum(tables[c][codes[..., c]] for c in range(k))
    torch.testing.assert_close(model.embed_audio(codes), expected, rtol=1e-6, atol=1e-6)

    hidden = torch.randn(3, 5, 32)
    heads = (model.audio_embedding if tie else model.audio_head).weight.view(k, v, -1)
    logits = model.audio_logits(hidden)
    assert logits.shape == (3, 5, k, v)
    for c in range(k):
        torch.testing.assert_close(logits[..., c, :], F.linear(hidden, heads[c]), rtol=1e-6, atol=1e-6)
    assert (model.audio_head is None) == tie
    if not tie:  # an untied head really is its own weight
        assert not torch.equal(model.audio_head.weight, model.audio_embedding.weight)


def test_audio_slots_take_their_rows_in_order():
    cfg = tiny_config()
    model = random_model(cfg)
    ids = torch.tensor([[3, -100, -100, 4, -100], [5, 6, -100, 7, 8]])
    rows = torch.randint(0, 1026, (2, 3, 4))
    rows_mask = torch.tensor([[True, True, True], [True, False, False]])
    embeds = model.embed(ids, rows, rows_mask)
    fused = model.embed_audio(rows)
    torch.testing.assert_close(embeds[0, [1, 2, 4]], fused[0])
    torch.testing.assert_close(embeds[1, 2], fused[1, 0])
    torch.testing.assert_close(embeds[1, [0, 1, 3, 4]], model.backbone.embed_tokens(ids[1, [0, 1, 3, 4]]))
    with pytest.raises(ValueError, match="3 audio slots in input_ids but 2 audio rows"):
        model.embed(ids[:1], rows[:1, :2])


def write_released(model: HiggsTts3, cfg: Tts3Config, codec, out):
    """The release's files, named by hand from its key layout (independent of ``save_pretrained``)."""
    out.mkdir()
    own = model.state_dict()
    state = {"tied.embedding.text_embedding.weight": own["backbone.embed_tokens.weight"],
             "body.norm.weight": own["backbone.norm.weight"],
             "tied.embedding.modality_embeddings.0.embedding.weight": own["audio_embedding.weight"]}
    state.update({"body." + k[len("backbone."):]: v for k, v in own.items() if k.startswith("backbone.layers.")})
    state.update({"tied.embedding.modality_embeddings.0.model." + k: v for k, v in codec.state_dict().items()})
    save_file({k: v.contiguous() for k, v in state.items()}, out / "model.safetensors")
    raw = cfg.to_dict() | {"audio_tokenizer_id": "audio_tokenizer"}
    (out / "config.json").write_text(json.dumps(raw))
    return out


def test_released_layout_loads_and_saves_back(tiny_dir, tmp_path):
    cfg = tiny_config()
    model = random_model(cfg, seed=1)
    codec = load_codec(tiny_dir)
    release = write_released(model, cfg, codec, tmp_path / "release")
    (release / "audio_tokenizer").mkdir()
    (release / "audio_tokenizer" / "config.json").write_text((tiny_dir / "audio_tokenizer" / "config.json").read_text())

    ids = torch.tensor([[1, 2, -100, -100, -100, 3, 4, -100]])
    rows = torch.randint(0, 1026, (1, 4, 4))
    with torch.no_grad():
        expected = model(ids, rows).audio_logits
        loaded = HiggsTts3.from_pretrained(release)
        assert torch.equal(loaded(ids, rows).audio_logits, expected)
        assert loaded.backbone.config.rope_parameters["rope_theta"] == QWEN3_ROPE_THETA

        saved = loaded.save_pretrained(tmp_path / "export", codec=load_codec(release))
        assert torch.equal(HiggsTts3.from_pretrained(saved)(ids, rows).audio_logits, expected)

    def keys(d):
        with safe_open(d / "model.safetensors", "pt") as f:
            return set(f.keys())
    assert keys(saved) == keys(release)
    assert json.loads((saved / "config.json").read_text()) == json.loads((release / "config.json").read_text())
    bundled = load_codec(saved).state_dict()
    assert bundled.keys() == codec.state_dict().keys()
    assert all(torch.equal(bundled[k], v) for k, v in codec.state_dict().items())


def test_untied_heads_use_their_released_names(tmp_path):
    model = random_model(tiny_config(tie_audio=False, tie_text=False))
    saved = model.save_pretrained(tmp_path / "untied")
    with safe_open(saved / "model.safetensors", "pt") as f:
        names = set(f.keys())
    assert {"tied.head.modality_heads.0.weight", "tied.head.text_head.weight"} <= names
    assert not any(k.startswith(CODEC) for k in names)
    loaded = HiggsTts3.from_pretrained(saved)
    assert torch.equal(loaded.audio_head.weight, model.audio_head.weight)
    assert torch.equal(loaded.text_head.weight, model.text_head.weight)


def test_tiny_v3_is_the_released_layout(tiny_dir):
    with safe_open(tiny_dir / "model.safetensors", "pt") as f:
        names = set(f.keys())
    assert "body.layers.0.self_attn.q_proj.weight" in names
    assert "tied.embedding.text_embedding.weight" in names
    assert "tied.embedding.modality_embeddings.0.embedding.weight" in names
    assert any(k.startswith(CODEC) for k in names)
    raw = json.loads((tiny_dir / "config.json").read_text())
    assert raw["model_type"] == "higgs_multimodal_qwen3" and raw["text_config"]["rope_theta"] is None
    assert raw["audio_encoder_config"]["num_codebooks"] * raw["audio_encoder_config"]["vocab_size"] == 8 * 1026
    codec = load_codec(tiny_dir)  # its weights come from the bundle: the config dir holds none
    wave = torch.zeros(1, 1, 24000)
    assert codec.encode(wave).audio_codes.shape == (1, 8, 25)


@pytest.mark.parametrize("change, field", [
    (lambda r: r.update(model_type="higgs_audio_v2"), "'model_type'"),
    (lambda r: r["audio_encoder_config"].update(encoder_type="whisper"), "'audio_encoder_config.encoder_type'"),
    (lambda r: r["audio_encoder_config"].update(vocab_size=1024), "'audio_encoder_config.vocab_size'"),
    (lambda r: r["audio_encoder_config"].update(use_delay_pattern=False), "'audio_encoder_config.use_delay_pattern'"),
    (lambda r: r["audio_encoder_config"].update(out_dim=48), "'audio_encoder_config.out_dim'"),
    (lambda r: r["text_config"].update(model_type="llama"), "'text_config.model_type'"),
    (lambda r: r.pop("text_config"), "'text_config'"),
])
def test_config_it_cannot_represent_is_one_line(tiny_dir, tmp_path, change, field):
    raw = json.loads((tiny_dir / "config.json").read_text())
    change(raw)
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ConfigError) as e:
        HiggsTts3.from_pretrained(tmp_path)
    assert "\n" not in str(e.value) and str(tmp_path / "config.json") in str(e.value) and field in str(e.value)


def test_weights_it_cannot_represent_are_one_line(tmp_path):
    model = random_model(tiny_config())
    saved = model.save_pretrained(tmp_path / "ok")
    with safe_open(saved / "model.safetensors", "pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}
    save_file(state | {"tied.embedding.modality_embeddings.1.encoder.weight": torch.zeros(2)},
              saved / "model.safetensors")
    with pytest.raises(ConfigError, match="modality_embeddings.1.encoder.weight' is not part of"):
        HiggsTts3.from_pretrained(saved)
    del state["body.layers.1.mlp.up_proj.weight"]
    save_file(state, saved / "model.safetensors")
    with pytest.raises(ConfigError, match="lacks 1 weight.*'body.layers.1.mlp.up_proj.weight'"):
        HiggsTts3.from_pretrained(saved)


# ---------------------------------------------------------------- prompt layout and labels


class _Cfg:  # the config fields the layout reads, for a 3-codebook fixture small enough to write out by hand
    audio_token_id, stream_bos, stream_eos, num_codebooks = -100, B, E, 3


@pytest.fixture(scope="module")
def tokenizer(tiny_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_dir)


def test_delayed_rows_match_the_runtime_layout(tokenizer):
    # SGLang-Omni's apply_delay_pattern: [T, N] -> [T + N - 1, N], BOC before each codebook's codes, EOC after.
    ids = Tts3Ids.from_parts(tokenizer, _Cfg)
    rows = delayed_rows(np.array([[10, 11], [20, 21], [30, 31]]), ids)
    assert rows.tolist() == [[10, B, B], [11, 20, B], [E, 21, 30], [E, E, 31]]


def test_plain_tts_labels_token_by_token(tokenizer):
    ids = Tts3Ids.from_parts(tokenizer, _Cfg)
    words = tokenizer("the quick fox", add_special_tokens=False)["input_ids"]
    ex = build_example(tokenizer, ids, "the quick fox", np.array([[10, 11], [20, 21], [30, 31]]))
    S = -100  # an audio slot
    assert ex["input_ids"].tolist() == [ids.tts, ids.text, *words, ids.audio, S, S, S, S]
    assert (ex["labels"] == IGNORE).all()  # the runtime samples no text
    I = IGNORE  # noqa: E741
    assert ex["audio_input_ids"].tolist() == [[10, B, B], [11, 20, B], [E, 21, 30], [E, E, 31]]
    # BOS fills never, codes always, each codebook's first EOS (the last codebook's falls outside the window)
    assert ex["audio_labels"].tolist() == [[10, I, I], [11, 20, I], [E, 21, 30], [I, E, 31]]
    no_eos = build_example(tokenizer, ids, "the quick fox", np.array([[10, 11], [20, 21], [30, 31]]),
                           train_eos=False)
    assert no_eos["audio_labels"].tolist() == [[10, I, I], [11, 20, I], [I, 21, 30], [I, I, 31]]


def test_voice_cloning_labels_token_by_token(tokenizer):
    ids = Tts3Ids.from_parts(tokenizer, _Cfg)
    ref_words = tokenizer("seven stars", add_special_tokens=False)["input_ids"]
    words = tokenizer("the dog", add_special_tokens=False)["input_ids"]
    ex = build_example(tokenizer, ids, "the dog", np.array([[10], [20], [30]]),
                       ref_codes=np.array([[1, 2], [3, 4], [5, 6]]), ref_text="seven stars")
    S, I = -100, IGNORE  # noqa: E741
    assert ex["input_ids"].tolist() == [ids.tts, ids.ref_text, *ref_words, ids.ref_audio, S, S, S, S,
                                        ids.text, *words, ids.audio, S, S, S]
    assert ex["audio_input_ids"].tolist() == [[1, B, B], [2, 3, B], [E, 4, 5], [E, E, 6],  # reference
                                              [10, B, B], [E, 20, B], [E, E, 30]]          # target
    assert ex["audio_labels"].tolist() == [[I, I, I]] * 4 + [[10, I, I], [E, 20, I], [I, E, 30]]
    assert (ex["labels"] == IGNORE).all()
    # the generation prompt is the same up to <|audio|>
    prompt = build_example(tokenizer, ids, "the dog", None, ref_codes=np.array([[1, 2], [3, 4], [5, 6]]),
                           ref_text="seven stars")
    assert prompt["input_ids"].tolist() == ex["input_ids"].tolist()[:-3]
    assert prompt["audio_input_ids"].tolist() == ex["audio_input_ids"].tolist()[:4]


def test_a_tokenizer_without_the_v3_tokens_is_one_line(tmp_path):
    from higgs_accel.tiny import build_text_tokenizer

    with pytest.raises(ConfigError, match=r"^tokenizer: lacks the Higgs TTS 3 special token\(s\) <\|tts\|>"):
        Tts3Ids.from_parts(build_text_tokenizer(tmp_path), _Cfg)


def test_lora_trains_only_adapters_on_the_backbone_projections(tiny_dir, tokenizer):
    from peft import LoraConfig, get_peft_model

    from higgs_accel.losses import audio_labels_by_position

    model = HiggsTts3.from_pretrained(tiny_dir)
    model.requires_grad_(False)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    wrapped = {n.rsplit(".", 1)[0] for n, _ in peft_model.named_parameters() if "lora_A" in n}
    layers = model.config.qwen3().num_hidden_layers
    assert len(wrapped) == len(targets) * layers
    assert all(".backbone.layers." in n for n in wrapped)

    ids = Tts3Ids.from_parts(tokenizer, model.config)
    ex = build_example(tokenizer, ids, "the quick fox", np.random.default_rng(0).integers(0, 1024, (8, 5)))
    out = peft_model(ex["input_ids"][None], ex["audio_input_ids"][None])
    labels = audio_labels_by_position(ex["input_ids"][None], ex["audio_labels"][None],
                                      torch.ones(1, len(ex["audio_input_ids"]), dtype=torch.bool),
                                      torch.tensor([ids.slot]))
    # position t predicts the row at t + 1
    loss = F.cross_entropy(out.audio_logits[:, :-1].flatten(0, 2), labels[:, 1:].flatten(), ignore_index=IGNORE)
    loss.backward()
    with_grad = {n for n, p in peft_model.named_parameters() if p.grad is not None}
    assert with_grad and all("lora_" in n for n in with_grad)
    assert any(p.grad.abs().sum() > 0 for n, p in peft_model.named_parameters() if "lora_B" in n)
    assert {n for n, p in peft_model.named_parameters() if p.requires_grad} == with_grad


def test_the_shared_dual_loss_takes_the_v3_heads(tiny_dir, tokenizer):
    """The wiring plan's claim: ``losses.dual_loss`` needs no change for v3 (audio-only, text part None)."""
    from higgs_accel.data import collate
    from higgs_accel.losses import audio_labels_by_position, dual_loss

    model = HiggsTts3.from_pretrained(tiny_dir)
    ids = Tts3Ids.from_parts(tokenizer, model.config)
    rng = np.random.default_rng(1)
    batch = collate([build_example(tokenizer, ids, "the quick fox", rng.integers(0, 1024, (8, 4))),
                     build_example(tokenizer, ids, "a dog", rng.integers(0, 1024, (8, 6)),
                                   ref_codes=rng.integers(0, 1024, (8, 3)), ref_text="seven stars")],
                    tokenizer.pad_token_id, ids.stream_eos)
    with torch.no_grad():
        out = model(batch["input_ids"], batch["audio_input_ids"], batch["audio_input_ids_mask"],
                    batch["attention_mask"])
        labels = audio_labels_by_position(batch["input_ids"], batch["audio_labels"], batch["audio_input_ids_mask"],
                                          torch.tensor([ids.slot]))
        loss = dual_loss(out.hidden_states, model.text_logits, model.audio_logits, batch["labels"], labels)
    assert loss.text_loss is None
    per_codebook = [F.cross_entropy(out.audio_logits[:, :-1, c].flatten(0, 1), labels[:, 1:, c].flatten(),
                                    ignore_index=IGNORE) for c in range(8)]
    torch.testing.assert_close(loss.audio_loss, sum(per_codebook))
    # targets per codebook: codes of both targets (4 + 6), plus one EOS in every codebook but the last
    assert (labels[:, 1:] != IGNORE).sum((0, 1)).tolist() == [12] * 7 + [10]
