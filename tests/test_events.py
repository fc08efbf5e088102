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
import warnings
from datetime import datetime, timedelta, timezone
from pathlib import Path

import duckdb
import pandas as pd
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import transformers

from analysis.schema import declared_type, read_parts
from higgs_accel import loop
from higgs_accel.events import EventLog, JsonLines
from higgs_accel.rebuild import rebuild_parquet
from higgs_accel.sinks import ConsoleSink, ParquetSink, TrackerSink, compact
from tests.conftest import events_of, of, train_run

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
    events = events_of(tmp_path)
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


def test_nonfinite_numbers_inside_lists_and_dicts_become_null_with_a_flag(tmp_path):
    log = EventLog(tmp_path, "r1", sinks=[ParquetSink(tmp_path / "events")])
    log.emit("eval_audio", step=1, acc=0.5, acc_cb=[0.5, float("nan"), float("-inf")],
             hardware={"gpu": {"temps": [40.0, float("inf")]}}, sample_rate=24000)
    log.close()
    line = (tmp_path / "events.jsonl").read_text()
    assert "NaN" not in line and "Infinity" not in line
    e = json.loads(line)
    assert e["acc_cb"] == [0.5, None, None] and e["hardware"] == {"gpu": {"temps": [40.0, None]}}
    assert e["nonfinite"] == ["acc_cb", "hardware"] and e["acc"] == 0.5
    table = pq.read_table(tmp_path / "events" / "eval_audio")
    assert table.schema.field("acc_cb").type == pa.list_(pa.float64())
    assert table.column("acc_cb").to_pylist() == [[0.5, None, None]]


def _lines(path: Path) -> list[dict]:
    """Every line of a log, parsed: a line that does not parse fails the test (unlike readers, which skip it)."""
    return [json.loads(x) for x in path.read_bytes().split(b"\n")[:-1]]


def test_a_torn_last_line_is_cut_off_and_reported_when_the_log_is_reopened(tmp_path):
    log = EventLog(tmp_path, "r1")
    for i in range(3):
        log.emit("train_step", step=i + 1, loss=float(i))
    log.close()
    fragment = '{"event": "train_step", "ts": "2025-01-01T00:00:00Z", "level": "in'
    with open(tmp_path / "events.jsonl", "a") as f:  # what kill -9 in the middle of a write leaves
        f.write(fragment)

    log = EventLog(tmp_path, "r1")
    log.emit("run_resume", step=3, checkpoint="c", from_step=3)
    log.close()
    events = _lines(tmp_path / "events.jsonl")
    assert [e["seq"] for e in events] == list(range(5))
    assert [e["step"] for e in of(events, "train_step")] == [1, 2, 3]
    torn = of(events, "log_error")
    assert [(e["sink"], e["error_type"], e["fragment"]) for e in torn] == [("JsonLines", "TornLine", fragment)]
    assert of(events, "run_resume")[0]["seq"] == 4


def test_a_whole_last_event_without_its_newline_is_kept(tmp_path):
    (tmp_path / "events.jsonl").write_text('{"event": "train_step", "seq": 0, "step": 1}')
    log = EventLog(tmp_path, "r1")
    log.emit("train_step", step=2)
    log.close()
    events = _lines(tmp_path / "events.jsonl")
    assert [(e["event"], e["seq"], e["step"]) for e in events] == [("train_step", 0, 1), ("train_step", 1, 2)]


def test_a_log_that_is_one_fragment_starts_over(tmp_path):
    (tmp_path / "events.jsonl").write_text('{"event": "run_st')
    log = EventLog(tmp_path, "r1")
    log.emit("run_start")
    log.close()
    events = _lines(tmp_path / "events.jsonl")
    assert [(e["event"], e["seq"]) for e in events] == [("log_error", 0), ("run_start", 1)]
    assert events[0]["fragment"] == '{"event": "run_st'


def test_report_error_applies_the_once_per_sink_and_error_type_rule(tmp_path):
    log = EventLog(tmp_path, "r1")
    log.report_error("pred_slice", IndexError("slice 1"))
    log.report_error("pred_slice", IndexError("slice 2"))
    log.report_error("pred_slice", ValueError("other type"))
    log.report_error("eval_audio", IndexError("other sink"))
    reported = [(e["sink"], e["error_type"], e["error"]) for e in events_of(tmp_path)]  # written at once
    log.close()
    assert reported == [("pred_slice", "IndexError", "slice 1"), ("pred_slice", "ValueError", "other type"),
                        ("eval_audio", "IndexError", "other sink")]
    assert all(e["level"] == "warning" and e["event"] == "log_error" for e in events_of(tmp_path))


@pytest.mark.parametrize("target", ["parquet", "console", "jsonl"])
def test_training_survives_a_failing_sink(target, tmp_path, tiny, codes_cache, monkeypatch):
    def boom(*args, **kwargs):
        raise OSError(28, "No space left on device")

    if target == "parquet":
        monkeypatch.setattr(ParquetSink, "write", boom)
    elif target == "console":
        monkeypatch.setattr(ConsoleSink, "write", boom)
    else:  # the JSON-lines file itself: disk full on the log dir
        monkeypatch.setattr(JsonLines, "write", boom)
    train_run(tmp_path, tiny, codes_cache, train__max_steps=3, train__eval_every=0, train__save_every=0)
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    if target == "jsonl":
        errors = pq.read_table(tmp_path / "events" / "log_error").to_pylist()
        assert [(e["sink"], e["error_type"]) for e in errors] == [("JsonLines", "OSError")]
        assert pq.read_table(tmp_path / "events" / "train_step").num_rows == 3
        return
    events = events_of(tmp_path)
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


def _read_everywhere(folder: Path, field: str) -> list:
    """One column of an event family as pandas, polars and DuckDB read the folder; they must agree."""
    by_pandas = [None if pd.isna(v) else v for v in pd.read_parquet(folder)[field]]
    by_polars = pl.read_parquet(str(folder / "*.parquet"))[field].to_list()
    by_duckdb = [r[0] for r in duckdb.sql(f"SELECT {field} FROM '{folder}/*.parquet' ORDER BY seq").fetchall()]
    assert by_pandas == by_polars == by_duckdb
    return by_pandas


@pytest.mark.parametrize("family, field", [("eval_audio", "reason"), ("generate_audio", "error"),
                                           ("run_end", "error"), ("data_skip", "detail")])
def test_a_text_field_null_in_every_row_of_one_part_keeps_its_type(family, field, tmp_path):
    log = EventLog(tmp_path, "r1", sinks=[ParquetSink(tmp_path / "events", flush_events=1)])
    log.emit(family, step=1, **{field: None})
    log.emit(family, step=2, **{field: "went wrong"})
    folder = tmp_path / "events" / family
    parts = sorted(folder.glob("part-*.parquet"))
    assert len(parts) == 2 and all(pq.read_schema(p).field(field).type == pa.string() for p in parts)
    assert _read_everywhere(folder, field) == [None, "went wrong"]
    log.close()
    assert len(list(folder.glob("part-*.parquet"))) == 1
    assert _read_everywhere(folder, field) == [None, "went wrong"]


def test_an_undeclared_field_null_in_one_part_still_compacts(tmp_path):
    log = EventLog(tmp_path, "r1", sinks=[ParquetSink(tmp_path / "events", flush_events=1)])
    log.emit("speaker_probe", step=1, verdict=None)
    log.emit("speaker_probe", step=2, verdict="same speaker")
    log.close()
    table = pq.read_table(tmp_path / "events" / "speaker_probe")
    assert table.column("verdict").to_pylist() == [None, "same speaker"]


def test_parts_typed_by_an_older_writer_still_compact(tmp_path):
    folder = tmp_path / "eval_audio"
    folder.mkdir()
    pq.write_table(pa.table({"seq": [0], "step": [1], "reason": pa.array([None], pa.float64())}),
                   folder / "part-000000000000.parquet")
    pq.write_table(pa.table({"seq": [1], "step": [2], "reason": ["no target audio codes"]}),
                   folder / "part-000000000001.parquet")
    compact(tmp_path)
    assert [p.name for p in folder.iterdir()] == ["part-000000000000.parquet"]
    assert read_parts(folder).column("reason").to_pylist() == [None, "no target audio codes"]


@pytest.fixture
def jq() -> None:
    """The recipes are shell commands for the jq program: required in CI (.ci/run installs it), else skipped."""
    if shutil.which("jq"):
        return
    if os.environ.get("CI"):
        pytest.fail("jq is required in CI (.ci/run installs it)")
    pytest.skip("jq is not installed (apt-get install jq); .ci/run installs it")


def _docs_commands(prefix: str) -> list[str]:
    text = (REPO / "docs" / "events.md").read_text()
    return [line for block in re.findall(r"```bash\n(.*?)```", text, re.S) for line in block.splitlines()
            if line.startswith(prefix)]


def _superseded_jq(run_dir: Path) -> list[list]:
    """The documented jq recipe that applies the superseded rule to events.jsonl, run on ``run_dir``."""
    [cmd] = [c for c in _docs_commands("jq ") if "run_resume" in c]
    r = subprocess.run(cmd.replace("RUN_DIR", str(run_dir)), shell=True, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return [json.loads(x) for x in r.stdout.splitlines()]


def test_superseded_events_are_marked_by_compaction_rebuild_and_the_jq_recipe(tmp_path, jq):
    first = EventLog(tmp_path, "r1", sinks=[ParquetSink(tmp_path / "events")])
    for step in range(1, 6):
        first.emit("train_step", step=step, loss=10.0 - step)
    first.emit("run_end", step=5, status="crashed", error="RuntimeError: boom")
    first.close()  # compacted: every row not superseded, yet
    with open(tmp_path / "events.jsonl", "a") as f:
        f.write('{"event": "train_step", "step": 6, "lo')  # and then a hard kill, for good measure
    second = EventLog(tmp_path, "r1", sinks=[ParquetSink(tmp_path / "events")])
    second.emit("run_start", step=3)
    second.emit("run_resume", step=3, checkpoint="checkpoints/step-3", from_step=3)
    for step in range(4, 8):
        second.emit("train_step", step=step, loss=1.0 / step)
    second.close()

    def flags(family: str) -> list[tuple[int, bool]]:
        table = pd.read_parquet(tmp_path / "events" / family)
        return list(zip(table["step"], table["superseded"]))

    expected = [(1, False), (2, False), (3, False), (4, True), (5, True), (4, False), (5, False), (6, False),
                (7, False)]
    assert flags("train_step") == expected
    assert flags("run_end") == [(5, True)] and flags("run_resume") == [(3, False)]
    kept = pd.read_parquet(tmp_path / "events" / "train_step").query("not superseded")
    assert kept["step"].tolist() == list(range(1, 8)) and kept["loss"].iloc[-1] == pytest.approx(1 / 7)
    rebuild_parquet(tmp_path)
    assert flags("train_step") == expected and flags("run_end") == [(5, True)]
    assert _superseded_jq(tmp_path) == [[s, 10.0 - s] for s in (1, 2, 3)] + [[s, 1.0 / s] for s in range(4, 8)]


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
    torn = not events_file.read_bytes().endswith(b"\n")
    whole = [json.loads(x) for x in events_file.read_bytes().split(b"\n")[:-1]]
    assert whole and all(e["event"] for e in whole)
    parts = list((run_dir / "events").glob("*/part-*.parquet"))
    assert parts  # flushes every 40 events and at each checkpoint: some parts were written before the kill
    for part in parts:
        assert pq.read_table(part).num_rows
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
    events = _lines(events_file)  # a torn line glued to the resumed run's first event would not parse
    assert [e["seq"] for e in events] == list(range(len(events)))
    assert [e["error_type"] for e in of(events, "log_error")] == (["TornLine"] if torn else [])
    from_step = of(events, "run_resume")[0]["from_step"]
    assert from_step == int(done[-1].split("-")[1])
    # The product's readers, not the rule again: the superseded column of the compacted table, and the jq recipe.
    steps = pd.read_parquet(run_dir / "events" / "train_step")
    assert steps["superseded"].sum() == last_step - from_step
    assert steps.query("not superseded")["step"].tolist() == list(range(1, last_step + 4))
    if shutil.which("jq") or os.environ.get("CI"):
        assert [s for s, _ in _superseded_jq(run_dir)] == list(range(1, last_step + 4))


class FailingTracker:
    """An accelerate tracker backend that is down: every ``log`` raises."""

    trackers = ()

    def log(self, values, step):
        raise ConnectionError("tracker unreachable")

    def end_training(self):
        pass


class EventLogWithFailingTracker(EventLog):
    def __init__(self, *args, sinks=(), **kwargs):
        super().__init__(*args, sinks=[*sinks, TrackerSink(FailingTracker())], **kwargs)


def planting_library_logs(peak_memory_mb):
    """``peak_memory_mb`` (called once per step) that also logs a transformers warning and a Python warning once."""
    planted = []

    def wrapped():
        if not planted:
            planted.append(True)
            transformers.utils.logging.get_logger("transformers.planted").warning("planted transformers warning")
            warnings.warn("planted python warning", UserWarning, stacklevel=1)
        return peak_memory_mb()

    return wrapped


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, tiny, codes_cache):
    """A finished run that meets every event but run_resume: a planted bad manifest line (data_skip), evals with
    eval audio and generation, checkpoints, a transformers and a Python warning (library_log) and a tracker that is
    down (log_error). One run serves the documented recipes and the checks below: each tiny run costs a while."""
    run_dir = tmp_path_factory.mktemp("recipes") / "demo"
    manifest = run_dir.parent / "train.jsonl"
    root = Path(tiny["data.train_manifest"]).parent
    rows = [json.loads(x) for x in Path(tiny["data.train_manifest"]).read_text().splitlines()]
    manifest.write_text("".join(json.dumps({**r, "audio": str(root / r["audio"])}) + "\n" for r in rows)
                        + '{"audio": "missing.wav", "text": "gone"}\n')
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(loop, "EventLog", EventLogWithFailingTracker)
        mp.setattr(loop, "peak_memory_mb", planting_library_logs(loop.peak_memory_mb))
        train_run(run_dir, tiny, codes_cache, data__train_manifest=str(manifest), train__max_steps=20,
                  train__eval_every=10, train__save_every=10, log__log_steps=20, log__generate_every=1,
                  log__generate_max_new_tokens=16)
    return run_dir


def _readme_jq_commands() -> list[str]:
    text = (REPO / "README.md").read_text()
    return [line for block in re.findall(r"```bash\n(.*?)```", text, re.S) for line in block.splitlines()
            if line.startswith("jq ")]


def test_readme_jq_recipes_run_on_a_real_log(full_run, jq):
    commands = _readme_jq_commands()
    assert len(commands) >= 4
    for cmd in commands:
        cmd = cmd.replace("runs/demo", str(full_run))
        r = subprocess.run(cmd, shell=True, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, (cmd, r.stderr)
        assert r.stdout.strip(), f"no output from: {cmd}"
    [skip_recipe] = [c for c in commands if '"data_skip"' in c]
    skips = subprocess.run(skip_recipe.replace("runs/demo", str(full_run)), shell=True, capture_output=True,
                           text=True).stdout.strip().splitlines()
    assert len(skips) == 1 and '"missing_file"' in skips[0] and ",17," in skips[0]


def test_parquet_reads_in_pandas_polars_and_duckdb(full_run):
    events = full_run / "events"
    steps = pd.read_parquet(events / "train_step")
    assert list(steps["step"]) == list(range(1, 21)) and steps["loss"].dtype == "float64"
    slices = pl.read_parquet(str(events / "pred_slice" / "*.parquet"))
    assert slices.schema["first_pred"] == pl.List(pl.Int32) and slices.schema["first_pred_text"] == pl.List(pl.String)
    n = duckdb.sql(f"SELECT count(*) FROM '{events}/eval/*.parquet'").fetchall()[0][0]
    assert n == 2
    start = pd.read_parquet(events / "run_start").iloc[0]
    assert json.loads(start["config"])["train"]["max_steps"] == 20


def test_trackers_get_numeric_metrics_of_steps_and_evals(tmp_path):
    class FakeAccelerator:
        logged: list = []
        trackers = ()

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


def test_library_warnings_reach_the_log_once_each_as_library_log(full_run):
    planted = [e for e in of(events_of(full_run), "library_log") if "planted" in e["message"]]
    assert sorted((e["logger"], e["level"]) for e in planted) == [("py.warnings", "warning"),
                                                                 ("transformers.planted", "warning")]
    by_logger = {e["logger"]: e["message"] for e in planted}
    assert by_logger["transformers.planted"] == "planted transformers warning"
    assert "UserWarning: planted python warning" in by_logger["py.warnings"]


def test_a_failing_tracker_is_reported_once_and_training_finishes(full_run):
    events = events_of(full_run)
    errors = [(e["sink"], e["error_type"], e["error"]) for e in of(events, "log_error")]
    assert errors == [("TrackerSink", "ConnectionError", "tracker unreachable")]
    assert len(of(events, "train_step")) == 20 and of(events, "run_end")[0]["status"] == "finished"
    assert (full_run / "adapter" / "adapter_model.safetensors").is_file()


COMMON = ("event", "ts", "run_id", "seq", "step", "epoch", "phase", "rank", "schema_version", "level")


def test_every_event_of_a_real_run_has_the_common_fields(full_run):
    events = events_of(full_run)
    assert len({e["event"] for e in events}) >= 12
    assert [e["seq"] for e in events] == list(range(len(events)))
    steps = [e["step"] for e in events]
    assert steps == sorted(steps) and steps[-1] == 20
    for e in events:
        missing = [k for k in COMMON if k not in e]
        assert not missing, (e["event"], missing)
        assert e["run_id"] == events[0]["run_id"] and e["rank"] == 0 and e["schema_version"] == 1
        assert e["level"] in ("info", "warning", "error") and e["phase"] in ("train", "eval")
        assert type(e["step"]) is int and type(e["epoch"]) is int
        assert datetime.fromisoformat(e["ts"].replace("Z", "+00:00")).utcoffset() == timedelta(0)
    assert {e["phase"] for e in of(events, "eval")} == {"eval"}
    assert {e["phase"] for e in of(events, "train_step")} == {"train"}


def _table_rows(markdown: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip().strip("|").split("|")] for line in markdown.splitlines()
            if line.startswith("| `")]


def _field_names(cell: str) -> list[str]:
    """Backticked names of a table cell; `x_cb0` .. `x_cb7` stands for every one in between."""
    names = []
    for stem, lo, hi in re.findall(r"`(\w+?)(\d+)` \.\. `\w+?(\d+)`", cell):
        names += [f"{stem}{i}" for i in range(int(lo), int(hi) + 1)]
    cell = re.sub(r"`\w+` \.\. `\w+`", "", cell)
    return names + re.findall(r"`(\w+)`", cell)


def documented_fields() -> tuple[set[str], dict[str, dict[str, bool]]]:
    """From docs/events.md: the fields on every event, and per event its fields, each mapped to whether it is on
    every event of that name (a row that says "absent" is not)."""
    text = (REPO / "docs" / "events.md").read_text()
    common_part, events_part = text.split("## Fields on every event")[1].split("\n## Events\n")
    common = {name for row in _table_rows(common_part) for name in _field_names(row[0])}
    events = {}
    for name, body in re.findall(r"^### `(\w+)`[^\n]*\n(.*?)(?=^### |\Z)", events_part, re.S | re.M):
        events[name] = {f: "absent" not in row[1] for row in _table_rows(body) for f in _field_names(row[0])}
    return common, events


def test_every_event_and_field_of_a_real_run_is_documented_and_back(full_run):
    common, documented = documented_fields()
    assert set(COMMON) | {"nonfinite"} == common
    emitted: dict[str, list[dict]] = {}
    for e in events_of(full_run):
        emitted.setdefault(e["event"], []).append(e)
    assert set(emitted) <= set(documented), set(emitted) - set(documented)
    # run_resume is met by the resume test; the quality events (a run with scorers) by tests/test_quality.py; the
    # lock takeover and skipped checkpoints by tests/test_run_control.py
    assert set(documented) - set(emitted) == {"run_resume", "quality", "quality_summary", "checkpoint_skipped",
                                              "run_lock_taken_over"}
    for name, events in emitted.items():
        fields = documented[name]
        seen = set().union(*events) - common
        assert seen <= set(fields), f"{name}: undocumented {seen - set(fields)}"
        assert set(fields) - seen <= {"fragment"}, f"{name}: documented, never emitted {set(fields) - seen}"
        always = {f for f, on_every in fields.items() if on_every}
        on_all = set.intersection(*[set(e) for e in events])
        assert always <= on_all, f"{name}: missing on some events {always - on_all}"


def test_the_parquet_tables_of_a_real_run_have_the_declared_types(full_run):
    folders = sorted((full_run / "events").iterdir())
    assert len(folders) >= 12
    for folder in folders:
        [part] = folder.glob("part-*.parquet")  # compacted at the end of the run
        schema = pq.read_schema(part)
        assert "superseded" in schema.names
        for field in schema:
            assert field.type == declared_type(field.name), (folder.name, field.name, field.type)


# ---------------------------------------------------------------- one schema for writer and reader

_SAMPLE_VALUES = {pa.int64(): 3, pa.float64(): 1.5, pa.bool_(): True, pa.string(): "x",
                  pa.list_(pa.int32()): [1, 2], pa.list_(pa.float64()): [0.5], pa.list_(pa.string()): ["a"]}


def test_writer_and_reader_type_the_same_rows_alike(tmp_path):
    """Every declared field, null in one part and holding a value in the next: the trainer's compacted Parquet, the
    reader on that Parquet and the reader on events.jsonl alone all give each field its declared type."""
    from analysis.load import read_events as load_events
    from analysis.schema import FIELD_TYPES, TIME

    set_by_log = {"event", "ts", "level", "step", "epoch", "phase", "seq", "run_id", "rank", "schema_version"}
    fields = {f: t for f, t in FIELD_TYPES.items() if f not in set_by_log | {"superseded"}}
    assert set(map(str, fields.values())) | {str(TIME)} == set(map(str, set(FIELD_TYPES.values())))
    run_dir = tmp_path / "run"
    log = EventLog(run_dir, "r1", sinks=[ParquetSink(run_dir / "events", flush_events=1)])
    log.emit("probe", **dict.fromkeys(fields))
    log.emit("probe", **{f: _SAMPLE_VALUES[t] for f, t in fields.items()})
    assert len(list((run_dir / "events" / "probe").glob("part-*.parquet"))) == 2
    log.close()
    written = pq.read_table(run_dir / "events" / "probe").schema
    from_parquet = load_events(run_dir, skipped=[])["probe"].schema
    shutil.rmtree(run_dir / "events")
    from_jsonl = load_events(run_dir, skipped=[])["probe"].schema
    for name, declared in FIELD_TYPES.items():
        if name == "superseded":
            assert written.field(name).type == declared and name not in from_parquet.names
            continue
        types = (written.field(name).type, from_parquet.field(name).type, from_jsonl.field(name).type)
        assert types == (declared,) * 3, (name, types)
    assert load_events(run_dir, skipped=[])["probe"].column("ts").type == TIME


def test_readers_skip_damaged_lines_and_say_which(tmp_path):
    """Lines that are JSON but no event object, declared fields of the wrong type and a missing seq are left out
    and named (line and reason); they never crash a reader, never count, and the rebuilder writes only events/."""
    from analysis.load import read_events as load_events

    good = [{"event": "train_step", "seq": i, "step": i + 1, "loss": 1.0 / (i + 1),
             "ts": "2026-01-01T00:00:00.000000Z"} for i in range(3)]
    damaged = ["[1, 2]", '"text"', "17", json.dumps({"event": "train_step", "step": 9}),
               json.dumps({"event": "train_step", "seq": 10, "step": "nine"}),
               json.dumps({"event": "../../escape", "seq": 11}), json.dumps({"event": "train_step", "seq": True})]
    lines = [json.dumps(good[0]), *damaged, *map(json.dumps, good[1:])]
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "events.jsonl").write_text("\n".join(lines) + "\n")
    skipped = []
    tables = load_events(run_dir, skipped=skipped)
    assert list(tables) == ["train_step"] and tables["train_step"].column("step").to_pylist() == [1, 2, 3]
    assert tables["train_step"].schema.field("step").type == pa.int64()
    assert sorted(s.line for s in skipped) == list(range(2, 2 + len(damaged)))
    assert any("'step'" in str(s) and "line 6" in str(s) for s in skipped)
    with pytest.warns(UserWarning) as reported:
        load_events(run_dir)
    assert len(reported) == len(damaged) and "events.jsonl line 2: a JSON list" in str(reported[0].message)
    assert rebuild_parquet(run_dir) == 1
    assert sorted(p.name for p in run_dir.iterdir()) == ["events", "events.jsonl"]
    assert [p.name for p in (run_dir / "events").iterdir()] == ["train_step"]
    assert not (tmp_path / "escape").exists()


def test_the_writer_refuses_an_unsafe_event_name(tmp_path):
    log = EventLog(tmp_path, "r1", sinks=[ParquetSink(tmp_path / "events")])
    for name in ("../x", "Train", "a/b", ""):
        with pytest.raises(ValueError, match="event name"):
            log.emit(name)
    log.close()
    assert not (tmp_path / "events.jsonl").read_text()


def test_two_logs_in_one_process_are_independent(tmp_path):
    """Each log owns its chain: fields bound on one never reach the other, each numbers its own events, and
    structlog's global configuration is never touched."""
    import structlog

    before = structlog.get_config()
    a, b = EventLog(tmp_path / "a", "ra"), EventLog(tmp_path / "b", "rb")
    a.bind(step=7, phase="eval")
    a.emit("checkpoint", path="x")
    b.emit("checkpoint", path="y")
    b.emit("checkpoint", path="z")
    a.close()
    b.close()
    [ea] = events_of(tmp_path / "a")
    eb = events_of(tmp_path / "b")
    assert (ea["step"], ea["phase"], ea["run_id"], ea["seq"]) == (7, "eval", "ra", 0)
    assert [(e["step"], e["phase"], e["run_id"], e["seq"]) for e in eb] == [(0, "train", "rb", 0),
                                                                           (0, "train", "rb", 1)]
    assert structlog.get_config() == before


def test_closing_the_log_restores_logging_and_warnings_state(tmp_path):
    import logging

    from higgs_accel.events import LIBRARY_LOGGERS, capture_library_logs

    def snapshot():
        loggers = {n: (list(logging.getLogger(n).handlers), logging.getLogger(n).level,
                       logging.getLogger(n).propagate) for n in LIBRARY_LOGGERS}
        bars = transformers.utils.logging.is_progress_bar_enabled()
        return loggers, list(warnings.filters), warnings.showwarning, bars

    before = snapshot()
    log = EventLog(tmp_path, "r1")
    capture_library_logs(log, is_main=False)
    assert snapshot() != before
    log.close()
    assert snapshot() == before


def test_ts_written_as_text_by_an_older_writer_reads_as_a_timestamp(tmp_path):
    from analysis.schema import TIME

    pq.write_table(pa.table({"seq": [0, 1], "ts": ["2026-01-01T00:00:00.000000Z", None]}),
                   tmp_path / "part-000000000000.parquet")
    ts = read_parts(tmp_path).column("ts")
    assert ts.type == TIME and ts.to_pylist()[0] == datetime(2026, 1, 1, tzinfo=timezone.utc)
