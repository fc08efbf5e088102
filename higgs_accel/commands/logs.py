"""``higgs-accel logs``: event-log maintenance (``logs rebuild``: the Parquet tables from events.jsonl)."""

from __future__ import annotations

import sys

from .report import check_run_dir


def add_parser(subparsers):
    p = subparsers.add_parser("logs", help="event-log maintenance")
    sub = p.add_subparsers(dest="logs_command", required=True)
    rebuild = sub.add_parser("rebuild", help="rebuild the Parquet tables of RUN_DIR from events.jsonl")
    rebuild.add_argument("run_dir")
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    from ..rebuild import rebuild_parquet

    check_run_dir(args.run_dir)  # before anything is written: no events/ beside nothing
    skipped = []
    n = rebuild_parquet(args.run_dir, skipped)
    for s in skipped:
        print(f"{args.run_dir}: {s}", file=sys.stderr)
    print(f"rebuilt {n} event tables under {args.run_dir}/events from events.jsonl", file=sys.stderr)
    return 0
