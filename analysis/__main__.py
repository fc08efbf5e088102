"""Reports of higgs-accel runs: python -m analysis report RUN_DIR, python -m analysis diff RUN_A RUN_B (main is also
what higgs-accel report calls). Exit status: 0 ok, 1 a --fail-if-worse check failed, 2 bad input."""

from __future__ import annotations

import argparse
import sys


def _steps(text: str) -> list[int]:
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated steps like 1,30,60, got {text!r}") from None


def _mb(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected a size in MB (0 or more), got {text!r}")
    return value


_AUDIO_HELP = ("cap on the eval audio inlined into the HTML, in MB of WAV (default 20): all eval steps when they fit, "
               "else evenly spread ones (at least first, middle and last); files beyond it are linked")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m analysis", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    rep = sub.add_parser("report", help="write a Markdown and/or HTML report of one run")
    rep.add_argument("run_dir")
    rep.add_argument("--out", help="output directory (default: RUN_DIR/report)")
    rep.add_argument("--format", choices=["md", "html", "both"], default="both")
    rep.add_argument("--steps", type=_steps, help="steps whose prediction slices are shown, e.g. 1,30,60 "
                                                  "(default: first, middle and last step with slices)")
    rep.add_argument("--audio-mb", type=_mb, default=20.0, metavar="MB", help=_AUDIO_HELP)
    diff = sub.add_parser("diff", help="compare two runs (B against A)")
    diff.add_argument("run_a")
    diff.add_argument("run_b")
    diff.add_argument("--json", action="store_true", help="print the comparison as JSON instead of text")
    diff.add_argument("--all", action="store_true", help="show every config key, not only the changed ones")
    diff.add_argument("--out", help="also write diff.md, diff.html, diff.json and overlaid curves here")
    diff.add_argument("--fail-if-worse", action="append", default=[], metavar="METRIC:TOLERANCE",
                      help="exit 1 if B's final METRIC (e.g. eval.loss, train.loss, eval.audio_acc) is worse than "
                           "A's by more than TOLERANCE (absolute); repeatable")
    diff.add_argument("--audio-mb", type=_mb, default=20.0, metavar="MB", help=_AUDIO_HELP)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "report":
            from .report import write_report

            formats = ("md", "html") if args.format == "both" else (args.format,)
            for path in write_report(args.run_dir, args.out, formats, args.steps, args.audio_mb):
                print(path)
            return 0
        from .diff import run_diff

        return run_diff(args.run_a, args.run_b, as_json=args.json, show_all=args.all, out=args.out,
                        gates=args.fail_if_worse, audio_mb=args.audio_mb)
    except (FileNotFoundError, ValueError) as e:
        print(f"analysis: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
