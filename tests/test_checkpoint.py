"""Verified checkpoints on the tiny model: manifests, fallback past damage, run ids, no pickle ever executed,
loud RNG failures, disk full during a save."""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import pytest
import torch

from higgs_accel import checkpoint as ckpt
from higgs_accel.config import ConfigError

from .conftest import events_of, of, train_run

STEPS = {"train__max_steps": 4, "train__save_every": 2, "train__eval_every": 0, "log__log_steps": 2,
         "lora__dropout": 0.1}


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tiny, codes_cache) -> tuple[Path, list[dict]]:
    run_dir = tmp_path_factory.mktemp("ckpt") / "run"
    return run_dir, train_run(run_dir, tiny, codes_cache, **STEPS)


@pytest.fixture
def copy(saved, tmp_path) -> Path:
    return Path(shutil.copytree(saved[0], tmp_path / "run"))


class Marker:
    """Unpickling this creates a file: the proof that code from a checkpoint ran."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def step(run_dir: Path, n: int) -> Path:
    return ckpt.checkpoint_dir(run_dir, n)


def rewrite_manifest(c: Path) -> None:
    """What an attacker (or a careless tool) can do: make the manifest agree with whatever the dir holds."""
    manifest = json.loads((c / ckpt.MANIFEST).read_text())
    files = {n: {"size": (c / n).stat().st_size, "sha256": ckpt._sha256(c / n)} for n in ckpt._files(c)}
    (c / ckpt.MANIFEST).write_text(json.dumps({**manifest, "files": files}))


def test_a_checkpoint_lists_every_file_and_holds_no_pickled_objects(saved):
    run_dir, events = saved
    c = step(run_dir, 4)
    manifest = json.loads((c / ckpt.MANIFEST).read_text())
    run_id = events[0]["run_id"]
    assert manifest["run_id"] == run_id == ckpt.read_state(c)["run_id"] and manifest["step"] == 4
    assert sorted(manifest["files"]) == ckpt._files(c)
    assert {"model.safetensors", "optimizer.bin", "random_states_0.pkl", "scheduler.json"} <= set(manifest["files"])
    assert not list(c.glob("custom_checkpoint_*"))
    assert json.loads((c / ckpt.SCHEDULER_FILE).read_text())["last_epoch"] == 4
    assert ckpt.verify(c) is None and ckpt.has_saved_work(run_dir)


def test_a_truncated_latest_checkpoint_falls_back_to_the_previous_one(saved, copy, tiny, codes_cache):
    model = step(copy, 4) / "model.safetensors"
    model.write_bytes(model.read_bytes()[:100])
    found = ckpt.find_checkpoint(copy, "latest")
    assert found.path == step(copy, 2) and found.skipped[0][0] == step(copy, 4)
    assert "model.safetensors has 100 bytes, its manifest says" in found.skipped[0][1]
    assert "resuming from step-00000002" in found.skip_line()
    with pytest.raises(ConfigError, match="step-00000004 cannot be resumed: model.safetensors has 100 bytes"):
        ckpt.find_checkpoint(copy, str(step(copy, 4)))
    events = train_run(copy, tiny, codes_cache, **STEPS, resume="latest")
    assert of(events, "run_resume")[-1]["from_step"] == 2
    straight = {e["step"]: e["loss"] for e in of(saved[1], "train_step")}
    again = {e["step"]: e["loss"] for e in of(events, "train_step") if e["seq"] > len(saved[1])}
    assert sorted(again) == [3, 4] and all(abs(straight[s] - again[s]) < 1e-6 for s in again)
    assert ckpt.verify(step(copy, 4)) is None  # saved again, whole


def test_a_crafted_pickle_in_a_checkpoint_is_never_executed(copy, tmp_path, tiny, codes_cache):
    from accelerate.checkpointing import load_custom_state

    marker = tmp_path / "pwned"
    c = step(copy, 4)
    torch.save(Marker(marker), c / "custom_checkpoint_0.pkl")
    # The control: accelerate's loader for registered objects runs it.
    with pytest.raises(TypeError):
        load_custom_state(torch.nn.Linear(1, 1), c, 0)
    assert marker.exists()
    marker.unlink()

    assert "custom_checkpoint_0.pkl" in ckpt.find_checkpoint(copy, "latest").skipped[0][1]
    rewrite_manifest(c)  # listed with the right hash: still not part of a checkpoint's layout
    assert "not part of a checkpoint: custom_checkpoint_0.pkl" in ckpt.find_checkpoint(copy, "latest").skipped[0][1]
    (c / "custom_checkpoint_0.pkl").unlink()
    torch.save(Marker(marker), c / "random_states_0.pkl")
    rewrite_manifest(c)
    found = ckpt.find_checkpoint(copy, "latest")
    assert found.path == step(copy, 2) and "RNG state random_states_0.pkl does not load" in found.skipped[0][1]
    torch.save({"state": Marker(marker)}, step(copy, 2) / "optimizer.bin")
    rewrite_manifest(step(copy, 2))
    with pytest.raises(Exception, match="Weights only load failed"):
        train_run(copy, tiny, codes_cache, **STEPS, resume="latest")
    assert not marker.exists()


def test_a_damaged_rng_state_is_never_swallowed(copy):
    c = step(copy, 4)
    (c / "random_states_0.pkl").write_bytes(b"not a pickle at all")
    rewrite_manifest(c)
    with pytest.raises(ConfigError, match="RNG state random_states_0.pkl does not load .*resume would not be exact"):
        ckpt.find_checkpoint(copy, str(c))
    with pytest.raises(ConfigError, match="random_states_0.pkl does not load .*resume would not be exact") as e:
        ckpt.restore_rng(c, 0)
    assert "\n" not in str(e.value)


def test_a_checkpoint_of_another_run_is_refused_unless_asked(copy):
    theirs = ckpt.read_state(step(copy, 4))["run_id"]
    with pytest.raises(ConfigError, match=f"no usable checkpoint .*saved by run {theirs}, not by this dir's run "
                                          "other.*train.resume_any_run=true"):
        ckpt.find_checkpoint(copy, "latest", run_id="other")
    with pytest.raises(ConfigError, match="train.resume_any_run=true resumes it anyway"):
        ckpt.find_checkpoint(copy, str(step(copy, 2)), run_id="other")
    assert ckpt.find_checkpoint(copy, "latest", run_id="other", any_run=True).path == step(copy, 4)
    assert ckpt.find_checkpoint(copy, "latest", run_id=theirs).path == step(copy, 4)


def test_no_checkpoint_gives_advice_that_leads_somewhere(copy):
    shutil.rmtree(copy / ckpt.CHECKPOINTS)
    shutil.rmtree(copy / ckpt.ADAPTER)
    assert not ckpt.has_saved_work(copy)  # so a plain rerun replaces the dir
    with pytest.raises(ConfigError, match="saved no step, so there is nothing to resume; rerun without --resume"):
        ckpt.find_checkpoint(copy, "latest")


def test_disk_full_during_a_save_keeps_the_previous_checkpoint(tmp_path, tiny, codes_cache, monkeypatch):
    real = ckpt.write_manifest

    def full_at_step_4(c, state):
        if state["step"] == 4:
            (c / "filler").write_bytes(b"x")
            raise OSError(errno.ENOSPC, "No space left on device")
        real(c, state)

    monkeypatch.setattr(ckpt, "write_manifest", full_at_step_4)
    run_dir = tmp_path / "run"
    with pytest.raises(ConfigError) as e:
        train_run(run_dir, tiny, codes_cache, **STEPS)
    assert str(e.value) == (f"could not save {step(run_dir, 4)} (No space left on device); the previous checkpoint "
                            "step-00000002 is intact; free space, then rerun with --resume latest")
    assert [p.name for p in (run_dir / ckpt.CHECKPOINTS).iterdir()] == ["step-00000002"]
    assert ckpt.verify(step(run_dir, 2)) is None
    assert of(events_of(run_dir), "run_end")[-1]["status"] == "crashed"


def test_a_non_finite_adapter_is_never_saved(tmp_path):
    from types import SimpleNamespace

    module = torch.nn.Linear(2, 2)
    acc = SimpleNamespace(unwrap_model=lambda m: m, is_main_process=True, reduce=lambda t, _op: t)
    assert ckpt.nonfinite_tensors(acc, module) == []
    with torch.no_grad():
        module.bias[0] = float("nan")
    with pytest.raises(ConfigError, match=r"adapter not saved: 1 trainable tensor\(s\) are not finite \(first: bias\)"):
        ckpt.save_adapter(acc, module, tmp_path)
    assert not (tmp_path / ckpt.ADAPTER).exists()
