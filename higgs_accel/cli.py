"""higgs-accel: LoRA fine-tuning of Higgs Audio v2, and the tools around a run: one subcommand per job below
(higgs-accel COMMAND --help for its options). Bad input exits with status 2 and one line naming the culprit."""

from __future__ import annotations

import argparse
import contextlib
import sys

from .commands import convert, dataset, diff, evaluate, export, generate, logs, prepare, report, train
from .config import ConfigError, unknown_key
from .events import quiet_libraries

# The subcommands, in the order --help lists them (higgs_accel.commands says what a command module holds).
COMMANDS = (train, prepare, generate, export, convert, evaluate, report, diff, logs, dataset)


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one line, like every other bad input (the usage is in --help)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _version() -> str:
    """The installed distribution's version (what pip reports), else the package's own."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("higgs-accel")
    except PackageNotFoundError:  # run from a checkout that was never installed
        from . import __version__

        return __version__


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="higgs-accel", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in COMMANDS:
        module.add_parser(sub).set_defaults(quiet=getattr(module, "QUIET_LIBRARIES", False))
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    # key=value overrides may come after flags too, which argparse's positional matching does not allow.
    args, extra = parser.parse_known_args(argv)
    takes_overrides = hasattr(args, "overrides")  # the config commands: train, prepare
    stray = [x for x in extra if x.startswith("-") or "=" not in x or not takes_overrides]
    for flag in stray:
        if flag.startswith("--") and "." in flag and takes_overrides:  # a mistyped config key
            raise unknown_key(flag[2:].split("=")[0], "command line", prefix="--")
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    return args


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
        # One-shot commands print their result alone; training captures library logs as events instead.
        with quiet_libraries() if args.quiet else contextlib.nullcontext():
            return args.func(args)
    except ConfigError as e:
        print(f"higgs-accel: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C outside the training steps (or not in train.stop_signals): no traceback
        from .stopping import EXIT_CODES

        print("higgs-accel: interrupted", file=sys.stderr)
        return EXIT_CODES["interrupted"]


if __name__ == "__main__":
    sys.exit(main())
