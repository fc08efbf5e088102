"""The report of one run: report.md (terminal, pull request; PNGs next to it) and report.html (one file)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from . import checks, plots, quality
from .audio import AUDIO_MB, report_section
from .document import Doc
from .run import Run, better, load_run, spread
from .schema import REPORT_DIR, flatten
from .slices import MARKS, step_grids, step_summary

FORMATS = ("md", "html")
# Columns of train_step / eval that are counts or timing, not quality: left out of best/final tables.
_NOT_QUALITY = {"seq", "epoch", "rank", "schema_version", "text_targets", "audio_targets", "tokens", "audio_frames",
                "samples", "lr", "grad_norm", "step_time_s", "samples_per_s", "tokens_per_s", "peak_mem_mb"}


def write_report(run_dir, out=None, formats=FORMATS, steps=None, audio_mb: float = AUDIO_MB) -> list[Path]:
    """Write RUN_DIR's report into ``out`` (default RUN_DIR/report): report.md with PNGs and/or report.html.
    ``steps`` chooses the steps whose prediction slices are shown (default: first, middle, last); ``audio_mb``
    caps the eval audio inlined into report.html (MB of WAV: all eval steps when they fit, else spread ones)."""
    run = load_run(run_dir)
    out = Path(out) if out is not None else Path(run_dir) / REPORT_DIR
    out.mkdir(parents=True, exist_ok=True)
    unknown = set(formats) - set(FORMATS)
    if unknown:
        raise ValueError(f"unknown report format(s) {sorted(unknown)}; use md and/or html")
    doc = build(run, out, steps, audio_mb)
    paths = []
    if "md" in formats:
        paths.append(out / "report.md")
        paths[-1].write_text(doc.markdown(out), encoding="utf-8")
    if "html" in formats:
        paths.append(out / "report.html")
        paths[-1].write_text(doc.html(out), encoding="utf-8")
    return paths


def build(run: Run, out: Path, steps: list[int] | None = None, audio_mb: float = AUDIO_MB) -> Doc:
    doc = Doc(f"Run {run.start.get('run_id') or run.path.name}: {run.status}")
    found = checks.warnings_for(run)
    doc.bullets(summary(run, found))
    header(doc, run)
    doc.heading("Worth a look")
    doc.bullets(found) if found else doc.para("Nothing: no NaN/inf, spikes, stalled losses or data problems found.")
    metric_tables(doc, run)
    doc.heading("Curves")
    doc.image(plots.losses(run, out / "loss.png"), "total, text and audio loss")
    doc.image(plots.quality(run, out / "quality.png"), "loss, WER/CER and speaker similarity of generations")
    doc.image(plots.codebooks(run, out / "codebooks.png"), "loss and accuracy per codebook")
    doc.image(plots.optimizer(run, out / "optimizer.png"), "learning rate and gradient norm")
    doc.image(plots.throughput(run, out / "throughput.png"), "throughput and memory")
    codebook_health(doc, run, out)
    slices_section(doc, run, steps)
    quality.report_section(doc, run, audio_mb, out)
    report_section(doc, run, audio_mb, out)
    files_section(doc, run)
    return doc


def _change(s: pd.Series) -> str:
    """"first → last (change)" of a metric over steps, or its one value."""
    s = pd.to_numeric(s, errors="coerce").dropna()
    if s.empty:
        return "-"
    first, last = float(s.iloc[0]), float(s.iloc[-1])
    if len(s) == 1:
        return f"{last:.4g} at step {int(s.index[-1])}"
    rel = f" ({(last - first) / abs(first):+.0%})" if first else ""
    return f"{first:.4g} at step {int(s.index[0])} → {last:.4g} at step {int(s.index[-1])}{rel}"


def summary(run: Run, found: list[str]) -> list[str]:
    """The report in a few lines: how the run ended, how its losses and accuracy moved, what to look at."""
    total = run.start.get("total_steps")
    steps = max(run.steps) if run.steps else 0
    elapsed = run.elapsed_text()
    out = [f"**{run.status}** after {steps}" + (f" of {total}" if total else "") + " steps"
           + (f" in {elapsed}" if elapsed else "")]
    train, ev = run.metrics("train"), run.metrics("eval")
    if "loss" in train:
        out.append(f"train loss {_change(train['loss'])}")
    for col, name in (("loss", "eval loss"), ("audio_acc", "eval audio accuracy"), ("text_acc", "eval text accuracy")):
        if col in ev:
            out.append(f"{name} {_change(ev[col])}")
    curve = run.quality_curve()
    for col, name in (("wer", "WER of generations"), ("similarity", "speaker similarity of generations")):
        change = _change(curve[col]) if col in curve else "-"
        if change != "-":
            out.append(f"{name} {change}")
    out.append(f"{len(found)} thing(s) worth a look, below" if found else "nothing worth a look found")
    return out


def _fmt_int(v) -> str:
    return f"{v:,}" if isinstance(v, int) else "-" if v is None else str(v)


def _engine(e: dict | None) -> str:
    """The engine that ran (run_start.engine): name, accelerate's type, sharding, and the rank layout."""
    if not e:
        return "-"
    parts = [f"{e.get('engine')} ({e.get('distributed_type')})"]
    parts += [f"{k.replace('_', ' ')} {e[k]}" for k in ("sharding_strategy", "zero_stage", "num_machines",
                                                          "local_world_size") if e.get(k) is not None]
    return ", ".join(parts)


def _memory(m: dict | None) -> str:
    """The memory plan (run_start.memory): the prediction, and whether activations were recomputed and why."""
    if not m:
        return "-"
    predicted = m.get("predicted_gib")
    return (f"predicted {predicted:.1f} GiB" if isinstance(predicted, (int, float)) else "predicted -") + \
        f"; gradient checkpointing {'on' if m.get('gradient_checkpointing') else 'off'} ({m.get('setting')})"


def header(doc: Doc, run: Run) -> None:
    s, end = run.start, run.end or {}
    steps = run.steps
    last = run.last_event_time
    params = s.get("trainable_params"), s.get("total_params")
    share = f" ({100 * params[0] / params[1]:.2f}% of {params[1]:,})" if all(isinstance(p, int) for p in params) \
        and params[1] else ""
    hw = s.get("hardware") or {}
    rows = [
        ["status", run.status + "".join(f" ({end[k]})" for k in ("error", "message") if end.get(k))],
        ["last event", last.strftime("%Y-%m-%d %H:%M:%S UTC") if last else "-"],
        ["run dir", str(run.path)],
        ["steps", f"{max(steps) if steps else 0} of {_fmt_int(s.get('total_steps'))} "
                  f"({s.get('steps_per_epoch', '-')} per epoch)"],
        ["elapsed", run.elapsed_text() or "-"],
        ["resumed", "yes" if s.get("resumed") or not run.frame("run_resume").empty else "no"],
        ["world size", _fmt_int(s.get("world_size"))],
        ["device", f"{s.get('device', '-')}, mixed precision {s.get('mixed_precision', '-')}"],
        ["engine", _engine(s.get("engine"))],
        ["checkpoints", "; ".join(f"{k}: {v.get('layout')}" + (f", converted ({v['converted']}) to {v.get('path')}"
                                                                if v.get("converted") else "")
                                  for k, v in (s.get("checkpoints") or {}).items()) or "-"],
        ["memory", _memory(s.get("memory"))],
        ["hardware", ", ".join(f"{k} {v}" for k, v in hw.items()) or "-"],
        ["trainable parameters", _fmt_int(params[0]) + share],
        ["versions", ", ".join(f"{k} {v}" for k, v in (s.get("versions") or {}).items()) or "-"],
        ["git commit", str(s.get("git_commit") or "-")],
    ]
    cfg = run.config
    picks = ["preset", "train.lr", "train.batch_size", "train.grad_accum", "train.max_steps", "train.scheduler",
             "lora.r", "lora.alpha", "data.train_manifest"]
    flat = flatten(cfg)
    rows.append(["config", ", ".join(f"{k}={flat[k]}" for k in picks if k in flat and flat[k] not in ("", None))
                 or "-"])
    doc.table(["run", ""], rows, align_right=False)
    if run.data_summary:
        reasons = sorted({r for d in run.data_summary.values() for r in (d.get("skipped_by_reason") or {})})
        doc.table(["data", "kept", "skipped", *reasons],
                  [[split, _fmt_int(d.get("kept")), _fmt_int(d.get("skipped")),
                    *[_fmt_int((d.get("skipped_by_reason") or {}).get(r, 0)) for r in reasons]]
                   for split, d in run.data_summary.items()])
    skips = run.frame("data_skip")
    if not skips.empty:
        cols = [c for c in ("split", "reason", "source", "line", "detail") if c in skips]
        doc.para(f"First data skips ({len(skips)} in all; `run.data_skip` has every one):")
        doc.table(cols, skips[cols].head(10).values.tolist(), align_right=False)


def best_final(df: pd.DataFrame) -> list[list]:
    """Per quality metric: best value and its step, final value and its step."""
    rows = []
    for col in df.columns:
        direction = better(col)
        if col in _NOT_QUALITY or direction is None or not pd.api.types.is_numeric_dtype(df[col]):
            continue
        s = df[col].dropna()
        if s.empty:
            continue
        best_step = s.idxmin() if direction == "lower" else s.idxmax()
        rows.append([col, s.loc[best_step], int(best_step), s.iloc[-1], int(s.index[-1])])
    return rows


def metric_tables(doc: Doc, run: Run) -> None:
    header = ["metric", "best", "at step", "final", "at step"]
    ev = run.metrics("eval")
    doc.heading("Eval: best and final")
    if ev.empty:
        doc.para("No eval events in this run.")
    else:
        doc.table(header, best_final(ev))
    train = run.metrics("train")
    if not train.empty:
        doc.heading("Train: best and final")
        doc.table(header, best_final(train))


def codebook_health(doc: Doc, run: Run, out: Path) -> None:
    cbs = run.codebooks()
    if not cbs:
        return
    doc.heading("Codebook health")
    doc.image(plots.accuracy_heatmap(run, out / "codebook_accuracy.png"), "train accuracy by codebook over steps")
    train, ev = run.codebook_accuracy("train"), run.codebook_accuracy("eval")
    rows = []
    for cb in cbs:
        t = train[cb].dropna() if cb in train else pd.Series(dtype=float)
        e = ev[cb].dropna() if cb in ev else pd.Series(dtype=float)
        rows.append([f"cb{cb}", t.iloc[0] if len(t) else None, t.iloc[-1] if len(t) else None,
                     e.iloc[-1] if len(e) else None, e.max() if len(e) else None])
    doc.table(["codebook", "train acc, first step", "train acc, final", "eval acc, final", "eval acc, best"], rows)
    fm = run.first_mismatch("train")
    audio = fm[fm["modality"] == "audio"] if not fm.empty else fm
    if audio.empty:
        return
    window = int(audio["window"].max())
    doc.para(f"Where predictions first diverge from the labels: the index of the first wrong target among the "
             f"first {window} of each slice, averaged over samples (`{window}` = the whole window right). "
             f"Moving right as training goes on means the model holds the labels for longer.")
    doc.image(plots.divergence(fm, out / "first_mismatch.png"), "first mismatch per codebook over steps")
    table = audio["first_mismatch"].fillna(window).groupby([audio["step"], audio["codebook"]]).mean()
    table = table.unstack("codebook")
    shown = spread(list(table.index), 12)
    doc.table(["step", *[f"cb{int(c)}" for c in table.columns]],
              [[int(step), *[f"{v:.1f}" if np.isfinite(v) else "-" for v in table.loc[step]]] for step in shown])


SLICE_STEPS = 7  # train steps whose slices the report shows by default, evenly spread (first and last included)


def choose_steps(run: Run, wanted: list[int] | None) -> tuple[list[int], list[str]]:
    """Steps with train slices to show: the wanted ones (each moved to the nearest step that has slices),
    or up to SLICE_STEPS evenly spread ones."""
    have = run.slice_steps("train") or run.slice_steps("eval")
    if not have:
        return [], []
    if not wanted:
        return spread(have, SLICE_STEPS), []
    chosen, notes = [], []
    for step in wanted:
        near = min(have, key=lambda h: (abs(h - step), h))
        if near != step:
            notes.append(f"step {step} has no slices; showing step {near}")
        if near not in chosen:
            chosen.append(near)
    return chosen, notes


def slices_section(doc: Doc, run: Run, steps: list[int] | None) -> None:
    doc.heading("Predictions vs labels")
    chosen, notes = choose_steps(run, steps)
    if not chosen:
        doc.para("No prediction slices in this run.")
        return
    doc.para("The first (and last) targets of a few samples per step: the argmax prediction at each, marked where "
             "it is wrong, with the label; audio slices have one column per code frame and one row per codebook. "
             "One section per step; the first and the last are open. " + MARKS)
    doc.bullets(notes)
    phase = "train" if run.slice_steps("train") else "eval"
    for i, step in enumerate(chosen):
        df = run.slices_at(step, phase)
        with doc.details(f"{phase} step {step}: {step_summary(df)}", open=i in (0, len(chosen) - 1)):
            step_grids(doc, df)
    eval_steps = run.slice_steps("eval")
    if eval_steps and phase == "train":
        df = run.slices_at(eval_steps[-1], "eval")
        with doc.details(f"eval step {eval_steps[-1]} (the last eval): {step_summary(df)}", open=True):
            step_grids(doc, df)


def files_section(doc: Doc, run: Run) -> None:
    doc.heading("Event tables")
    doc.table(["family", "events"], [[name, t.num_rows] for name, t in sorted(run.tables.items())])
    doc.para(f"Load them in a notebook: `analysis.load_run({str(run.path)!r})`.")
    if run.config:
        doc.heading("Config")
        doc.code("\n".join(f"{k} = {v!r}" for k, v in flatten(run.config).items()))
