"""The console sink: concise human lines and a progress bar. Progress and results go to stdout, warnings and errors
to stderr (``| tee`` keeps the run's story; ``2>`` keeps its problems)."""

from __future__ import annotations

import shlex
import sys
from collections import Counter
from pathlib import Path

from analysis.schema import BOOKKEEPING, CODEBOOK_METRIC, EVENTS_DIR, EVENTS_FILE, REPORT_DIR, SAMPLES_DIR

from ..checkpoint import checkpoints
from ..run_dir import ADAPTER


def summary_line(split: str, kept: int, by_reason: dict[str, int], duplicates: int = 0) -> str:
    """The one line users see per split: kept, skipped, and skipped by reason; repeated lines as a warning."""
    by = ", ".join(f"{k}: {v}" for k, v in Counter(by_reason).most_common()) or "none"
    line = f"data {split}: {kept} kept, {sum(by_reason.values())} skipped ({by})"
    if duplicates:
        line += f"; warning: {duplicates} line(s) repeat an earlier line's audio and text (data.drop_duplicates)"
    return line


def rate(samples_per_s: float) -> str:
    """Throughput as a person reads it: samples per second, or seconds per sample when under one a second (a real
    model's step on a CPU takes minutes: "0.0 samples/s" would say nothing)."""
    if samples_per_s >= 1:
        return f"{samples_per_s:.1f} samples/s"
    if samples_per_s <= 0:
        return "n/a samples/s"
    return f"{1 / samples_per_s:.1f} s/sample"


class ConsoleSink:
    """Concise human lines and a progress bar. Prediction slices: one line per sample's audio (matches per
    codebook), the text slice only when it has a mismatch or the prompts are trained; every slice in full, with
    the tensor shapes, at ``debug``."""

    LEVELS = {"debug": 10, "info": 20, "warning": 30}

    def __init__(self, total_steps: int, log_steps: int, level: str = "info", stream=None, errors=None):
        self.total, self.log_steps = total_steps, log_steps
        self.level = self.LEVELS[level]
        self.stream = stream or sys.stdout
        self.errors = errors or sys.stderr
        self.bar = None
        self.run_dir: Path | None = None
        self.slice_codebooks: int | None = None  # audio slices per sample, from run_start's config
        self.train_on_prompt = False
        self.pending: list[dict] = []  # one sample's audio slices, printed as one line once all are in

    def _print(self, text: str, problem: bool = False) -> None:
        stream = self.errors if problem else self.stream
        if self.bar is not None:
            self.bar.write(text, file=stream)
        else:
            print(text, file=stream, flush=True)

    def write(self, e: dict) -> None:
        name = e["event"]
        if self.pending and (name != "pred_slice" or _slice_key(e) != _slice_key(self.pending[0])
                             or e["modality"] != "audio"):
            self._audio_line()
        handler = getattr(self, f"_on_{name}", None)
        if handler is not None:
            handler(e)
        elif self.level <= 10 or e.get("level") in ("warning", "error") and name != "library_log":
            self._print(f"[{e.get('level', 'info')}] {name} " + " ".join(
                f"{k}={v}" for k, v in e.items() if k not in BOOKKEEPING), problem=_is_problem(e))

    def _on_run_start(self, e):
        self.run_dir = Path(e["run_dir"])
        config = e.get("config") or {}
        self.slice_codebooks = len((config.get("log") or {}).get("slice_codebooks") or []) or None
        self.train_on_prompt = bool((config.get("data") or {}).get("train_on_prompt"))
        if self.level <= 20:
            self._print(f"run {e['run_id']} | {e['world_size']} process(es) on {e['device']} | "
                        f"trainable {e['trainable_params']:,} of {e['total_params']:,} parameters "
                        f"({100 * e['trainable_params'] / max(e['total_params'], 1):.2f}%) | {e['run_dir']}")
        if e.get("eval_note"):
            self._print(f"[warning] {e['eval_note']}", problem=True)

    def _on_data_summary(self, e):
        if self.level <= 20 or _is_problem(e):
            self._print(summary_line(e["split"], e["kept"], e["skipped_by_reason"], e.get("duplicates") or 0),
                        problem=_is_problem(e))

    def _on_data_skip(self, e):
        self._print(f"[warning] {e['split']} data: skipped {e['source']}:{e['line']}: {e['reason']}: {e['detail']}",
                    problem=True)

    def _on_train_step(self, e):
        from tqdm import tqdm

        if self.bar is None and self.level <= 20 and self.stream.isatty():
            self.bar = tqdm(total=self.total, initial=e["step"] - 1, desc="train", unit="step", file=self.stream,
                            dynamic_ncols=True, leave=True)
        if self.bar is not None:
            self.bar.update(e["step"] - self.bar.n)
            self.bar.set_postfix(loss=_fmt(e["loss"]), lr=f"{e['lr']:.2e}", refresh=False)
        if e.get("step_skipped"):
            self._print(f"[warning] step {e['step']} skipped: non-finite loss or gradient norm "
                        f"({e.get('nonfinite_steps')} so far in this start)", problem=True)
        if self.level <= 10 or (self.level <= 20 and (e["step"] % self.log_steps == 0 or e["step"] == self.total)):
            self._print(f"step {e['step']}/{self.total} | loss {_fmt(e['loss'])} | text {_fmt(e['text_loss'])} | "
                        f"audio {_fmt(e['audio_loss'])} | audio acc {_fmt(e['audio_acc'])} | lr {e['lr']:.2e} | "
                        f"grad {_fmt(e['grad_norm'])} | {rate(e['samples_per_s'])}")

    def _on_eval(self, e):
        if self.level <= 20:
            # As many codebooks as the model has: the event holds one audio_acc_cb<c> per codebook.
            n = sum(1 for k in e if CODEBOOK_METRIC.fullmatch(k) and k.startswith("audio_acc"))
            cbs = " ".join(_fmt(e.get(f"audio_acc_cb{c}"), 2) for c in range(n))
            self._print(f"eval step {e['step']} | loss {_fmt(e['loss'])} | text {_fmt(e['text_loss'])} | "
                        f"audio {_fmt(e['audio_loss'])} | audio acc per codebook [{cbs}]")

    def _on_pred_slice(self, e):
        if self.level > 20:
            return
        if self.level <= 10:
            self._print(self._slice_rows(e, shapes=True))
        elif e["modality"] == "audio":
            self.pending.append(e)
            if len(self.pending) == self.slice_codebooks:
                self._audio_line()
        elif e["n_match"] < e["n_targets"] or self.train_on_prompt:
            self._print(self._slice_rows(e, shapes=False))

    def _audio_line(self) -> None:
        """One sample's audio slices as one line: ``train step 20 sample 0 audio: cb0 4/27 cb1 6/27 ...``."""
        slices, self.pending = self.pending, []
        e = slices[0]
        matches = " ".join(f"cb{s['codebook']} {s['n_match']}/{s['n_targets']}" for s in slices)
        self._print(f"{e['phase']} step {e['step']} sample {e['sample']} audio: {matches}")

    @staticmethod
    def _slice_rows(e: dict, shapes: bool) -> str:
        """A slice as a head line and, for its first and last targets, aligned prediction and label rows."""
        what = "text" if e["modality"] == "text" else f"audio codebook {e['codebook']}"
        head = f"{e['phase']} step {e['step']} sample {e['sample']} {what}: {e['n_match']}/{e['n_targets']} match"
        if shapes:
            head += f" | logits {e['logits_shape']} labels {e['labels_shape']}"
        lines = [head]
        for part in ("first", "last"):
            cells = slice_cells(e, part)
            width = [max(len(a), len(b)) for a, b, _ in cells]
            lines.append(f"  {part:5} pred  " + " ".join(f"{a:>{w}}" for (a, _, _), w in zip(cells, width)))
            lines.append(f"  {'':5} label " + " ".join(f"{b:>{w}}" for (_, b, _), w in zip(cells, width))
                         + ("   * mismatch" if not all(same for _, _, same in cells) else ""))
        return "\n".join(lines)

    def _on_eval_audio(self, e):
        if e["reason"]:
            self._print(f"[warning] eval audio step {e['step']} sample {e['sample']}: {e['reason']}", problem=True)
        elif self.level <= 20:
            self._print(f"eval audio step {e['step']} sample {e['sample']}: {self._short(e['pred_path'])} vs "
                        f"{Path(e['label_path']).name} ({e['label_seconds']:.2f} s, acc {_fmt(e['acc'], 2)})")

    def _on_generate_audio(self, e):
        if e["error"]:
            self._print(f"[warning] generate step {e['step']} prompt {e['prompt']}: {e['error']}", problem=True)
        elif self.level <= 20:
            self._print(f"generated step {e['step']}: {self._short(e['path'])} ({e['seconds']:.2f} s, "
                        f"stopped at {e['stopped']})")

    def _on_checkpoint(self, e):
        if self.level <= 20:
            self._print(f"checkpoint step {e['step']}: {self._short(e['path'])}")

    def _on_run_resume(self, e):
        if self.level <= 20:
            self._print(f"resumed from {e['checkpoint']} at step {e['from_step']}")

    def _on_log_error(self, e):
        self._print(f"[logging error] {e['sink']}: {e['error_type']}: {e['error']} (training continues)", problem=True)

    def _on_library_log(self, e):
        if self.level <= 10:
            self._print(f"[{e['logger']}] {e['message']}", problem=_is_problem(e))

    def _on_run_end(self, e):
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        self._print(f"run {e['status']} after {e['step']} steps in {e['elapsed_s']:.1f} s"
                    + "".join(f": {e[k]}" for k in ("error", "message") if e.get(k)), problem=_is_problem(e))

    def _short(self, path: str) -> str:
        """A path inside the run dir relative to it: the run dir is named once, in the run_start line."""
        if self.run_dir is not None and Path(path).is_relative_to(self.run_dir):
            return str(Path(path).relative_to(self.run_dir))
        return str(path)

    def flush(self) -> None:
        if self.pending:
            self._audio_line()

    def close(self) -> None:
        self.flush()
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def run_summary_lines(run_dir: str | Path) -> list[str]:
    """What a training run left in ``run_dir`` (events, Parquet, adapter, samples, checkpoints, report) and the
    commands to run next, as printed at its end (on stdout, after the report is written)."""
    run_dir = Path(run_dir)
    q = shlex.quote(str(run_dir))
    wrote = []
    if (run_dir / EVENTS_FILE).is_file():
        tables = sorted(p.name for p in (run_dir / EVENTS_DIR).iterdir() if p.is_dir()) \
            if (run_dir / EVENTS_DIR).is_dir() else []
        wrote.append(("events", f"{EVENTS_FILE} (JSON lines), {EVENTS_DIR}/ ({len(tables)} Parquet tables)"))
    adapter = run_dir / ADAPTER
    if adapter.is_dir():
        wrote.append(("adapter", f"{ADAPTER}/ (PEFT LoRA, {_size(adapter)})"))
    if saved := checkpoints(run_dir):
        wrote.append(("checkpoints", f"{saved[0].relative_to(run_dir)}/"
                      + (f" (newest of {len(saved)})" if len(saved) > 1 else "")))
    wavs = sorted((run_dir / SAMPLES_DIR).glob("*/*.wav"))
    if wavs:
        steps = sorted({w.parent.name for w in wavs})
        wrote.append(("samples", f"{SAMPLES_DIR}/ ({len(wavs)} WAV files; newest {SAMPLES_DIR}/{steps[-1]}/)"))
    reports = sorted((run_dir / REPORT_DIR).glob("report.*"))
    if reports:
        wrote.append(("report", ", ".join(str(p.relative_to(run_dir)) for p in reports)))
    width = max((len(k) for k, _ in wrote), default=0)
    lines = [f"wrote {run_dir}/:"] + [f"  {k:<{width}}  {v}" for k, v in wrote]
    nxt = []
    if adapter.is_dir():
        nxt += [(f"higgs-accel generate --run {q} --text 'Hello there.' --out hello.wav", "listen to the fine-tune"),
                (f"higgs-accel evaluate --run {q} --manifest HELD_OUT.jsonl", "WER and speaker similarity")]
    elif saved:
        nxt.append((f"higgs-accel train --resume latest --output-dir {q}", "continue from the newest checkpoint"))
    nxt += [(f"higgs-accel report {q}", "write the report again"),
            (f"higgs-accel diff {q} OTHER_RUN", "compare with another run")]
    width = max(len(c) for c, _ in nxt)
    return lines + ["next:"] + [f"  {c:<{width}}  # {why}" for c, why in nxt]


def slice_cells(e: dict, part: str) -> list[tuple[str, str, bool]]:
    """(prediction, label, equal) per target of a ``pred_slice`` event's ``first`` or ``last`` part, as shown to a
    person: decoded tokens (quoted) on text rows, code numbers on audio rows."""
    preds, labels = e[f"{part}_pred"], e[f"{part}_label"]
    shown_preds, shown_labels = preds, labels
    if e["modality"] == "text":
        shown_preds, shown_labels = e[f"{part}_pred_text"], e[f"{part}_label_text"]
    return [(repr(a) if isinstance(a, str) else str(a), repr(b) if isinstance(b, str) else str(b), p == lab)
            for a, b, p, lab in zip(shown_preds, shown_labels, preds, labels)]


def _slice_key(e: dict) -> tuple:
    return e.get("phase"), e.get("step"), e.get("sample")


def _is_problem(e: dict) -> bool:
    return e.get("level") in ("warning", "error")


def _size(path: Path) -> str:
    n = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.0f} KiB"


def _fmt(v, digits: int = 4) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"
