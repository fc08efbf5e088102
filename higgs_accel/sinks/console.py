"""The console sink: concise human lines and a progress bar."""

from __future__ import annotations

import sys
from collections import Counter

from analysis.schema import BOOKKEEPING, CODEBOOK_METRIC


def summary_line(split: str, kept: int, by_reason: dict[str, int], duplicates: int = 0) -> str:
    """The one line users see per split: kept, skipped, and skipped by reason; repeated lines as a warning."""
    by = ", ".join(f"{k}: {v}" for k, v in Counter(by_reason).most_common()) or "none"
    line = f"data {split}: {kept} kept, {sum(by_reason.values())} skipped ({by})"
    if duplicates:
        line += f"; warning: {duplicates} line(s) repeat an earlier line's audio and text (data.drop_duplicates)"
    return line


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
                f"{k}={v}" for k, v in e.items() if k not in BOOKKEEPING))

    def _on_run_start(self, e):
        if self.level <= 20:
            self._print(f"run {e['run_id']} | {e['world_size']} process(es) on {e['device']} | "
                        f"trainable {e['trainable_params']:,} of {e['total_params']:,} parameters "
                        f"({100 * e['trainable_params'] / max(e['total_params'], 1):.2f}%) | {e['run_dir']}")

    def _on_data_summary(self, e):
        if self.level <= 20:
            self._print(summary_line(e["split"], e["kept"], e["skipped_by_reason"], e.get("duplicates") or 0))

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
            # As many codebooks as the model has: the event holds one audio_acc_cb<c> per codebook.
            n = sum(1 for k in e if CODEBOOK_METRIC.fullmatch(k) and k.startswith("audio_acc"))
            cbs = " ".join(_fmt(e.get(f"audio_acc_cb{c}"), 2) for c in range(n))
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
            cells = slice_cells(e, part)
            width = [max(len(a), len(b)) for a, b, _ in cells]
            lines.append(f"  {part:5} pred  " + " ".join(f"{a:>{w}}" for (a, _, _), w in zip(cells, width)))
            lines.append(f"  {'':5} label " + " ".join(f"{b:>{w}}" for (_, b, _), w in zip(cells, width))
                         + ("   * mismatch" if not all(same for _, _, same in cells) else ""))
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
                        + "".join(f": {e[k]}" for k in ("error", "message") if e.get(k)))

    def flush(self) -> None:
        pass

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def slice_cells(e: dict, part: str) -> list[tuple[str, str, bool]]:
    """(prediction, label, equal) per target of a ``pred_slice`` event's ``first`` or ``last`` part, as shown to a
    person: decoded tokens (quoted) on text rows, code numbers on audio rows."""
    preds, labels = e[f"{part}_pred"], e[f"{part}_label"]
    shown_preds, shown_labels = preds, labels
    if e["modality"] == "text":
        shown_preds, shown_labels = e[f"{part}_pred_text"], e[f"{part}_label_text"]
    return [(repr(a) if isinstance(a, str) else str(a), repr(b) if isinstance(b, str) else str(b), p == lab)
            for a, b, p, lab in zip(shown_preds, shown_labels, preds, labels)]


def _fmt(v, digits: int = 4) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"
