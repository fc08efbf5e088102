"""``higgs-accel diff``: ``python -m analysis diff`` (the same options, help and exit statuses: 1 when a
``--fail-if-worse`` gate fails)."""

from __future__ import annotations

from analysis.__main__ import DIFF_HELP, add_diff_arguments, run_diff

from .report import check_run_dir


def add_parser(subparsers):
    p = subparsers.add_parser("diff", help=DIFF_HELP, description=f"{DIFF_HELP} (as python -m analysis diff)")
    add_diff_arguments(p).set_defaults(func=run)
    return p


def run(args) -> int:
    check_run_dir(args.run_a, "RUN_A")
    check_run_dir(args.run_b, "RUN_B")
    return run_diff(args)
