"""``higgs-accel train``: fine-tune with LoRA (``loop.train``), then write the run's report."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from ..config import error_line, load_config
from ..run_dir import resumed_config
from ..sinks.tracker import check_trackers_start
from . import add_config_parser, config_overrides


def add_parser(subparsers):
    p = add_config_parser(subparsers, "train", "fine-tune with LoRA")
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    overrides = config_overrides(args)
    cfg = load_config(args.config, overrides)
    changed = {}
    if cfg.resume:  # the run's own settings, with what this command sets on top
        cfg, changed = resumed_config(cfg, args.config, overrides)
        if os.environ.get("RANK", "0") == "0":  # the launcher's main process (accelerate's state is not built yet)
            for key, (old, new) in changed.items():
                print(f"resume: {key} changed from {old!r} to {new!r}")
    check_trackers_start(cfg.log.log_with)  # a tracker that cannot start stops the run before anything loads
    from accelerate import PartialState

    from ..loop import train

    ended = train(cfg, changed)
    if not args.no_report and PartialState().is_main_process:
        write_run_report(ended.run_dir)
    if PartialState().is_main_process:
        from ..sinks.console import run_summary_lines

        print("\n".join(run_summary_lines(ended.run_dir)), flush=True)
    return ended.exit_code  # stopping.EXIT_CODES: a requeue wrapper tells preempted (75) from failed


def write_run_report(run_dir) -> None:
    """The report at the end of a run. It can never change how the run ended: a failure is one warning line and a
    ``log_error`` event (sink ``report``) appended to the run's log; the exit status stays the run's."""
    from analysis.report import write_report

    try:
        write_report(run_dir)  # the run's summary lines name it
    except Exception as e:  # noqa: BLE001 - the run is over and its events are safe; only the report is missing
        print(f"higgs-accel: warning: the run finished, but its report failed ({type(e).__name__}: {e}); "
              f"try again with `higgs-accel report {run_dir}`", file=sys.stderr)
        _append_log_error(run_dir, "report", e)
        return


def _append_log_error(run_dir, sink: str, error: BaseException) -> None:
    """One ``log_error`` event appended to a closed run (JSON lines and Parquet), at the run's last step."""
    from ..events import EventLog, last_event
    from ..run_dir import EVENTS_DIR, EVENTS_FILE
    from ..sinks.parquet import ParquetSink

    try:
        last = last_event(Path(run_dir) / EVENTS_FILE) or {}
        log = EventLog(run_dir, str(last.get("run_id", "")), sinks=[ParquetSink(Path(run_dir) / EVENTS_DIR)])
        log.bind(**{k: last[k] for k in ("step", "epoch") if isinstance(last.get(k), int)})
        log.report_error(sink, error)
        log.close()
    except Exception as e:  # noqa: BLE001 - not even the log can be written: the warning line above stands
        print(f"higgs-accel: warning: could not record that in the event log ({error_line(e)})", file=sys.stderr)
