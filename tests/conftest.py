"""Shared fixtures: tiny assets built once per session, and in-process training runs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from higgs_accel.config import load_config
from higgs_accel.tiny import ensure_tiny_assets

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> dict[str, str]:
    """Paths of the tiny model, codec and manifests (the same assets --preset tiny builds)."""
    return ensure_tiny_assets(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def codes_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("codes")


def make_config(run_dir: Path, tiny: dict, codes_cache: Path, **overrides):
    """A tiny-preset config whose assets and code cache are shared across the session's runs."""
    pairs = [("preset", "tiny", "test"), ("train.output_dir", str(run_dir), "test"),
             ("data.codes_cache", str(codes_cache), "test")]
    pairs += [(k, v, "test") for k, v in tiny.items()]
    pairs += [(k.replace("__", "."), v, "test") for k, v in overrides.items()]
    return load_config(None, pairs)


def train_run(run_dir: Path, tiny: dict, codes_cache: Path, **overrides) -> list[dict]:
    """Train in this process; return the events it wrote."""
    from higgs_accel.loop import train

    train(make_config(run_dir, tiny, codes_cache, **overrides))
    return events_of(run_dir)


def kill_when_encoded(args: list[str], codes: Path, entries: int) -> list[Path]:
    """Start ``args`` from the repository root, SIGKILL it as soon as ``codes`` holds ``entries`` code entries (or
    after 2 min); return the entries there after the kill."""
    proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(list(codes.glob("*/*.npy"))) < entries:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    return list(codes.glob("*/*.npy"))


def encoded_now(prepare_stderr: str) -> int:
    """The count on prepare's last line: 'codes cache: DIR (N encoded by this process now[, S.Sx real time])'."""
    return int(prepare_stderr.split("(")[-1].split(" encoded")[0])


def events_of(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "events.jsonl").read_text().splitlines()]


def of(events: list[dict], name: str) -> list[dict]:
    return [e for e in events if e["event"] == name]
