"""Reports of training runs and diffs between runs, read from a run directory's event log.

Reads Parquet (falling back to events.jsonl) with pyarrow and pandas only: never torch or the trainer. The names
below import on first use, so the trainer, which imports ``analysis.schema`` to write its tables, never loads
pandas.
"""

import importlib

__all__ = ["Run", "load_run", "load_runs"]


def __getattr__(name: str):
    if name in __all__:
        return getattr(importlib.import_module(".run", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
