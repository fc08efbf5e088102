"""The loss that is optimized is the loss that is logged, whatever way a step's samples are split: one batch,
gradient accumulation, or processes give the same LoRA gradients and the same logged loss (issue 13)."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from higgs_accel import loop
from higgs_accel.model import DualLossModel
from higgs_accel.tiny import SAMPLE_RATE, WORDS, speech_like
from tests.conftest import of, train_run

REPO = Path(__file__).resolve().parents[1]
# One optimizer step over all 8 samples, with nothing random in it: fp32 on the CPU, no dropout, no eval.
ONE_STEP = {"train__max_steps": 1, "train__eval_every": 0, "train__save_every": 0, "lora__dropout": 0.0,
            "data__val_manifest": "", "train__lr": 1e-3}
# Loads the grads of the one step into a file: the spy of the loop's backward, launched by `accelerate launch`.
SPY = """
import sys, torch
from higgs_accel import loop
from higgs_accel.model import DualLossModel
from higgs_accel.cli import main
backward = loop.backward

def spy(state, batches, stats):
    result = backward(state, batches, stats)
    if state.accelerator.is_main_process:
        model = state.accelerator.unwrap_model(state.model)
        torch.save({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}, sys.argv[1])
    return result

loop.backward = spy
sys.exit(main(["train", "--no-report", *sys.argv[2:]]))
"""


@pytest.fixture(scope="module")
def uneven(tmp_path_factory) -> Path:
    """8 samples from 1 to 24 words: clips of very different lengths, as in real TTS corpora."""
    root = tmp_path_factory.mktemp("uneven")
    pick, rng, lines = random.Random(1), np.random.default_rng(1), []
    for i, n in enumerate((1, 24, 3, 16, 2, 9, 5, 12)):
        text = " ".join(pick.choice(WORDS) for _ in range(n)).capitalize() + "."
        sf.write(root / f"{i}.wav", speech_like(text, rng), SAMPLE_RATE)
        lines.append(json.dumps({"audio": str(root / f"{i}.wav"), "text": text}))
    (root / "train.jsonl").write_text("\n".join(lines) + "\n")
    return root / "train.jsonl"


def step_grads(monkeypatch, run_dir: Path, tiny, codes_cache, manifest, **overrides) -> tuple[dict, list]:
    """The LoRA gradients of the run's one optimizer step, and its events; ``grads["optimized"]`` is the sum of the
    losses its micro-batches backpropagated (the objective whose gradient the optimizer got)."""
    grads, losses = {}, []
    backward, forward = loop.backward, DualLossModel.forward

    def keep_loss(self, batch, counts=None):
        out = forward(self, batch, counts)
        if self.training:  # not the final eval's
            losses.append(out.loss.item())
        return out

    def spy(state, batches, stats):
        result = backward(state, batches, stats)
        model = state.accelerator.unwrap_model(state.model)
        grads.update({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
        return result

    monkeypatch.setattr(loop, "backward", spy)
    monkeypatch.setattr(DualLossModel, "forward", keep_loss)
    events = train_run(run_dir, tiny, codes_cache, data__train_manifest=str(manifest), **ONE_STEP, **overrides)
    grads["optimized"] = sum(losses)
    return grads, events


def assert_same(grads: dict, reference: dict) -> None:
    grads, reference = ({n: g for n, g in d.items() if n != "optimized"} for d in (grads, reference))
    assert grads.keys() == reference.keys() and reference
    scale = max(g.abs().max().item() for g in reference.values())
    diff = max((grads[n] - reference[n]).abs().max().item() for n in reference)
    assert scale > 0 and diff <= 1e-6 * scale, (diff, scale)


@pytest.fixture(scope="module")
def one_batch(tmp_path_factory, tiny, codes_cache, uneven):
    with pytest.MonkeyPatch.context() as mp:
        return step_grads(mp, tmp_path_factory.mktemp("one"), tiny, codes_cache, uneven, train__batch_size=8)


def test_the_samples_have_very_different_lengths(one_batch):
    _, events = one_batch
    step = of(events, "train_step")[0]
    assert step["samples"] == 8 and step["padding_frac"] > 0.4  # the short clips are mostly padding


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_accumulation_gives_the_gradient_and_the_loss_of_one_batch(tmp_path, monkeypatch, tiny, codes_cache,
                                                                   uneven, reduction):
    reference, events = step_grads(monkeypatch, tmp_path / "one", tiny, codes_cache, uneven, train__batch_size=8,
                                   train__audio_reduction=reduction, train__text_weight=0.5)
    grads, accumulated = step_grads(monkeypatch, tmp_path / "split", tiny, codes_cache, uneven, train__batch_size=2,
                                    train__grad_accum=4, train__audio_reduction=reduction, train__text_weight=0.5)
    assert_same(grads, reference)
    one, split = of(events, "train_step")[0], of(accumulated, "train_step")[0]
    assert split["samples"] == 8
    for key in ("loss", "text_loss", "audio_loss", "audio_loss_cb0", "audio_loss_cb7", "grad_norm"):
        assert split[key] == pytest.approx(one[key], rel=1e-6), key


def test_the_logged_loss_is_the_optimized_loss(tmp_path, monkeypatch, tiny, codes_cache, uneven, one_batch):
    """Summed over a step's micro-batches, the losses backpropagated are the loss logged: with one batch, and
    split into 4 micro-batches whose own mean losses would average to another figure."""
    reference, events = one_batch
    logged = of(events, "train_step")[0]["loss"]
    assert reference["optimized"] == pytest.approx(logged, rel=1e-6)
    grads, split = step_grads(monkeypatch, tmp_path, tiny, codes_cache, uneven, train__batch_size=2,
                              train__grad_accum=4)
    assert grads["optimized"] == pytest.approx(logged, rel=1e-6)
    assert of(split, "train_step")[0]["loss"] == pytest.approx(logged, rel=1e-6)


@pytest.mark.slow
def test_two_processes_give_the_gradient_and_the_loss_of_one_batch(tmp_path, tiny, codes_cache, uneven, one_batch):
    reference, events = one_batch
    script, grads = tmp_path / "spy.py", tmp_path / "grads.pt"
    script.write_text(SPY)
    overrides = [f"{k}={v}" for k, v in tiny.items()] + [
        f"{k.replace('__', '.')}={v}" for k, v in {**ONE_STEP, "data__train_manifest": str(uneven)}.items()]
    r = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                        "--num_machines", "1", str(script), str(grads), "--preset", "tiny", "--output-dir",
                        str(tmp_path / "run"), f"data.codes_cache={codes_cache}", "train.batch_size=1",
                        "train.grad_accum=4", *overrides],
                       capture_output=True, text=True, cwd=REPO, timeout=600,
                       env={**os.environ, "ACCELERATE_USE_CPU": "1", "PYTHONPATH": str(REPO)})
    assert r.returncode == 0, r.stderr[-3000:]
    assert_same(torch.load(grads), reference)
    steps = [json.loads(x) for x in (tmp_path / "run" / "events.jsonl").read_text().splitlines()]
    step = [e for e in steps if e["event"] == "train_step"][0]
    assert step["samples"] == 8
    assert step["loss"] == pytest.approx(of(events, "train_step")[0]["loss"], rel=1e-6)


def test_batches_that_vanish_mid_run_are_left_out_of_the_step(tmp_path, monkeypatch, tiny, codes_cache):
    """Samples whose codes vanish from the cache mid-run are reported and left out: a step whose first micro-batch
    vanished trains on its second; a step whose micro-batches all vanished is no step (one process)."""
    from higgs_accel.data import HiggsDataset, Skip

    getitem, calls = HiggsDataset.__getitem__, []

    def vanishing(self, i):
        calls.append(i)
        if 5 <= len(calls) <= 6 or 9 <= len(calls) <= 12:  # step 2: its first micro-batch; step 3: all
            return Skip("test", i, "missing_codes", "deleted mid-run")
        return getitem(self, i)

    monkeypatch.setattr(HiggsDataset, "__getitem__", vanishing)
    events = train_run(tmp_path, tiny, codes_cache, train__max_steps=3, train__batch_size=2, train__grad_accum=2,
                       train__eval_every=0, train__save_every=0, data__val_manifest="", log__eval_audio_samples=0,
                       log__generate_every=0)
    steps = of(events, "train_step")
    assert [e["samples"] for e in steps] == [4, 2, 4] and all(e["loss"] > 0 for e in steps)
    assert len([e for e in of(events, "data_skip") if e["split"] == "train"]) == 6
    assert of(events, "run_end")[0]["status"] == "finished"
