"""Reports of training runs and diffs between runs, read from a run directory's event log.

Reads Parquet (falling back to events.jsonl) with pyarrow and pandas only: never torch or the trainer.
"""

from .run import Run, load_run, load_runs

__all__ = ["Run", "load_run", "load_runs"]
