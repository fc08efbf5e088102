"""Side sinks of the event log, one job each: Parquet tables, the console, accelerate trackers."""

from __future__ import annotations

import functools
import json
import os
import re
import sys
import time
from collections import defaultdict
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .codes import summary_line

# ---------------------------------------------------------------- Parquet

_INT, _FLOAT, _BOOL, _STR = pa.int64(), pa.float64(), pa.bool_(), pa.string()
_INTS, _FLOATS, _STRS = pa.list_(pa.int32()), pa.list_(pa.float64()), pa.list_(pa.string())

# The type of every documented field, whatever values one part happens to hold: a field that is null in every row
# of one part (a sample without audio, a run without errors) must not be typed differently there, or pandas,
# polars and DuckDB cannot read the folder and compaction cannot merge it. Strings take nested values as JSON text.
FIELD_TYPES: dict[str, pa.DataType] = {
    # every event; ``superseded`` only in compacted and rebuilt tables
    "event": _STR, "ts": _STR, "level": _STR, "step": _INT, "epoch": _INT, "phase": _STR, "seq": _INT,
    "run_id": _STR, "rank": _INT, "schema_version": _INT, "nonfinite": _STRS, "superseded": _BOOL,
    # run_start
    "config": _STR, "run_dir": _STR, "versions": _STR, "git_commit": _STR, "device": _STR, "hardware": _STR,
    "world_size": _INT, "mixed_precision": _STR, "trainable_params": _INT, "total_params": _INT, "total_steps": _INT,
    "steps_per_epoch": _INT, "train_samples": _INT, "val_samples": _INT, "resumed": _BOOL, "engine": _STR,
    # data_skip, data_summary
    "split": _STR, "source": _STR, "line": _INT, "reason": _STR, "detail": _STR, "kept": _INT, "skipped": _INT,
    "skipped_by_reason": _STR, "codec_encodes": _INT,
    # train_step, eval (and the per-codebook metrics, see _CODEBOOK_METRIC)
    "loss": _FLOAT, "text_loss": _FLOAT, "audio_loss": _FLOAT, "text_acc": _FLOAT, "audio_acc": _FLOAT,
    "text_targets": _INT, "audio_targets": _INT, "tokens": _INT, "audio_frames": _INT, "samples": _INT,
    "lr": _FLOAT, "grad_norm": _FLOAT, "step_time_s": _FLOAT, "samples_per_s": _FLOAT, "tokens_per_s": _FLOAT,
    "padding_frac": _FLOAT, "data_wait_s": _FLOAT, "peak_mem_mb": _FLOAT,
    # pred_slice
    "modality": _STR, "sample": _INT, "codebook": _INT, "first_pos": _INTS, "last_pos": _INTS, "first_frame": _INTS,
    "last_frame": _INTS, "first_pred": _INTS, "last_pred": _INTS, "first_label": _INTS, "last_label": _INTS,
    "first_pred_text": _STRS, "first_label_text": _STRS, "last_pred_text": _STRS, "last_label_text": _STRS,
    "n_targets": _INT, "n_match": _INT, "batch_match": _INT, "batch_targets": _INT, "logits_shape": _INTS,
    "labels_shape": _INTS,
    # eval_audio, generate_audio
    "pred_path": _STR, "label_path": _STR, "n_frames": _INT, "pred_seconds": _FLOAT, "label_seconds": _FLOAT,
    "sample_rate": _INT, "acc": _FLOAT, "acc_cb": _FLOATS, "prompt": _INT, "text": _STR, "path": _STR,
    "seconds": _FLOAT, "new_tokens": _INT, "stopped": _STR, "error": _STR,
    # checkpoint, adapter_saved, run_resume, log_error, library_log, run_end
    "adapter": _STR, "checkpoint": _STR, "from_step": _INT, "sink": _STR, "error_type": _STR, "fragment": _STR,
    "logger": _STR, "message": _STR, "status": _STR, "elapsed_s": _FLOAT, "completed_steps": _INT,
}
_CODEBOOK_METRIC = re.compile(r"audio_(loss|acc)_cb\d+")
# An undeclared field is typed by the first of these that holds all its values (strings hold anything).
_INFERRED = (_BOOL, _INT, _FLOAT, _INTS, pa.list_(pa.int64()), _FLOATS, _STRS, _STR)


def declared_type(name: str) -> pa.DataType | None:
    if name in FIELD_TYPES:
        return FIELD_TYPES[name]
    return _FLOAT if _CODEBOOK_METRIC.fullmatch(name) else None


@functools.cache
def _fits(tp: pa.DataType):
    """A test of whether a value converts to ``tp`` exactly (Arrow alone would truncate 1.5 into an int64 column).
    Built once per type: typing a part runs it on every value, on the training thread."""
    if tp == _STR:
        return lambda v: True
    if pa.types.is_list(tp):
        item = _fits(tp.value_type)
        return lambda v: v is None or (isinstance(v, (list, tuple)) and all(map(item, v)))
    if tp == _BOOL:
        return lambda v: v is None or isinstance(v, bool)
    if tp == _FLOAT:
        return lambda v: v is None or (isinstance(v, (int, float)) and not isinstance(v, bool))
    if pa.types.is_integer(tp):
        low, high = -(2 ** (tp.bit_width - 1)), 2 ** (tp.bit_width - 1)
        return lambda v: v is None or (type(v) is int and low <= v < high)
    return lambda v: v is None


def column_type(name: str, values: list) -> pa.DataType:
    """The declared type when every value fits it, else the narrowest type that holds them; all-null: null,
    which compaction's permissive merge unifies with whatever type another part has."""
    declared = declared_type(name)
    if declared is not None and all(map(_fits(declared), values)):
        return declared
    present = [v for v in values if v is not None]
    if not present:
        return pa.null()
    return next(tp for tp in _INFERRED if all(map(_fits(tp), present)))


def rows_to_table(rows: list[dict]) -> pa.Table:
    """Typed columns: floats for metrics, list<int32> for token slices, strings for text, JSON for nested."""
    names = list(dict.fromkeys(k for r in rows for k in r))
    return pa.table({name: _column(name, [r.get(name) for r in rows]) for name in names})


def _column(name: str, values: list) -> pa.Array:
    declared = declared_type(name)
    if declared is not None and declared != _STR:
        # Fast path, all in Arrow: its own inference, then a safe cast, which refuses truncation and overflow.
        # Not from strings or across bool and number: Arrow would parse "3" into a number and True into 1.
        try:
            inferred = pa.array(values)
            if not pa.types.is_string(inferred.type) and (
                    pa.types.is_null(inferred.type) or pa.types.is_boolean(inferred.type) == (declared == _BOOL)):
                return inferred.cast(declared)
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
            pass
    tp = column_type(name, values)
    if tp == _STR:
        values = [v if v is None or isinstance(v, str) else json.dumps(v, default=str) for v in values]
    return pa.array(values, type=tp)


def read_parts(family_dir: Path) -> pa.Table | None:
    """Every readable part of one event family, promoted to one schema, each event (seq) once."""
    tables = []
    for part in sorted(family_dir.glob("part-*.parquet")):
        try:
            tables.append(pq.read_table(part))
        except Exception:  # noqa: BLE001 - a part torn by a crash is skipped; events.jsonl still has its rows
            continue
    if not tables:
        return None
    try:
        table = pa.concat_tables(tables, promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
        # Parts written before the declared types (or an undeclared field typed two ways): retype from values.
        table = rows_to_table([r for t in tables for r in t.to_pylist()])
    if "seq" in table.column_names:
        seq = table.column("seq").to_pylist()
        keep, seen = [], set()
        for i, s in enumerate(seq):
            if s not in seen:
                seen.add(s)
                keep.append(i)
        table = table.take(keep)
    return table


class Superseded:
    """The rule of docs/events.md: an event is superseded when a later ``run_resume`` (higher seq) resumed from a
    step below the event's step, so the resumed run redid that step. ``mark`` writes it into a table as a boolean
    column, so pandas, polars and DuckDB users filter with ``NOT superseded``."""

    COLUMN = "superseded"

    def __init__(self, resumes: list[tuple[int, int]]):
        self.resumes = [(seq, from_step) for seq, from_step in resumes if seq is not None and from_step is not None]

    @classmethod
    def of_rows(cls, rows: list[dict]) -> Superseded:
        return cls([(r.get("seq"), r.get("from_step")) for r in rows if r.get("event") == "run_resume"])

    @classmethod
    def of_table(cls, table: pa.Table | None) -> Superseded:
        return cls.of_rows(table.to_pylist() if table is not None else [])

    def mark(self, table: pa.Table) -> pa.Table:
        """``table`` with a fresh ``superseded`` column (a column from an earlier compaction is recomputed)."""
        if self.COLUMN in table.column_names:
            table = table.drop_columns([self.COLUMN])
        flag = pa.array([False] * table.num_rows, _BOOL)
        if {"step", "seq"} <= set(table.column_names):
            step, seq = table.column("step"), table.column("seq")
            for resume_seq, from_step in self.resumes:
                redone = pc.and_(pc.greater(step, from_step), pc.less(seq, resume_seq))
                flag = pc.or_(flag, pc.fill_null(redone, False))
        return table.append_column(self.COLUMN, flag)


def write_atomic(table: pa.Table, path: Path) -> None:
    tmp = path.with_name(f"_{path.name}.{os.getpid()}.tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


class ParquetSink:
    """One table per event family under ``events/<family>/``, written as rolling complete part files."""

    def __init__(self, root: Path, flush_events: int = 500, flush_seconds: float = 30.0):
        self.root = Path(root)
        self.flush_events, self.flush_seconds = flush_events, flush_seconds
        self.buffers: dict[str, list[dict]] = defaultdict(list)
        self.buffered = 0
        self.last_flush = time.monotonic()

    def write(self, event: dict) -> None:
        self.buffers[event["event"]].append(event)
        self.buffered += 1
        if self.buffered >= self.flush_events or time.monotonic() - self.last_flush >= self.flush_seconds:
            self.flush()

    def flush(self) -> None:
        for family, rows in list(self.buffers.items()):
            if rows:
                folder = self.root / family
                folder.mkdir(parents=True, exist_ok=True)
                write_atomic(rows_to_table(rows), folder / f"part-{rows[0]['seq']:012d}.parquet")
                rows.clear()
        self.buffered = 0
        self.last_flush = time.monotonic()

    def close(self) -> None:
        self.flush()
        compact(self.root)


def compact(root: Path) -> None:
    """One part per family, with the ``superseded`` flag. The merged part replaces the first one atomically
    before the rest go, so a crash in between leaves duplicates (readers drop repeated seq), never a gap."""
    root = Path(root)
    if not root.is_dir():
        return
    rule = Superseded.of_table(read_parts(root / "run_resume"))
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        parts = sorted(folder.glob("part-*.parquet"))
        table = read_parts(folder) if parts else None
        if table is None:
            continue
        write_atomic(rule.mark(table), parts[0])
        for p in parts[1:]:
            p.unlink()


# ---------------------------------------------------------------- console

class ConsoleSink:
    """Concise human lines and a progress bar; prediction slices as aligned two-row comparisons."""

    LEVELS = {"debug": 10, "info": 20, "warning": 30}

    def __init__(self, total_steps: int, log_steps: int, level: str = "info", stream=None):
        self.total, self.log_steps = total_steps, log_steps
        self.level = self.LEVELS[level]
        self.stream = stream or sys.stderr
        self.bar = None

    def _print(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)

    def write(self, e: dict) -> None:
        name = e["event"]
        handler = getattr(self, f"_on_{name}", None)
        if handler is not None:
            handler(e)
        elif self.level <= 10 or e.get("level") in ("warning", "error") and name != "library_log":
            self._print(f"[{e.get('level', 'info')}] {name} " + " ".join(
                f"{k}={v}" for k, v in e.items() if k not in _COMMON))

    def _on_run_start(self, e):
        if self.level <= 20:
            self._print(f"run {e['run_id']} | {e['world_size']} process(es) on {e['device']} | "
                        f"trainable {e['trainable_params']:,} of {e['total_params']:,} parameters "
                        f"({100 * e['trainable_params'] / max(e['total_params'], 1):.2f}%) | {e['run_dir']}")

    def _on_data_summary(self, e):
        if self.level <= 20:
            self._print(summary_line(e["split"], e["kept"], e["skipped_by_reason"]))

    def _on_train_step(self, e):
        from tqdm import tqdm

        if self.bar is None and self.level <= 20 and self.stream.isatty():
            self.bar = tqdm(total=self.total, initial=e["step"] - 1, desc="train", unit="step", file=self.stream,
                            dynamic_ncols=True, leave=True)
        if self.bar is not None:
            self.bar.update(e["step"] - self.bar.n)
            self.bar.set_postfix(loss=_fmt(e["loss"]), lr=f"{e['lr']:.2e}", refresh=False)
        if self.level <= 10 or (self.level <= 20 and (e["step"] % self.log_steps == 0 or e["step"] == self.total)):
            self._print(f"step {e['step']}/{self.total} | loss {_fmt(e['loss'])} | text {_fmt(e['text_loss'])} | "
                        f"audio {_fmt(e['audio_loss'])} | audio acc {_fmt(e['audio_acc'])} | lr {e['lr']:.2e} | "
                        f"grad {_fmt(e['grad_norm'])} | {e['samples_per_s']:.1f} samples/s")

    def _on_eval(self, e):
        if self.level <= 20:
            cbs = " ".join(_fmt(e.get(f"audio_acc_cb{c}"), 2) for c in range(8))
            self._print(f"eval step {e['step']} | loss {_fmt(e['loss'])} | text {_fmt(e['text_loss'])} | "
                        f"audio {_fmt(e['audio_loss'])} | audio acc per codebook [{cbs}]")

    def _on_pred_slice(self, e):
        # The old trainer showed text and codebook 0; the other codebooks are in the log, and here at debug.
        if self.level > 20 or (self.level > 10 and e["modality"] == "audio" and e["codebook"] != 0):
            return
        what = "text" if e["modality"] == "text" else f"audio codebook {e['codebook']}"
        head = (f"{e['phase']} step {e['step']} sample {e['sample']} {what}: {e['n_match']}/{e['n_targets']} match"
                f" | logits {e['logits_shape']} labels {e['labels_shape']}")
        lines = [head]
        for part in ("first", "last"):
            preds, labels = e[f"{part}_pred"], e[f"{part}_label"]
            if e["modality"] == "text":
                preds, labels = e[f"{part}_pred_text"], e[f"{part}_label_text"]
            cells = [(repr(p) if isinstance(p, str) else str(p), repr(lab) if isinstance(lab, str) else str(lab))
                     for p, lab in zip(preds, labels)]
            width = [max(len(a), len(b)) for a, b in cells]
            mark = ["" if p == lab else "*" for p, lab in zip(e[f"{part}_pred"], e[f"{part}_label"])]
            lines.append(f"  {part:5} pred  " + " ".join(f"{a:>{w}}" for (a, _), w in zip(cells, width)))
            lines.append(f"  {'':5} label " + " ".join(f"{b:>{w}}" for (_, b), w in zip(cells, width))
                         + ("   * mismatch" if any(mark) else ""))
        self._print("\n".join(lines))

    def _on_eval_audio(self, e):
        if self.level <= 20 and not e["reason"]:
            self._print(f"eval audio step {e['step']} sample {e['sample']}: {e['pred_path']} (prediction) vs "
                        f"{e['label_path']} (label), {e['label_seconds']:.2f}s, acc {_fmt(e['acc'], 2)}")
        elif e["reason"]:
            self._print(f"[warning] eval audio step {e['step']} sample {e['sample']}: {e['reason']}")

    def _on_generate_audio(self, e):
        if e["error"]:
            self._print(f"[warning] generate step {e['step']} prompt {e['prompt']}: {e['error']}")
        elif self.level <= 20:
            self._print(f"generated step {e['step']}: {e['path']} ({e['seconds']:.2f}s, stopped at {e['stopped']})")

    def _on_checkpoint(self, e):
        if self.level <= 20:
            self._print(f"checkpoint step {e['step']} -> {e['path']}")

    def _on_run_resume(self, e):
        if self.level <= 20:
            self._print(f"resumed from {e['checkpoint']} at step {e['step']}")

    def _on_log_error(self, e):
        self._print(f"[logging error] {e['sink']}: {e['error_type']}: {e['error']} (training continues)")

    def _on_library_log(self, e):
        if self.level <= 10:
            self._print(f"[{e['logger']}] {e['message']}")

    def _on_run_end(self, e):
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.level <= 30:
            self._print(f"run {e['status']} after {e['step']} steps in {e['elapsed_s']:.1f}s"
                        + (f": {e['error']}" if e.get("error") else ""))

    def flush(self) -> None:
        pass

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


_COMMON = {"event", "ts", "run_id", "seq", "rank", "schema_version", "level"}


def _fmt(v, digits: int = 4) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


# ---------------------------------------------------------------- accelerate trackers

class TrackerSink:
    """Feeds the numeric fields of train_step and eval events to ``accelerator.log`` (tensorboard, wandb...)."""

    FAMILIES = ("train_step", "eval")

    def __init__(self, accelerator):
        self.accelerator = accelerator

    def write(self, e: dict) -> None:
        if e["event"] in self.FAMILIES:
            prefix = "eval/" if e["event"] == "eval" else "train/"
            values = {prefix + k: v for k, v in e.items()
                      if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in _COMMON | {"step"}}
            self.accelerator.log(values, step=e["step"])

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.accelerator.end_training()
