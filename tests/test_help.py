"""Help texts and the console of the one-shot commands: correct defaults, every command listed, no library noise."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from higgs_accel.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]


def _help(*args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "higgs_accel", *args, "--help"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return " ".join(done.stdout.split())  # argparse wraps lines: compare with single spaces


def test_top_level_help_lists_every_command_without_markup():
    text = _help()
    commands = next(a for a in build_parser()._actions if a.dest == "command").choices
    assert len(commands) >= 6
    for name, sub in commands.items():
        assert f" {name} " in text and sub.prog.endswith(name)
    assert "``" not in text and "`" not in text


def test_train_help_shows_list_defaults():
    text = _help("train")
    assert "_MISSING_TYPE" not in text and "object at 0x" not in text
    assert "--log.slice_codebooks A,B,... codebooks shown in audio slices; default: [0, 1, 2, 3, 4, 5, 6, 7]" in text
    assert "--log.log_with A,B,..." in text and "default: []" in text


def test_generate_prints_no_loading_bars_or_library_warnings(tiny, tmp_path):
    out = tmp_path / "hi.wav"
    done = subprocess.run([sys.executable, "-m", "higgs_accel", "generate", "--base", tiny["model.base"],
                           "--audio-tokenizer", tiny["model.audio_tokenizer"], "--text", "Hello.", "--out", str(out),
                           "--max-new-tokens", "30"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.stdout == "" or done.stdout.startswith("wrote"), done.stdout
    lines = (done.stdout + done.stderr).strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("wrote ") and out.is_file(), done.stderr[-2000:]


def test_prepare_prints_its_summary_alone(tiny, tmp_path):
    """As quiet as train: no weight-loading bar or library notice in redirected output, only what prepare says."""
    assets = [f"{k}={v}" for k, v in tiny.items()]
    done = subprocess.run([sys.executable, "-m", "higgs_accel", "prepare", "--preset", "tiny", "--output-dir",
                           str(tmp_path / "run"), f"data.codes_cache={tmp_path / 'codes'}", *assets], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = (done.stdout + done.stderr).strip().splitlines()
    assert [x.split(":")[0] for x in lines] == ["data train", "data val", "codes cache"], lines
