"""``higgs-accel report``: the same as ``python -m analysis report`` (its options and help)."""

from __future__ import annotations

import argparse


def add_parser(subparsers):
    p = subparsers.add_parser("report", help="write a report of a run (same as python -m analysis report)",
                              add_help=False)
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    from analysis.__main__ import main

    return main(["report", *args.rest])
