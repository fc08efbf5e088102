"""Reports and diffs for every shape of run: 0, 1 or many steps, evals and slice steps; a finished run never exits 1
because of its report; a diff never marks a correct prediction as wrong."""

from __future__ import annotations

import itertools
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

import analysis
from analysis.__main__ import main
from analysis.diff import diff
from analysis.report import write_report

ROOT = Path(__file__).resolve().parents[1]
CODEBOOKS = (0, 1)


class Log:
    """A synthetic event log with the documented fields of the events the report reads."""

    def __init__(self, path: Path):
        self.path, self.events = path, []

    def add(self, name: str, step: int, phase: str = "train", **fields) -> None:
        self.events.append(dict(event=name, ts="2025-01-01T00:00:00.000000Z", level="info", step=step, epoch=0,
                                phase=phase, seq=len(self.events), run_id="r", rank=0, schema_version=1, **fields))

    def write(self) -> Path:
        self.path.mkdir(parents=True)
        (self.path / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in self.events))
        return self.path


def metrics(step: int, scale: float = 1.0) -> dict:
    loss = scale * 10 / (1 + step)
    out = dict(loss=loss, text_loss=loss / 10, audio_loss=loss * 0.9, text_acc=min(1, step / 10),
               audio_acc=min(1, step / 20), text_targets=4, audio_targets=40, tokens=100, audio_frames=20, samples=2)
    for cb in CODEBOOKS:
        out[f"audio_loss_cb{cb}"], out[f"audio_acc_cb{cb}"] = loss / 2, min(1, step / (20 + cb))
    return out


def slice_rows(step: int, phase: str, keys: list[str], wrong_at: int) -> list[dict]:
    """Slices of two samples: text and two codebooks; each sample's labels follow from its key, and the prediction
    is wrong at target ``wrong_at``."""
    rows = []
    for sample, key in enumerate(keys):
        base = sum(map(ord, key)) % 500
        labels = [base + i for i in range(5)]
        preds = [v + (i == wrong_at) for i, v in enumerate(labels)]
        common = dict(sample=sample, sample_key=key, first_pos=list(range(10, 15)), last_pos=list(range(30, 35)),
                      first_label=labels, first_pred=preds, last_label=labels, last_pred=labels, n_targets=25,
                      n_match=24)
        rows.append(dict(common, modality="text", codebook=None, first_pred_text=[f"t{p}" for p in preds],
                         first_label_text=[f"t{v}" for v in labels], last_pred_text=[f"t{v}" for v in labels],
                         last_label_text=[f"t{v}" for v in labels]))
        for cb in CODEBOOKS:
            rows.append(dict(common, modality="audio", codebook=cb, first_frame=list(range(1, 6)),
                             last_frame=list(range(21, 26)), batch_match=40, batch_targets=50))
    return rows


def synthetic_run(path: Path, steps: int, evals: list[int], slices: list[int], keys=lambda step: ["s0", "s1"],
                  scale: float = 1.0, wrong_at: int = 2) -> Path:
    log = Log(path)
    log.add("run_start", 0, config={"train": {"max_steps": steps, "output_dir": str(path), "lr": 1e-3},
                                    "model": {"base": str(path / "tiny" / "model")}},
            run_dir=str(path), total_steps=steps, steps_per_epoch=steps, world_size=1, trainable_params=10,
            total_params=100)
    for step in range(1, steps + 1):
        log.add("train_step", step, **metrics(step, scale), lr=1e-3, grad_norm=1.0, step_time_s=0.1,
                samples_per_s=20.0, tokens_per_s=1000.0, peak_mem_mb=10.0)
        if step in slices:
            for row in slice_rows(step, "train", keys(step), wrong_at):
                log.add("pred_slice", step, **row)
        if step in evals:
            log.add("eval", step, "eval", **metrics(step, scale))
            for row in slice_rows(step, "eval", ["v0", "v1"], wrong_at):
                log.add("pred_slice", step, "eval", **row)
    log.add("run_end", steps, status="finished", error=None, elapsed_s=1.0, total_steps=steps,
            completed_steps=steps)
    return log.write()


SHAPES = [(1, [], []), (1, [1], [1])] + [(6, evals, slices) for evals, slices in itertools.product(
    ([], [6], [2, 4, 6]), ([], [3], [1, 3, 5]))]


@pytest.mark.parametrize("steps,evals,slices", SHAPES)
def test_report_and_diff_for_every_shape(tmp_path, steps, evals, slices):
    a = synthetic_run(tmp_path / "a", steps, evals, slices)
    b = synthetic_run(tmp_path / "b", steps, evals, slices, scale=1.1, wrong_at=3)
    md, page = (p.read_text() for p in write_report(a))
    shown = len(slices) or len(evals)  # a run with eval slices only shows them as its steps
    assert page.count("<details") == min(shown, 7) + bool(slices and evals)
    assert page.count("<details open") == min(shown, 2) + bool(slices and evals)
    assert ("No prediction slices in this run." in md) == (not slices and not evals)
    first_note = md.split("## Worth a look\n\n", 1)[1].split("\n", 1)[0]
    assert ("no eval events" in first_note) == (not evals)
    assert main(["diff", str(a), str(b), "--out", str(tmp_path / "d"), "--fail-if-worse", "train.loss:100"]) == 0
    text = (tmp_path / "d" / "diff.md").read_text()
    assert text.startswith("# Diff: b (B) against a (A)")
    assert "## Config: identical" in text  # both runs' assets under their own dirs, lr equal
    if evals:
        assert main(["diff", str(a), str(b), "--fail-if-worse", "eval.loss:0.001"]) == 1  # B is worse, not broken


def grid_rows(page: str, caption: str) -> dict[str, list[tuple[str, bool]]]:
    """The rows of the grid under ``caption``: name -> [(cell text, marked)]."""
    table = page.split(caption, 1)[1].split("<table class=\"grid\">", 1)[1].split("</table>", 1)[0]
    rows = {}
    for name, cells in re.findall(r"<tr><th>([^<]*)</th>(.*?)</tr>", table):
        rows[name] = [(text, bool(bad)) for bad, text in re.findall(r"<td( class=bad)?>([^<]*)", cells)]
    return rows


def test_diff_compares_only_the_same_samples_and_marks_against_the_label(tmp_path):
    # B saw other samples at steps 1 and 3 (another data order), the same ones at step 5.
    a = synthetic_run(tmp_path / "a", 6, [6], [1, 3, 5], wrong_at=1)
    b = synthetic_run(tmp_path / "b", 6, [6], [1, 3, 5], keys=lambda s: ["s0", "s1"] if s == 5 else ["x", "y"],
                      wrong_at=3)
    ra, rb = analysis.load_run(a), analysis.load_run(b)
    assert ra.same_sample_steps(rb, "train") == [5] and ra.same_sample_steps(rb, "eval") == [6]
    assert main(["diff", str(a), str(b), "--out", str(tmp_path / "d")]) == 0
    page = (tmp_path / "d" / "diff.html").read_text()
    assert "the same samples at 1 of the 3 common train steps" in page
    for phase, step in (("eval", 6), ("train", 5)):
        rows = grid_rows(page, f"{phase} step {step} · sample 0 · audio cb0 ·")
        label = [t for t, _ in rows["label"]]
        for name, wrong in (("pred A", 1), ("pred B", 3)):
            marked = [i for i, (t, bad) in enumerate(rows[name]) if bad]
            assert marked == [wrong]  # index 0 of the grid is target 0: each run marked at its own mistake
            assert all((t != lab) == bad for (t, bad), lab in zip(rows[name], label, strict=True))
    # Steps where the samples differ are never compared; with no step in common at all, it is said.
    c = synthetic_run(tmp_path / "c", 6, [], [1, 3], keys=lambda s: ["q", "r"])
    result = diff(ra, analysis.load_run(c))
    assert result["config"] == {}  # output_dir and the asset path sit under each run's own dir
    assert main(["diff", str(a), str(c), "--out", str(tmp_path / "d2")]) == 0
    assert "different samples at each of the 2 common train steps" in (tmp_path / "d2" / "diff.md").read_text()
    assert "pred B" not in (tmp_path / "d2" / "diff.md").read_text()


def test_old_logs_without_sample_key_are_matched_by_labels(tmp_path):
    a = synthetic_run(tmp_path / "a", 4, [], [2, 4])
    b = synthetic_run(tmp_path / "b", 4, [], [2, 4], keys=lambda s: ["s0", "s1"] if s == 2 else ["m", "n"])
    for path in (a, b):
        events = [json.loads(line) for line in (path / "events.jsonl").read_text().splitlines()]
        (path / "events.jsonl").write_text("".join(json.dumps({k: v for k, v in e.items() if k != "sample_key"})
                                                   + "\n" for e in events))
    assert analysis.load_run(a).same_sample_steps(analysis.load_run(b)) == [2]


# ---------------------------------------------------------------- a real tiny run


@pytest.fixture(scope="module")
def run20(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """The README's first command with max_steps=20: one eval and one slice step, the shape that used to crash."""
    out = tmp_path_factory.mktemp("tiny20") / "run"
    done = subprocess.run([sys.executable, "-m", "higgs_accel", "train", "--preset", "tiny", "--output-dir", str(out),
                           "train.max_steps=20"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    return out, done


def test_a_short_tiny_run_ends_with_status_0_and_a_report(run20):
    out, done = run20
    assert done.returncode == 0, done.stderr[-3000:]
    # progress and results on stdout, no loading bars and no blank line in it; nothing at all on stderr (no warning)
    lines = done.stdout.splitlines()
    assert "" not in lines and not any("Writing model shards" in x or "Loading" in x for x in lines)
    assert "report/report.html" in done.stdout and done.stderr == ""
    run = analysis.load_run(out)
    assert run.slice_steps() == [20] and run.metrics("eval").index.tolist() == [20]
    keys = run.pred_slice["sample_key"]
    assert keys.str.fullmatch(r"[0-9a-f]{16}").all()
    page = (out / "report" / "report.html").read_text()
    assert page.count('<details open>') == 2 and page.count('alt="mel spectrogram"') == 2


def test_a_failing_report_is_a_log_error_not_an_exit_status(run20, tmp_path, monkeypatch, capsys):
    import shutil

    import analysis.report
    from higgs_accel.commands.train import write_run_report

    out = tmp_path / "run"
    shutil.copytree(run20[0], out)
    before = analysis.load_run(out)

    def broken(run_dir):
        raise ValueError("no luck")

    monkeypatch.setattr(analysis.report, "write_report", broken)
    write_run_report(out)  # returns: the caller's exit status stays 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "warning: the run finished, but its report failed (ValueError: no luck)" in err
    after = analysis.load_run(out)
    [error] = after.log_error.to_dict("records")
    assert (error["sink"], error["error_type"], error["error"]) == ("report", "ValueError", "no luck")
    assert error["step"] == 20 and error["run_id"] == before.start["run_id"]
    assert after.status == "finished" and len(after.train_step) == len(before.train_step)
    assert "log_error" in {p.name for p in (out / "events").iterdir()}  # in the Parquet tables too


# ---------------------------------------------------------------- notebook API


def test_strict_tables_and_several_runs_in_one_frame(tmp_path):
    a = synthetic_run(tmp_path / "x" / "run", 3, [3], [])
    b = synthetic_run(tmp_path / "y" / "run", 2, [], [])
    run = analysis.load_run(a)
    for typo in ("evals", "trian_step"):
        with pytest.raises(AttributeError, match="tables: .*train_step"):
            getattr(run, typo)
    assert not hasattr(run, "evals") and hasattr(run, "checkpoint") and run.checkpoint.empty
    assert {"train_step", "eval", "run_end", "library_log"} <= set(dir(run))
    both = analysis.load_runs([a, b])
    assert list(both.columns[:2]) == ["run", "event"] and len(both) == 5
    assert both.groupby("run")["step"].max().to_dict() == {"x/run": 3, "y/run": 2}
    assert analysis.load_runs([a, b], "eval")["run"].tolist() == ["x/run"]
    with pytest.raises(AttributeError, match="did you mean 'eval'"):
        analysis.load_runs([a], "evl")


def test_every_documented_event_family_is_known_to_the_reader():
    from analysis.run import EVENT_FAMILIES

    documented = re.findall(r"^### `(\w+)`", (ROOT / "docs" / "events.md").read_text(), re.M)
    assert sorted(documented) == sorted(EVENT_FAMILIES)


@pytest.mark.slow
def test_the_default_demo_shows_a_model_learning(tmp_path):
    """`higgs-accel train --preset tiny` as the README runs it: 100 steps, evals at 25/50/75/100. The validation
    takes share voices and phrases with train, so eval loss and accuracy improve and the report has no warning."""
    out = tmp_path / "demo"
    done = subprocess.run([sys.executable, "-m", "higgs_accel", "train", "--preset", "tiny", "--output-dir", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    run = analysis.load_run(out)
    ev = run.metrics("eval")
    assert ev.index.tolist() == [25, 50, 75, 100]
    assert ev["loss"].iloc[-1] < 0.8 * ev["loss"].iloc[0] and ev["loss"].is_monotonic_decreasing
    assert ev["audio_acc"].iloc[-1] > ev["audio_acc"].iloc[0] + 0.1
    md = (out / "report" / "report.md").read_text()
    assert "Nothing: no NaN/inf" in md.split("## Worth a look", 1)[1].split("##", 1)[0]


def test_report_md_escapes_html_from_configs_and_manifests(tmp_path):
    """Config values and manifest strings are data: in report.md's tables they are escaped, as in report.html."""
    path = tmp_path / "run"
    log = Log(path)
    hostile = "<script>alert(1)</script>|x.jsonl"
    log.add("run_start", 0, config={"preset": "<b>tiny</b>", "train": {"max_steps": 1},
                                    "data": {"train_manifest": hostile}},
            run_dir=str(path), total_steps=1, steps_per_epoch=1, world_size=1, trainable_params=1, total_params=2)
    log.add("train_step", 1, **metrics(1), lr=1e-3, grad_norm=1.0, step_time_s=0.1)
    log.add("run_end", 1, status="finished", error=None, elapsed_s=1.0, total_steps=1, completed_steps=1)
    md_path, html_path = write_report(log.write())
    md = md_path.read_text()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;\\|x.jsonl" in md and "preset=&lt;b&gt;tiny&lt;/b&gt;" in md
    prose = re.sub(r"```.*?```", "", md, flags=re.S)  # code blocks show text as it is, never as HTML
    assert "<script>" not in prose and "<b>tiny" not in prose
    assert "<script>alert" not in html_path.read_text()
