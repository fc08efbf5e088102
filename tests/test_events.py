"""The event log: faults in every sink never stop training, kill -9 leaves readable files, documented recipes run."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import pandas as pd
import polars as pl
import pyarrow.parquet as pq
import pytest
import structlog

from higgs_accel.events import EventLog
from higgs_accel.rebuild import rebuild_parquet
from higgs_accel.sinks import ConsoleSink, ParquetSink, compact, read_parts
from tests.conftest import of, read_events, train_run

REPO = Path(__file__).resolve().parents[1]


class Broken:
    def write(self, event):
        raise RuntimeError("sink exploded")

    def flush(self):
        raise RuntimeError("flush exploded")

    def close(self):
        pass


def test_failing_sink_is_reported_once_and_others_continue(tmp_path):
    log = EventLog(tmp_path, "r1", sinks=[Broken(), ParquetSink(tmp_path / "events")])
    for i in range(5):
        log.emit("train_step", step=i, loss=float(i))
    log.flush()
    log.close()
    events = read_events(tmp_path)
    assert len(of(events, "train_step")) == 5
    errors = of(events, "log_error")
    assert [(e["sink"], e["error_type"]) for e in errors] == [("Broken", "RuntimeError")]
    assert pq.read_table(tmp_path / "events" / "train_step").num_rows == 5


def test_nonfinite_numbers_become_null_with_a_flag(tmp_path):
    log = EventLog(tmp_path, "r1", sinks=[ParquetSink(tmp_path / "events")])
    log.emit("train_step", step=1, loss=float("nan"), grad_norm=float("inf"), lr=0.1)
    log.close()
    line = (tmp_path / "events.jsonl").read_text()
    assert "NaN" not in line and "Infinity" not in line
    e = json.loads(line)
    assert e["loss"] is None and e["grad_norm"] is None and e["nonfinite"] == ["loss", "grad_norm"]
    assert pq.read_table(tmp_path / "events" / "train_step").column("loss").to_pylist() == [None]


@pytest.mark.parametrize("target", ["parquet", "console", "jsonl"])
def test_training_survives_a_failing_sink(target, tmp_path, tiny, codes_cache, monkeypatch):
    def boom(*args, **kwargs):
        raise OSError(28, "No space left on device")

    if target == "parquet":
        monkeypatch.setattr(ParquetSink, "write", boom)
    elif target == "console":
        monkeypatch.setattr(ConsoleSink, "write", boom)
    else:  # the JSON-lines file itself: disk full on the log dir
        for level in ("msg", "debug", "info", "warning", "error"):
            monkeypatch.setattr(structlog.WriteLogger, level, boom)
    train_run(tmp_path, tiny, codes_cache, train__max_steps=3, train__eval_every=0, train__save_every=0)
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    if target == "jsonl":
        errors = pq.read_table(tmp_path / "events" / "log_error").to_pylist()
        assert [(e["sink"], e["error_type"]) for e in errors] == [("JsonLines", "OSError")]
        assert pq.read_table(tmp_path / "events" / "train_step").num_rows == 3
        return
    events = read_events(tmp_path)
    assert len(of(events, "train_step")) == 3 and of(events, "run_end")[0]["status"] == "finished"
    errors = of(events, "log_error")
    assert len(errors) == 1 and errors[0]["error_type"] == "OSError", [(e["sink"], e["error"]) for e in errors]


def test_rolling_parts_are_complete_and_compacted(tmp_path):
    sink = ParquetSink(tmp_path, flush_events=3)
    log = EventLog(tmp_path / "run", "r1", sinks=[sink])
    for i in range(10):
        log.emit("train_step", step=i, loss=float(i))
    parts = sorted((tmp_path / "train_step").glob("part-*.parquet"))
    assert len(parts) == 3 and all(pq.read_table(p).num_rows == 3 for p in parts)
    log.close()
    parts = sorted((tmp_path / "train_step").glob("part-*.parquet"))
    assert len(parts) == 1 and pq.read_table(parts[0]).column("step").to_pylist() == list(range(10))
    compact(tmp_path)  # idempotent
    assert read_parts(tmp_path / "train_step").num_rows == 10


@pytest.mark.slow
def test_kill_9_leaves_whole_lines_and_readable_parts_then_resume_sees_each_step_once(tmp_path):
    run_dir = tmp_path / "run"
    args = [sys.executable, "-m", "higgs_accel", "train", "--preset", "tiny", "--output-dir", str(run_dir),
            "--no-report", "train.max_steps=2000", "train.save_every=10", "train.eval_every=0",
            "log.parquet_flush_events=40", "log.log_steps=5"]
    proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    events_file = run_dir / "events.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline:
        time.sleep(0.5)
        if events_file.exists() and events_file.read_text().count('"train_step"') >= 25:
            break
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    lines = events_file.read_bytes().split(b"\n")
    whole = [json.loads(x) for x in lines[:-1]]
    assert whole and all(e["event"] for e in whole)
    for part in (run_dir / "events").glob("*/part-*.parquet"):
        pq.read_table(part)
    assert not of(whole, "run_end")

    rebuild_parquet(run_dir)
    assert pq.read_table(run_dir / "events" / "train_step").num_rows == len(of(whole, "train_step"))

    done = sorted(p.name for p in (run_dir / "checkpoints").glob("step-*") if not p.name.endswith(".partial"))
    assert done
    last_step = max(e["step"] for e in of(whole, "train_step"))
    r = subprocess.run(args[:-4] + ["train.max_steps=" + str(last_step + 3), "train.save_every=10",
                                    "train.eval_every=0", "--resume", "latest"],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    events = read_events(run_dir) if events_file.read_bytes().endswith(b"\n") else None
    assert events is not None
    resume = of(events, "run_resume")[0]
    from_step = resume["from_step"]
    assert from_step == int(done[-1].split("-")[1])
    kept = [e for e in of(events, "train_step") if not (e["step"] > from_step and e["seq"] < resume["seq"])]
    assert [e["step"] for e in kept] == list(range(1, last_step + 4))
    assert [e["seq"] for e in events] == list(range(len(events)))


@pytest.fixture(scope="module")
def recipe_run(tmp_path_factory, tiny, codes_cache):
    """A finished run with one planted bad manifest line, for the documented jq and Parquet recipes."""
    run_dir = tmp_path_factory.mktemp("recipes") / "demo"
    manifest = run_dir.parent / "train.jsonl"
    root = Path(tiny["data.train_manifest"]).parent
    rows = [json.loads(x) for x in Path(tiny["data.train_manifest"]).read_text().splitlines()]
    manifest.write_text("".join(json.dumps({**r, "audio": str(root / r["audio"])}) + "\n" for r in rows)
                        + '{"audio": "missing.wav", "text": "gone"}\n')
    train_run(run_dir, tiny, codes_cache, data__train_manifest=str(manifest), train__max_steps=20,
              train__eval_every=10, train__save_every=0, log__log_steps=20)
    return run_dir


def _readme_jq_commands() -> list[str]:
    text = (REPO / "README.md").read_text()
    return [line for block in re.findall(r"```bash\n(.*?)```", text, re.S) for line in block.splitlines()
            if line.startswith("jq ")]


def test_readme_jq_recipes_run_on_a_real_log(recipe_run):
    if not shutil.which("jq"):
        pytest.fail("jq is required (.ci/run installs it)")
    commands = _readme_jq_commands()
    assert len(commands) >= 4
    for cmd in commands:
        cmd = cmd.replace("runs/demo", str(recipe_run))
        r = subprocess.run(cmd, shell=True, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, (cmd, r.stderr)
        assert r.stdout.strip(), f"no output from: {cmd}"
    skips = subprocess.run(commands[-1].replace("runs/demo", str(recipe_run)), shell=True, capture_output=True,
                           text=True).stdout.strip().splitlines()
    assert len(skips) == 1 and '"missing_file"' in skips[0] and ",17," in skips[0]


def test_parquet_reads_in_pandas_polars_and_duckdb(recipe_run):
    events = recipe_run / "events"
    steps = pd.read_parquet(events / "train_step")
    assert list(steps["step"]) == list(range(1, 21)) and steps["loss"].dtype == "float64"
    slices = pl.read_parquet(str(events / "pred_slice" / "*.parquet"))
    assert slices.schema["first_pred"] == pl.List(pl.Int32) and slices.schema["first_pred_text"] == pl.List(pl.String)
    n = duckdb.sql(f"SELECT count(*) FROM '{events}/eval/*.parquet'").fetchall()[0][0]
    assert n == 2
    start = pd.read_parquet(events / "run_start").iloc[0]
    assert json.loads(start["config"])["train"]["max_steps"] == 20


def test_trackers_get_numeric_metrics_of_steps_and_evals(tmp_path):
    from higgs_accel.sinks import TrackerSink

    class FakeAccelerator:
        logged: list = []

        def log(self, values, step):
            self.logged.append((step, values))

        def end_training(self):
            self.logged.append("end")

    acc = FakeAccelerator()
    log = EventLog(tmp_path, "r1", sinks=[TrackerSink(acc)])
    log.emit("train_step", step=3, loss=1.5, lr=0.1, grad_norm=None)
    log.emit("eval", step=3, phase="eval", loss=2.0)
    log.emit("pred_slice", step=3, first_pred=[1, 2])
    log.close()
    assert acc.logged[0] == (3, {"train/loss": 1.5, "train/lr": 0.1, "train/epoch": 0})
    assert acc.logged[1] == (3, {"eval/loss": 2.0, "eval/epoch": 0})
    assert acc.logged[2] == "end"
