"""Things worth a look in a run: non-finite values, loss spikes, losses that do not improve, data skips,
logging errors, an unfinished run. Each check returns plain sentences; thresholds are named here."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd

from .run import Run

SPIKE_WINDOW = 8  # steps of recent history a loss is compared against (short: the curve falls fast early on)
SPIKE_FACTOR = 1.2  # a step is a spike when its loss exceeds the recent median by this factor ...
SPIKE_NOISE = 8.0  # ... and by this many times the recent step-to-step noise (a noisy curve is not spiking)
STALL_MIN_STEPS = 6  # fewer steps than this say nothing about improvement
STALL_GAIN = 0.02  # a loss "improves" when its last tenth averages at least 2% below its first tenth
EVAL_TREND_MIN = 3  # evals needed before the eval loss's trend is judged
SKIP_SHARE = 0.05  # more than this share of a split's samples skipped is "many"


def _nonfinite(run: Run) -> list[str]:
    counts: dict[tuple[str, str], list[int]] = {}
    for family, table in run.tables.items():
        if "nonfinite" not in table.column_names:
            continue
        steps = table.column("step").to_pylist() if "step" in table.column_names else [None] * table.num_rows
        for names, step in zip(table.column("nonfinite").to_pylist(), steps, strict=True):
            if isinstance(names, str):  # JSON text when a part could not type the column as a list
                names = json.loads(names)
            for name in names or []:
                counts.setdefault((family, name), []).append(step)
    out = []
    for (family, name), steps in sorted(counts.items()):
        known = [s for s in steps if s is not None]
        where = f", first at step {min(known)}" if known else ""
        out.append(f"NaN/inf in `{family}.{name}` in {len(steps)} event(s){where}")
    return out


def loss_spikes(loss: pd.Series) -> pd.Series:
    """Steps whose loss jumps well above the median of the steps just before; returns loss / that median."""
    loss = loss.dropna()
    if len(loss) <= SPIKE_WINDOW // 2:
        return pd.Series(dtype="float64")
    median = loss.shift(1).rolling(SPIKE_WINDOW, min_periods=SPIKE_WINDOW // 2).median()
    noise = loss.diff().abs().shift(1).rolling(SPIKE_WINDOW, min_periods=SPIKE_WINDOW // 2).median()
    spike = (loss > median * SPIKE_FACTOR) & (loss - median > SPIKE_NOISE * noise.clip(lower=1e-12))
    return (loss / median)[spike]


def improvement(series: pd.Series) -> float | None:
    """Relative change from the first tenth of the steps to the last tenth (negative = lower = better)."""
    s = series.dropna()
    if len(s) < STALL_MIN_STEPS:
        return None
    k = max(1, len(s) // 10)
    head, tail = float(s.iloc[:k].mean()), float(s.iloc[-k:].mean())
    return (tail - head) / abs(head) if head else None


def warnings_for(run: Run) -> list[str]:
    out: list[str] = []
    status = run.status
    if status in ("crashed", "interrupted", "failed"):
        err = (run.end or {}).get("error")
        out.append(f"the run {status}" + (f": {err}" if err else " (no run_end event)" if run.end is None else ""))
    total = run.start.get("total_steps")
    if status != "running" and total and run.steps and max(run.steps) < total:
        out.append(f"{max(run.steps)} of {total} planned steps completed")
    out += _nonfinite(run)
    train = run.metrics("train")
    if "loss" in train:
        spikes = loss_spikes(pd.to_numeric(train["loss"], errors="coerce"))
        if len(spikes):
            worst = spikes.sort_values(ascending=False).head(3)
            out.append(f"{len(spikes)} loss spike(s) (> {SPIKE_FACTOR}x the median of the {SPIKE_WINDOW} steps "
                       f"before); worst: " + ", ".join(f"step {s} ({r:.1f}x)" for s, r in worst.items()))
    for col, label in [("text_loss", "text loss"), *((f"audio_loss_cb{cb}", f"codebook {cb} loss")
                                                     for cb in run.codebooks())]:
        if col in train:
            gain = improvement(pd.to_numeric(train[col], errors="coerce"))
            if gain is not None and gain > -STALL_GAIN:
                out.append(f"{label} is not improving (last tenth of the steps {gain:+.1%} vs the first tenth)")
    for split, s in run.data_summary.items():
        kept, skipped = s.get("kept") or 0, s.get("skipped") or 0
        if skipped and skipped > SKIP_SHARE * (kept + skipped):
            reasons = ", ".join(f"{k} {v}" for k, v in (s.get("skipped_by_reason") or {}).items())
            out.append(f"{skipped} of {kept + skipped} {split} samples skipped ({reasons})")
    errors = run.frame("log_error")
    if not errors.empty:
        out.append(f"{len(errors)} logging error(s): " + "; ".join(
            f"{r.get('sink')}: {r.get('error_type')} {r.get('error')}" for _, r in errors.head(3).iterrows()))
    evals = run.metrics("eval")
    if evals.empty and not train.empty:
        out.append("no eval events: the run has no held-out numbers (data.val_manifest / train.eval_every)")
    elif "loss" in evals and len(evals["loss"].dropna()) >= EVAL_TREND_MIN:
        ev = evals["loss"].dropna()
        gain = (ev.iloc[-1] - ev.iloc[0]) / abs(ev.iloc[0]) if ev.iloc[0] else None
        train_gain = improvement(pd.to_numeric(train["loss"], errors="coerce")) if "loss" in train else None
        if gain is not None and gain > -STALL_GAIN:
            falling = train_gain is not None and train_gain <= -STALL_GAIN
            out.append(f"eval loss is not improving ({ev.iloc[0]:.4g} at the first eval, {ev.iloc[-1]:.4g} at the "
                       f"last: {gain:+.1%})" + (f" while the train loss fell {train_gain:+.1%}: overfitting?"
                                               if falling else ""))
    acc = run.codebook_accuracy("train")
    if not acc.empty and len(acc) >= STALL_MIN_STEPS:
        tail = acc.iloc[-max(1, len(acc) // 10):].mean()
        dead = [int(cb) for cb, v in tail.items() if np.isfinite(v) and v == 0]
        if dead:
            out.append("codebook(s) " + ", ".join(map(str, dead)) + " predict nothing right at the end of training")
    return out
