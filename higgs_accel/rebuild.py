"""Rebuild the Parquet tables of a run from its JSON lines (after a crash, or to change the layout), with the
``superseded`` flag compaction writes."""

from __future__ import annotations

import json
import shutil
from collections import defaultdict
from pathlib import Path

from .events import EVENTS_FILE, PARQUET_DIR
from .sinks import Superseded, rows_to_table, write_atomic


def read_events(path: Path) -> list[dict]:
    """Every whole event of an events.jsonl; a torn last line (kill -9 mid-write) is skipped."""
    rows = []
    with open(path, "rb") as f:
        for raw in f:
            try:
                row = json.loads(raw)
            except ValueError:
                continue
            if isinstance(row, dict) and "event" in row:
                rows.append(row)
    return rows


def rebuild_parquet(run_dir: str | Path) -> int:
    run_dir = Path(run_dir)
    rows = read_events(run_dir / EVENTS_FILE)
    rule = Superseded.of_rows(rows)
    families = defaultdict(list)
    for row in rows:
        families[row["event"]].append(row)
    out = run_dir / PARQUET_DIR
    tmp = run_dir / f"_{PARQUET_DIR}.rebuild"
    shutil.rmtree(tmp, ignore_errors=True)
    for family, members in families.items():
        (tmp / family).mkdir(parents=True)
        write_atomic(rule.mark(rows_to_table(members)), tmp / family / f"part-{members[0]['seq']:012d}.parquet")
    shutil.rmtree(out, ignore_errors=True)
    tmp.mkdir(exist_ok=True)
    tmp.rename(out)
    return len(families)
