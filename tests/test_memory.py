"""The lean training step (higgs_accel.activations) computes what plain PEFT computes, and keeps less for backward;
the memory model (higgs_accel.memory) against measured steps and its checkpointing decision."""

from __future__ import annotations

import copy

import pytest
import torch

from higgs_accel.activations import LEAN, lean_activations
from higgs_accel.chat import SpecialIds
from higgs_accel.codes import CodeCache, resolve
from higgs_accel.config import DataConfig, LoraConfig, ModelConfig
from higgs_accel.data import HiggsDataset, collate, read_manifest
from higgs_accel.loading import load_base_model, load_codec, load_text_tokenizer
from higgs_accel.memory import plan
from higgs_accel.model import DualLossModel, add_lora


@pytest.fixture(scope="module")
def batch_and_ids(tiny, codes_cache):
    mc = ModelConfig(base=tiny["model.base"], audio_tokenizer=tiny["model.audio_tokenizer"])
    tok = load_text_tokenizer(mc)
    ids = SpecialIds.from_parts(tok, load_base_model(mc).config)
    cfg = DataConfig()
    cache = CodeCache(codes_cache, load_codec(mc))
    samples, _ = resolve(read_manifest(tiny["data.train_manifest"], cfg)[0], cache, 0, 30)
    ds = HiggsDataset(samples, cache, tok, ids, cfg)
    return collate([ds[i] for i in range(4)], ids.pad, ids.stream_eos), ids


def models(tiny, ids, dtype: str, dropout: float = 0.0) -> tuple[DualLossModel, DualLossModel]:
    """(lean model as add_lora builds it, the same weights as plain PEFT), with random LoRA B (PEFT starts it at
    zero, which would make every lora_A gradient zero and the comparison weak)."""
    base = load_base_model(ModelConfig(base=tiny["model.base"], dtype=dtype))
    lean = DualLossModel(add_lora(base, LoraConfig(dropout=dropout)), ids).train()
    torch.manual_seed(1)
    for p in lean.parameters():
        if p.requires_grad:
            p.data.normal_(0, 0.05)
    plain = copy.deepcopy(lean)
    assert lean_activations(plain, lean=False) == 2 * (10 + 4 + 2) + 1  # per layer: LoRA, norms, MLPs; final norm
    assert not any(type(m) in LEAN.values() for m in plain.modules())
    return lean, plain


def step(model: DualLossModel, batch: dict, seed: int = 0) -> tuple[float, dict[str, torch.Tensor]]:
    torch.manual_seed(seed)
    model.zero_grad(set_to_none=True)
    out = model(batch)
    out.loss.backward()
    return out.loss.item(), {n: p.grad.float().clone() for n, p in model.named_parameters() if p.requires_grad}


def assert_same(a, b, rel: float):
    (loss_a, grads_a), (loss_b, grads_b) = a, b
    assert loss_a == pytest.approx(loss_b, rel=rel)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) == 2 * 2 * 10  # A and B, 2 layers, 10 adapted modules
    for name, g in grads_a.items():
        scale = grads_b[name].abs().max().item()
        assert scale > 0, name
        assert (g - grads_b[name]).abs().max().item() <= rel * scale, name


def test_lean_step_equals_plain_peft_in_fp32(tiny, batch_and_ids):
    batch, ids = batch_and_ids
    lean, plain = models(tiny, ids, "fp32")
    reference = step(plain, batch)
    assert_same(step(lean, batch), reference, 1e-6)
    # Under gradient checkpointing the lean layers are recomputed too; their saved inputs go through its hooks.
    lean.lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert_same(step(lean, batch), reference, 1e-6)


def test_lean_step_equals_plain_peft_in_bf16(tiny, batch_and_ids):
    batch, ids = batch_and_ids
    lean, plain = models(tiny, ids, "bf16")
    # The same ops on the same bf16 values; only the order in which autograd sums a tensor's gradient
    # contributions can differ, which in bf16 moves the last bits of a gradient.
    assert_same(step(lean, batch), step(plain, batch), 2e-2)


def saved_fp32_bytes(model: DualLossModel, batch: dict) -> tuple[int, int]:
    """(bytes of fp32 activations of the backbone's widths (hidden, intermediate) saved for backward, bytes of all
    saved activations), each storage counted once, parameters left out."""
    c, seen = model.lm.config, {}
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = (t.dtype, t.shape[-1] if t.dim() else 0, storage.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(batch).loss
    loss.backward()  # outside: what backward saves while it recomputes is freed at once
    wide = sum(n for dtype, width, n in seen.values()
               if dtype == torch.float32 and width in (c.hidden_size, c.intermediate_size))
    return wide, sum(n for *_, n in seen.values())


def test_lean_bf16_step_keeps_no_fp32_copy_of_activations(tiny, batch_and_ids):
    batch, ids = batch_and_ids
    lean, plain = models(tiny, ids, "bf16")
    lean_wide, lean_all = saved_fp32_bytes(lean, batch)
    plain_wide, plain_all = saved_fp32_bytes(plain, batch)
    assert plain_wide > 0  # PEFT's per-projection fp32 input casts and RMSNorm's fp32 upcast
    assert lean_wide == 0
    assert lean_all < plain_all


def test_lora_dropout_shares_one_mask_per_input_and_checkpointing_rebuilds_it(tiny, batch_and_ids):
    batch, ids = batch_and_ids
    lean, plain = models(tiny, ids, "fp32", dropout=0.3)
    no_dropout = step(plain.eval(), batch)
    first = step(lean, batch, seed=5)
    assert first[0] != pytest.approx(no_dropout[0], rel=1e-5)  # dropout is applied
    assert_same(step(lean, batch, seed=5), first, 0)  # the seed fixes the masks
    lean.lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert_same(step(lean, batch, seed=5), first, 1e-6)  # recomputation draws the same masks again
    # One mask per shared input: q, k and v see the same dropped input, so with equal adapters they add the same.
    layer = lean.lm.model.layers[0].self_attn
    seeds = []
    for proj in (layer.q_proj, layer.k_proj, layer.v_proj, layer.o_proj):
        proj.register_forward_pre_hook(lambda m, args: seeds.append(m.mask_seeds.seed_for(args[0])))
    step(lean, batch, seed=5)
    assert seeds[0] == seeds[1] == seeds[2] != seeds[3]


def test_plan_turns_checkpointing_on_only_where_the_step_does_not_fit_a_gpu():
    from higgs_accel.config import RunConfig
    from higgs_accel.memory import GIB, predict, real_model_config

    c = real_model_config()
    cfg = RunConfig()
    cfg.model.gradient_checkpointing, cfg.model.dtype, cfg.train.batch_size = "auto", "bf16", 1
    cfg.data.max_tokens_per_batch = 2048
    needed = predict(c, cfg.lora, 2048).total
    assert 16 * GIB < needed < 22 * GIB  # the real model at 2048 tokens: above its weights, within a 24 GB card
    fits = plan(cfg, c, "cuda:0", capacity=24 * GIB)
    assert fits["gradient_checkpointing"] is False and fits["predicted_gib"] == pytest.approx(needed / GIB)
    tight = plan(cfg, c, "cuda:0", capacity=16 * GIB)
    assert tight["gradient_checkpointing"] is True
    assert tight["predicted_gib"] == tight["predicted_with_checkpointing_gib"] < needed / GIB
    assert plan(cfg, c, "cpu")["gradient_checkpointing"] is False  # auto never recomputes on the CPU
    cfg.model.gradient_checkpointing = "true"
    assert plan(cfg, c, "cpu")["gradient_checkpointing"] is True
    # Without max_tokens_per_batch the longest sample is batch_size x what data.max_seconds allows, or the data's.
    cfg.data.max_tokens_per_batch = 0
    assert plan(cfg, c, "cpu", longest=1500)["tokens_per_micro_batch"] == 1500
    assert plan(cfg, c, "cpu")["tokens_per_micro_batch"] > 25 * cfg.data.max_seconds


def test_the_plan_counts_the_codec_on_the_device_in_the_dtype_it_is_held_in(tiny):
    from higgs_accel.config import RunConfig
    from higgs_accel.loading import load_codec_dir
    from higgs_accel.memory import ALLOCATOR_OVERHEAD, GIB, codec_bytes_of, real_codec_config, real_model_config

    c, cfg = real_model_config(), RunConfig()
    cfg.data.max_tokens_per_batch = 2048
    codec = load_codec_dir(tiny["model.audio_tokenizer"])
    held = sum(t.numel() * t.element_size() for t in [*codec.parameters(), *codec.buffers()])
    alone, with_codec = plan(cfg, c, "cpu"), plan(cfg, c, "cpu", codec=codec)
    assert alone["codec_gib"] == 0 and with_codec["codec_gib"] * GIB == held > 0
    for key in ("predicted_gib", "predicted_without_checkpointing_gib", "predicted_with_checkpointing_gib"):
        assert (with_codec[key] - alone[key]) * GIB == pytest.approx(held * ALLOCATOR_OVERHEAD, abs=2)
    half = plan(cfg, c, "cpu", codec=codec.to(torch.bfloat16))["codec_gib"]
    assert half * GIB < 0.51 * held  # bf16: every floating parameter and buffer at half its fp32 size
    # The released codec (201 M parameters, loaded in fp32): about 0.75 GiB, counted without allocating it.
    assert 0.74 < codec_bytes_of(real_codec_config()) / GIB < 0.76


def test_gradient_checkpointing_takes_auto_and_yaml_booleans():
    from higgs_accel.config import ConfigError, load_config

    def setting(value):
        return load_config(None, [("preset", "tiny", "x"), ("model.gradient_checkpointing", value, "x")])

    for value, want in ((True, "true"), (False, "false"), ("auto", "auto"), ("true", "true")):
        assert setting(value).model.gradient_checkpointing == want
    with pytest.raises(ConfigError, match="'model.gradient_checkpointing' must be one of"):
        setting("sometimes")
