"""Higgs TTS 3 through the one trainer: the family seam (detection, layout lengths), `--preset tiny-v3` trained end to
end on the CPU (events of the v2 schema with an empty text part, Parquet, adapter, report), LoRA on the backbone,
and the memory plan's parameter count."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

from analysis.schema import declared_type
from higgs_accel.cli import main
from higgs_accel.config import LoraConfig
from higgs_accel.data import FileAudio, Sample, sequence_lengths
from higgs_accel.family import V2, V3, build_example
from higgs_accel.generate import generate_speech, generated_codes
from higgs_accel.loading import model_family
from higgs_accel.memory import parameter_counts
from higgs_accel.tiny import build_tiny_tts3, ensure_tiny_assets
from higgs_accel.tts3 import HiggsTts3, Tts3Config, load_codec
from higgs_accel.tts3_generate import effective_sampling, generate_rows
from higgs_accel.tts3_prompt import Tts3Ids, delayed_rows
from higgs_accel.tts3_prompt import build_example as tts3_example
from tests.conftest import events_of, of
from tests.test_events import documented_fields

LORA_TARGETS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


@pytest.fixture(scope="module")
def tiny_v3(tmp_path_factory):
    return build_tiny_tts3(tmp_path_factory.mktemp("tiny_v3"))


@pytest.fixture(scope="module")
def v3_run(tmp_path_factory):
    """A short `--preset tiny-v3` run through the command line: 4 steps, an eval and a checkpoint half way."""
    root = tmp_path_factory.mktemp("v3run")
    run = root / "run"
    assert main(["train", "--preset", "tiny-v3", "--output-dir", str(run), "train.max_steps=4", "train.eval_every=2",
                 "train.save_every=2", "log.log_steps=2", "log.generate_every=1", "log.generate_max_new_tokens=40",
                 f"data.codes_cache={root / 'codes'}"]) == 0
    return run


def test_the_family_is_read_from_the_checkpoint_config(tiny_v3, tmp_path):
    assert model_family(str(tiny_v3)) == V3
    v2 = ensure_tiny_assets(tmp_path / "v2")
    assert model_family(v2["model.base"]) == V2
    assert model_family(v2["model.audio_tokenizer"]) == V2  # a codec: the v2 path refuses it as a base
    assert model_family(str(tmp_path / "nothing-here")) == V2  # the v2 path refuses it, with its own line


def test_v3_sequence_lengths_are_the_built_lengths(tiny_v3):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_v3)
    ids = Tts3Ids.from_parts(tok, Tts3Config.from_file(tiny_v3 / "config.json"))
    rng = np.random.default_rng(0)
    cases = [(12, None, ""), (5, 7, "the quick fox"), (9, 3, "")]  # plain; cloning with and without ref text
    samples, built = [], []
    for t, t_ref, ref_text in cases:
        codes = rng.integers(0, 1024, (8, t))
        ref = rng.integers(0, 1024, (8, t_ref)) if t_ref else None
        s = Sample("m.jsonl", 1, FileAudio("a.wav"), "old green hills", ref_audio=FileAudio("r.wav") if t_ref else None,
                   ref_text=ref_text, frames=t + (t_ref or 0))
        samples.append(s)
        built.append(len(build_example(s, codes, ref, tok, ids, type("D", (), {"train_audio_eos": True}))
                         ["input_ids"]))
    assert sequence_lengths(samples, tok, ids, "ignored by v3") == built


def test_tiny_v3_trains_end_to_end_with_the_v2_event_schema(v3_run):
    events = events_of(v3_run)
    assert of(events, "run_end")[-1]["status"] == "finished"
    steps = of(events, "train_step")
    assert len(steps) == 4
    for e in steps + of(events, "eval"):  # audio only: the text part is empty, never a perfect 0
        assert e["text_loss"] is None and e["text_targets"] == 0
        assert e["audio_loss"] > 0 and e["audio_targets"] > 0 and e["loss"] == e["audio_loss"]
    assert of(events, "pred_slice") and of(events, "eval_audio")
    gens = of(events, "generate_audio")  # eval generations of the fixed prompts, through tts3_generate
    assert gens and all(g["error"] is None and g["n_frames"] > 0 and g["top_k"] == 50 for g in gens)
    assert all((v3_run / g["path"]).is_file() or Path(g["path"]).is_file() for g in gens)
    # Every event and field is one docs/events.md documents, as for v2.
    common, documented = documented_fields()
    for e in events:
        assert set(e) - common <= set(documented[e["event"]]), e["event"]
    for folder in (v3_run / "events").iterdir():
        for part in folder.glob("part-*.parquet"):
            for field in pq.read_schema(part):
                assert field.type == declared_type(field.name), (folder.name, field.name)
    assert (v3_run / "report" / "report.md").is_file()
    start = of(events, "run_start")[0]
    assert start["checkpoints"]["model.base"]["layout"] == "released"
    assert start["checkpoints"]["model.audio_tokenizer"]["layout"] == "bundled"
    assert start["memory"]["predicted_gib"] > 0


def test_v3_lora_adapts_the_backbone_attention_and_mlp(v3_run):
    adapter = v3_run / "adapter"
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert set(cfg["target_modules"]) == LORA_TARGETS
    with safe_open(adapter / "adapter_model.safetensors", "pt") as f:
        keys = list(f.keys())
    lora = {k.split(".lora_")[0].rsplit(".", 1)[-1] for k in keys if ".lora_" in k}
    assert lora == LORA_TARGETS
    assert all(".backbone.layers." in k for k in keys if ".lora_" in k)
    # The preset trains the random fused audio embedding (and the head tied to it) in full.
    assert [k for k in keys if ".lora_" not in k] == ["base_model.model.audio_embedding.weight"]


def test_v3_parameter_counts_are_the_module_s(tiny_v3):
    config = Tts3Config.from_file(tiny_v3 / "config.json")
    model = HiggsTts3(config)
    lora = LoraConfig()
    base, adapters = parameter_counts(config, lora)
    assert base == sum(p.numel() for p in model.parameters())
    from higgs_accel.model import add_lora

    peft = add_lora(model, lora)
    assert adapters == sum(p.numel() for n, p in peft.named_parameters() if "lora_" in n)


def test_the_released_architecture_has_4_04_b_parameters():
    """The release's widths (``memory.real_tts3_config``: the README's memory rows, bench/real_size.py --family v3),
    counted on the meta device."""
    from higgs_accel.memory import real_tts3_config

    config = real_tts3_config()
    with torch.device("meta"):
        model = HiggsTts3(config)
    count = sum(p.numel() for p in model.parameters())
    assert count == parameter_counts(config, LoraConfig())[0] and round(count / 1e9, 2) == 4.04
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads,
            config.vocab_size) == (2560, 36, 32, 8, 151936)


def rigged(model: HiggsTts3, script: torch.Tensor) -> HiggsTts3:
    """``model`` whose audio head says the rows of ``script`` in turn (then code 5 everywhere, forever)."""
    rows = iter(script)

    def audio_logits(hidden):
        row = next(rows, torch.full((script.shape[1],), 5))
        return F.one_hot(row, model.config.codebook_size).float()[None] * 100.0

    model.audio_logits = audio_logits
    return model


def test_generation_forces_the_ramp_up_stops_after_the_wind_down_and_reverts_to_the_codes(tiny_v3):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_v3)
    ids = Tts3Ids.from_parts(tok, Tts3Config.from_file(tiny_v3 / "config.json"))
    codes = np.random.default_rng(1).integers(0, 1024, (8, 6))
    layout = torch.as_tensor(delayed_rows(codes, ids))  # T + K - 1 rows, as training lays them out
    t, k = codes.shape[1], ids.num_codebooks
    script = layout.clone()
    script[script == ids.stream_bos] = 7  # the sampler must force the ramp-up's stream BOS itself
    for j in range(1, k - 1):  # and keep a codebook ended once it said stream EOS
        script[t + j, :j] = 9
    greedy = effective_sampling({"do_sample": False})
    prompt = tts3_example(tok, ids, "old green hills", None)
    rows, stopped = generate_rows(rigged(HiggsTts3.from_pretrained(tiny_v3), script), ids, prompt, 100, greedy)
    assert stopped == "eos" and torch.equal(rows, layout)
    cut, stopped = generate_rows(rigged(HiggsTts3.from_pretrained(tiny_v3), script), ids, prompt, 4, greedy)
    assert stopped == "max_length" and torch.equal(cut, layout[:4])
    # The shared path: the codes decoded are what was encoded.
    result = generate_speech(rigged(HiggsTts3.from_pretrained(tiny_v3), script), tok, load_codec(tiny_v3), ids,
                             "old green hills", sampling={"do_sample": False}, max_new_tokens=100)
    assert result["error"] is None and result["stopped"] == "eos"
    assert result["n_frames"] == t and result["new_tokens"] == t + k - 1
    frames = torch.cat([torch.full((1, k), ids.stream_bos), rows])
    assert torch.equal(generated_codes(frames, ids), torch.as_tensor(codes))


def test_repetition_aware_sampling_is_refused_for_v3():
    with pytest.raises(ValueError, match="ras_win_len"):
        effective_sampling({"ras_win_len": 7})
    assert effective_sampling({"ras_win_len": 0, "top_k": 20})["top_k"] == 20


def test_cached_generation_equals_the_full_forward(tiny_v3):
    """Each greedy row is the argmax of the full (uncached) forward over the prompt and the rows before it, except
    where the ramp-up forces stream BOS."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_v3)
    ids = Tts3Ids.from_parts(tok, Tts3Config.from_file(tiny_v3 / "config.json"))
    model = HiggsTts3.from_pretrained(tiny_v3)
    prompt = tts3_example(tok, ids, "old green hills", None)
    rows, _ = generate_rows(model, ids, prompt, 12, effective_sampling({"do_sample": False}))
    assert len(rows) == 12
    input_ids = torch.cat([prompt["input_ids"], torch.full((len(rows),), ids.slot)])
    with torch.no_grad():
        logits = model(input_ids[None], rows[None]).audio_logits[0]
    n = len(prompt["input_ids"])
    expected = logits[n - 1:n - 1 + len(rows)].argmax(-1)
    free = torch.arange(len(rows))[:, None] >= torch.arange(ids.num_codebooks)[None]  # not forced by the ramp-up
    assert torch.equal(rows[free], expected[free])


def test_v3_export_is_the_released_layout_with_the_adapter_merged(v3_run, tmp_path):
    from higgs_accel.config import ModelConfig
    from higgs_accel.data import collate
    from higgs_accel.loading import load_stack
    from higgs_accel.run_dir import run_sources

    out = tmp_path / "export"
    assert main(["export", "--run", str(v3_run), "--out", str(out)]) == 0
    with safe_open(out / "model.safetensors", "pt") as f:
        keys = list(f.keys())
    assert not [k for k in keys if "lora" in k or "base_layer" in k or "modules_to_save" in k]
    assert any(k.startswith("body.layers.0.self_attn.q_proj") for k in keys)
    assert any(k.startswith("tied.embedding.modality_embeddings.0.model.") for k in keys)  # the codec, bundled
    src = run_sources(v3_run)
    adapted = load_stack(src.model, src.adapter)
    exported = load_stack(ModelConfig(base=str(out), audio_tokenizer=str(out)))
    assert exported.checkpoints["model.audio_tokenizer"]["layout"] == "bundled"
    for a, b in zip(adapted.codec.state_dict().values(), exported.codec.state_dict().values()):
        assert torch.equal(a, b)
    codes = np.random.default_rng(2).integers(0, 1024, (8, 9))
    batch = collate([tts3_example(adapted.tokenizer, adapted.ids, "old green hills", codes)],
                    pad_id=adapted.ids.pad, stream_eos=adapted.ids.stream_eos)
    args = (batch["input_ids"], batch["audio_input_ids"], batch["audio_input_ids_mask"], batch["attention_mask"])
    with torch.no_grad():
        want = adapted.model(*args).audio_logits
        base = load_stack(ModelConfig(base=src.model.base)).model(*args).audio_logits
        got = exported.model(*args).audio_logits
    assert not torch.allclose(want, base, atol=1e-3)  # the adapter changed the model ...
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)  # ... and the export is the adapted model
    # and it speaks on its own, its codec from its bundle, as the release does
    assert main(["generate", "--base", str(out), "--text", "old green hills", "--out", str(tmp_path / "e.wav"),
                 "--max-new-tokens", "40", "--seed", "0"]) == 0  # seeded: unseeded, the tiny model may end too soon


def test_a_v3_run_resumes_exactly(v3_run, tmp_path):
    """Steps 3 and 4 resumed from the step-2 checkpoint in a fresh dir equal the uninterrupted run's."""
    resumed = tmp_path / "resumed"
    checkpoint = v3_run / "checkpoints" / "step-00000002"
    assert main(["train", "--preset", "tiny-v3", "--output-dir", str(resumed), "--resume", str(checkpoint),
                 "--no-report"]) == 0
    straight = {e["step"]: e for e in of(events_of(v3_run), "train_step")}
    again = {e["step"]: e for e in of(events_of(resumed), "train_step")}
    assert sorted(again) == [3, 4]
    for step in (3, 4):
        for key in ("loss", "audio_loss", "lr", "grad_norm"):
            assert abs(straight[step][key] - again[step][key]) < 1e-6, (step, key)


def released_bf16_shards(src: Path, out: Path) -> Path:
    """``src`` (a tiny release, fp32) as the 4B release is laid out: bf16 weights in several shards with an index,
    the audio head stored beside the embedding it is tied to, the bundled codec kept in fp32."""
    import shutil

    from safetensors.torch import load_file, save_file

    from higgs_accel.tts3 import AUDIO_EMBEDDING, AUDIO_HEAD, CODEC, WEIGHTS, WEIGHTS_INDEX

    shutil.copytree(src, out, ignore=shutil.ignore_patterns(WEIGHTS))
    state = {k: v if k.startswith(CODEC) else v.to(torch.bfloat16) for k, v in load_file(src / WEIGHTS).items()}
    state[AUDIO_HEAD + "weight"] = state[AUDIO_EMBEDDING + "weight"].clone()
    names = sorted(state)
    shards = {f"model-{i + 1:05d}-of-00003.safetensors": names[i::3] for i in range(3)}
    for shard, keys in shards.items():
        save_file({k: state[k] for k in keys}, out / shard, metadata={"format": "pt"})
    weight_map = {k: shard for shard, keys in shards.items() for k in keys}
    (out / WEIGHTS_INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return out


def written_tensors(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {k: v for f in sorted(out.glob("*.safetensors")) for k, v in load_file(f).items()}


def test_v3_export_merges_tensor_by_tensor_into_the_release_layout(v3_run, tmp_path, monkeypatch):
    """A sharded bf16 release: the export is PEFT's fp32 merge followed by the cast, bit for bit, under the released
    names; the tied head copy gets the trained embedding; the codec bundle is carried in its own dtype; and the full
    model is never built (the merge streams, as v2's does)."""
    from higgs_accel.export import export, plan_export
    from higgs_accel.loading import with_adapter
    from higgs_accel.run_dir import run_sources
    from higgs_accel.tts3 import AUDIO_EMBEDDING, AUDIO_HEAD, CODEC, WEIGHTS_INDEX, released_key

    src = run_sources(v3_run)
    base = released_bf16_shards(Path(src.model.base), tmp_path / "release")
    stored = written_tensors(base)
    with torch.no_grad():
        merged = with_adapter(HiggsTts3.from_pretrained(base, dtype=torch.float32), src.adapter).merge_and_unload()
    want = {released_key(k): v.to(torch.bfloat16) for k, v in merged.state_dict().items()}

    def no_full_model(*args, **kwargs):
        raise AssertionError("the export built the whole model")

    monkeypatch.setattr(HiggsTts3, "from_pretrained", no_full_model)
    plan = plan_export(str(base), src.adapter, tmp_path / "out")
    assert plan.merge.dtype == torch.bfloat16 and "bf16" in plan.summary()
    assert AUDIO_HEAD + "weight" in plan.merge.replaced  # the tied copy, as the embedding
    out = export(plan, tmp_path / "out")
    monkeypatch.undo()
    got = written_tensors(out)
    assert set(got) == set(stored)
    for k, v in got.items():
        if k.startswith(CODEC):
            assert v.dtype == torch.float32 and torch.equal(v, stored[k]), k
        elif k == AUDIO_HEAD + "weight":
            assert torch.equal(v, want[AUDIO_EMBEDDING + "weight"])
        else:
            assert v.dtype == torch.bfloat16 and torch.equal(v, want[k]), k
    assert not torch.equal(got[AUDIO_EMBEDDING + "weight"], stored[AUDIO_EMBEDDING + "weight"])  # trained
    index = json.loads((out / WEIGHTS_INDEX).read_text())
    assert set(index["weight_map"]) == set(got) and len(set(index["weight_map"].values())) == 3
    assert (out / "audio_tokenizer" / "config.json").is_file()  # audio_tokenizer_id names a dir inside
    HiggsTts3.from_pretrained(out)  # the export loads, model and bundled codec
    load_codec(out)


def test_v3_export_bundles_the_codec_the_run_names(v3_run, tmp_path):
    """A codec named apart from the base is bundled in place of the base's, in the release's codec prefix."""
    from higgs_accel.export import MANIFEST, export, plan_export
    from higgs_accel.run_dir import run_sources
    from higgs_accel.tts3 import CODEC

    src = run_sources(v3_run)
    codec = load_codec(src.model.base)
    with torch.no_grad():
        for p in codec.parameters():
            p.add_(0.01)
    codec.save_pretrained(tmp_path / "codec")
    out = export(plan_export(src.model.base, src.adapter, tmp_path / "out", audio_tokenizer=str(tmp_path / "codec")),
                 tmp_path / "out")
    bundled = load_codec(out).state_dict()
    assert bundled.keys() == codec.state_dict().keys()
    assert all(torch.equal(bundled[k], v) for k, v in codec.state_dict().items())
    assert sum(k.startswith(CODEC) for k in written_tensors(out)) == len(bundled)  # the base's bundle is gone
    assert json.loads((out / MANIFEST).read_text())["audio_tokenizer"] == str(tmp_path / "codec")


@pytest.mark.parametrize("setting, says", [("data.system_prompt=Speak softly.", "'data.system_prompt': Higgs TTS 3"),
                                           ("data.train_on_prompt=true", "'data.train_on_prompt': Higgs TTS 3")])
def test_v3_refuses_the_v2_prompt_settings_in_one_line(tmp_path, capsys, setting, says):
    """A setting v3's layout has no place for is refused before the model loads, not silently ignored."""
    run = tmp_path / "run"
    assert main(["train", "--preset", "tiny-v3", "--output-dir", str(run), setting, "--no-report"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if says in line]
    assert len(err) == 1
    ends = of(events_of(run), "run_end")
    assert ends and ends[-1]["status"] == "failed" and says in ends[-1]["error"]


def test_v3_voice_cloning_generation_end_to_end(v3_run, tmp_path, monkeypatch, capsys):
    """`generate --ref-audio` and training's `log.generate_ref_audio` on a v3 run: the reference is encoded, laid
    out after `<|ref_audio|>` as its delayed rows, and speech comes out; `--scene` is refused in one line."""
    import soundfile as sf

    from higgs_accel import tts3_generate
    from higgs_accel.tiny import SAMPLE_RATE, speech_like

    ref = tmp_path / "ref.wav"
    sf.write(ref, speech_like("old green hills", np.random.default_rng(0)), SAMPLE_RATE)
    prompts = []
    real = tts3_generate.generate_rows
    monkeypatch.setattr(tts3_generate, "generate_rows", lambda m, ids, prompt, *a: prompts.append(prompt) or
                        real(m, ids, prompt, *a))
    out = tmp_path / "clone.wav"
    assert main(["generate", "--run", str(v3_run), "--text", "old green hills", "--ref-audio", str(ref),
                 "--ref-text", "old green hills", "--out", str(out), "--max-new-tokens", "30", "--seed", "0"]) == 0
    assert sf.info(out).frames > 0
    run = tmp_path / "run"
    assert main(["train", "--preset", "tiny-v3", "--output-dir", str(run), "train.max_steps=1", "train.eval_every=0",
                 "log.generate_every=1", "log.generate_max_new_tokens=20", f"log.generate_ref_audio={ref}",
                 "log.generate_ref_text=old green hills", "--no-report"]) == 0
    generated = of(events_of(run), "generate_audio")
    assert generated and all(e["error"] is None for e in generated)
    assert len(prompts) >= 2
    frames = round(sf.info(ref).duration * 25)
    for prompt in prompts:
        tok_ids = prompt["input_ids"].tolist()
        assert len(prompt["audio_input_ids"]) == frames + 7  # the reference's delayed rows, T + K - 1
        assert tok_ids.count(-100) == frames + 7
    assert main(["generate", "--run", str(v3_run), "--text", "hi", "--scene", "a quiet room", "--out",
                 str(tmp_path / "x.wav")]) == 2
    assert "--scene: Higgs TTS 3's prompt has no system turn or scene" in capsys.readouterr().err


def test_v3_inline_control_tags_are_text_and_layout_tokens_are_refused(tiny_v3):
    """The release's tokenizer makes its control tags special tokens: a transcript may hold them (one token each,
    in the text), while a layout token in a transcript still skips the sample."""
    from transformers import AutoTokenizer

    from higgs_accel.data import special_token_skip
    from higgs_accel.tiny import TINY_CONTROL_TAGS

    tok = AutoTokenizer.from_pretrained(tiny_v3)
    ids = Tts3Ids.from_parts(tok, Tts3Config.from_file(tiny_v3 / "config.json"))
    tag = TINY_CONTROL_TAGS[0]
    assert tok.added_tokens_decoder[tok.convert_tokens_to_ids(tag)].special
    tagged = Sample("m.jsonl", 3, FileAudio("a.wav"), f"{tag} old green hills")
    assert special_token_skip(tagged, tok) is None
    prompt = tts3_example(tok, ids, tagged.text, None)["input_ids"].tolist()
    assert prompt.count(tok.convert_tokens_to_ids(tag)) == 1
    skip = special_token_skip(Sample("m.jsonl", 4, FileAudio("a.wav"), "old <|audio|> hills"), tok)
    assert skip is not None and skip.reason == "special_token" and "<|audio|>" in skip.detail
