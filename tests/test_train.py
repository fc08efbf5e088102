"""Training end to end on the tiny preset: learning, trainable parameters, adapters, resume, run files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

import analysis
from higgs_accel.chat import SpecialIds, build_example
from higgs_accel.config import ConfigError, DataConfig
from higgs_accel.data import FileAudio, Sample, collate
from tests.conftest import events_of, make_config, of, train_run


def test_overfits_four_samples(tmp_path, tiny, codes_cache):
    manifest = tmp_path / "four.jsonl"
    lines = open(tiny["data.train_manifest"]).read().splitlines()[:4]
    root = tiny["data.train_manifest"].rsplit("/", 1)[0]
    manifest.write_text("\n".join(json.dumps({**json.loads(x), "audio": f"{root}/{json.loads(x)['audio']}"})
                                  for x in lines) + "\n")
    events = train_run(tmp_path / "run", tiny, codes_cache, data__train_manifest=str(manifest),
                       data__val_manifest="", train__max_steps=60, train__save_every=0, train__eval_every=0,
                       train__lr=1e-2)
    losses = [e["loss"] for e in of(events, "train_step")]
    assert len(losses) == 60
    assert min(losses[-5:]) <= 0.5 * losses[0], (losses[0], losses[-5:])


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny, codes_cache):
    run_dir = tmp_path_factory.mktemp("finished")
    events = train_run(run_dir, tiny, codes_cache, train__max_steps=6, train__save_every=3, train__eval_every=3,
                       log__log_steps=2, lora__modules_to_save=[], lora__dropout=0.1)
    return run_dir, events


def test_only_lora_parameters_train(tiny, codes_cache, tmp_path):
    from higgs_accel.loading import load_base_model
    from higgs_accel.model import add_lora

    cfg = make_config(tmp_path, tiny, codes_cache, lora__modules_to_save=["audio_lm_head"])
    model = add_lora(load_base_model(cfg.model), cfg.lora)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n or "audio_lm_head.modules_to_save" in n for n in names)
    for kind in ("q_proj", "k_proj", "v_proj", "o_proj", "mlp.gate_proj", "audio_mlp.gate_proj",
                 "audio_mlp.up_proj", "audio_mlp.down_proj", "mlp.down_proj"):
        assert any(f"{kind}.lora_A" in n for n in names), kind
    assert not any("text_lm_head" in n or "embed" in n for n in names)


def test_events_and_run_files(finished):
    run_dir, events = finished
    steps = of(events, "train_step")
    assert [e["step"] for e in steps] == [1, 2, 3, 4, 5, 6]
    for e in steps:
        for key in ("event", "ts", "run_id", "seq", "step", "loss", "text_loss", "audio_loss", "lr", "grad_norm",
                    "audio_loss_cb7", "audio_acc_cb0", "tokens", "audio_frames", "step_time_s", "peak_mem_mb"):
            assert key in e, key
        assert abs(e["loss"] - (e["text_loss"] + e["audio_loss"])) < 1e-4
        assert abs(e["audio_loss"] - sum(e[f"audio_loss_cb{c}"] for c in range(8))) < 1e-4
    assert [e["seq"] for e in events] == list(range(len(events)))
    assert len({e["run_id"] for e in events}) == 1
    start = of(events, "run_start")[0]
    assert 0 < start["trainable_params"] < start["total_params"] and start["world_size"] == 1
    end = of(events, "run_end")[0]
    assert end["status"] == "finished" and end["completed_steps"] == 6
    for key in ("samples", "tokens", "audio_frames", "text_targets", "audio_targets"):
        assert end[key] == sum(e[key] for e in steps) > 0, key
    assert [e["step"] for e in of(events, "eval")] == [3, 6]
    slices = of(events, "pred_slice")
    assert {(e["phase"], e["step"]) for e in slices} == {("train", 2), ("train", 4), ("train", 6), ("eval", 3),
                                                         ("eval", 6)}
    text = [e for e in slices if e["modality"] == "text"][0]
    # data.train_audio_out_bos (the authors' convention): the audio opener, then what follows the audio
    assert text["first_label_text"][:2] == ["<|audio_out_bos|>", "<|audio_eos|>"]
    assert len(text["first_pos"]) == len(text["first_pred"])
    assert {e["codebook"] for e in slices if e["modality"] == "audio"} == set(range(8))
    for e in (e for e in slices if e["modality"] == "audio"):
        # codes 1..n then the stream EOS at n + 1, whatever the codebook's delay
        assert e["first_frame"][0] == 1 and e["last_frame"][-1] == e["n_targets"] and e["last_label"][-1] == 1025
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-00000003", "step-00000006"]
    table = pq.read_table(run_dir / "events" / "train_step")
    assert table.num_rows == 6 and str(table.schema.field("loss").type) == "double"
    assert pq.read_table(run_dir / "events" / "pred_slice").schema.field("first_pred").type == pa.list_(pa.int32())
    # checkpoints hold the trainable weights only, not the frozen base model
    saved = load_file(run_dir / "checkpoints" / "step-00000003" / "model.safetensors")
    assert saved and all("lora_" in k for k in saved)


def head_logits(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Text and audio logits at every position, through the heads of a model, LoRA-wrapped or not."""
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    with torch.no_grad():
        hidden = lm.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                          audio_input_ids=batch["audio_input_ids"],
                          audio_input_ids_mask=batch["audio_input_ids_mask"]).last_hidden_state
        return lm.text_lm_head(hidden), lm.audio_lm_head(hidden)


def test_final_adapter_reloads_with_peft_and_reproduces_the_trained_logits(tmp_path, tiny, codes_cache, monkeypatch):
    """The model as training left it, against PeftModel.from_pretrained(base, RUN_DIR/adapter): same logits. With
    the preset's LoRA (dropout, both heads in modules_to_save), so every kind of saved weight is covered."""
    from peft import PeftModel

    from higgs_accel import checkpoint, loop
    from higgs_accel.loading import load_base_model, load_text_tokenizer

    trained = {}
    save_adapter = checkpoint.save_adapter

    def keep_model(accelerator, module, run_dir):
        trained["model"] = accelerator.unwrap_model(module).peft
        return save_adapter(accelerator, module, run_dir)

    monkeypatch.setattr(loop.ckpt, "save_adapter", keep_model)
    run_dir = tmp_path / "run"
    train_run(run_dir, tiny, codes_cache, train__max_steps=4, train__eval_every=0, train__save_every=0,
              lora__dropout=0.1)
    cfg = make_config(run_dir, tiny, codes_cache)
    assert cfg.lora.modules_to_save == ["audio_lm_head", "text_lm_head"]
    tok = load_text_tokenizer(cfg.model)
    reloaded = PeftModel.from_pretrained(load_base_model(cfg.model), run_dir / "adapter").eval()
    base = load_base_model(cfg.model).eval()
    ids = SpecialIds.from_parts(tok, base.config)
    batch = collate([example(tok, ids, frames) for frames in (30, 18)], ids.pad, ids.stream_eos)
    text, audio = head_logits(trained["model"].eval(), batch)
    text_again, audio_again = head_logits(reloaded, batch)
    torch.testing.assert_close(text_again, text, atol=1e-5, rtol=0)
    torch.testing.assert_close(audio_again, audio, atol=1e-5, rtol=0)
    assert not torch.allclose(head_logits(base, batch)[1], audio, atol=1e-3), "training should change the model"


def example(tok, ids: SpecialIds, frames: int) -> dict:
    """One voice-cloning sample laid out by the trainer's chat code, with random codes."""
    rng = np.random.default_rng(frames)
    sample = Sample(source="test", line=1, audio=FileAudio(Path("a.wav")), text="hello there",
                    ref_audio=FileAudio(Path("r.wav")), ref_text="a reference")
    codes = [rng.integers(0, 1024, size=(ids.num_codebooks, n)) for n in (frames, frames // 2)]
    return build_example(sample, codes[0], codes[1], tok, ids, DataConfig().system_prompt, train_on_prompt=False,
                         train_audio_eos=True)


def test_resume_continues_exactly(finished, tmp_path, tiny, codes_cache):
    """6 steps straight == 3 steps, then a fresh process state resumed from the step-3 checkpoint, 3 more."""
    run_dir, events = finished
    resumed_dir = tmp_path / "resumed"
    resumed = train_run(resumed_dir, tiny, codes_cache, train__max_steps=6, train__save_every=3,
                        train__eval_every=3, log__log_steps=2, lora__modules_to_save=[], lora__dropout=0.1,
                        resume=str(run_dir / "checkpoints" / "step-00000003"))
    straight = {e["step"]: e for e in of(events, "train_step")}
    again = {e["step"]: e for e in of(resumed, "train_step")}
    assert sorted(again) == [4, 5, 6]
    for step in (4, 5, 6):
        for key in ("loss", "text_loss", "audio_loss", "lr", "grad_norm"):
            assert abs(straight[step][key] - again[step][key]) < 1e-6, (step, key)
    a = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    b = load_file(resumed_dir / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6
    assert of(resumed, "run_resume")[0]["from_step"] == 3


def test_resume_latest_in_the_same_dir_appends(tmp_path, tiny, codes_cache):
    run_dir = tmp_path / "run"
    train_run(run_dir, tiny, codes_cache, train__max_steps=4, train__save_every=2, train__eval_every=0)
    first = events_of(run_dir)
    events = train_run(run_dir, tiny, codes_cache, train__max_steps=4, train__save_every=2, train__eval_every=0,
                       resume="latest")
    assert events[: len(first)] == first
    later = events[len(first):]
    assert of(later, "run_resume")[0]["from_step"] == 4 and not of(later, "train_step")
    assert [e["seq"] for e in events] == list(range(len(events)))


def test_refuses_to_mix_two_runs(tmp_path, tiny, codes_cache):
    train_run(tmp_path, tiny, codes_cache, train__max_steps=1, train__eval_every=0, train__save_every=0)
    with pytest.raises(ConfigError, match="already holds a run"):
        train_run(tmp_path, tiny, codes_cache, train__max_steps=1)
    with pytest.raises(ConfigError, match="no complete checkpoint"):
        train_run(tmp_path, tiny, codes_cache, train__max_steps=1, resume="latest")


def test_a_run_that_fails_to_start_says_so_and_the_next_one_replaces_it(tmp_path, tiny, codes_cache):
    manifest = tmp_path / "data.jsonl"
    root = tiny["data.train_manifest"].rsplit("/", 1)[0]
    lines = [json.loads(x) for x in open(tiny["data.train_manifest"]).read().splitlines()[:4]]
    lines = [{**x, "audio": f"{root}/{x['audio']}"} for x in lines] + [{"audio": "gone.wav", "text": "Missing."}]
    manifest.write_text("".join(json.dumps(x) + "\n" for x in lines))
    run_dir = tmp_path / "run"
    with pytest.raises(ConfigError, match="'data.strict': 1 bad sample"):
        train_run(run_dir, tiny, codes_cache, data__train_manifest=str(manifest), data__strict=True)
    end = events_of(run_dir)[-1]
    assert end["event"] == "run_end" and end["status"] == "failed" and "gone.wav" in end["error"]
    # Nothing was trained, so the same command again (without strict) needs no overwrite.
    events = train_run(run_dir, tiny, codes_cache, data__train_manifest=str(manifest), train__max_steps=1,
                       train__eval_every=0, train__save_every=1)
    assert [e["status"] for e in of(events, "run_end")] == ["finished"] and len(of(events, "run_start")) == 1
    # A resume that fails to start is logged, but the run it meant to continue still reads as it ended.
    with pytest.raises(ConfigError, match="'data.strict'"):
        train_run(run_dir, tiny, codes_cache, data__train_manifest=str(manifest), data__strict=True,
                  train__max_steps=2, resume="latest")
    assert [e["status"] for e in of(events_of(run_dir), "run_end")] == ["finished", "failed"]
    assert analysis.load_run(run_dir).status == "finished"


def test_gradient_accumulation_checkpointing_and_linear_schedule(tmp_path, tiny, codes_cache):
    events = train_run(tmp_path, tiny, codes_cache, train__max_steps=3, train__batch_size=2, train__grad_accum=2,
                       train__scheduler="linear", train__warmup_steps=1, train__lr=1e-3,
                       train__eval_every=0, train__save_every=0, model__gradient_checkpointing=True)
    steps = of(events, "train_step")
    assert [e["samples"] for e in steps] == [4, 4, 4]  # two micro-batches of 2 per optimizer step
    # the lr each update used: warmup step 1 of 1 at the peak, then the linear decay from the peak
    assert [round(e["lr"], 6) for e in steps] == [0.001, 0.001, 0.0005]
    assert all(e["loss"] is not None and e["grad_norm"] > 0 for e in steps)
