"""Read a run directory into typed tables: Parquet first, completed from events.jsonl where Parquet lags.

The Parquet tables are the fast path; ``events.jsonl`` is the ground truth that a crashed or still running
run has written further than its last Parquet flush. The table format itself (types, parts, the superseded rule)
is ``analysis.schema``, shared with the trainer's writer. Reading a run never imports torch or the trainer.
"""

from __future__ import annotations

import warnings
from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from .schema import (
    EVENTS_DIR,
    EVENTS_FILE,
    Skipped,
    Superseded,
    concat,
    drop_repeated_seq,
    read_families,
    read_jsonl,
    rows_to_table,
)

# A run without run_end whose last event is younger than this may still have a process writing to it.
RUNNING_WINDOW_S = 120.0


def read_events(run_dir: str | Path, skipped: list[Skipped] | None = None) -> dict[str, pa.Table]:
    """Every event family of a run, each event once, typed by ``analysis.schema``: Parquet, completed from
    events.jsonl where it lags. Lines of events.jsonl that are no valid event are left out; they are appended to
    ``skipped`` when given, else each is reported as a warning."""
    run_dir = Path(run_dir)
    report = skipped is None
    skipped = [] if skipped is None else skipped
    families = read_families(run_dir / EVENTS_DIR)
    jsonl = run_dir / EVENTS_FILE
    seqs = [t.column("seq") for t in families.values() if "seq" in t.column_names]
    n_parquet = sum(len(s) for s in seqs)
    max_parquet = max((pc.max(s).as_py() for s in seqs if len(s)), default=-1)
    if max_parquet < 0:
        extra = read_jsonl(jsonl, skipped=skipped)
    elif n_parquet < max_parquet + 1:
        # A gap (a part lost in a crash, or rows that were never flushed before a resume): take everything
        # Parquet lacks. seq starts at 0 and every event has one, so the count shows the gap.
        have = set(pa.chunked_array([c for s in seqs for c in s.chunks], type=pa.int64()).to_pylist())
        extra = read_jsonl(jsonl, skip=have, skipped=skipped)
    else:
        extra = read_jsonl(jsonl, after_seq=max_parquet, skipped=skipped)
    by_family: dict[str, list[dict]] = {}
    for e in extra:
        by_family.setdefault(e["event"], []).append(e)
    for name, rows in by_family.items():
        table = rows_to_table(rows)
        families[name] = drop_repeated_seq(concat([families.get(name), table])) if name in families else table
    if report:
        for s in skipped[:20]:
            warnings.warn(str(s), stacklevel=2)
    rule = Superseded.of_table(families.get("run_resume"))
    return {name: rule.drop(t) for name, t in families.items()}


def run_status(end: dict | None, last_ts: datetime | None, now: datetime | None = None) -> str:
    """finished / crashed / interrupted / failed (to start) from run_end; without it, running if the log is fresh,
    else crashed."""
    if end is not None:
        return str(end.get("status") or "crashed")
    now = now or datetime.now(timezone.utc)
    if last_ts is not None and (now - last_ts).total_seconds() < RUNNING_WINDOW_S:
        return "running"
    return "crashed"
