"""Side sinks of the event log, one job and one module each: Parquet tables (``parquet``), the console
(``console``), accelerate trackers (``tracker``). ``EventLog`` hands each a finished event after writing its JSON
line; a sink only has to follow ``Sink``."""

from __future__ import annotations

from typing import Protocol

from .console import ConsoleSink
from .parquet import ParquetSink, compact
from .tracker import TrackerSink


class Sink(Protocol):
    def write(self, event: dict) -> None:
        """Take one finished event (its JSON line is already written)."""

    def flush(self) -> None:
        """Write out anything buffered (at eval, checkpoint and run end)."""

    def close(self) -> None:
        """Flush and release; the log is closing."""


__all__ = ["ConsoleSink", "ParquetSink", "Sink", "TrackerSink", "compact"]
