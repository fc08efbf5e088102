"""``higgs-accel report``: ``python -m analysis report`` (the same options, help and exit statuses), refusing a
dir that holds no event log with one line instead of writing a report of nothing."""

from __future__ import annotations

from pathlib import Path

from analysis.__main__ import REPORT_HELP, add_report_arguments, run_report
from analysis.schema import EVENTS_FILE

from ..config import ConfigError


def add_parser(subparsers):
    p = subparsers.add_parser("report", help=REPORT_HELP, description=f"{REPORT_HELP} (as python -m analysis report)")
    add_report_arguments(p).set_defaults(func=run)
    return p


def check_run_dir(run_dir: str, flag: str = "RUN_DIR") -> None:
    """``run_dir`` is a run: a dir with its ``events.jsonl`` (the ground truth every table is rebuilt from)."""
    path = Path(run_dir)
    if not path.is_dir():
        raise ConfigError(f"{flag}: no such dir: {run_dir}")
    if not (path / EVENTS_FILE).is_file():
        raise ConfigError(f"{flag}: {run_dir} is not a run dir (no {EVENTS_FILE})")


def run(args) -> int:
    check_run_dir(args.run_dir)
    return run_report(args)
