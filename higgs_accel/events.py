"""The structured event log: one structlog processor chain per log, built here and nowhere else.

Every event is one ``EventLog.emit(name, **fields)`` call. The chain adds the common fields (run_id, seq,
rank, schema_version, step, epoch, phase), an ISO UTC timestamp and the level, turns non-finite floats into
null plus a ``nonfinite`` list and renders one JSON line; the line goes into ``RUN_DIR/events.jsonl``, then the
finished event to the side sinks (``higgs_accel.sinks``: Parquet, console, trackers). Only the main process
writes; the others drop their events. A failing sink never stops training: the error becomes one ``log_error``
event and training goes on. A log reopened after a hard kill first loses its torn last line (reported, with the
fragment), so appending never glues a new event to it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import warnings
from pathlib import Path

import structlog

from analysis.schema import COMMON_FIELDS, EVENTS_FILE, SCHEMA_VERSION, check_event_name, parse_line


def _has_nonfinite(value) -> bool:
    # Runs on every field of every event: the common types are tested first.
    if type(value) is int or type(value) is str:
        return False
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, (list, tuple)):
        try:  # a list of numbers in one C call: NaN and inf carry through the sum
            return not math.isfinite(math.fsum(value))
        except (TypeError, ValueError, OverflowError):  # strings or nested lists, inf - inf, a huge finite sum
            return any(map(_has_nonfinite, value))
    if isinstance(value, dict):
        return any(map(_has_nonfinite, value.values()))
    return False


def _nulled(value):
    """``value`` with every non-finite float, at any depth, as None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (list, tuple)):
        return [_nulled(v) for v in value]
    if isinstance(value, dict):
        return {k: _nulled(v) for k, v in value.items()}
    return value


def finite_fields(_, __, event: dict) -> dict:
    """No NaN/inf literals in JSON: non-finite floats, also inside lists and dicts (a per-codebook list), become
    null and the top-level field holding them is named in ``nonfinite``."""
    bad = [k for k, v in event.items() if _has_nonfinite(v)]
    for k in bad:
        event[k] = _nulled(event[k])
    if bad:
        event["nonfinite"] = bad
    return event


def cut_torn_tail(path: Path) -> bytes:
    """Make a log whose last line was cut short by a hard kill end in a newline, so the next event starts a line of
    its own; return the fragment dropped. A last line that is a whole event only lacks its newline and is kept."""
    if not path.is_file():
        return b""
    with open(path, "r+b") as f:
        end = pos = f.seek(0, os.SEEK_END)
        cut = 0
        while pos > 0:  # backwards in blocks: the log may be large, the fragment is at most one event
            start = max(0, pos - (1 << 16))
            f.seek(start)
            newline = f.read(pos - start).rfind(b"\n")
            if newline >= 0:
                cut = start + newline + 1
                break
            pos = start
        if cut == end:
            return b""
        f.seek(cut)
        fragment = f.read()
        if parse_line(fragment)[0] is not None:
            f.seek(end)
            f.write(b"\n")
            return b""
        f.truncate(cut)
    return fragment


def last_event(path: Path) -> dict | None:
    """The last event of an existing log (the one with the highest ``seq``); lines that are no event are skipped."""
    if not Path(path).is_file():
        return None
    last = None
    with open(path, "rb") as f:
        for raw in f:
            event, _ = parse_line(raw)
            if event is not None and (last is None or event["seq"] > last["seq"]):
                last = event
    return last


def read_last_seq(path: Path) -> int:
    """The last ``seq`` in an existing log (a resumed run continues it); a torn last line is skipped."""
    last = last_event(path)
    return -1 if last is None else last["seq"]


class _Common:
    """Adds the fields every event carries; ``seq`` is monotonic over the whole run, resumes included."""

    def __init__(self, run_id: str, rank: int, first_seq: int):
        self.run_id, self.rank, self.seq = run_id, rank, first_seq

    def __call__(self, _, __, event: dict) -> dict:
        event.setdefault("step", 0)
        event.setdefault("epoch", 0)
        event.setdefault("phase", "train")
        event.update(run_id=self.run_id, seq=self.seq, rank=self.rank, schema_version=SCHEMA_VERSION)
        self.seq += 1
        return event


def ordered(_, __, event: dict) -> dict:
    """Common fields first, so a line reads well in a terminal as well as in jq."""
    return {**{k: event[k] for k in COMMON_FIELDS if k in event}, **event}


class _MainOnly:
    def __init__(self, is_main: bool):
        self.is_main = is_main

    def __call__(self, _, __, event: dict) -> dict:
        if not self.is_main:
            raise structlog.DropEvent
        return event


def _render(_, __, event: dict) -> tuple[tuple, dict]:
    """The last processor: the JSON line, handed to the output together with the finished event."""
    return (_dumps(event), event), {}


class JsonLines:
    """RUN_DIR/events.jsonl, appended one flushed line per event."""

    def __init__(self, path: Path):
        self.file = open(path, "a", encoding="utf-8")

    def write(self, line: str) -> None:
        self.file.write(line + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


class _Output:
    """What the chain's last processor hands each event to: the JSON line goes to the file first, then the finished
    event to each side sink in turn. A failure in one never stops the others, nor training: it is reported."""

    def __init__(self, lines: JsonLines | None, sinks: list, on_error):
        self.lines, self.sinks, self.on_error = lines, sinks, on_error

    def msg(self, line: str, event: dict) -> None:
        if self.lines is not None:
            try:
                self.lines.write(line)
            except Exception as e:  # noqa: BLE001 - e.g. disk full on the log dir
                self.on_error("JsonLines", e)
        for sink in self.sinks:
            try:
                sink.write(event)
            except Exception as e:  # noqa: BLE001 - logging must never stop training
                self.on_error(type(sink).__name__, e)

    debug = info = warning = error = critical = msg


class EventLog:
    """Owns the JSON-lines file and the side sinks of one run; ``emit`` is the single emission point.

    The processor chain belongs to this log alone (``structlog.wrap_logger``): structlog's global configuration is
    never touched, so two logs in one process (tests, a notebook) stay independent."""

    def __init__(self, run_dir: str | Path, run_id: str, rank: int = 0, is_main: bool = True, sinks: list = ()):
        self.run_dir = Path(run_dir)
        self.is_main = is_main
        self.sinks = list(sinks)
        self._reported: set[tuple[str, str]] = set()
        self._pending_errors: list[dict] = []
        self._file = None
        self._on_close: list = []
        first_seq = 0
        torn = b""
        if is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            path = self.run_dir / EVENTS_FILE
            torn = cut_torn_tail(path)
            first_seq = read_last_seq(path) + 1
            self._file = JsonLines(path)
        self.first_seq = first_seq  # of this start: a resume names it, so what came before is told apart
        self._log = structlog.wrap_logger(
            _Output(self._file, self.sinks, self._sink_failed),
            processors=[
                _MainOnly(is_main),
                structlog.processors.add_log_level,
                _Common(run_id, rank, first_seq),
                structlog.processors.TimeStamper(fmt="iso", utc=True, key="ts"),
                finite_fields,
                ordered,
                _render,
            ],
            wrapper_class=structlog.BoundLogger,
        )
        if torn:
            # Reported with the whole fragment, so what the kill cut short is still in the log, as data.
            self.emit("log_error", level="warning", sink="JsonLines", error_type="TornLine",
                      error=f"the last line was cut short ({len(torn)} bytes), by a hard kill; dropped",
                      fragment=torn.decode("utf-8", "replace"))

    def bind(self, **fields) -> None:
        """Set fields (step, epoch, phase) carried by every later event of this log."""
        self._log = self._log.bind(**fields)

    def emit(self, event: str, level: str = "info", **fields) -> None:
        check_event_name(event)
        try:
            getattr(self._log, level)(event, **fields)
        except Exception as e:  # noqa: BLE001 - a field that cannot be rendered, say
            self._sink_failed("JsonLines", e)
        self._flush_errors()

    def report_error(self, sink: str, error: BaseException) -> None:
        """A logging side task failed (``pred_slice``: a slice could not be built, ``eval_audio``: listening
        material): one ``log_error`` event per sink and error type, like the sinks' own failures; never raises."""
        self._sink_failed(sink, error)
        self._flush_errors()

    def _sink_failed(self, sink: str, error: BaseException) -> None:
        key = (sink, type(error).__name__)
        if key in self._reported:
            return
        self._reported.add(key)
        self._pending_errors.append(dict(sink=sink, error_type=type(error).__name__, error=str(error)[:500]))

    def _flush_errors(self) -> None:
        while self._pending_errors:
            fields = self._pending_errors.pop(0)
            try:
                self._log.warning("log_error", **fields)
            except Exception:  # noqa: BLE001 - the JSON file itself is failing; the other sinks got it
                pass

    def flush(self) -> None:
        """Write buffered side-sink data (a Parquet part) now: at eval, checkpoint and run end."""
        for sink in self.sinks:
            try:
                sink.flush()
            except Exception as e:  # noqa: BLE001
                self._sink_failed(type(sink).__name__, e)
        self._flush_errors()

    def close(self) -> None:
        for sink in self.sinks:
            try:
                sink.close()
            except Exception as e:  # noqa: BLE001
                self._sink_failed(type(sink).__name__, e)
        self._flush_errors()
        while self._on_close:
            self._on_close.pop()()
        if self._file:
            self._file.close()
            self._file = None

    def on_close(self, undo) -> None:
        """Call ``undo()`` when this log closes (state set up for it, put back)."""
        self._on_close.append(undo)


def _dumps(obj, **kw) -> str:
    kw.setdefault("default", str)
    return json.dumps(obj, allow_nan=False, ensure_ascii=False, **kw)


class LibraryLogHandler(logging.Handler):
    """Routes transformers / accelerate / peft / warnings logs into the same chain as ``library_log`` events."""

    def __init__(self, log: EventLog):
        super().__init__(level=logging.WARNING)
        self.log = log

    def emit(self, record: logging.LogRecord) -> None:
        if record.name.startswith("higgs_accel"):
            return
        try:
            self.log.emit("library_log", level="warning" if record.levelno < logging.ERROR else "error",
                          logger=record.name, message=record.getMessage()[:2000])
        except Exception:  # noqa: BLE001
            pass


LIBRARY_LOGGERS = ("transformers", "accelerate", "peft", "torch", "py.warnings", "datasets")


def _silence_library_output():
    """Turn transformers' and the hub's progress bars off; return the function that puts them (and transformers'
    verbosity) back as they were."""
    import transformers
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    tf_logging = transformers.utils.logging
    verbosity, tf_bars = tf_logging.get_verbosity(), tf_logging.is_progress_bar_enabled()
    hub_bars = not are_progress_bars_disabled()
    tf_logging.disable_progress_bar()
    disable_progress_bars()

    def restore() -> None:
        tf_logging.set_verbosity(verbosity)
        if tf_bars:
            tf_logging.enable_progress_bar()
        if hub_bars:
            enable_progress_bars()

    return restore


@contextlib.contextmanager
def quiet_libraries():
    """No loading bars and no library deprecation notices on the console of the one-shot commands (generate,
    export, ...): their output is the result. Errors still show. Training records library warnings as events instead
    (``capture_library_logs``)."""
    import transformers

    restore = _silence_library_output()
    transformers.utils.logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            yield
    finally:
        restore()


def capture_library_logs(log: EventLog, is_main: bool) -> None:
    """Library warnings become events on the main process and are silenced elsewhere, until ``log`` closes: then
    the logging and Python-warnings state this changed is put back, so an in-process run (a test, a notebook) leaves
    the process as it found it."""
    import transformers

    saved_loggers = {name: (list(lg.handlers), lg.level, lg.propagate)
                     for name, lg in ((n, logging.getLogger(n)) for n in LIBRARY_LOGGERS)}
    saved_warnings = (warnings.filters[:], warnings.showwarning, logging._warnings_showwarning)
    restore_output = _silence_library_output()

    def restore() -> None:
        for name, (handlers, level, propagate) in saved_loggers.items():
            lg = logging.getLogger(name)
            lg.handlers[:] = handlers
            lg.setLevel(level)
            lg.propagate = propagate
        warnings.filters[:], warnings.showwarning, logging._warnings_showwarning = saved_warnings
        restore_output()

    transformers.utils.logging.disable_default_handler()
    # Installed afresh: captureWarnings(True) does nothing while an earlier call's hook is recorded, even when
    # something since put its own ``warnings.showwarning`` back (a test runner, a notebook, an earlier run).
    logging.captureWarnings(False)
    logging.captureWarnings(True)
    handler = LibraryLogHandler(log)
    for name in LIBRARY_LOGGERS:
        lg = logging.getLogger(name)
        for h in [h for h in lg.handlers if isinstance(h, LibraryLogHandler)]:
            lg.removeHandler(h)
        lg.addHandler(handler)
        lg.setLevel(logging.WARNING if is_main else logging.ERROR)
        lg.propagate = False
    if not is_main:
        warnings.filterwarnings("ignore")
    log.on_close(restore)
