"""Side sinks of the event log, one job each: Parquet tables, the console, accelerate trackers."""

from __future__ import annotations

import json
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from .codes import summary_line

# ---------------------------------------------------------------- Parquet


def _column_type(values: list) -> pa.DataType:
    present = [v for v in values if v is not None]
    if not present:
        return pa.float64()  # an all-null column is a metric that was undefined (e.g. no targets yet)
    if all(isinstance(v, bool) for v in present):
        return pa.bool_()
    if all(isinstance(v, int) and not isinstance(v, bool) for v in present):
        return pa.int64()
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in present):
        return pa.float64()
    if all(isinstance(v, str) for v in present):
        return pa.string()
    if all(isinstance(v, list) for v in present):
        items = [x for v in present for x in v]
        if all(isinstance(x, int) and not isinstance(x, bool) for x in items):
            return pa.list_(pa.int32())
        if all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in items):
            return pa.list_(pa.float64())
        if all(isinstance(x, str) for x in items):
            return pa.list_(pa.string())
    return pa.string()  # anything nested (the resolved config) is stored as JSON text


def rows_to_table(rows: list[dict]) -> pa.Table:
    """Typed columns: floats for metrics, list<int32> for token slices, strings for text, JSON for nested."""
    names = list(dict.fromkeys(k for r in rows for k in r))
    arrays = {}
    for name in names:
        values = [r.get(name) for r in rows]
        tp = _column_type(values)
        if tp == pa.string():
            values = [v if v is None or isinstance(v, str) else json.dumps(v, default=str) for v in values]
        arrays[name] = pa.array(values, type=tp)
    return pa.table(arrays)


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
    table = pa.concat_tables(tables, promote_options="permissive")
    if "seq" in table.column_names:
        seq = table.column("seq").to_pylist()
        keep, seen = [], set()
        for i, s in enumerate(seq):
            if s not in seen:
                seen.add(s)
                keep.append(i)
        table = table.take(keep)
    return table


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
    """One part per family. The merged part replaces the first one atomically before the rest go, so a crash
    in between leaves duplicates (readers drop repeated seq), never a gap."""
    if not Path(root).is_dir():
        return
    for folder in sorted(p for p in Path(root).iterdir() if p.is_dir()):
        parts = sorted(folder.glob("part-*.parquet"))
        if len(parts) < 2:
            continue
        table = read_parts(folder)
        if table is None:
            continue
        write_atomic(table, parts[0])
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
