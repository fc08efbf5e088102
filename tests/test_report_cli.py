"""The analysis CLI as a user and a wrapper meet it: --help of both subcommands, the parsers a wrapper reuses,
--fail-if-worse without a tolerance, readable mel pictures, the marks explained once, and the note on audio from
the tiny preset's random codec."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

import analysis
from analysis.__main__ import add_diff_arguments, add_report_arguments, main, run_diff, run_report
from analysis.audio import TINY_CODEC, tiny_codec
from analysis.diff import check_gate, parse_gate
from analysis.plots import mel_panels
from analysis.report import write_report
from analysis.slices import MARKS
from tests.test_report_shapes import Log, synthetic_run

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("command", ["report", "diff"])
def test_help_of_each_subcommand_exits_0(command):
    done = subprocess.run([sys.executable, "-m", "analysis", command, "--help"], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.startswith(f"usage: python -m analysis {command}")


def test_a_wrapper_builds_the_same_subcommands_into_its_own_parser(tmp_path, capsys):
    a = synthetic_run(tmp_path / "a", 4, [2, 4], [2])
    b = synthetic_run(tmp_path / "b", 4, [2, 4], [2], scale=1.1)
    parser = argparse.ArgumentParser(prog="wrapper")
    sub = parser.add_subparsers(dest="command", required=True)
    add_report_arguments(sub.add_parser("report")).set_defaults(func=run_report)
    add_diff_arguments(sub.add_parser("diff")).set_defaults(func=run_diff)
    args = parser.parse_args(["report", str(a), "--format", "md", "--out", str(tmp_path / "rep")])
    assert args.func(args) == 0 and (tmp_path / "rep" / "report.md").is_file()
    args = parser.parse_args(["diff", str(a), str(b), "--fail-if-worse", "train.loss"])
    assert args.func(args) == 1  # B's loss is higher
    args = parser.parse_args(["diff", str(a), str(tmp_path / "missing")])
    capsys.readouterr()
    assert args.func(args) == 2 and capsys.readouterr().err.count("\n") == 1


def test_fail_if_worse_without_a_tolerance_means_any_worsening(tmp_path):
    assert parse_gate("quality.wer") == ("quality", "wer", 0.0)
    assert parse_gate("eval.loss:0.05") == ("eval", "loss", 0.05)
    for bad in ("loss", "eval.loss:x", "eval.loss:nan", "nothing.loss"):
        with pytest.raises(ValueError, match="--fail-if-worse"):
            parse_gate(bad)
    a = analysis.load_run(synthetic_run(tmp_path / "a", 4, [2, 4], []))
    same = analysis.load_run(synthetic_run(tmp_path / "same", 4, [2, 4], []))
    worse = analysis.load_run(synthetic_run(tmp_path / "worse", 4, [2, 4], [], scale=1.001))
    assert check_gate(a, same, "eval.loss")["ok"]
    assert not check_gate(a, worse, "eval.loss")["ok"] and check_gate(a, worse, "eval.loss:1")["ok"]
    assert main(["diff", str(a.path), str(worse.path), "--fail-if-worse", "eval.loss"]) == 1


def test_mel_pictures_are_wide_with_seconds_and_hz(tmp_path):
    t = np.arange(24000) / 24000
    for name, f in (("low", 300), ("high", 3000)):
        sf.write(tmp_path / f"{name}.wav", 0.3 * np.sin(2 * np.pi * f * t), 24000)
    for panels in ([("generated", tmp_path / "low.wav")], [("label", tmp_path / "low.wav"),
                                                           ("prediction", tmp_path / "high.wav")]):
        path = mel_panels(panels, tmp_path / "mel.png")
        width, height = Image.open(path).size
        assert width >= 800 and height >= 250


def audio_run(path: Path, preset: str, codec: str = "") -> Path:
    """A run with slices at 5 steps and one eval with audio, under ``preset`` (and the user's ``codec``)."""
    log = Log(path)
    log.add("run_start", 0, config={"preset": preset, "train": {"max_steps": 5},
                                    "model": {"audio_tokenizer": codec or str(path / "tiny" / "codec")}},
            run_dir=str(path), total_steps=5, steps_per_epoch=5, world_size=1, trainable_params=1, total_params=2)
    src = synthetic_run(path.parent / f"{path.name}-src", 5, [5], [1, 2, 3, 4, 5])
    log.events += [e for e in _events(src) if e["event"] not in ("run_start",)]
    wav = path / "samples" / "step-00000005"
    wav.mkdir(parents=True)
    t = np.arange(24000) / 24000
    for kind, f in (("label", 300), ("pred", 600)):
        sf.write(wav / f"{kind}-0.wav", 0.3 * np.sin(2 * np.pi * f * t), 24000)
    log.add("eval_audio", 5, "eval", sample=0, label_path=str(wav / "label-0.wav"), pred_path=str(wav / "pred-0.wav"),
            n_frames=25, label_seconds=1.0, pred_seconds=1.0, sample_rate=24000, acc=0.5, acc_cb=[0.5] * 8,
            reason=None)
    for i, e in enumerate(log.events):
        e["seq"] = i
    (path / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in log.events))
    return path


def _events(path: Path) -> list[dict]:
    return [json.loads(line) for line in (path / "events.jsonl").read_text().splitlines()]


def test_the_report_says_once_how_marks_read_and_when_audio_is_from_the_tiny_codec(tmp_path):
    tiny = audio_run(tmp_path / "tiny", "tiny")
    md, page = (p.read_text() for p in write_report(tiny))
    assert page.count("after the slash") == 0 and md.count("prediction/label") == 1
    assert page.count("<code>prediction/label</code>") == 1  # said once, not under every grid
    assert MARKS.split(":")[0] in md and md.count(TINY_CODEC) == 1
    assert tiny_codec(analysis.load_run(tiny))
    own = audio_run(tmp_path / "own", "tiny", codec="bosonai/higgs-audio-v2-tokenizer")
    plain = audio_run(tmp_path / "plain", "")
    for run in (own, plain):
        assert not tiny_codec(analysis.load_run(run))
        assert TINY_CODEC not in write_report(run, formats=("md",))[0].read_text()
