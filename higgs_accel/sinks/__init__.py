"""Side sinks of the event log, one job and one module each: Parquet tables (``parquet``), the console
(``console``), accelerate trackers (``tracker``). ``EventLog`` hands each a finished event after writing its JSON
line; a sink only has to follow ``Sink``."""

from __future__ import annotations

from typing import Protocol

# Fields every event carries: bookkeeping, not something to print or chart.
COMMON_FIELDS = frozenset({"event", "ts", "run_id", "seq", "rank", "schema_version", "level"})


class Sink(Protocol):
    def write(self, event: dict) -> None:
        """Take one finished event (its JSON line is already written)."""

    def flush(self) -> None:
        """Write out anything buffered (at eval, checkpoint and run end)."""

    def close(self) -> None:
        """Flush and release; the log is closing."""


from .console import ConsoleSink  # noqa: E402 - the modules import COMMON_FIELDS from here
from .parquet import ParquetSink, compact  # noqa: E402
from .tracker import TrackerSink  # noqa: E402

__all__ = ["COMMON_FIELDS", "ConsoleSink", "ParquetSink", "Sink", "TrackerSink", "compact"]
