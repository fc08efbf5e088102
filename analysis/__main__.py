"""Reports of higgs-accel runs: python -m analysis report RUN_DIR, python -m analysis diff RUN_A RUN_B. Exit status:
0 ok, 1 a --fail-if-worse check failed, 2 bad input.

A wrapper (``higgs-accel report`` / ``higgs-accel diff``) builds the same subcommands into its own parser with
``add_report_arguments`` / ``add_diff_arguments`` and runs them with ``run_report`` / ``run_diff``, so both CLIs
take the same options and show the same help."""

from __future__ import annotations

import argparse
import sys

REPORT_HELP = "write a Markdown and/or HTML report of one run"
DIFF_HELP = "compare two runs (B against A)"
_AUDIO_HELP = ("cap on the eval audio inlined into the HTML, in MB of WAV (default 20): all eval steps when they fit, "
               "else evenly spread ones (at least first, middle and last); files beyond it are linked")
_GATE_HELP = ("exit 1 if B's final METRIC (e.g. eval.loss, train.loss, eval.audio_acc, quality.wer) is worse than A's: "
              "at all, or by more than TOLERANCE (absolute) when given; repeatable")


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


def add_report_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options of ``report`` on ``parser`` (a subparser of this CLI or of a wrapper's)."""
    parser.add_argument("run_dir")
    parser.add_argument("--out", help="output directory (default: RUN_DIR/report)")
    parser.add_argument("--format", choices=["md", "html", "both"], default="both")
    parser.add_argument("--steps", type=_steps, help="steps whose prediction slices are shown, e.g. 1,30,60 "
                                                     "(default: first, middle and last step with slices)")
    parser.add_argument("--audio-mb", type=_mb, default=20.0, metavar="MB", help=_AUDIO_HELP)
    return parser


def add_diff_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options of ``diff`` on ``parser`` (a subparser of this CLI or of a wrapper's)."""
    parser.add_argument("run_a")
    parser.add_argument("run_b")
    parser.add_argument("--json", action="store_true", help="print the comparison as JSON instead of text")
    parser.add_argument("--all", action="store_true", help="show every config key, not only the changed ones")
    parser.add_argument("--out", help="also write diff.md, diff.html, diff.json and overlaid curves here")
    parser.add_argument("--fail-if-worse", action="append", default=[], metavar="METRIC[:TOLERANCE]",
                        help=_GATE_HELP)
    parser.add_argument("--audio-mb", type=_mb, default=20.0, metavar="MB", help=_AUDIO_HELP)
    return parser


def _bad_input(error: Exception) -> int:
    print(f"analysis: error: {error}", file=sys.stderr)
    return 2


def run_report(args: argparse.Namespace) -> int:
    """Write the report of ``args`` (parsed by ``add_report_arguments``); print its paths; the exit status."""
    from .report import write_report

    formats = ("md", "html") if args.format == "both" else (args.format,)
    try:
        paths = write_report(args.run_dir, args.out, formats, args.steps, args.audio_mb)
    except (FileNotFoundError, ValueError) as e:
        return _bad_input(e)
    for path in paths:
        print(path)
    return 0


def run_diff(args: argparse.Namespace) -> int:
    """Diff the runs of ``args`` (parsed by ``add_diff_arguments``); the exit status (1: a gate failed)."""
    from .diff import run_diff as diff_runs

    try:
        return diff_runs(args.run_a, args.run_b, as_json=args.json, show_all=args.all, out=args.out,
                         gates=args.fail_if_worse, audio_mb=args.audio_mb)
    except (FileNotFoundError, ValueError) as e:
        return _bad_input(e)


def build_parser(prog: str = "python -m analysis") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    add_report_arguments(sub.add_parser("report", help=REPORT_HELP, description=REPORT_HELP)).set_defaults(
        func=run_report)
    add_diff_arguments(sub.add_parser("diff", help=DIFF_HELP, description=DIFF_HELP)).set_defaults(func=run_diff)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
