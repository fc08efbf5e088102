"""The event table format, defined once: the run-dir names, the type of every field, how rows become typed tables,
how part files are named, written and read back, how ``events.jsonl`` is read, and the superseded rule.

The trainer writes with it (``higgs_accel.sinks``, ``higgs_accel.rebuild``) and ``analysis.load`` reads with it, so
the same rows get the same types on both sides. Torch-free, like all of ``analysis``: only pyarrow, numpy and the
standard library.
"""

from __future__ import annotations

import functools
import json
import os
import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

# ---------------------------------------------------------------- run-dir names

SCHEMA_VERSION = 1
EVENTS_FILE = "events.jsonl"  # RUN_DIR/events.jsonl: the ground truth, one JSON object per line
EVENTS_DIR = "events"  # RUN_DIR/events/<event>/part-<first seq>.parquet
SAMPLES_DIR = "samples"  # RUN_DIR/samples/step-<8 digits>/: eval and generated audio
REPORT_DIR = "report"  # RUN_DIR/report/: report.md and its figures
PART_GLOB = "part-*.parquet"


def step_dir_name(step: int) -> str:
    """The folder of one step (a checkpoint, the audio of an eval): sorts by name like by step."""
    return f"step-{step:08d}"


def part_name(first_seq: int) -> str:
    return f"part-{first_seq:012d}.parquet"


# An event name becomes a folder name under events/: nothing that could leave it or hide in it.
EVENT_NAME = re.compile(r"[a-z][a-z0-9_]{0,63}")


def is_event_name(name) -> bool:
    return isinstance(name, str) and EVENT_NAME.fullmatch(name) is not None


def check_event_name(name) -> None:
    if not is_event_name(name):
        raise ValueError(f"event name {name!r} is not a lower-case identifier ([a-z][a-z0-9_]*, at most 64)")


# ---------------------------------------------------------------- field types

INT, FLOAT, BOOL, STR = pa.int64(), pa.float64(), pa.bool_(), pa.string()
TIME = pa.timestamp("us", tz="UTC")
INTS, FLOATS, STRS = pa.list_(pa.int32()), pa.list_(pa.float64()), pa.list_(pa.string())

# The type of every documented field, whatever values one part happens to hold: a field that is null in every row
# of one part (a sample without audio, a run without errors) must not be typed differently there, or pandas,
# polars and DuckDB cannot read the folder and compaction cannot merge it. Strings take nested values as JSON text.
# The fields every event carries, in the order a JSON line starts with them. ``step``, ``epoch`` and ``phase`` say
# where in the run it happened; the others are bookkeeping (``BOOKKEEPING``), not something to print or chart.
COMMON_FIELDS: dict[str, pa.DataType] = {
    "event": STR, "ts": TIME, "level": STR, "step": INT, "epoch": INT, "phase": STR, "seq": INT,
    "run_id": STR, "rank": INT, "schema_version": INT,
}
BOOKKEEPING = frozenset(COMMON_FIELDS) - {"step", "epoch", "phase"}
FIELD_TYPES: dict[str, pa.DataType] = {
    **COMMON_FIELDS,
    # any event with a non-finite value; ``superseded`` only in compacted and rebuilt tables
    "nonfinite": STRS, "superseded": BOOL,
    # run_start
    "config": STR, "run_dir": STR, "versions": STR, "git_commit": STR, "device": STR, "hardware": STR,
    "world_size": INT, "mixed_precision": STR, "trainable_params": INT, "total_params": INT, "total_steps": INT,
    "steps_per_epoch": INT, "train_samples": INT, "val_samples": INT, "resumed": BOOL, "checkpoints": STR,
    "memory": STR, "engine": STR, "eval_note": STR,
    # data_skip, data_summary
    "split": STR, "source": STR, "line": INT, "reason": STR, "detail": STR, "kept": INT, "skipped": INT,
    "skipped_by_reason": STR, "codec_encodes": INT, "longest_tokens": INT, "duplicates": INT, "encode_speed": FLOAT,
    "encode_batch_exact": BOOL,
    # train_step, eval (and the per-codebook metrics, see CODEBOOK_METRIC)
    "loss": FLOAT, "text_loss": FLOAT, "audio_loss": FLOAT, "text_acc": FLOAT, "audio_acc": FLOAT,
    "text_targets": INT, "audio_targets": INT, "tokens": INT, "audio_frames": INT, "samples": INT,
    "lr": FLOAT, "grad_norm": FLOAT, "step_time_s": FLOAT, "samples_per_s": FLOAT, "tokens_per_s": FLOAT,
    "padding_frac": FLOAT, "data_wait_s": FLOAT, "peak_mem_mb": FLOAT, "step_skipped": BOOL, "nonfinite_steps": INT,
    # pred_slice
    "modality": STR, "sample": INT, "codebook": INT, "first_pos": INTS, "last_pos": INTS, "first_frame": INTS,
    "last_frame": INTS, "first_pred": INTS, "last_pred": INTS, "first_label": INTS, "last_label": INTS,
    "first_pred_text": STRS, "first_label_text": STRS, "last_pred_text": STRS, "last_label_text": STRS,
    "n_targets": INT, "n_match": INT, "batch_match": INT, "batch_targets": INT, "logits_shape": INTS,
    "labels_shape": INTS, "sample_key": STR,
    # eval_audio, generate_audio
    "pred_path": STR, "label_path": STR, "n_frames": INT, "pred_seconds": FLOAT, "label_seconds": FLOAT,
    "sample_rate": INT, "acc": FLOAT, "acc_cb": FLOATS, "prompt": INT, "text": STR, "path": STR,
    "seconds": FLOAT, "new_tokens": INT, "stopped": STR, "error": STR, "do_sample": BOOL, "temperature": FLOAT,
    "top_k": INT, "top_p": FLOAT, "ras_win_len": INT, "ras_win_max_num_repeat": INT,
    "gen_time_s": FLOAT,
    # quality, quality_summary
    "transcript": STR, "wer": FLOAT, "cer": FLOAT, "similarity": FLOAT, "rtf": FLOAT, "baseline": BOOL,
    "utterances": INT, "no_audio": INT, "asr_model": STR, "speaker_model": STR, "reference": STR,
    "score_s": FLOAT,
    # checkpoint, adapter_saved, run_resume, log_error, library_log, run_end
    "adapter": STR, "checkpoint": STR, "from_step": INT, "sink": STR, "error_type": STR, "fragment": STR,
    "logger": STR, "message": STR, "status": STR, "elapsed_s": FLOAT, "completed_steps": INT, "checkpoint_seq": INT,
    "start_seq": INT, "start_elapsed_s": FLOATS, "total_elapsed_s": FLOAT, "changed": STR,
    # run_lock_taken_over (checkpoint_skipped: path, reason)
    "holder_host": STR, "holder_pid": INT, "holder_started": STR, "holder_run_id": STR, "heartbeat_age_s": FLOAT,
    # the dataset command's events (docs/dataset.md)
    "out_dir": STR, "sources": INT, "pending": INT, "workers": INT, "settings": STR, "start": FLOAT, "end": FLOAT,
    "avg_logprob": FLOAT, "compression_ratio": FLOAT, "speaker": STR, "clips": INT, "rejected": INT,
    "clip_seconds": FLOAT, "timing": STR, "sources_skipped": INT, "hours_in": FLOAT, "hours_kept": FLOAT,
    "train_clips": INT, "val_clips": INT, "speakers": STR, "rejected_by_reason": STR, "length_edges": FLOATS,
    "length_counts": INTS,
}
CODEBOOK_METRIC = re.compile(r"audio_(loss|acc)_cb\d+")
# An undeclared field is typed by the first of these that holds all its values (strings hold anything).
_INFERRED = (BOOL, INT, FLOAT, INTS, pa.list_(pa.int64()), FLOATS, STRS, STR)


def declared_type(name: str) -> pa.DataType | None:
    if name in FIELD_TYPES:
        return FIELD_TYPES[name]
    return FLOAT if CODEBOOK_METRIC.fullmatch(name) else None


def parse_time(v) -> datetime | None:
    """A ``ts`` value as a UTC datetime (JSON holds ISO 8601 text), or None when it is not one."""
    if isinstance(v, datetime):
        return v
    if isinstance(v, str):
        try:
            t = datetime.fromisoformat(v.replace("Z", "+00:00"))
        except ValueError:
            return None
        return t if t.tzinfo is not None else None
    return None


@functools.cache
def fits(tp: pa.DataType):
    """A test of whether a value converts to ``tp`` exactly (Arrow alone would truncate 1.5 into an int64 column).
    Built once per type: typing a part runs it on every value, on the training thread."""
    if tp == STR:
        return lambda v: True
    if pa.types.is_list(tp):
        item = fits(tp.value_type)
        return lambda v: v is None or (isinstance(v, (list, tuple)) and all(map(item, v)))
    if tp == BOOL:
        return lambda v: v is None or isinstance(v, bool)
    if tp == FLOAT:
        return lambda v: v is None or (isinstance(v, (int, float)) and not isinstance(v, bool))
    if pa.types.is_integer(tp):
        low, high = -(2 ** (tp.bit_width - 1)), 2 ** (tp.bit_width - 1)
        return lambda v: v is None or (type(v) is int and low <= v < high)
    if tp == TIME:
        return lambda v: v is None or parse_time(v) is not None
    return lambda v: v is None


def column_type(name: str, values: list) -> pa.DataType:
    """The declared type when every value fits it, else the narrowest type that holds them; all-null: null,
    which compaction's permissive merge unifies with whatever type another part has."""
    declared = declared_type(name)
    if declared is not None and all(map(fits(declared), values)):
        return declared
    present = [v for v in values if v is not None]
    if not present:
        return pa.null()
    return next(tp for tp in _INFERRED if all(map(fits(tp), present)))


def column(name: str, values: list) -> pa.Array:
    """The values of field ``name`` as one typed column: floats for metrics, list<int32> for token slices, strings
    for text, JSON text for nested values, UTC timestamps for ``ts``."""
    declared = declared_type(name)
    if declared is not None and declared != STR:
        # Fast path, all in Arrow: its own inference, then a safe cast, which refuses truncation and overflow.
        # Not from strings or across bool and number: Arrow would parse "3" into a number and True into 1.
        # ``ts`` is the one string Arrow parses: ISO 8601 with its zone.
        try:
            inferred = pa.array(values)
            from_text = pa.types.is_string(inferred.type)
            if (declared == TIME and (from_text or pa.types.is_timestamp(inferred.type))) or (not from_text and (
                    pa.types.is_null(inferred.type) or pa.types.is_boolean(inferred.type) == (declared == BOOL))):
                return inferred.cast(declared)
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
            pass
    tp = column_type(name, values)
    if tp == TIME:
        values = [parse_time(v) for v in values]
    elif tp == STR:
        values = [v if v is None or isinstance(v, str) else json.dumps(v, default=str) for v in values]
    return pa.array(values, type=tp)


def rows_to_table(rows: list[dict]) -> pa.Table:
    """Events as a typed table, one column per field seen in any row (missing values are null)."""
    names = list(dict.fromkeys(k for r in rows for k in r))
    return pa.table({name: column(name, [r.get(name) for r in rows]) for name in names})


def misfits(rows: list[dict]) -> list[tuple[int, str]]:
    """(row index, field) of each row whose declared field holds a value of another type (``"step": "3"``): such a
    row would retype the whole column, so a reader skips it. Checked per event family, on the fields it has."""
    families: dict[str, list[int]] = {}
    for i, r in enumerate(rows):
        families.setdefault(r.get("event"), []).append(i)
    bad: dict[int, str] = {}
    for members in families.values():
        names = dict.fromkeys(k for i in members for k in rows[i])
        for name in names:
            declared = declared_type(name)
            if declared is None or declared == STR:
                continue
            values = [rows[i].get(name) for i in members]
            if column(name, values).type in (declared, pa.null()):  # at Arrow's speed: the usual case
                continue
            test = fits(declared)
            for i, v in zip(members, values):
                if not test(v):
                    bad.setdefault(i, name)
    return sorted(bad.items())


def concat(tables: list[pa.Table | None]) -> pa.Table | None:
    """One table from parts whose schemas drifted (a column all-null in one part, new fields in another)."""
    tables = [t for t in tables if t is not None]
    if not tables:
        return None
    if len(tables) == 1:
        return tables[0]
    try:
        return pa.concat_tables(tables, promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
        # Parts written before the declared types (or an undeclared field typed two ways): retype from values.
        return rows_to_table([r for t in tables for r in t.to_pylist()])


def drop_repeated_seq(table: pa.Table) -> pa.Table:
    """After a crash during compaction one event can sit in two parts; keep its first copy."""
    if "seq" not in table.column_names or table.num_rows == 0:
        return table
    seq = table.column("seq").to_numpy(zero_copy_only=False)
    _, first = np.unique(seq, return_index=True)
    if len(first) == table.num_rows:
        return table
    return table.take(np.sort(first))


# ---------------------------------------------------------------- parts


def write_atomic(table: pa.Table, path: Path) -> None:
    """A complete Parquet file at ``path`` or none: written aside, then renamed over it."""
    _replace_with(path, lambda tmp: pq.write_table(table, tmp))


def write_text_atomic(text: str, path: Path) -> None:
    """A complete text file at ``path`` or none (a reader on another process never sees half of it)."""
    _replace_with(Path(path), lambda tmp: tmp.write_text(text))


def _replace_with(path: Path, write) -> None:
    tmp = path.with_name(f"_{path.name}.{os.getpid()}.tmp")
    write(tmp)
    os.replace(tmp, path)


def umask_modes(root: Path) -> None:
    """Give every file under ``root`` (or ``root`` itself) the mode a new file gets from the umask (0644 under the
    usual 022). Writers that go through a private temporary file (safetensors, ``tempfile.mkstemp``) leave 0600,
    which other users of a shared run dir or export cannot read."""
    mode = 0o666 & ~_umask()
    root = Path(root)
    for path in [root] if root.is_file() else root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            os.chmod(path, mode)


def _umask() -> int:
    """The process umask, read without setting it (``os.umask`` sets it: another thread creating a file meanwhile
    would get the wrong mode)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    return 0o022


def read_parts(family_dir: Path) -> pa.Table | None:
    """Every readable part of one event family, promoted to one schema, each event (seq) once."""
    tables = []
    for part in sorted(Path(family_dir).glob(PART_GLOB)):
        try:
            tables.append(pq.read_table(part))
        except Exception:  # noqa: BLE001 - a part torn by a crash is skipped; events.jsonl still has its rows
            continue
    table = concat(tables)
    return None if table is None else drop_repeated_seq(_time_as_timestamp(table))


def _time_as_timestamp(table: pa.Table) -> pa.Table:
    """Parts written before ``ts`` was a timestamp hold it as ISO text: read as the timestamp it is now."""
    if "ts" not in table.column_names or table.schema.field("ts").type == TIME:
        return table
    i = table.column_names.index("ts")
    return table.set_column(i, "ts", column("ts", table.column("ts").to_pylist()))


def read_families(events_dir: Path) -> dict[str, pa.Table]:
    """Every family folder under ``events/`` whose name is an event name, as one table each."""
    root = Path(events_dir)
    families: dict[str, pa.Table] = {}
    if not root.is_dir():
        return families
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and is_event_name(p.name)):
        table = read_parts(folder)
        if table is not None:
            families[folder.name] = table
    return families


# ---------------------------------------------------------------- events.jsonl


@dataclass
class Skipped:
    """A line of events.jsonl a reader left out, and why."""

    line: int  # 1-based; 0 when the line number is unknown (read backwards from the end)
    reason: str

    def __str__(self) -> str:
        return f"{EVENTS_FILE} line {self.line or '?'}: {self.reason}; skipped"


def parse_line(raw: bytes) -> tuple[dict | None, str | None]:
    """One line as an event, or (None, why not). A line that does not parse is a torn last line or damage."""
    try:
        event = json.loads(raw)
    except ValueError:
        return None, "not JSON (a line torn by a hard kill, or damage)"
    if not isinstance(event, dict):
        return None, f"a JSON {type(event).__name__}, not an object"
    if not is_event_name(event.get("event")):
        return None, f"'event' {event.get('event')!r} is not an event name"
    if "seq" not in event:
        return None, "no 'seq'"
    seq = event["seq"]
    if type(seq) is not int or seq < 0:
        return None, f"'seq' {seq!r} is not a non-negative integer"
    return event, None


def read_jsonl(path: Path, after_seq: int = -1, skip: set | None = None,
               skipped: list[Skipped] | None = None) -> list[dict]:
    """Events of events.jsonl with seq > after_seq (and not in ``skip``). Lines that are no event, and events whose
    declared fields hold values of another type, are left out and listed in ``skipped``: they never crash a reader
    and never count.

    With ``after_seq`` set, the file is read backwards from its end, because seq only grows along the file:
    completing a crashed run's Parquet then costs the unflushed tail, not the whole log.
    """
    path = Path(path)
    skipped = [] if skipped is None else skipped
    if not path.is_file():
        return []
    if after_seq >= 0 and not skip:
        events, lines = _read_tail(path, after_seq, skipped)
    else:
        events, lines = [], []
        with open(path, "rb") as f:
            for n, raw in enumerate(f, 1):
                if not raw.strip():
                    continue
                e, why = parse_line(raw)
                if e is None:
                    skipped.append(Skipped(n, why))
                elif e["seq"] > after_seq and (not skip or e["seq"] not in skip):
                    events.append(e)
                    lines.append(n)
    bad = dict(misfits(events))
    if bad:
        for i, name in bad.items():
            skipped.append(Skipped(lines[i], f"field '{name}' holds {events[i][name]!r}, not "
                                             f"{declared_type(name)}"))
        events = [e for i, e in enumerate(events) if i not in bad]
    return events


def _read_tail(path: Path, after_seq: int, skipped: list[Skipped],
               block: int = 1 << 20) -> tuple[list[dict], list[int]]:
    events: list[dict] = []
    with open(path, "rb") as f:
        end = f.seek(0, os.SEEK_END)
        carry = b""
        while end > 0:
            start = max(0, end - block)
            f.seek(start)
            chunk = f.read(end - start) + carry
            lines = chunk.split(b"\n")
            carry = lines.pop(0) if start > 0 else b""  # maybe cut in half: joined with the next block
            done = False
            for raw in reversed(lines):
                if not raw.strip():
                    continue
                e, why = parse_line(raw)
                if e is None:
                    skipped.append(Skipped(0, why))
                    continue
                if e["seq"] <= after_seq:
                    done = True
                    break
                events.append(e)
            if done:
                break
            end = start
    events.reverse()
    return events, [0] * len(events)


# ---------------------------------------------------------------- the superseded rule


def start_seconds(events: list[dict]) -> list[float]:
    """The wall time of each start (launch) of a run, in order, from its events: a start's ``run_end``
    ``elapsed_s``, or for a start killed without one, the time from its first to its last event. A start begins
    after the previous one's ``run_end``, or at a ``run_start`` following one that never ended."""
    spans: list[float] = []
    first = last = None
    opened = False

    def close() -> None:
        spans.append((last - first).total_seconds() if first and last else 0.0)

    for e in events:
        name, ts = e.get("event"), parse_time(e.get("ts"))
        if name == "run_start" and opened:  # the start before this one was killed: no run_end
            close()
            first = last = None
            opened = False
        first = first or ts
        last = ts or last
        opened = opened or name == "run_start"
        if name == "run_end":
            elapsed = e.get("elapsed_s")
            if isinstance(elapsed, (int, float)) and not isinstance(elapsed, bool):
                spans.append(float(elapsed))
            else:
                close()
            first = last = None
            opened = False
    if first is not None:
        close()
    return spans


class Superseded:
    """The rule of docs/events.md: an event is superseded when a later start resumed (``run_resume``; the event
    logged before that start, seq below its ``start_seq``) from a step below the event's step, or from the event's
    own step with the event logged after that step's checkpoint (seq above the resume's ``checkpoint_seq``: the final
    eval, ``adapter_saved``, ``run_end``), so the resumed run redid it. The writer marks it (``mark``: a boolean
    column, so pandas, polars and DuckDB users filter with ``NOT superseded``); a reader drops those rows
    (``drop``)."""

    COLUMN = "superseded"

    def __init__(self, resumes: list[tuple]):
        """``resumes``: (seq, from_step, checkpoint_seq, start_seq) of each ``run_resume``; the last two may be None
        (logs written before they existed): then the resume's own seq stands for its start."""
        self.resumes = [(start if type(start) is int else seq, from_step, ckpt if type(ckpt) is int else None)
                        for seq, from_step, ckpt, start in resumes if type(seq) is int and type(from_step) is int]

    FIELDS = ("seq", "from_step", "checkpoint_seq", "start_seq")

    @classmethod
    def of_rows(cls, rows: list[dict]) -> Superseded:
        return cls([tuple(r.get(k) for k in cls.FIELDS) for r in rows if r.get("event") == "run_resume"])

    @classmethod
    def of_table(cls, table: pa.Table | None) -> Superseded:
        if table is None or not {"seq", "from_step"} <= set(table.column_names):
            return cls([])
        columns = [table.column(k).to_pylist() if k in table.column_names else [None] * table.num_rows
                   for k in cls.FIELDS]
        return cls(list(zip(*columns, strict=True)))

    def flags(self, table: pa.Table) -> pa.Array:
        """True on each row of ``table`` that a resume redid."""
        flag = pa.array([False] * table.num_rows, BOOL)
        if {"step", "seq"} <= set(table.column_names):
            step, seq = table.column("step"), table.column("seq")
            for start_seq, from_step, ckpt_seq in self.resumes:
                after = pc.greater(step, from_step)
                if ckpt_seq is not None:
                    after = pc.or_(after, pc.and_(pc.equal(step, from_step), pc.greater(seq, ckpt_seq)))
                redone = pc.and_(after, pc.less(seq, start_seq))
                flag = pc.or_(flag, pc.fill_null(redone, False))
        return flag

    def mark(self, table: pa.Table) -> pa.Table:
        """``table`` with a fresh ``superseded`` column (a column from an earlier compaction is recomputed)."""
        if self.COLUMN in table.column_names:
            table = table.drop_columns([self.COLUMN])
        return table.append_column(self.COLUMN, self.flags(table))

    def drop(self, table: pa.Table) -> pa.Table:
        """``table`` without the rows a resume redid and without the writer's flag column (bookkeeping, not a
        field of the event); the rule is applied afresh too, as a flag written before a later resume misses it."""
        if self.COLUMN in table.column_names:
            flag = table.column(self.COLUMN)
            if pa.types.is_boolean(flag.type):
                table = table.filter(pc.invert(pc.fill_null(flag, False)))
            table = table.drop_columns([self.COLUMN])
        if not self.resumes:
            return table
        return table.filter(pc.invert(self.flags(table)))


# ---------------------------------------------------------------- nested values


def flatten(value, prefix: str = "") -> dict:
    """Nested config as dotted keys: {"train": {"lr": 1e-4}} -> {"train.lr": 1e-4}."""
    if not isinstance(value, dict):
        return {prefix: value}
    out = {}
    for k, v in value.items():
        out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out
