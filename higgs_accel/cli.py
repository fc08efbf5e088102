"""higgs-accel: LoRA fine-tuning of Higgs Audio v2, and the tools around a run: one subcommand per job below
(higgs-accel COMMAND --help for its options). Bad input exits with status 2 and one line naming the culprit."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import sys
import warnings

from . import convert, export, generate, quality
from .config import SECTIONS, ConfigError, all_keys, load_config, parse_override, type_name, unknown_key

TRAIN_EPILOG = """\
Values apply in this order: --config YAML, then key=value overrides, then --section.key flags.
Examples:
  higgs-accel train --preset tiny --output-dir runs/demo
  higgs-accel train --config run.yaml train.lr=1e-4 lora.r=32
  accelerate launch --config_file accelerate_config.yaml -m higgs_accel train --config run.yaml
  torchrun --nproc_per_node 8 -m higgs_accel train --config run.yaml   (engines: docs/distributed.md)
"""


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one line, like every other bad input (the usage is in --help)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _train_parser(sub, name: str = "train", help: str = "fine-tune with LoRA") -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help, epilog=TRAIN_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
                       description=f"{help[0].upper()}{help[1:]}. Every config key is an option.")
    p.add_argument("--config", help="YAML file with sections model, lora, data, train, log")
    p.add_argument("--preset", choices=["tiny"], help="embedded tiny model, codec and data (no download)")
    p.add_argument("--output-dir", help="same as --train.output_dir")
    p.add_argument("--resume", help="'latest' or a checkpoint dir")
    p.add_argument("--log-level", choices=["debug", "info", "warning"], help="same as --log.level")
    p.add_argument("--no-report", action="store_true", help="skip writing RUN_DIR/report at the end")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.lr=1e-4")
    _add_original_flags(p)
    keys = all_keys()
    for section in SECTIONS:
        group = p.add_argument_group(f"{section} options")
        for key, (f, _) in keys.items():
            if key.startswith(section + "."):
                default = f.default_factory() if f.default is dataclasses.MISSING else f.default
                choices = f.metadata.get("choices")
                extra = f" (one of: {', '.join(map(str, choices))})" if choices else ""
                group.add_argument(f"--{key}", dest=key, default=argparse.SUPPRESS, metavar=_metavar(key),
                                   help=f"{f.metadata['doc']}{extra}; default: {default!r}")
    return p


# The original Higgs Audio trainer's flags, so its command lines (`torchrun ... trainer.py --train_manifest ...`)
# keep working; each sets the matching config key.
ORIGINAL_FLAGS = {"--train_manifest": "data.train_manifest", "--output_dir": "train.output_dir",
                  "--log_steps": "log.log_steps"}


def _add_original_flags(p: argparse.ArgumentParser) -> None:
    for flag, key in ORIGINAL_FLAGS.items():
        p.add_argument(flag, dest=key, default=argparse.SUPPRESS, metavar=_metavar(key),
                       help=f"same as --{key} (the original Higgs Audio trainer's flag)")


def _metavar(key: str) -> str:
    name = type_name(key).removesuffix(" or null")
    if name.startswith("a list"):
        return "A,B,..."
    return {"true or false": "BOOL", "an integer": "INT", "a number": "FLOAT"}.get(name, "STR")


def _run_overrides(args: argparse.Namespace) -> list[tuple[str, object, str]]:
    out = []
    for text in args.overrides:
        key, value = parse_override(text)
        out.append((key, value, "command line"))
    shortcuts = {"preset": args.preset, "train.output_dir": args.output_dir, "resume": args.resume,
                 "log.level": args.log_level}
    out += [(k, v, "command line") for k, v in shortcuts.items() if v is not None]
    out += [(k, v, f"--{k}") for k, v in vars(args).items() if "." in k and k in all_keys()]
    return out


def cmd_train(args) -> int:
    cfg = load_config(args.config, _run_overrides(args))
    from .loop import train

    ended = train(cfg)
    if not args.no_report and _is_main():
        write_run_report(ended.run_dir)
    return ended.exit_code  # stopping.EXIT_CODES: a requeue wrapper tells preempted (75) from failed


def write_run_report(run_dir) -> None:
    """The report at the end of a run. It can never change how the run ended: a failure is one warning line and a
    ``log_error`` event (sink ``report``) appended to the run's log; the exit status stays the run's."""
    from analysis.report import write_report

    try:
        paths = write_report(run_dir)
    except Exception as e:  # noqa: BLE001 - the run is over and its events are safe; only the report is missing
        print(f"higgs-accel: warning: the run finished, but its report failed ({type(e).__name__}: {e}); "
              f"try again with `higgs-accel report {run_dir}`", file=sys.stderr)
        _append_log_error(run_dir, "report", e)
        return
    print(f"report: {', '.join(str(p) for p in paths)}", file=sys.stderr)


def _append_log_error(run_dir, sink: str, error: BaseException) -> None:
    """One ``log_error`` event appended to a closed run (JSON lines and Parquet), at the run's last step."""
    import json
    from pathlib import Path

    from analysis.schema import EVENTS_DIR, EVENTS_FILE

    from .events import EventLog
    from .sinks.parquet import ParquetSink

    last = {}
    try:
        with open(Path(run_dir) / EVENTS_FILE, "rb") as f:
            for raw in f:
                try:
                    last = json.loads(raw)
                except ValueError:
                    continue
        log = EventLog(run_dir, str(last.get("run_id", "")), sinks=[ParquetSink(Path(run_dir) / EVENTS_DIR)])
        log.bind(**{k: last[k] for k in ("step", "epoch") if isinstance(last.get(k), int)})
        log.report_error(sink, error)
        log.close()
    except Exception as e:  # noqa: BLE001 - not even the log can be written: the warning line above stands
        print(f"higgs-accel: warning: could not record that in the event log ({type(e).__name__}: {e})",
              file=sys.stderr)


def cmd_prepare(args) -> int:
    from .codes import prepare

    prepare(load_config(args.config, _run_overrides(args)))
    return 0


def _is_main() -> bool:
    from accelerate import PartialState

    return PartialState().is_main_process


def cmd_report(args) -> int:
    from analysis.__main__ import main as analysis_main

    return analysis_main(["report", *args.rest])


def cmd_logs(args) -> int:
    from .rebuild import rebuild_parquet

    n = rebuild_parquet(args.run_dir)
    print(f"rebuilt {n} event tables under {args.run_dir}/events from events.jsonl", file=sys.stderr)
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    # key=value overrides may come after flags too, which argparse's positional matching does not allow.
    args, extra = parser.parse_known_args(argv)
    stray = [x for x in extra if x.startswith("-") or "=" not in x or args.command not in ("train", "prepare")]
    for flag in stray:
        if flag.startswith("--") and "." in flag and args.command in ("train", "prepare"):  # a mistyped config key
            raise unknown_key(flag[2:].split("=")[0], "command line", prefix="--")
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    return args


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="higgs-accel", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    _train_parser(sub).set_defaults(func=cmd_train)
    _train_parser(sub, "prepare", "encode all audio into the codes cache before training (same options as train)"
                  ).set_defaults(func=cmd_prepare)
    generate.register(sub)
    export.register(sub)
    convert.register(sub)
    quality.register(sub)
    rep = sub.add_parser("report", help="write a report of a run (same as python -m analysis report)",
                         add_help=False)
    rep.add_argument("rest", nargs=argparse.REMAINDER)
    rep.set_defaults(func=cmd_report)
    logs = sub.add_parser("logs", help="event-log maintenance")
    logs_sub = logs.add_subparsers(dest="logs_command", required=True)
    rb = logs_sub.add_parser("rebuild", help="rebuild the Parquet tables of RUN_DIR from events.jsonl")
    rb.add_argument("run_dir")
    rb.set_defaults(func=cmd_logs)
    return parser


@contextlib.contextmanager
def quiet_libraries():
    """No loading bars and no library deprecation notices on the console of the one-shot commands (generate,
    export): their output is the result. Errors still show. Training records library warnings as events instead."""
    import transformers
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    tf_logging = transformers.utils.logging
    verbosity, bars, hub_bars = tf_logging.get_verbosity(), tf_logging.is_progress_bar_enabled(), \
        not are_progress_bars_disabled()
    tf_logging.set_verbosity_error()
    tf_logging.disable_progress_bar()
    disable_progress_bars()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            yield
    finally:
        tf_logging.set_verbosity(verbosity)
        if bars:
            tf_logging.enable_progress_bar()
        if hub_bars:
            enable_progress_bars()


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
        if args.command in ("train", "prepare", "report", "logs"):  # training captures library logs as events
            return args.func(args)
        with quiet_libraries():
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
