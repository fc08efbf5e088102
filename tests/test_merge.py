"""The streaming LoRA merge (higgs_accel.merge): the same weights as PEFT's fp32 merge_and_unload followed by the
same cast, one tensor alive at a time, the base's dtype by default, a full disk refused before anything is written,
and an export that plain transformers loads."""

from __future__ import annotations

import json
import shutil
import weakref
from collections import namedtuple
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from higgs_accel import merge
from higgs_accel.config import ConfigError, LoraConfig
from higgs_accel.loading import load_model
from higgs_accel.model import add_lora
from higgs_accel.tiny import build_codec, build_model, build_text_tokenizer

SHARD = "200KB"  # the tiny model in several shards; the audio embedding and head (1 MiB in bf16) each alone


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    """A tiny base in fp32 (one file) and in bf16 (sharded), and an adapter with random non-zero B, trained
    heads (modules_to_save) and alpha/r = 2."""
    from transformers import HiggsAudioV2ForConditionalGeneration

    root = tmp_path_factory.mktemp("merge")
    torch.manual_seed(0)
    tok = build_text_tokenizer(root / "fp32")
    build_model(root / "fp32", tok)
    model = HiggsAudioV2ForConditionalGeneration.from_pretrained(root / "fp32", use_text_head=True)
    model.to(torch.bfloat16).save_pretrained(root / "bf16", max_shard_size=SHARD)
    tok.save_pretrained(root / "bf16")
    peft = add_lora(model.float(), LoraConfig(modules_to_save=["audio_lm_head"]))
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                p.copy_(torch.randn_like(p) * 0.05)
    peft.save_pretrained(root / "adapter")
    build_codec(root / "codec")
    return {"fp32": root / "fp32", "bf16": root / "bf16", "adapter": root / "adapter", "codec": root / "codec"}


def reference(base: Path, adapter: Path, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """PEFT's full merge on the fp32 model, then the cast: what the old export wrote."""
    merged = load_model(str(base), str(adapter), "fp32").merge_and_unload()
    return {k: v.to(dtype) for k, v in merged.state_dict().items()}


def written(out: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for f in sorted(out.glob("*.safetensors")):
        tensors.update(load_file(f))
    return tensors


@pytest.mark.parametrize("base, dtype", [("bf16", None), ("bf16", torch.float32), ("fp32", None),
                                         ("fp32", torch.bfloat16)])
def test_merge_equals_fp32_merge_then_cast(parts, tmp_path, base, dtype):
    plan = merge.plan_merge(parts[base], parts["adapter"], dtype)
    expected_dtype = dtype or {"bf16": torch.bfloat16, "fp32": torch.float32}[base]
    assert plan.dtype == expected_dtype  # None: the base checkpoint's dtype
    assert len(plan.lora) == 2 * 10  # 2 layers x (q, k, v, o + 2 MLPs x gate, up, down)
    assert plan.replaced == {"audio_lm_head.weight": "base_model.model.audio_lm_head.weight"}
    out = merge.merge(plan, tmp_path / "out")
    got, want = written(out), reference(parts[base], parts["adapter"], expected_dtype)
    assert got.keys() == want.keys()
    for k in want:
        assert got[k].dtype == expected_dtype and torch.equal(got[k], want[k]), k
    assert sum(f.stat().st_size for f in out.glob("*.safetensors")) == plan.output_bytes
    assert json.loads((out / "config.json").read_text())["dtype"] == merge.CONFIG_DTYPES[expected_dtype]
    if base == "bf16":
        assert len(plan.shards) > 2 and (out / merge.INDEX).is_file()
        index = json.loads((out / merge.INDEX).read_text())
        assert set(index["weight_map"].values()) == {f.name for f in out.glob("*.safetensors")}
        assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in got.values())
    # the adapter changed what it should: a LoRA weight and the replaced head differ from the base
    base_weights = written(parts[base])
    for k in ("model.layers.0.self_attn.q_proj.weight", "audio_lm_head.weight"):
        assert not torch.equal(got[k].float(), base_weights[k].float())


def test_merge_over_an_earlier_export_leaves_no_stale_shard(parts, tmp_path):
    out = merge.merge(merge.plan_merge(parts["bf16"], parts["adapter"]), tmp_path / "out")
    assert (out / merge.INDEX).is_file()
    merge.merge(merge.plan_merge(parts["fp32"], parts["adapter"]), out)
    assert [f.name for f in out.glob("*.safetensors")] == [merge.SINGLE] and not (out / merge.INDEX).exists()


def test_rslora_scaling_matches_peft(parts, tmp_path):
    adapter = tmp_path / "adapter"
    shutil.copytree(parts["adapter"], adapter)
    cfg = json.loads((adapter / merge.ADAPTER_CONFIG).read_text())
    (adapter / merge.ADAPTER_CONFIG).write_text(json.dumps({**cfg, "use_rslora": True}))
    out = merge.merge(merge.plan_merge(parts["fp32"], adapter), tmp_path / "out")
    want = reference(parts["fp32"], adapter, torch.float32)
    assert all(torch.equal(v, want[k]) for k, v in written(out).items())


class LiveTensors:
    """Bytes of the tensors the merge reads and writes that are still alive, sampled at every read and write."""

    def __init__(self):
        self.refs: dict[int, tuple[weakref.ref, int, int]] = {}
        self.peak = 0

    def track(self, t: torch.Tensor) -> torch.Tensor:
        self.refs[id(t)] = (weakref.ref(t), t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        storages = {ptr: n for ref, ptr, n in self.refs.values() if ref() is not None}
        self.peak = max(self.peak, sum(storages.values()))
        return t


def watched_merge(monkeypatch, plan, out, keep_reads=False, keep_writes=False) -> int:
    """Peak live bytes of ``merge.merge``; ``keep_reads`` / ``keep_writes`` make it naive: every tensor read
    (the whole base loaded first) or written (a merged state dict saved at the end) kept until the end."""
    live, kept = LiveTensors(), []
    read, write = merge.read_tensor, merge.ShardWriter.write

    def read_tensor(handle, name):
        t = live.track(read(handle, name))
        if keep_reads:
            kept.append(t)
        return t

    def write_tensor(self, name, t):
        live.track(t)
        if keep_writes:
            kept.append(t)
        write(self, name, t)

    with monkeypatch.context() as m:
        m.setattr(merge, "read_tensor", read_tensor)
        m.setattr(merge.ShardWriter, "write", write_tensor)
        merge.merge(plan, out)
    return live.peak


def test_merge_holds_one_tensor_at_a_time(parts, tmp_path, monkeypatch):
    plan = merge.plan_merge(parts["bf16"], parts["adapter"], torch.float32)
    bound = plan.largest_shard_bytes + 4 * plan.largest_tensor  # one shard and one tensor's fp32 worth
    model_fp32 = 4 * sum(v.numel() for v in written(parts["bf16"]).values())
    assert model_fp32 > bound and 2 * plan.input_bytes > bound  # so a second copy of the model would show
    assert watched_merge(monkeypatch, plan, tmp_path / "streamed") <= bound
    # the same watch flags the naive merges: the whole base read up front, or the merged model kept to save
    assert watched_merge(monkeypatch, plan, tmp_path / "naive_read", keep_reads=True) > bound
    assert watched_merge(monkeypatch, plan, tmp_path / "naive_write", keep_writes=True) > bound


def test_full_disk_refused_before_writing(parts, tmp_path, monkeypatch):
    plan = merge.plan_merge(parts["bf16"], parts["adapter"], codec=parts["codec"])
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(merge.shutil, "disk_usage", lambda p: usage(10**12, 10**12 - plan.disk_bytes + 1,
                                                                     plan.disk_bytes - 1))
    out = tmp_path / "out"
    with pytest.raises(ConfigError) as e:
        merge.merge(plan, out, "audio_tokenizer")
    assert "\n" not in str(e.value) and str(e.value).startswith(f"--out: {out} needs")
    assert not out.exists()
    assert "peak memory at most" in plan.summary() and "bf16" in plan.summary()
    assert "2x the base's bf16" in merge.plan_merge(parts["bf16"], parts["adapter"], torch.float32).summary()


@pytest.mark.parametrize("change, says", [({"use_dora": True}, "DoRA"), ({"bias": "all"}, "bias 'all'"),
                                          ({"peft_type": "IA3"}, "peft_type IA3"),
                                          ({"rank_pattern": {"q_proj": 8}}, "rank_pattern")])
def test_unmergeable_adapter_refused(parts, tmp_path, change, says):
    adapter = tmp_path / "adapter"
    shutil.copytree(parts["adapter"], adapter)
    cfg = json.loads((adapter / merge.ADAPTER_CONFIG).read_text())
    (adapter / merge.ADAPTER_CONFIG).write_text(json.dumps({**cfg, **change}))
    with pytest.raises(ConfigError, match=says) as e:
        merge.plan_merge(parts["bf16"], adapter)
    assert "\n" not in str(e.value)


def test_adapter_of_another_model_refused(parts, tmp_path):
    from transformers import HiggsAudioV2Config, HiggsAudioV2ForConditionalGeneration

    other = tmp_path / "other"
    cfg = HiggsAudioV2Config.from_pretrained(parts["fp32"])
    cfg.num_hidden_layers = 1
    HiggsAudioV2ForConditionalGeneration(cfg, use_text_head=True).save_pretrained(other)
    with pytest.raises(ConfigError, match="model.layers.1.*which the base checkpoint does not have"):
        merge.plan_merge(other, parts["adapter"])


def test_export_loads_in_plain_transformers_with_the_adapters_logits(parts, tmp_path):
    from transformers import AutoTokenizer, HiggsAudioV2ForConditionalGeneration, HiggsAudioV2TokenizerModel

    plan = merge.plan_merge(parts["fp32"], parts["adapter"], codec=parts["codec"])
    out = merge.merge(plan, tmp_path / "out", "audio_tokenizer")
    for f in parts["codec"].iterdir():  # the codec copied as it is
        assert (out / "audio_tokenizer" / f.name).read_bytes() == f.read_bytes()
    HiggsAudioV2TokenizerModel.from_pretrained(out / "audio_tokenizer")
    assert sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) == plan.disk_bytes
    plain = HiggsAudioV2ForConditionalGeneration.from_pretrained(out, use_text_head=True).eval()
    adapted = load_model(str(parts["fp32"]), str(parts["adapter"]), "fp32")
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok("the quick brown fox", return_tensors="pt").input_ids
    with torch.no_grad():
        hidden = plain.model(input_ids=ids).last_hidden_state
        want_hidden = adapted.get_base_model().model(input_ids=ids).last_hidden_state
        torch.testing.assert_close(hidden, want_hidden, rtol=1e-5, atol=1e-5)
        for head in ("text_lm_head", "audio_lm_head"):
            torch.testing.assert_close(getattr(plain, head)(hidden), getattr(adapted.get_base_model(), head)(
                want_hidden), rtol=1e-5, atol=1e-5)
        base = load_model(str(parts["fp32"]), dtype="fp32")
        assert (base.model(input_ids=ids).last_hidden_state - hidden).abs().max() > 1e-3  # the adapter counts
