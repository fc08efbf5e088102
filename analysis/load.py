"""Read a run directory into typed tables: Parquet first, completed from events.jsonl where Parquet lags.

The Parquet tables are the fast path; ``events.jsonl`` is the ground truth that a crashed or still running
run has written further than its last Parquet flush. Only pyarrow, pandas and the standard library are used:
reading a run must never import torch or the trainer.
"""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

EVENTS_FILE = "events.jsonl"
PARQUET_DIR = "events"
SUPERSEDED = "superseded"  # the Parquet writer's flag on rows a resume redid
# A run without run_end whose last event is younger than this may still have a process writing to it.
RUNNING_WINDOW_S = 120.0


# ---------------------------------------------------------------- typed tables (the trainer's conventions)


def _json_text(values: list) -> pa.Array:
    return pa.array([v if v is None or isinstance(v, str) else json.dumps(v, default=str) for v in values],
                    pa.string())


def column(values: list) -> pa.Array:
    """One typed column as the trainer's Parquet sink writes it: float64 metrics (all-null too), int64
    counters, list<int32> token slices, strings, and JSON text for anything nested or mixed.

    Arrow's own inference does the typing (fast on long logs); what it types differently is mapped back.
    """
    try:
        arr = pa.array(values)
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        return _json_text(values)
    t = arr.type
    if pa.types.is_null(t):
        return arr.cast(pa.float64())
    if t in (pa.int64(), pa.float64(), pa.string(), pa.bool_()):
        return arr
    if pa.types.is_list(t):
        item = t.value_type
        if pa.types.is_null(item) or pa.types.is_integer(item):
            try:
                return arr.cast(pa.list_(pa.int32()))
            except pa.ArrowInvalid:  # a value beyond int32: keep it exact
                return arr
        if item in (pa.float64(), pa.string()):
            return arr
    return _json_text(values)


def rows_to_table(rows: list[dict]) -> pa.Table:
    """Events as a typed table, one column per field seen in any row (missing values are null)."""
    names = list(dict.fromkeys(k for r in rows for k in r))
    return pa.table({name: column([r.get(name) for r in rows]) for name in names})


def concat(tables: list[pa.Table]) -> pa.Table:
    """One table from parts whose schemas drifted (a column all-null in one part, new fields in another)."""
    tables = [t for t in tables if t is not None]
    if len(tables) == 1:
        return tables[0]
    try:
        return pa.concat_tables(tables, promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
        # Types that Arrow will not unify (int in one part, JSON text in another): retype from Python values.
        return rows_to_table([r for t in tables for r in t.to_pylist()])


def drop_repeated_seq(table: pa.Table) -> pa.Table:
    """After a crash during compaction one event can sit in two parts; keep its first copy."""
    if "seq" not in table.column_names or table.num_rows == 0:
        return table
    seq = table.column("seq").to_numpy(zero_copy_only=False)
    _, first = np.unique(seq, return_index=True)
    if len(first) == table.num_rows:
        return table
    return table.take(np.sort(first))


# ---------------------------------------------------------------- reading


def read_parquet_families(run_dir: Path) -> dict[str, pa.Table]:
    root = Path(run_dir) / PARQUET_DIR
    families: dict[str, pa.Table] = {}
    if not root.is_dir():
        return families
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        tables = []
        for part in sorted(folder.glob("part-*.parquet")):
            try:
                tables.append(pq.read_table(part))
            except Exception:  # noqa: BLE001 - a torn part is skipped; events.jsonl still holds its rows
                continue
        if tables:
            families[folder.name] = drop_repeated_seq(concat(tables))
    return families


def _parse_line(raw: bytes) -> dict | None:
    try:
        event = json.loads(raw)
    except ValueError:
        return None  # the torn last line of a crashed run
    return event if isinstance(event, dict) and "event" in event else None


def read_jsonl(path: Path, after_seq: int = -1, skip: set | None = None) -> list[dict]:
    """Events of events.jsonl with seq > after_seq (and not in ``skip``), unparseable lines skipped.

    With ``after_seq`` set, the file is read backwards from its end, because seq only grows along the file:
    completing a crashed run's Parquet then costs the unflushed tail, not the whole log.
    """
    if not path.is_file():
        return []
    if after_seq >= 0 and not skip:
        return _read_tail(path, after_seq)
    events = []
    with open(path, "rb") as f:
        for raw in f:
            e = _parse_line(raw)
            if e is not None and e.get("seq", -1) > after_seq and (not skip or e.get("seq") not in skip):
                events.append(e)
    return events


def _read_tail(path: Path, after_seq: int, block: int = 1 << 20) -> list[dict]:
    events: list[dict] = []
    with open(path, "rb") as f:
        end = f.seek(0, os.SEEK_END)
        carry = b""
        while end > 0:
            start = max(0, end - block)
            f.seek(start)
            chunk = f.read(end - start) + carry
            lines = chunk.split(b"\n")
            carry = lines.pop(0) if start > 0 else b""  # maybe cut in half: joined with the next block
            done = False
            for raw in reversed(lines):
                e = _parse_line(raw) if raw.strip() else None
                if e is None:
                    continue
                if e.get("seq", -1) <= after_seq:
                    done = True
                    break
                events.append(e)
            if done:
                break
            end = start
    events.reverse()
    return events


def read_events(run_dir: str | Path) -> dict[str, pa.Table]:
    """Every event family of a run, each event once: Parquet, completed from events.jsonl where it lags."""
    run_dir = Path(run_dir)
    families = read_parquet_families(run_dir)
    jsonl = run_dir / EVENTS_FILE
    seqs = [t.column("seq") for t in families.values() if "seq" in t.column_names]
    n_parquet = sum(len(s) for s in seqs)
    max_parquet = max((pc.max(s).as_py() for s in seqs if len(s)), default=-1)
    if max_parquet < 0:
        extra = read_jsonl(jsonl)
    elif n_parquet < max_parquet + 1:
        # A gap (a part lost in a crash, or rows that were never flushed before a resume): take everything
        # Parquet lacks. seq starts at 0 and every event has one, so the count shows the gap.
        have = set(pa.chunked_array([c for s in seqs for c in s.chunks], type=pa.int64()).to_pylist())
        extra = read_jsonl(jsonl, skip=have)
    else:
        extra = read_jsonl(jsonl, after_seq=max_parquet)
    by_family: dict[str, list[dict]] = {}
    for e in extra:
        by_family.setdefault(e["event"], []).append(e)
    for name, rows in by_family.items():
        table = rows_to_table(rows)
        families[name] = drop_repeated_seq(concat([families.get(name), table])) if name in families else table
    return {name: drop_superseded(drop_flagged(t), families) for name, t in families.items()}


def drop_flagged(table: pa.Table) -> pa.Table:
    """Compacted and rebuilt Parquet may carry the writer's own ``superseded`` flag: drop the rows it marks and
    the flag itself (a bookkeeping column, not a field of the event; the rule below finds the same rows)."""
    if SUPERSEDED not in table.column_names:
        return table
    flag = table.column(SUPERSEDED)
    if pa.types.is_boolean(flag.type):
        table = table.filter(pc.invert(pc.fill_null(flag, False)))
    return table.drop_columns([SUPERSEDED])


def drop_superseded(table: pa.Table, families: dict[str, pa.Table]) -> pa.Table:
    """Events logged before a crash for steps that a resume redid: step > from_step and seq < the resume's seq."""
    resumes = families.get("run_resume")
    if resumes is None or resumes.num_rows == 0 or not {"step", "seq"} <= set(table.column_names):
        return table
    keep = None
    pairs = zip(resumes.column("seq").to_pylist(), resumes.column("from_step").to_pylist(), strict=True)
    for seq, from_step in pairs:
        if from_step is None:
            continue
        stale = pc.and_(pc.greater(table.column("step"), from_step), pc.less(table.column("seq"), seq))
        fresh = pc.invert(pc.fill_null(stale, False))
        keep = fresh if keep is None else pc.and_(keep, fresh)
    return table if keep is None else table.filter(keep)


def parse_ts(ts: str | None) -> datetime | None:
    if not ts:
        return None
    try:
        return datetime.fromisoformat(ts.replace("Z", "+00:00"))
    except ValueError:
        return None


def run_status(end: dict | None, last_ts: datetime | None, now: datetime | None = None) -> str:
    """finished / crashed / interrupted / failed (to start) from run_end; without it, running if the log is fresh,
    else crashed."""
    if end is not None:
        return str(end.get("status") or "crashed")
    now = now or datetime.now(timezone.utc)
    if last_ts is not None and (now - last_ts).total_seconds() < RUNNING_WINDOW_S:
        return "running"
    return "crashed"
