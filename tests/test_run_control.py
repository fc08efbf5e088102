"""The loop on a shared cluster (issue 12): one run per dir, stop signals save the work at a step boundary,
divergence stops without touching the weights, resumed runs show each row once."""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pytest
import torch
from safetensors.torch import load_file

from analysis.schema import Superseded
from higgs_accel import checkpoint as ckpt
from higgs_accel.cli import main
from higgs_accel.config import ConfigError
from higgs_accel.lock import LOCK_FILE
from higgs_accel.model import DualLossModel
from tests.conftest import events_of, of, train_run
from tests.test_events import documented_fields

REPO = Path(__file__).resolve().parents[1]
STEPS = ["train.max_steps=6", "train.save_every=2", "train.eval_every=2", "log.log_steps=2", "lora.dropout=0.1"]


def cli_train(run_dir: Path, tiny: dict, codes_cache: Path, *args: str) -> int:
    """``higgs-accel train`` in this process, on the session's tiny assets; returns the exit status."""
    return main(["train", "--no-report", "--output-dir", str(run_dir), "--preset", "tiny",
                 f"data.codes_cache={codes_cache}", *(f"{k}={v}" for k, v in tiny.items()), *args])


def on_training_forward(monkeypatch, call: int, action) -> None:
    """Run ``action(output)`` at the ``call``-th training forward of the model and every one after it."""
    forward, calls = DualLossModel.forward, []

    def hooked(self, batch, counts=None):
        out = forward(self, batch, counts)
        if self.training:
            calls.append(1)
            if len(calls) >= call:
                action(out)
        return out

    monkeypatch.setattr(DualLossModel, "forward", hooked)


def once(fn):
    done = []

    def run(out):
        if not done:
            done.append(fn(out))
    return run


def assert_documented(event: dict) -> None:
    common, documented = documented_fields()
    assert set(event) - common == set(documented[event["event"]]), event["event"]


def visible(events: list[dict], name: str) -> list[dict]:
    """The rows of ``name`` a reader keeps: the superseded rule applied."""
    rows = of(events, name)
    table = pa.table({"step": [e["step"] for e in rows], "seq": [e["seq"] for e in rows]})
    flags = Superseded.of_rows(events).flags(table).to_pylist()
    return [e for e, flag in zip(rows, flags) if not flag]


@pytest.fixture(scope="module")
def straight(tmp_path_factory, tiny, codes_cache):
    run_dir = tmp_path_factory.mktemp("straight")
    assert cli_train(run_dir, tiny, codes_cache, *STEPS) == 0
    return events_of(run_dir)


def test_sigterm_saves_at_a_step_boundary_and_resume_repeats_the_losses(tmp_path, monkeypatch, tiny, codes_cache,
                                                                        straight):
    run_dir = tmp_path / "run"
    on_training_forward(monkeypatch, 3, once(lambda _: os.kill(os.getpid(), signal.SIGTERM)))
    assert cli_train(run_dir, tiny, codes_cache, *STEPS) == 75
    first = events_of(run_dir)
    end = of(first, "run_end")[-1]
    assert end["status"] == "preempted" and end["step"] == 3 and "stopped by SIGTERM at step 3" in end["message"]
    assert [e["step"] for e in of(first, "checkpoint")] == [2, 3]  # step 3 is no save step: saved for the stop
    assert not (run_dir / ckpt.ADAPTER).exists()
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # handlers given back
    monkeypatch.undo()
    assert cli_train(run_dir, tiny, codes_cache, *STEPS, "--resume", "latest") == 0
    events = events_of(run_dir)
    assert of(events, "run_resume")[0]["from_step"] == 3
    expected = [(e["step"], e["loss"], e["grad_norm"]) for e in of(straight, "train_step")]
    assert [(e["step"], e["loss"], e["grad_norm"]) for e in visible(events, "train_step")] == expected
    # each row once after the superseded filter: the preempted run_end is superseded by the resumed start's
    for name in ("eval", "run_end", "adapter_saved"):
        assert [e["step"] for e in visible(events, name)] == [e["step"] for e in of(straight, name)], name
    assert [e["step"] for e in visible(events, "checkpoint")] == [2, 3, 4, 6]
    assert [e["status"] for e in visible(events, "run_end")] == ["finished"]


def test_resumed_runs_show_each_row_once(tmp_path, tiny, codes_cache):
    """A resume from the last checkpoint redoes the final eval, adapter_saved and run_end (logged after that
    checkpoint): their first copies are superseded. A resume from step 2 keeps the eval of step 2 (logged before
    the step-2 checkpoint) and supersedes everything after."""
    run_dir = tmp_path / "run"
    args = ("train.max_steps=4", "train.save_every=2", "train.eval_every=2", "log.eval_audio_samples=0",
            "log.generate_every=0")
    assert cli_train(run_dir, tiny, codes_cache, *args) == 0
    first = events_of(run_dir)
    assert cli_train(run_dir, tiny, codes_cache, *args, "--resume", "latest") == 0
    assert cli_train(run_dir, tiny, codes_cache, *args, "--resume", str(ckpt.checkpoint_dir(run_dir, 2))) == 0
    events = events_of(run_dir)
    assert [e["from_step"] for e in of(events, "run_resume")] == [4, 2]
    assert [e["step"] for e in visible(events, "train_step")] == [1, 2, 3, 4]
    for name, steps in (("eval", [2, 4]), ("run_end", [4]), ("adapter_saved", [4]), ("checkpoint", [2, 4]),
                        ("pred_slice", sorted({e["step"] for e in of(first, "pred_slice")}))):
        rows = visible(events, name)
        assert sorted({e["step"] for e in rows}) == steps and len(rows) == len(of(first, name)), name
    assert visible(events, "eval")[0] == of(first, "eval")[0]
    # a start's own opening rows are no redone work; the second start (at step 4) was all redone by the third
    assert [e["step"] for e in visible(events, "run_start")] == [0, 2]


def test_damaged_latest_checkpoint_is_skipped_with_an_event(tmp_path, tiny, codes_cache, capsys):
    run_dir = tmp_path / "run"
    args = ("train.max_steps=4", "train.save_every=2", "train.eval_every=0")
    assert cli_train(run_dir, tiny, codes_cache, *args) == 0
    weights = ckpt.checkpoint_dir(run_dir, 4) / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    capsys.readouterr()
    assert cli_train(run_dir, tiny, codes_cache, *args, "--resume", "latest") == 0
    assert "resume: skipped 1 damaged checkpoint(s) (step-00000004" in capsys.readouterr().err
    events = events_of(run_dir)
    skipped = of(events, "checkpoint_skipped")
    assert len(skipped) == 1 and skipped[0]["path"].endswith("step-00000004") and "100 bytes" in skipped[0]["reason"]
    assert_documented(skipped[0])
    assert of(events, "run_resume")[0]["from_step"] == 2
    assert [e["step"] for e in visible(events, "train_step")] == [1, 2, 3, 4]


@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_nonfinite_loss_never_reaches_the_weights(tmp_path, monkeypatch, tiny, codes_cache, policy):
    """A NaN loss from step 3 on: stop ends after 2 bad steps as diverged with the step-2 checkpoint and no
    adapter; skip trains on, every bad step counted and skipped, and saves a finite adapter."""
    run_dir = tmp_path / "run"
    on_training_forward(monkeypatch, 3, lambda out: setattr(out, "loss", out.loss * math.nan))
    code = cli_train(run_dir, tiny, codes_cache, "train.max_steps=6", "train.save_every=2", "train.eval_every=0",
                     f"train.on_nonfinite={policy}", "train.max_nonfinite_steps=2")
    events = events_of(run_dir)
    steps, end = of(events, "train_step"), of(events, "run_end")[-1]
    assert [e["step_skipped"] for e in steps] == [False, False] + [True] * (len(steps) - 2)
    assert [e["nonfinite_steps"] for e in steps][2:] == list(range(1, len(steps) - 1))
    assert all(e["level"] == "warning" for e in steps[2:])
    if policy == "stop":
        assert code == 3 and end["status"] == "diverged" and end["step"] == 4 and end["nonfinite_steps"] == 2
        assert "2 non-finite steps in a row (steps 3-4); last good checkpoint step-00000002" in end["message"]
        assert [e["step"] for e in of(events, "checkpoint")] == [2]
        assert not (run_dir / ckpt.ADAPTER).exists()
        kept = load_file(ckpt.checkpoint_dir(run_dir, 2) / "model.safetensors")
    else:
        assert code == 0 and end["status"] == "finished" and end["nonfinite_steps"] == 4
        kept = load_file(run_dir / ckpt.ADAPTER / "adapter_model.safetensors")
        # the skipped steps left the weights as step 2 had them
        two = load_file(ckpt.checkpoint_dir(run_dir, 2) / ckpt.ADAPTER / "adapter_model.safetensors")
        assert all(torch.equal(kept[k], two[k]) for k in two)
    assert kept and all(torch.isfinite(t).all() for t in kept.values())


def test_zero_gradient_steps_are_warned_about(tmp_path, monkeypatch, tiny, codes_cache):
    on_training_forward(monkeypatch, 1, lambda out: setattr(out, "loss", out.loss * 0.0))
    events = train_run(tmp_path, tiny, codes_cache, train__max_steps=3, train__eval_every=0, train__save_every=0,
                       train__max_nonfinite_steps=2)
    steps = of(events, "train_step")
    assert [e["grad_norm"] for e in steps] == [0.0, 0.0, 0.0]
    assert [e["level"] for e in steps] == ["info", "warning", "warning"]
    assert not any(e["step_skipped"] for e in steps)


def test_a_stale_lock_is_taken_over_with_an_event(tmp_path, tiny, codes_cache):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    holder = {"host": socket.gethostname(), "pid": int(dead.stdout), "started": "2026-11-30T01:00:00+00:00",
              "run_id": "killed9"}
    tmp_path.mkdir(exist_ok=True)
    (tmp_path / LOCK_FILE).write_text(json.dumps(holder) + "\n")
    events = train_run(tmp_path, tiny, codes_cache, train__max_steps=1, train__eval_every=0, train__save_every=0)
    taken = of(events, "run_lock_taken_over")
    assert len(taken) == 1 and taken[0]["holder_pid"] == holder["pid"] and taken[0]["holder_run_id"] == "killed9"
    assert taken[0]["level"] == "warning" and "gone" in taken[0]["reason"]
    assert_documented(taken[0])
    assert (tmp_path / LOCK_FILE).read_text() == ""  # released cleanly at the end


def test_a_second_concurrent_run_is_refused_while_the_first_finishes(tmp_path, tiny, codes_cache):
    run_dir = tmp_path / "run"
    args = [f"{k}={v}" for k, v in tiny.items()] + [f"data.codes_cache={codes_cache}", "train.max_steps=8",
                                                    "train.eval_every=0", "train.save_every=4"]
    first = subprocess.Popen([sys.executable, "-m", "higgs_accel", "train", "--no-report", "--preset", "tiny",
                              "--output-dir", str(run_dir), *args], cwd=REPO, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        deadline = time.time() + 300
        while not (run_dir / "events.jsonl").is_file() or '"train_step"' not in (run_dir / "events.jsonl").read_text():
            assert first.poll() is None and time.time() < deadline, first.stderr.read()[-3000:]
            time.sleep(0.2)
        with pytest.raises(ConfigError, match=f"is in use by another run .*pid {first.pid}"):
            train_run(run_dir, tiny, codes_cache, train__max_steps=1, train__overwrite=True)
        assert first.wait(timeout=300) == 0
    finally:
        first.kill()
    events = events_of(run_dir)
    assert [e["step"] for e in of(events, "train_step")] == list(range(1, 9))
    assert [e["status"] for e in of(events, "run_end")] == ["finished"] and len(of(events, "run_start")) == 1
    assert [e["seq"] for e in events] == list(range(len(events)))


def launch_two(run_dir: Path, tiny: dict, codes_cache: Path, *args: str) -> subprocess.Popen:
    """``accelerate launch`` of ``higgs-accel train`` on 2 CPU processes (gloo), started in the background; its
    stderr goes to RUN_DIR.stderr (a pipe nobody reads while it runs could fill up and stall it)."""
    stderr = open(run_dir.with_suffix(".stderr"), "a")
    return subprocess.Popen([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                             "--num_machines", "1", "-m", "higgs_accel", "train", "--no-report", "--preset", "tiny",
                             "--output-dir", str(run_dir), f"data.codes_cache={codes_cache}",
                             *(f"{k}={v}" for k, v in tiny.items()), *args],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=stderr, text=True,
                            env={**os.environ, "ACCELERATE_USE_CPU": "1", "PYTHONPATH": str(REPO)})


def stderr_of(run_dir: Path) -> str:
    return run_dir.with_suffix(".stderr").read_text()[-3000:]


@pytest.mark.slow
def test_sigterm_with_two_processes_stops_both_at_one_step_and_resume_repeats_the_losses(tmp_path, tiny,
                                                                                         codes_cache):
    """SIGTERM to the main process only: the other learns it from the step's reduce and stops at the same step."""
    args = ("train.max_steps=8", "train.save_every=4", "train.eval_every=0")
    straight = launch_two(tmp_path / "straight", tiny, codes_cache, *args)
    assert straight.wait(timeout=600) == 0, stderr_of(tmp_path / "straight")
    run_dir = tmp_path / "run"
    first = launch_two(run_dir, tiny, codes_cache, *args)
    try:
        log = run_dir / "events.jsonl"
        while not log.is_file() or log.read_text().count('"train_step"') < 2:
            assert first.poll() is None, stderr_of(run_dir)
            time.sleep(0.1)
        os.kill(json.loads((run_dir / LOCK_FILE).read_text())["pid"], signal.SIGTERM)
        first.wait(timeout=300)
    finally:
        first.kill()
    # The workers end without a traceback (the launcher prints one of its own: a worker exited 75, see docs/cluster.md)
    assert "higgs_accel/" not in stderr_of(run_dir), stderr_of(run_dir)
    end = of(events_of(run_dir), "run_end")[-1]
    assert end["status"] == "preempted" and 2 <= end["step"] < 8, end
    assert (ckpt.checkpoint_dir(run_dir, end["step"]) / ckpt.MANIFEST).is_file()
    assert len(list(ckpt.checkpoint_dir(run_dir, end["step"]).glob("random_states_*.pkl"))) == 2
    again = launch_two(run_dir, tiny, codes_cache, *args, "--resume", "latest")
    assert again.wait(timeout=600) == 0, stderr_of(run_dir)
    expected = [(e["step"], e["loss"], e["grad_norm"]) for e in of(events_of(tmp_path / "straight"), "train_step")]
    events = events_of(run_dir)
    assert [(e["step"], e["loss"], e["grad_norm"]) for e in visible(events, "train_step")] == expected
    assert [e["status"] for e in visible(events, "run_end")] == ["finished"]
