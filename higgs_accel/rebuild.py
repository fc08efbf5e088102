"""Rebuild the Parquet tables of a run from its JSON lines (after a crash, or to change the layout)."""

from __future__ import annotations

import json
import shutil
from collections import defaultdict
from pathlib import Path

from .events import EVENTS_FILE, PARQUET_DIR
from .sinks import rows_to_table, write_atomic


def read_events(path: Path) -> list[dict]:
    """Every whole line of an events.jsonl; a torn last line (kill -9 mid-write) is skipped."""
    rows = []
    with open(path, "rb") as f:
        for raw in f:
            try:
                rows.append(json.loads(raw))
            except ValueError:
                continue
    return rows


def rebuild_parquet(run_dir: str | Path) -> int:
    run_dir = Path(run_dir)
    families = defaultdict(list)
    for row in read_events(run_dir / EVENTS_FILE):
        families[row["event"]].append(row)
    out = run_dir / PARQUET_DIR
    tmp = run_dir / f"_{PARQUET_DIR}.rebuild"
    shutil.rmtree(tmp, ignore_errors=True)
    for family, rows in families.items():
        (tmp / family).mkdir(parents=True)
        write_atomic(rows_to_table(rows), tmp / family / f"part-{rows[0]['seq']:012d}.parquet")
    shutil.rmtree(out, ignore_errors=True)
    tmp.mkdir(exist_ok=True)
    tmp.rename(out)
    return len(families)
