"""The Parquet sink: one table per event family under ``events/<family>/``, in the format of ``analysis.schema``."""

from __future__ import annotations

import time
from collections import defaultdict
from pathlib import Path

from analysis.schema import PART_GLOB, Superseded, part_name, read_parts, rows_to_table, write_atomic


class ParquetSink:
    """One table per event family under ``events/<family>/``, written as rolling complete part files."""

    def __init__(self, root: Path, flush_events: int = 500, flush_seconds: float = 30.0):
        self.root = Path(root)
        self.flush_events, self.flush_seconds = flush_events, flush_seconds
        self.buffers: dict[str, list[dict]] = defaultdict(list)
        self.buffered = 0
        self.last_flush = time.monotonic()

    def write(self, event: dict) -> None:
        self.buffers[event["event"]].append(event)
        self.buffered += 1
        if self.buffered >= self.flush_events or time.monotonic() - self.last_flush >= self.flush_seconds:
            self.flush()

    def flush(self) -> None:
        for family, rows in list(self.buffers.items()):
            if rows:
                folder = self.root / family
                folder.mkdir(parents=True, exist_ok=True)
                write_atomic(rows_to_table(rows), folder / part_name(rows[0]["seq"]))
                rows.clear()
        self.buffered = 0
        self.last_flush = time.monotonic()

    def close(self) -> None:
        self.flush()
        compact(self.root)


def compact(root: Path) -> None:
    """One part per family, with the ``superseded`` flag. The merged part replaces the first one atomically
    before the rest go, so a crash in between leaves duplicates (readers drop repeated seq), never a gap."""
    root = Path(root)
    if not root.is_dir():
        return
    rule = Superseded.of_table(read_parts(root / "run_resume"))
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        parts = sorted(folder.glob(PART_GLOB))
        table = read_parts(folder) if parts else None
        if table is None:
            continue
        write_atomic(rule.mark(table), parts[0])
        for p in parts[1:]:
            p.unlink()
