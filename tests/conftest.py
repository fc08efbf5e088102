"""Shared fixtures: tiny assets built once per session, and in-process training runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from higgs_accel.config import load_config
from higgs_accel.tiny import ensure_tiny_assets


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


def events_of(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "events.jsonl").read_text().splitlines()]


def of(events: list[dict], name: str) -> list[dict]:
    return [e for e in events if e["event"] == name]
