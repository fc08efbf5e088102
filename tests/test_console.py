"""The console: one line per audio slice, text slices only when they say something, no tensor shapes unless asked,
progress and results on stdout, problems on stderr, and a run that ends by saying what it wrote and what to run."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from higgs_accel.sinks import ConsoleSink
from higgs_accel.sinks.console import rate, run_summary_lines
from tests.conftest import events_of, of

REPO = Path(__file__).resolve().parents[1]
SHAPES = re.compile(r"logits \[|labels \[")


def _event(name: str, **fields) -> dict:
    common = dict(ts="2025-01-01T00:00:00Z", level="info", step=5, epoch=0, phase="train", seq=0, run_id="r",
                  rank=0, schema_version=1, event=name)
    return {**common, **fields}


def _run_start(codebooks: int, train_on_prompt: bool = False) -> dict:
    return _event("run_start", run_id="r", world_size=1, device="cpu", trainable_params=1, total_params=10,
                  run_dir="/runs/x", config={"log": {"slice_codebooks": list(range(codebooks))},
                                             "data": {"train_on_prompt": train_on_prompt}})


def _text(n_match: int, sample: int = 0) -> dict:
    return _event("pred_slice", modality="text", codebook=None, sample=sample, n_match=n_match, n_targets=3,
                  logits_shape=[9, 100], labels_shape=[1, 12], first_pred=[5, 6, 1234], first_label=[5, 7, 1234],
                  last_pred=[8, 9], last_label=[8, 9], first_pred_text=["Hi", "!", "<|eot_id|>"],
                  first_label_text=["Hi", "..." if n_match < 3 else "!", "<|eot_id|>"], last_pred_text=["a", "b"],
                  last_label_text=["a", "b"])


def _audio(codebook: int, n_match: int, sample: int = 0) -> dict:
    return _event("pred_slice", modality="audio", codebook=codebook, sample=sample, n_match=n_match, n_targets=27,
                  logits_shape=[40, 8, 1026], labels_shape=[1, 20, 8], first_pred=[324, 324, 5],
                  first_label=[171, 324, 5], last_pred=[1025], last_label=[1025])


def _console(events: list[dict], level: str = "info") -> tuple[str, str]:
    out, err = io.StringIO(), io.StringIO()
    console = ConsoleSink(total_steps=10, log_steps=5, level=level, stream=out, errors=err)
    for e in events:
        console.write(e)
    console.close()
    return out.getvalue(), err.getvalue()


def test_one_line_per_audio_slice_and_the_text_slice_only_with_a_mismatch():
    slices = [_text(3, 0), *(_audio(c, c + 1, 0) for c in range(3)), _text(1, 1), *(_audio(c, 2, 1) for c in range(3))]
    out, err = _console([_run_start(3), *slices])
    lines = out.splitlines()[1:]
    assert lines[0] == "train step 5 sample 0 audio: cb0 1/27 cb1 2/27 cb2 3/27"
    assert lines[1] == "train step 5 sample 1 text: 1/3 match"  # sample 0's text matched: not shown
    assert lines[2] == "  first pred  'Hi'   '!' '<|eot_id|>'"
    assert lines[3] == "        label 'Hi' '...' '<|eot_id|>'   * mismatch"
    assert lines[5] == "        label 'a' 'b'"  # no mismatch mark when all match
    for pred, label in ((lines[2], lines[3]), (lines[4], lines[5])):  # every cell ends in the same column
        ends = [m.end() for m in re.finditer(r"\S+", pred)][2:]
        assert ends == [m.end() for m in re.finditer(r"\S+", label)][1:len(ends) + 1]
    assert lines[6] == "train step 5 sample 1 audio: cb0 2/27 cb1 2/27 cb2 2/27" and len(lines) == 7
    assert not SHAPES.search(out) and err == ""


def test_trained_prompts_show_every_text_slice_and_debug_shows_every_slice_with_its_shapes():
    out, _ = _console([_run_start(1, train_on_prompt=True), _text(3), _audio(0, 4)])
    assert out.splitlines()[1:] == ["train step 5 sample 0 text: 3/3 match", *out.splitlines()[2:6],
                                    "train step 5 sample 0 audio: cb0 4/27"]
    noise = [_event("library_log", level="warning", logger="transformers.x", message="noisy"),
             _event("probe", level="debug", note="details")]
    info, _ = _console([_run_start(2), _text(3), _audio(0, 4), _audio(1, 5), *noise])
    debug, debug_err = _console([_run_start(2), _text(3), _audio(0, 4), _audio(1, 5), *noise], level="debug")
    assert "noisy" not in info and "details" not in info
    assert "train step 5 sample 0 text: 3/3 match | logits [9, 100] labels [1, 12]" in debug
    assert "train step 5 sample 0 audio codebook 1: 5/27 match | logits [40, 8, 1026] labels [1, 20, 8]" in debug
    assert "[debug] probe" in debug and "[transformers.x] noisy" in debug_err


def test_audio_slices_of_a_run_without_its_config_are_joined_when_the_sample_ends():
    """Without run_start (a sink fed by hand), a sample's line is printed when the next event or the close comes."""
    out, _ = _console([_audio(0, 1), _audio(1, 2), _audio(0, 3, sample=1)])
    assert out.splitlines() == ["train step 5 sample 0 audio: cb0 1/27 cb1 2/27",
                                "train step 5 sample 1 audio: cb0 3/27"]


def test_progress_goes_to_stdout_and_problems_to_stderr():
    step = _event("train_step", step=10, loss=1.0, text_loss=0.5, audio_loss=0.5, audio_acc=0.1, lr=1e-3,
                  grad_norm=2.0, samples_per_s=0.04)
    skipped = dict(step, step=7, level="warning", step_skipped=True, nonfinite_steps=1)
    skip = _event("data_skip", level="warning", split="train", source="m.jsonl", line=3, reason="invalid_json",
                  detail="Expecting value at column 1")
    ends = [_event("run_end", status=s, level=lvl, step=10, elapsed_s=3.0, error=None, message=m)
            for s, lvl, m in (("finished", "info", None), ("preempted", "error", "stopped by SIGTERM"))]
    out, err = _console([_run_start(1), skip, skipped, step, ends[0]])
    assert out.splitlines()[1:] == ["step 10/10 | loss 1.0000 | text 0.5000 | audio 0.5000 | audio acc 0.1000 | "
                                    "lr 1.00e-03 | grad 2.0000 | 25.0 s/sample", "run finished after 10 steps in 3.0 s"]
    assert err.splitlines() == [
        "[warning] train data: skipped m.jsonl:3: invalid_json: Expecting value at column 1",
        "[warning] step 7 skipped: non-finite loss or gradient norm (1 so far in this start)"]
    out, err = _console([ends[1]], level="warning")
    assert out == "" and err == "run preempted after 10 steps in 3.0 s: stopped by SIGTERM\n"


@pytest.mark.parametrize("samples_per_s, shown", [(26.83, "26.8 samples/s"), (1.0, "1.0 samples/s"),
                                                  (0.5, "2.0 s/sample"), (1 / 23.4, "23.4 s/sample"),
                                                  (0.0, "n/a samples/s")])
def test_throughput_reads_as_seconds_per_sample_under_one_sample_a_second(samples_per_s, shown):
    assert rate(samples_per_s) == shown


def test_the_summary_of_a_stopped_run_without_an_adapter_says_how_to_continue(tmp_path):
    (tmp_path / "checkpoints" / "step-00000004").mkdir(parents=True)
    (tmp_path / "checkpoints" / "step-00000008").mkdir()
    lines = run_summary_lines(tmp_path)
    assert lines[0] == f"wrote {tmp_path}/:" and "checkpoints/step-00000008/ (newest of 2)" in lines[1]
    assert not any("generate" in line or "adapter" in line for line in lines)
    assert any(f"higgs-accel train --resume latest --output-dir {tmp_path}" in line for line in lines)


def test_a_short_tiny_run_talks_on_stdout_warns_on_stderr_and_ends_with_what_it_wrote(tmp_path, tiny, codes_cache):
    """The CLI end to end: a manifest with one line that is not JSON, 10 steps, one log step with slices."""
    manifest = Path(tiny["data.train_manifest"])
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    for row in rows:
        row["audio"] = str(manifest.parent / row["audio"])
    bad = tmp_path / "train.jsonl"
    bad.write_text("".join(json.dumps(r) + "\n" for r in rows) + "{not json\n")
    run_dir = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, "-m", "higgs_accel", "train", "--preset", "tiny", "--output-dir", str(run_dir),
         *(f"{k}={v}" for k, v in tiny.items() if k != "data.train_manifest"), f"data.train_manifest={bad}",
         f"data.codes_cache={codes_cache}", "train.max_steps=10", "train.eval_every=10", "log.log_steps=10"],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    out, err = done.stdout, done.stderr
    events = events_of(run_dir)
    audio = [e for e in of(events, "pred_slice") if e["modality"] == "audio"]
    slice_lines = re.findall(r"^(train|eval) step 10 sample (\d) audio: ((?:cb\d+ \d+/\d+ ?)+)$", out, re.M)
    assert len(slice_lines) == len({(e["phase"], e["sample"]) for e in audio}) == 4  # 2 samples, train and eval
    for phase, sample, cells in slice_lines:
        expected = " ".join(f"cb{e['codebook']} {e['n_match']}/{e['n_targets']}" for e in audio
                            if (e["phase"], e["sample"]) == (phase, int(sample)))
        assert cells == expected
    text_shown = re.findall(r"^(?:train|eval) step 10 sample \d text: ", out, re.M)
    assert len(text_shown) == sum(e["n_match"] < e["n_targets"] for e in of(events, "pred_slice")
                                  if e["modality"] == "text")
    assert not SHAPES.search(out + err)
    assert re.search(r"^step 10/10 \| loss ", out, re.M) and "run finished after 10 steps" in out
    assert f"[warning] train data: skipped {bad}:{len(rows) + 1}: invalid_json: " in err
    assert "[warning]" not in out and "step 10/10" not in err
    tail = out[out.index(f"wrote {run_dir}/:"):].splitlines()
    assert any(line.split()[:2] == ["adapter", "adapter/"] for line in tail)
    assert any(line.split()[0] == "report" and "report/report.html" in line for line in tail)
    commands = [line.split("#")[0].strip() for line in tail[tail.index("next:") + 1:]]
    assert [c.split()[:2] for c in commands] == [["higgs-accel", "generate"], ["higgs-accel", "evaluate"],
                                                 ["higgs-accel", "report"], ["higgs-accel", "diff"]]
    assert commands[0].startswith(f"higgs-accel generate --run {run_dir} --text")
