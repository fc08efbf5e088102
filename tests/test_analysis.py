"""The analysis package on real runs of the tiny preset and on runs derived from them: crashed, torn, resumed,
one step, no eval, duplicated and drifting Parquet parts, unknown event families."""

from __future__ import annotations

import base64
import itertools
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import unquote

import pandas as pd
import pyarrow.parquet as pq
import pytest

import analysis
from analysis.__main__ import main
from analysis.audio import choose, report_section, step_bytes
from analysis.checks import loss_spikes, warnings_for
from analysis.diff import check_gate, diff
from analysis.document import Doc
from analysis.load import run_status
from analysis.report import write_report
from analysis.schema import rows_to_table
from tests.conftest import events_of

ROOT = Path(__file__).resolve().parents[1]
TRAIN_ARGS = ["--no-report", "train.max_steps=8", "train.eval_every=4", "log.log_steps=2", "train.save_every=4",
              "log.generate_every=1", "log.generate_max_new_tokens=30"]


def _train(out: Path, *extra: str) -> None:
    cmd = [sys.executable, "-m", "higgs_accel", "train", "--preset", "tiny", "--output-dir", str(out), *TRAIN_ARGS,
           *extra]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.fixture(scope="session")
def real_run(tmp_path_factory) -> Path:
    """One finished tiny run: 8 steps, eval at 4 and 8, slices every 2 steps, checkpoints at 4 and 8, eval audio
    (2 samples: label and teacher-forced prediction) and one generated prompt at each eval."""
    out = tmp_path_factory.mktemp("analysis") / "run"
    _train(out)
    return out


def make_run(path: Path, events: list[dict], parquet: bool = False, torn: bool = False) -> Path:
    """A run directory holding these events (events.jsonl; one Parquet part per family if asked)."""
    path.mkdir(parents=True)
    text = "".join(json.dumps(e) + "\n" for e in events)
    if torn:
        text += '{"event": "train_step", "loss": 1.2'  # the half-written line of a killed process
    (path / "events.jsonl").write_text(text)
    if parquet:
        write_parts(path, events)
    return path


def write_parts(path: Path, events: list[dict], name: str = "part-{seq:012d}.parquet") -> None:
    families: dict[str, list[dict]] = {}
    for e in events:
        families.setdefault(e["event"], []).append(e)
    for family, rows in families.items():
        folder = path / "events" / family
        folder.mkdir(parents=True, exist_ok=True)
        pq.write_table(rows_to_table(rows), folder / name.format(seq=rows[0]["seq"]))


def aged(events: list[dict]) -> list[dict]:
    """The same events, logged long ago: a run without run_end then reads as crashed, not running."""
    return [{**e, "ts": "2020-01-01T00:00:00.000000Z"} for e in events]


# ---------------------------------------------------------------- independence from the trainer


def test_analysis_never_imports_torch(real_run, tmp_path):
    code = (
        "import sys\n"
        "for name in ('torch', 'accelerate', 'higgs_accel', 'transformers', 'peft'):\n"
        "    sys.modules[name] = None  # importing any of them now raises ImportError\n"
        "import analysis, analysis.report, analysis.diff, analysis.__main__\n"
        f"run = analysis.load_run({str(real_run)!r})\n"
        f"analysis.report.write_report({str(real_run)!r}, out={str(tmp_path / 'r')!r})\n"
        f"assert analysis.__main__.main(['diff', {str(real_run)!r}, {str(real_run)!r}, '--out', "
        f"{str(tmp_path / 'd')!r}]) == 0\n"
        "print('ok', len(run.steps))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "ok 8" in done.stdout


# ---------------------------------------------------------------- loading


def test_load_real_run(real_run):
    run = analysis.load_run(real_run)
    assert run.status == "finished" and run.end["status"] == "finished"
    assert run.steps == list(range(1, 9))
    assert {"run_start", "train_step", "eval", "pred_slice", "run_end", "data_summary"} <= set(run.tables)
    assert list(run.loss_curve().columns) == ["loss", "text_loss", "audio_loss"]
    assert run.metrics("eval").index.tolist() == [4, 8]
    acc = run.codebook_accuracy()
    assert acc.shape == (8, 8) and acc.index.name == "step"
    assert run.slice_steps() == [2, 4, 6, 8] and run.slice_steps("eval") == [4, 8]
    slices = run.slices_at(8)
    assert len(slices) == 2 * 9 and slices.iloc[0]["modality"] == "text"
    assert all(isinstance(t, str) for t in slices.iloc[0]["first_pred_text"])
    fm = run.first_mismatch()
    assert len(fm) == len(run.pred_slice[run.pred_slice.phase == "train"])
    assert fm["first_mismatch"].dropna().between(0, fm["window"].max() - 1).all()
    assert run.config["train"]["max_steps"] == 8 and run.start["trainable_params"] > 0
    assert run.data_summary["train"]["kept"] > 0
    assert run.run_resume.empty  # a documented family the run has none of is an empty frame
    with pytest.raises(AttributeError, match=r"'trian_step'; did you mean 'train_step'\? tables: .*eval_audio"):
        run.trian_step  # noqa: B018 - a typo is an error, not an empty frame
    assert {"train_step", "eval", "pred_slice", "run_resume"} <= set(dir(run))
    assert run.train_step.seq.is_monotonic_increasing
    # pandas-native types: codebook an integer (null on text slices), ts a UTC datetime
    assert str(run.pred_slice["codebook"].dtype) == "Int64" and run.pred_slice["codebook"].isna().any()
    assert sorted(run.pred_slice["codebook"].dropna().unique()) == list(range(8))
    assert str(run.train_step["ts"].dtype).startswith("datetime64") and str(run.train_step["ts"].dt.tz) == "UTC"


def test_parquet_and_jsonl_agree(real_run, tmp_path):
    jsonl_only = tmp_path / "jsonl-only"
    jsonl_only.mkdir()
    shutil.copy(real_run / "events.jsonl", jsonl_only / "events.jsonl")
    a, b = analysis.load_run(real_run), analysis.load_run(jsonl_only)
    assert set(a.tables) == set(b.tables)
    for family in a.tables:
        fa, fb = a.frame(family), b.frame(family)
        assert len(fa) == len(fb), family
        assert fa["seq"].tolist() == fb["seq"].tolist()
    cols = [c for c in a.train_step.columns if a.train_step[c].dtype.kind == "f"]
    pd.testing.assert_frame_equal(a.train_step[cols], b.train_step[cols], check_like=True)


def test_crashed_run_with_torn_line(real_run, tmp_path):
    events = [e for e in aged(events_of(real_run)) if e["event"] != "run_end" and e["step"] <= 5]
    run = analysis.load_run(make_run(tmp_path / "crashed", events, torn=True))
    assert run.status == "crashed" and run.end is None
    assert run.steps == [1, 2, 3, 4, 5]
    assert any("crashed" in w for w in warnings_for(run))
    paths = write_report(run.path)
    assert "crashed" in paths[0].read_text()


def test_run_end_crashed_and_running_status(real_run, tmp_path):
    events = events_of(real_run)
    end = dict(events[-1], status="crashed", error="RuntimeError: CUDA out of memory")
    run = analysis.load_run(make_run(tmp_path / "oom", [*events[:-1], end]))
    assert run.status == "crashed"
    assert "CUDA out of memory" in write_report(run.path, formats=("md",))[0].read_text()
    assert run_status(None, pd.Timestamp.now(tz="UTC").to_pydatetime()) == "running"


def test_parquet_completed_from_jsonl(real_run, tmp_path):
    """A crash after the last flush: Parquet holds the first events, events.jsonl the rest."""
    events = aged(events_of(real_run))
    events = [e for e in events if e["event"] != "run_end"]
    path = make_run(tmp_path / "lagging", events)
    write_parts(path, [e for e in events if e["step"] <= 3])
    run = analysis.load_run(path)
    assert run.steps == list(range(1, 9))
    assert run.tables["train_step"].column("seq").to_pylist() == sorted(set(run.train_step.seq))


def test_gap_in_parquet_is_filled(real_run, tmp_path):
    """A lost middle part: events on both sides are in Parquet, the gap only in events.jsonl."""
    events = events_of(real_run)
    path = make_run(tmp_path / "gap", events)
    write_parts(path, [e for e in events if not 3 <= e["step"] <= 5])
    assert analysis.load_run(path).steps == list(range(1, 9))


def test_repeated_seq_and_schema_drift(real_run, tmp_path):
    """After a crash during compaction the same events sit in two parts; parts may type a column differently."""
    events = events_of(real_run)
    path = make_run(tmp_path / "dup", events)
    write_parts(path, events)
    write_parts(path, [e for e in events if e["step"] >= 6], name="part-9{seq:011d}.parquet")
    first = [dict(e, text_acc=None) for e in events if e["event"] == "train_step" and e["step"] <= 2]
    pq.write_table(rows_to_table(first), path / "events" / "train_step" / "part-000000000000.parquet")
    run = analysis.load_run(path)
    assert run.steps == list(range(1, 9))
    assert run.train_step.seq.is_unique
    assert len(run.pred_slice) == sum(e["event"] == "pred_slice" for e in events)


def resumed(events: list[dict], from_step: int = 4) -> tuple[list[dict], list[dict]]:
    """A run killed after its last step and resumed from the step-4 checkpoint, as the trainer logs it: the
    second launch appends data_summary, run_start, run_resume and then steps 5-8 again (losses marked +100)."""
    first = [e for e in aged(events) if e["event"] != "run_end"]
    seq = first[-1]["seq"] + 1
    second = []
    common = {k: v for k, v in events[0].items() if k in ("level", "run_id", "rank", "schema_version", "ts")}
    second = []
    for e in events:
        if e["step"] == 0 and e["event"] == "data_summary":
            second.append(dict(e))
        elif e["event"] == "run_start":
            second.append(dict(e, resumed=True))
            second.append(dict(common, event="run_resume", checkpoint="checkpoints/step-00000004",
                               from_step=from_step, step=from_step, epoch=1, phase="train"))
        elif e["step"] > from_step:
            second.append(dict(e, loss=e["loss"] + 100) if e["event"] == "train_step" else dict(e))
    for e in second:
        e["seq"] = seq
        seq += 1
    return first, second


@pytest.mark.parametrize("parquet", ["none", "parts", "flagged"])
def test_resumed_run_has_each_step_once(real_run, tmp_path, parquet):
    first, second = resumed(events_of(real_run))
    path = make_run(tmp_path / "resumed", first + second)
    if parquet == "parts":  # the first launch compacted, the second wrote its own parts
        write_parts(path, first)
        write_parts(path, second)
    if parquet == "flagged":  # compacted after the resume: the writer's own superseded column on every row
        stale = {e["seq"] for e in first if e["step"] > 4}
        write_parts(path, [dict(e, superseded=e["seq"] in stale) for e in first + second])
    run = analysis.load_run(path)
    assert run.steps == list(range(1, 9))
    assert "superseded" not in run.train_step and "superseded" not in run.metrics()
    assert (run.metrics().loc[5:, "loss"] > 100).all() and (run.metrics().loc[:4, "loss"] < 100).all()
    assert (run.eval.step.value_counts() == 1).all() and len(run.slices_at(6)) == 18
    assert run.start["resumed"] is True and run.status == "finished"
    assert "| resumed | yes |" in write_report(path, formats=("md",))[0].read_text()


def test_real_crash_and_resume(tmp_path, tiny, codes_cache, monkeypatch):
    """The trainer's own crash and resume: launch 1 dies during step 7, launch 2 resumes from the step-4
    checkpoint in the same dir and redoes steps 5-8. Its Parquet and its events.jsonl both read as each step
    once, from the launch that counts, and the report is written."""
    from higgs_accel import loop
    from tests.conftest import of, train_run

    log_step = loop.log_train_step

    def crash_at_7(run, *args):
        if args[-1] == 7:  # the step number, log_train_step's last argument
            raise RuntimeError("planted crash")
        return log_step(run, *args)

    run_dir = tmp_path / "run"
    settings = dict(train__max_steps=8, train__save_every=4, train__eval_every=4, log__log_steps=2)
    monkeypatch.setattr(loop, "log_train_step", crash_at_7)
    with pytest.raises(RuntimeError, match="planted crash"):
        train_run(run_dir, tiny, codes_cache, **settings)
    monkeypatch.undo()
    events = train_run(run_dir, tiny, codes_cache, **settings, resume="latest")
    resume = of(events, "run_resume")[0]
    assert resume["from_step"] == 4
    assert [e["step"] for e in of(events, "train_step")] == [1, 2, 3, 4, 5, 6, 5, 6, 7, 8]

    jsonl_only = tmp_path / "jsonl-only"
    jsonl_only.mkdir()
    shutil.copy(run_dir / "events.jsonl", jsonl_only)
    runs = [analysis.load_run(run_dir), analysis.load_run(jsonl_only)]
    for run in runs:
        assert run.steps == list(range(1, 9)) and run.status == "finished" and run.start["resumed"] is True
        assert (run.train_step.loc[run.train_step.step >= 5, "seq"] > resume["seq"]).all()
        assert run.eval.step.tolist() == [4, 8] and run.slice_steps() == [2, 4, 6, 8]
        assert not run.pred_slice.duplicated(["step", "phase", "modality", "codebook", "sample"]).any()
        assert "superseded" not in run.train_step
    for family in runs[0].tables:
        assert runs[0].frame(family).seq.tolist() == runs[1].frame(family).seq.tolist(), family
    md = write_report(run_dir, formats=("md",))[0].read_text()
    assert "| status | finished |" in md and "| resumed | yes |" in md and "**train step 6: " in md


def test_one_step_run(real_run, tmp_path):
    events = events_of(real_run)
    end = dict(events[-1], step=1, completed_steps=1, total_steps=1)
    events = [e for e in events if e["step"] <= 1 and e["event"] != "run_end"] + [end]
    run = analysis.load_run(make_run(tmp_path / "one", events, parquet=True))
    assert run.steps == [1] and run.slice_steps() == []
    paths = write_report(run.path)
    md = paths[0].read_text()
    assert "No prediction slices" in md and "No eval events" in md
    assert (paths[0].parent / "loss.png").is_file()


def test_run_without_eval(real_run, tmp_path):
    events = [e for e in events_of(real_run) if e["event"] != "eval" and e.get("phase") != "eval"]
    run = analysis.load_run(make_run(tmp_path / "no-eval", events, parquet=True))
    assert run.eval.empty and run.metrics("eval").empty and run.codebook_accuracy("eval").empty
    assert any("no eval" in w for w in warnings_for(run))
    assert "No eval events" in write_report(run.path, formats=("md",))[0].read_text()


def test_nonfinite_skips_and_unknown_family(real_run, tmp_path):
    events = events_of(real_run)
    for e in events:
        if e["event"] == "train_step" and e["step"] == 3:
            e.update(loss=None, grad_norm=None, nonfinite=["loss", "grad_norm"])
        if e["event"] == "data_summary" and e["split"] == "train":
            e.update(kept=10, skipped=6, skipped_by_reason={"length": 4, "unreadable_audio": 2})
    last = events[-1]
    events.insert(-1, dict(last, event="speaker_probe", seq=last["seq"], wav="eval/step-8/sample-0.wav"))
    events[-1] = dict(last, seq=last["seq"] + 1)
    run = analysis.load_run(make_run(tmp_path / "odd", events, parquet=True))
    found = " ".join(warnings_for(run))
    assert "NaN/inf in `train_step.loss`" in found and "first at step 3" in found
    assert "6 of 16 train samples skipped" in found
    assert run.speaker_probe.wav.tolist() == ["eval/step-8/sample-0.wav"]
    assert "speaker_probe" in write_report(run.path, formats=("md",))[0].read_text()


def test_loss_spike_detection():
    loss = pd.Series([10.0 - 0.1 * i + 0.05 * (-1) ** i for i in range(40)], index=range(1, 41))
    assert loss_spikes(loss).empty
    loss[25] = 14.0
    assert loss_spikes(loss).index.tolist() == [25]


# ---------------------------------------------------------------- report


def test_report_real_run(real_run, tmp_path):
    paths = write_report(real_run, out=tmp_path / "rep")
    assert [p.name for p in paths] == ["report.md", "report.html"]
    md, page = paths[0].read_text(), paths[1].read_text()
    for section in ("Worth a look", "Eval: best and final", "Curves", "Codebook health", "Predictions vs labels"):
        assert section in md and section in page
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert {"loss.png", "codebooks.png", "optimizer.png", "throughput.png", "codebook_accuracy.png"} <= set(images)
    assert all((tmp_path / "rep" / i).is_file() for i in images)
    sources = re.findall(r'src="([^"]+)"', page)  # one file: every image and sound inlined
    assert sources and all(s.startswith(("data:image/png;base64,", "data:audio/wav;base64,")) for s in sources)
    assert "<|eot_id|>" in md and "&lt;|eot_id|&gt;" in page  # text slices decoded; escaped in HTML
    # what ran: the engine, the checkpoints' layout, the memory plan (from run_start)
    assert re.search(r"^\| engine \| single \(NO\)", md, re.M)
    assert "| checkpoints | model.base: transformers; model.audio_tokenizer: transformers |" in md
    assert re.search(r"^\| memory \| predicted [0-9.]+ GiB; gradient checkpointing off \(false\) \|$", md, re.M)
    assert all(f"**train step {s}: " in md for s in (2, 4, 6, 8)) and page.count("<details open>") == 3
    run = analysis.load_run(real_run)
    assert_header(run, md, page)
    assert_best_final(run.metrics("eval"), md_table(md, "## Eval: best and final"))
    assert_best_final(run.metrics("train"), md_table(md, "## Train: best and final"))
    assert_mismatches_marked(run, md, page)
    assert "first_mismatch.png" in images
    assert_first_mismatch_table(run, md)


def md_table(md: str, after: str, header: str = "| metric |") -> list[list[str]]:
    """The body cells of the first Markdown table after the text ``after`` whose header line starts with
    ``header``."""
    lines = md.split(after, 1)[1].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    table = list(itertools.takewhile(lambda line: line.startswith("|"), lines[start:]))
    return [[c.strip() for c in line.strip("|").split(" | ")] for line in table[2:]]


def assert_header(run, md: str, page: str) -> None:
    start = run.start
    run_rows = dict(md_table(md, "# Run", "| run |"))
    assert all(f"{k} {v}" in run_rows["versions"] for k, v in start["versions"].items())
    assert "torch" in run_rows["versions"] and run_rows["world size"] == "1"
    assert run_rows["hardware"] == ", ".join(f"{k} {v}" for k, v in start["hardware"].items())
    assert run_rows["trainable parameters"].startswith(f"{start['trainable_params']:,} (")
    assert "<td class=l>world size</td><td class=l>1</td>" in page
    data = {r[0]: r[1:] for r in md_table(md, "# Run", "| data |")}
    assert data == {split: [str(s["kept"]), str(s["skipped"])] for split, s in run.data_summary.items()}
    assert set(data) == {"train", "val"} and "<th>kept</th><th>skipped</th>" in page


def assert_best_final(df: pd.DataFrame, rows: list[list[str]]) -> None:
    """Every loss and accuracy of the frame, with its best and final value and their steps."""
    quality = [c for c in df.columns if ("loss" in c or "acc" in c) and df[c].notna().any()]
    assert [r[0] for r in rows] == quality
    for metric, best, best_step, final, final_step in rows:
        s = df[metric].dropna()
        step = s.idxmin() if "loss" in metric else s.idxmax()
        assert float(best) == pytest.approx(s[step], rel=1e-3) and int(best_step) == step, metric
        assert float(final) == pytest.approx(s.iloc[-1], rel=1e-3) and int(final_step) == s.index[-1], metric


def expected_marks(row) -> int:
    """Wrong predictions at the positions a slice grid shows: those of its first and last window, each once."""
    wrong = {}
    for part in ("first", "last"):
        for pos, p, lab in zip(row[f"{part}_pos"], row[f"{part}_pred"], row[f"{part}_label"], strict=True):
            wrong[pos] = p != lab
    return sum(wrong.values())


def assert_mismatches_marked(run, md: str, page: str) -> None:
    """Each step-8 train slice marks exactly its wrong predictions: in the sample's compact grid (text: the pred
    row, ^ in Markdown; audio: the codebook's row, pred/label in Markdown), red cells in HTML."""
    counts = []
    for _, row in run.slices_at(8).iterrows():
        caption = f"train step 8 · sample {row['sample']} · "
        text_grid, audio_grid = (g.splitlines() for g in re.findall(r"```\n(.*?)```", md.split(f"**{caption}", 1)[1],
                                                                  re.S)[:2])
        tables = page.split(f'<div class="cap">{caption}', 1)[1].split('<table class="grid">')
        counts.append(expected_marks(row))
        if row["modality"] == "text":
            i = next(k for k, line in enumerate(text_grid) if line.startswith("pred "))
            marks = text_grid[i + 1].count("^") if not text_grid[i + 1].startswith("label") else 0
            html_row = tables[1].split("<tr><th>pred</th>", 1)[1].split("</tr>", 1)[0]
        else:
            name = f"cb{int(row['codebook'])}"
            marks = next(line for line in audio_grid if line.startswith(name + " ")).count("/")
            html_row = tables[2].split(f"<tr><th>{name}</th>", 1)[1].split("</tr>", 1)[0]
        assert marks == counts[-1] and html_row.count("class=bad") == counts[-1], (caption, row["codebook"])
    assert 0 in counts and max(counts) > 0  # some slices right, some wrong: both ways are checked


def assert_first_mismatch_table(run, md: str) -> None:
    """The last row of the first-mismatch table: per codebook, the mean index over samples (K when all right)."""
    rows = md_table(md, "first diverge from the labels", "| step |")
    assert [r[0] for r in rows] == [str(s) for s in run.slice_steps()]
    audio = run.slices_at(8)
    audio = audio[audio.modality == "audio"]
    window = len(audio.iloc[0]["first_pred"])
    expected = audio["first_mismatch"].fillna(window).groupby(audio["codebook"]).mean()
    assert rows[-1][1:] == [f"{v:.1f}" for v in expected.sort_index()]


def test_warnings_fire_on_stalled_logs_only(real_run, tmp_path):
    """A healthy log draws no warning; a stalled text loss, a flat codebook loss and a dead codebook each do."""
    def curves(e: dict, stalled: bool) -> None:
        s = e["step"]
        e.update(loss=50 / s, text_loss=3.0 if stalled else 4 / s, audio_loss=46 / s)
        for cb in range(8):
            e[f"audio_loss_cb{cb}"] = 6.0 + 0.01 * (-1) ** s if stalled and cb == 5 else 6 / s
            e[f"audio_acc_cb{cb}"] = 0.0 if stalled and cb == 3 else 0.1 * s

    runs = {}
    for stalled in (False, True):
        events = events_of(real_run)
        for e in events:
            if e["event"] == "train_step":
                curves(e, stalled)
        runs[stalled] = make_run(tmp_path / str(stalled), events, parquet=True)
    assert warnings_for(analysis.load_run(runs[False])) == []
    assert "Nothing: no NaN/inf" in write_report(runs[False], formats=("md",))[0].read_text()
    found = warnings_for(analysis.load_run(runs[True]))
    assert [w.split(" (")[0] for w in found] == ["text loss is not improving", "codebook 5 loss is not improving",
                                                   "codebook(s) 3 predict nothing right at the end of training"]
    worth = write_report(runs[True], formats=("md",))[0].read_text().split("## Worth a look")[1].split("## ")[0]
    assert all(f"- {w}" in worth for w in found)


def test_flat_eval_loss_under_a_falling_train_loss_is_flagged(real_run, tmp_path):
    events = events_of(real_run)
    evals = [e for e in events if e["event"] == "eval"]
    extra = {**evals[0], "step": 6, "seq": max(e["seq"] for e in events) + 1}
    for losses, name in (([9.0, 8.0, 7.0], "falling"), ([9.0, 9.1, 9.05], "flat")):
        run = [e for e in events if e["event"] != "eval"] + [{**e, "loss": x} for e, x in zip(
            [evals[0], extra, evals[1]], losses)]
        for e in run:
            if e["event"] == "train_step":
                e["loss"] = 50 / e["step"]
        found = [w for w in warnings_for(analysis.load_run(make_run(tmp_path / name, run))) if "eval loss" in w]
        if name == "falling":
            assert found == []
        else:
            assert found == ["eval loss is not improving (9 at the first eval, 9.05 at the last: +0.6%) while the "
                             "train loss fell -87.5%: overfitting?"], found


def test_cli_report_formats_and_steps(real_run, tmp_path, capsys):
    assert main(["report", str(real_run), "--out", str(tmp_path), "--format", "md", "--steps", "2,5"]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "report.md")
    md = (tmp_path / "report.md").read_text()
    assert "step 5 has no slices; showing step 4" in md and "**train step 4: " in md and "**train step 8: " not in md
    assert not (tmp_path / "report.html").exists()
    assert main(["report", str(tmp_path / "missing")]) == 2


def test_default_report_dir(real_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(real_run, run_dir, ignore=shutil.ignore_patterns("checkpoints", "adapter", "tiny", "codes"))
    assert write_report(run_dir) == [run_dir / "report" / "report.md", run_dir / "report" / "report.html"]


# ---------------------------------------------------------------- diff


def _is_cb0_slice(e: dict) -> bool:
    """Sample 0, codebook 0 of step 8's train slices: the slice the diff's side-by-side test changes in B."""
    return (e["event"] == "pred_slice" and e["step"] == 8 and e["phase"] == "train" and e["modality"] == "audio"
            and e["codebook"] == 0 and e["sample"] == 0)


def _changed_copy(real_run: Path, path: Path) -> Path:
    """B: the same run, but its loss parts at step 5, eval loss ends 0.1 higher, lr was changed and the first
    prediction of one step-8 slice differs."""
    events = events_of(real_run)
    for e in events:
        if _is_cb0_slice(e):
            e["first_pred"][0] = (e["first_pred"][0] + 1) % 1026
        if e["event"] == "train_step" and e["step"] >= 5:
            e["loss"] += 0.5
        if e["event"] == "eval" and e["step"] == 8:
            e["loss"] += 0.1
            e["audio_acc"] -= 0.02
        if e["event"] == "run_start":
            e["config"]["train"]["lr"] = 1e-4
    return make_run(path, events)


def test_diff_identical_runs(real_run, capsys):
    assert main(["diff", str(real_run), str(real_run), "--fail-if-worse", "eval.loss:0"]) == 0
    out = capsys.readouterr().out
    assert "Losses are identical on all 8 common train steps" in out and "## Config: identical" in out


def test_diff_changed_run(real_run, tmp_path, capsys):
    b = _changed_copy(real_run, tmp_path / "b")
    result = diff(analysis.load_run(real_run), analysis.load_run(b))
    assert result["first_difference"]["step"] == 5 and "loss" in result["first_difference"]["fields"]
    lr = analysis.load_run(real_run).config["train"]["lr"]
    assert result["config"] == {"config.train.lr": [lr, 1e-4]}
    final = result["metrics"]["eval"]["final"]["loss"]
    assert final["abs"] == pytest.approx(0.1) and final["better"] == "A"
    assert result["metrics"]["train"]["only_a"] == "" and result["metrics"]["train"]["common_steps"] == 8

    assert main(["diff", str(real_run), str(b), "--json", "--all"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert "config.train.seed" in data["config"] and data["first_difference"]["step"] == 5

    out = tmp_path / "out"
    assert main(["diff", str(real_run), str(b), "--out", str(out), "--fail-if-worse", "eval.loss:0.05"]) == 1
    assert {"diff.md", "diff.html", "diff.json", "curves.png"} <= {p.name for p in out.iterdir()}
    assert_slice_difference_marked(real_run, out)
    assert main(["diff", str(real_run), str(b), "--fail-if-worse", "eval.loss:0.2",
                 "--fail-if-worse", "eval.audio_acc:0.05"]) == 0
    assert main(["diff", str(real_run), str(b), "--fail-if-worse", "eval.audio_acc:0.01"]) == 1
    assert main(["diff", str(real_run), str(b), "--fail-if-worse", "eval.nothing:0.1"]) == 2
    assert main(["diff", str(real_run), str(b), "--fail-if-worse", "loss"]) == 2


def assert_slice_difference_marked(real_run: Path, out: Path) -> None:
    """The diff shows A's and B's predictions of the changed slice, each marked where it is wrong against the label
    (never where it merely differs from the other run)."""
    event = next(e for e in events_of(real_run) if _is_cb0_slice(e))
    old, label = event["first_pred"][0], event["first_label"][0]
    new = (old + 1) % 1026
    md, page = (out / "diff.md").read_text(), (out / "diff.html").read_text()
    assert "## Predictions side by side" in md and "<summary>train step 8</summary>" in page
    grid = re.search(r"\*\*train step 8 · sample 0 · audio cb0 · [^*]+\*\*\n\n```\n(.*?)```", md, re.S).group(1)
    lines = grid.splitlines()
    pred_a = next(line for line in lines if line.startswith("pred A"))
    pred_b = next(line for line in lines if line.startswith("pred B"))
    assert pred_a.split()[2] == str(old) and pred_b.split()[2] == str(new)
    section = page.split("train step 8 · sample 0 · audio cb0 · A")[1].split("</table>")[0]
    bad_a, bad_b = (' class=bad' if v != label else '' for v in (old, new))
    assert re.search(rf"<tr><th>pred A</th><td{bad_a}>{old}</td>", section)
    assert re.search(rf"<tr><th>pred B</th><td{bad_b}>{new}</td>", section)
    assert re.search(rf"<tr><th>label</th><td>{label}</td>", section)


def test_gate_fails_when_b_lacks_the_metric(real_run, tmp_path):
    events = [e for e in events_of(real_run) if e["event"] != "eval"]
    b = analysis.load_run(make_run(tmp_path / "no-eval", events))
    gate = check_gate(analysis.load_run(real_run), b, "eval.loss:1")
    assert not gate["ok"] and "missing in B" in gate["why"]


@pytest.mark.parametrize("parquet", [False, True])
def test_gate_fails_when_b_ends_non_finite(real_run, tmp_path, capsys, parquet):
    """B's eval loss turns NaN at its last eval: an earlier finite value must not stand in for it."""
    events = events_of(real_run)
    for e in events:
        if e["event"] == "eval" and e["step"] == 8:
            e.update(loss=None, nonfinite=["loss"])
    b = make_run(tmp_path / "nan", events, parquet=parquet)
    gate = check_gate(analysis.load_run(real_run), analysis.load_run(b), "eval.loss:100")
    assert not gate["ok"] and gate["why"] == "B's final eval.loss (step 8) is NaN/inf"
    assert check_gate(analysis.load_run(real_run), analysis.load_run(b), "eval.audio_acc:0")["ok"]
    assert main(["diff", str(real_run), str(b), "--fail-if-worse", "eval.loss:100"]) == 1
    assert "eval.loss:100 failed: B's final eval.loss (step 8) is NaN/inf" in capsys.readouterr().err


def test_gate_skips_a_plain_null(real_run, tmp_path):
    """A null without ``nonfinite`` is a step without targets: the gate takes the last step that has a value."""
    events = events_of(real_run)
    for e in events:
        if e["event"] == "train_step" and e["step"] == 8:
            e["text_acc"] = None
    b = analysis.load_run(make_run(tmp_path / "no-targets", events))
    gate = check_gate(analysis.load_run(real_run), b, "train.text_acc:1")
    assert gate["ok"] and gate["b"] == b.metrics().loc[7, "text_acc"]


def test_gate_fails_when_b_crashed_or_stopped_early(real_run, tmp_path, capsys):
    a = analysis.load_run(real_run)
    crashed = [e for e in aged(events_of(real_run)) if e["event"] != "run_end"]
    gate = check_gate(a, analysis.load_run(make_run(tmp_path / "crashed", crashed)), "eval.loss:100")
    assert not gate["ok"] and gate["why"] == "B has not finished (status crashed)"
    short = [e for e in events_of(real_run) if e["step"] <= 6 or e["event"] == "run_end"]
    gate = check_gate(a, analysis.load_run(make_run(tmp_path / "short", short)), "train.loss:100")
    assert not gate["ok"] and gate["why"] == "B ended at step 6, before A's last step 8"
    assert main(["diff", str(real_run), str(tmp_path / "short"), "--fail-if-worse", "train.loss:100"]) == 1
    assert "before A's last step 8" in capsys.readouterr().err
    assert main(["diff", str(tmp_path / "short"), str(real_run), "--fail-if-worse", "train.loss:100"]) == 0


def test_diff_unmatched_steps(real_run, tmp_path):
    events = [e for e in events_of(real_run) if e["step"] <= 6]
    b = analysis.load_run(make_run(tmp_path / "short", events))
    m = diff(analysis.load_run(real_run), b)["metrics"]["train"]
    assert m["only_a"] == "7-8" and m["only_b"] == "" and m["common_steps"] == 6


# ---------------------------------------------------------------- audio samples

AUDIO_FAMILIES = ("eval_audio", "generate_audio")
PLAYER = re.compile(r'<audio controls [^>]*title="([^"]+)" src="data:audio/wav;base64,([A-Za-z0-9+/=]+)"></audio>')
MD_WAV = re.compile(r"\[((?:label|pred|gen)-\d+\.wav)\]\(([^)]+)\)")


def moved(real_run: Path, path: Path, edit=None) -> Path:
    """The run copied to ``path`` as if from another machine: its audio events name files under a directory that
    does not exist here, the WAVs sit in path/samples. ``edit(event)`` may change events first."""
    events = events_of(real_run)
    for e in events:
        for key in ("pred_path", "label_path", "path"):
            if e["event"] in AUDIO_FAMILIES and e.get(key):
                e[key] = "/elsewhere/runs/demo/samples/" + "/".join(Path(e[key]).parts[-2:])
        if edit is not None:
            edit(e)
    make_run(path, events, parquet=True)
    shutil.copytree(real_run / "samples", path / "samples")
    return path


def _b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode("ascii")


def test_report_audio_players(real_run, tmp_path):
    run = analysis.load_run(real_run)
    assert run.audio_steps() == [4, 8]
    at = run.audio_at(8)
    assert [r["sample"] for r in at["eval"]] == [0, 1] and len(at["eval"][0]["acc_cb"]) == 8
    assert at["eval"][0]["pred_file"] == real_run / "samples" / "step-00000008" / "pred-0.wav"
    assert at["generate"][0]["stopped"] in ("eos", "max_length") and at["generate"][0]["file"].is_file()

    md_path, html_path = write_report(real_run, out=tmp_path / "rep")
    md, page = md_path.read_text(), html_path.read_text()
    assert "## Audio samples" in md and "<h2>Audio samples</h2>" in page
    players = PLAYER.findall(page)
    assert len(players) == 2 * (2 * 2 + 1)  # per eval step: label and prediction of 2 samples, 1 generated
    assert all(base64.b64decode(data)[:4] == b"RIFF" for _, data in players)
    for step in (4, 8):
        folder = real_run / "samples" / f"step-{step:08d}"
        section = page.split(f"<h3>Audio at step {step}</h3>")[1].split("<h")[0]
        for i in (0, 1):  # label and prediction of each sample side by side, in one table row
            row = re.search(rf'title="label-{i}\.wav" src="data:audio/wav;base64,([^"]+)"></audio></td>'
                            rf'<td class=l><audio [^>]*title="pred-{i}\.wav" src="data:audio/wav;base64,([^"]+)"',
                            section)
            assert row and row.groups() == (_b64(folder / f"label-{i}.wav"), _b64(folder / f"pred-{i}.wav"))
        assert _b64(folder / "gen-0.wav") in section and "The quick brown fox" in section
        assert re.search(r"<td class=l>(at EOS|length limit \(no EOS\))</td>", section)
        acc = next(r["acc"] for r in run.audio_at(step)["eval"] if r["sample"] == 0)
        assert f"<td class=l>{acc:.3f}</td>" in section
    links = MD_WAV.findall(md)
    assert len(links) == 10 and all((tmp_path / "rep" / unquote(link)).resolve().is_file() for _, link in links)
    assert all(Path(unquote(link)).name == name for name, link in links)
    assert "### Audio at step 4" in md and "### Audio at step 8" in md


def test_audio_of_a_moved_run_and_missing_files(real_run, tmp_path):
    """Paths recorded on another machine are found under RUN_DIR/samples/; what is not there is reported."""
    def edit(e):
        if e["event"] == "eval_audio" and e["step"] == 4 and e["sample"] == 1:
            e.update(pred_path=None, label_path=None, reason="no target audio codes in this sample")
        if e["event"] == "generate_audio" and e["step"] == 4:
            e.update(path=None, error="RuntimeError: boom")

    path = moved(real_run, tmp_path / "moved", edit)
    (path / "samples" / "step-00000008" / "pred-1.wav").unlink()
    odd = dict(events_of(path)[-1], event="eval_audio", step=8, seq=10**6, wav="x.wav")  # a hand-made row
    with open(path / "events.jsonl", "a") as f:
        f.write(json.dumps(odd) + "\n")
    run = analysis.load_run(path)
    assert run.audio_at(8)["eval"][0]["pred_file"] == path / "samples" / "step-00000008" / "pred-0.wav"
    assert run.audio_at(8)["eval"][1]["pred_file"] is None
    md_path, html_path = write_report(path, out=tmp_path / "rep")
    md, page = md_path.read_text(), html_path.read_text()
    assert "file missing (pred-1.wav)" in md and "file missing" in page
    assert "no file: no target audio codes in this sample" in md and "error: RuntimeError: boom" in md
    assert len(PLAYER.findall(page)) == 10 - 2 - 1 - 1  # sample 1 at step 4, its gen, the deleted file
    links = MD_WAV.findall(md)
    assert len(links) == 6 and all((tmp_path / "rep" / unquote(link)).resolve().is_file() for _, link in links)
    assert all("moved/samples" in link for _, link in links)


def test_audio_size_cap(real_run, tmp_path):
    """Past the cap, evenly spread eval steps are shown (first and last kept) and the rest is said left out."""
    events = [e for e in events_of(real_run) if e["event"] not in AUDIO_FAMILIES]
    template = [e for e in events_of(real_run) if e["event"] in AUDIO_FAMILIES and e["step"] == 4]
    seq = max(e["seq"] for e in events) + 1
    for step in range(1, 13):
        for e in template:
            events.append(dict(e, step=step, seq=seq))
            seq += 1
    run = analysis.load_run(make_run(tmp_path / "many", events))
    per_step = step_bytes(run.audio_at(1))
    assert run.audio_steps() == list(range(1, 13)) and per_step > 0

    def section(mb):
        doc = Doc("t")
        report_section(doc, run, mb)
        return doc.markdown(tmp_path), doc.html(tmp_path)

    md, page = section(100)
    assert md.count("### Audio at step") == 12 and "left out" not in md and len(PLAYER.findall(page)) == 12 * 5
    md, page = section(4.5 * per_step / 1e6)
    shown = [int(s) for s in re.findall(r"### Audio at step (\d+)", md)]
    assert shown[0] == 1 and shown[-1] == 12 and len(shown) == 4 and "are left out" in md
    assert len(PLAYER.findall(page)) == 4 * 5 and "not inlined" not in page
    md, page = section(1.5 * per_step / 1e6)  # not even first, middle and last fit: files past the cap are links
    assert [int(s) for s in re.findall(r"### Audio at step (\d+)", md)] == [1, 7, 12]
    assert "linked, not inlined" in md and 5 <= len(PLAYER.findall(page)) < 10
    hrefs = re.findall(r'<a href="([^"]+)">[^<]+</a> <span class="note">\(not inlined\)', page)
    assert hrefs and all((tmp_path / unquote(h)).resolve().is_file() for h in hrefs)
    assert choose({1: 10, 2: 10}, 5) == [1, 2] and choose({s: 1 for s in range(10)}, 100) == list(range(10))

    out = tmp_path / "cli"
    assert main(["report", str(run.path), "--out", str(out), "--format", "html", "--audio-mb", "0"]) == 0
    page = (out / "report.html").read_text()
    assert "<audio" not in page and page.count("(not inlined)") == 3 * 5
    with pytest.raises(SystemExit):
        main(["report", str(run.path), "--audio-mb", "-1"])


def test_runs_without_audio_unchanged(real_run, tmp_path, capsys):
    events = [e for e in events_of(real_run) if e["event"] not in AUDIO_FAMILIES]
    path = make_run(tmp_path / "silent", events, parquet=True)
    run = analysis.load_run(path)
    assert run.audio_steps() == [] and run.audio_at(4) == {"eval": [], "generate": []}
    md = write_report(path, out=tmp_path / "rep", formats=("md",))[0].read_text()
    assert "Audio" not in md
    assert "audio" not in diff(run, run)
    assert main(["diff", str(path), str(path)]) == 0
    assert "Audio" not in capsys.readouterr().out
    one_sided = diff(analysis.load_run(real_run), run)["audio"]
    assert one_sided["common_steps"] == [] and one_sided["only_a"] == "4, 8"


def test_diff_audio_side_by_side(real_run, tmp_path, capsys):
    def edit(e):
        if e["event"] == "eval_audio" and e["step"] == 8:
            e["acc"] = 0.5

    b = moved(real_run, tmp_path / "b", edit)
    out = tmp_path / "out"
    assert main(["diff", str(real_run), str(b), "--out", str(out)]) == 0
    terminal = capsys.readouterr().out
    assert "## Audio samples, side by side" in terminal
    assert "| sample | A label | A prediction | A acc | B label | B prediction | B acc |" in terminal
    page, md = (out / "diff.html").read_text(), (out / "diff.md").read_text()
    assert len(PLAYER.findall(page)) == 2 * 2 * 5
    for step in (4, 8):
        section = page.split(f"<h3>Audio at step {step}</h3>")[1].split("<h")[0]
        row = re.search(r"<tr><td class=l>0</td>(.*?)</tr>", section).group(1)
        titles = re.findall(r'title="([^"]+)"', row)
        assert titles == ["label-0.wav", "pred-0.wav", "label-0.wav", "pred-0.wav"]
        folder = f"step-{step:08d}"
        assert _b64(real_run / "samples" / folder / "pred-0.wav") in row
        assert re.search(r"<td class=l>(at EOS|length limit \(no EOS\))</td>.*<td class=l>(at EOS|length limit "
                         r"\(no EOS\))</td>",
                         section)
    assert "| 0.500 |" in md.split("### Audio at step 8")[1]
    a_links = [link for _, link in MD_WAV.findall(md) if "b/samples" not in link]
    b_links = [link for _, link in MD_WAV.findall(md) if "b/samples" in link]
    assert len(a_links) == len(b_links) == 10
    assert all((out / unquote(link)).resolve().is_file() for link in a_links + b_links)
    result = json.loads((out / "diff.json").read_text())["audio"]
    assert result["common_steps"] == [4, 8] and len(result["eval"]) == 4 and len(result["generate"]) == 2
    assert [r["acc_b"] for r in result["eval"] if r["step"] == 8] == [0.5, 0.5]

    short = make_run(tmp_path / "short", [e for e in events_of(real_run) if e["step"] <= 6])
    assert main(["diff", str(real_run), str(short)]) == 0
    terminal = capsys.readouterr().out
    assert "### Audio at step 4" in terminal and "### Audio at step 8" not in terminal
    assert "Eval steps with audio only in A: 8." in terminal


# ---------------------------------------------------------------- docs


def test_docs_examples_run(real_run, tmp_path):
    """Every python block of docs/analysis.md, in order, against a real run."""
    text = (ROOT / "docs" / "analysis.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert len(blocks) >= 4
    namespace = {"RUN_DIR": str(real_run), "OUT_DIR": str(tmp_path)}
    for block in blocks:
        exec(compile(block, "docs/analysis.md", "exec"), namespace)
    assert (tmp_path / "report.md").is_file() and (tmp_path / "loss-notebook.png").is_file()
