"""Rebuild the Parquet tables of a run from its JSON lines (after a crash, or to change the layout), with the
``superseded`` flag compaction writes."""

from __future__ import annotations

import shutil
from collections import defaultdict
from pathlib import Path

from analysis.schema import (
    EVENTS_DIR,
    EVENTS_FILE,
    Skipped,
    Superseded,
    part_name,
    read_jsonl,
    rows_to_table,
    write_atomic,
)


def rebuild_parquet(run_dir: str | Path, skipped: list[Skipped] | None = None) -> int:
    """Replace ``RUN_DIR/events/`` by one part per event family built from events.jsonl; return the family count.
    Lines that are no valid event are left out (and appended to ``skipped``). Only ``events/`` and a temporary
    folder beside it are written: family names are checked event names, so none leads outside."""
    run_dir = Path(run_dir)
    rows = read_jsonl(run_dir / EVENTS_FILE, skipped=[] if skipped is None else skipped)
    rule = Superseded.of_rows(rows)
    families = defaultdict(list)
    for row in rows:
        families[row["event"]].append(row)
    out = run_dir / EVENTS_DIR
    tmp = run_dir / f"_{EVENTS_DIR}.rebuild"
    shutil.rmtree(tmp, ignore_errors=True)
    for family, members in families.items():
        (tmp / family).mkdir(parents=True)
        write_atomic(rule.mark(rows_to_table(members)), tmp / family / part_name(members[0]["seq"]))
    shutil.rmtree(out, ignore_errors=True)
    tmp.mkdir(exist_ok=True)
    tmp.rename(out)
    return len(families)
