"""PNG figures of a run (and of two runs overlaid), drawn with matplotlib's Agg backend: no display needed."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - the backend must be chosen before pyplot loads
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from .mel import HOP, TOP_DB, mel_db, read_audio, to_mel  # noqa: E402
from .run import Run  # noqa: E402

DPI = 90
MAX_POINTS = 2000  # longer curves are drawn as bucket means within a min-max band: same picture, far faster


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def _series(df: pd.DataFrame, col) -> pd.Series | None:
    if col not in df:
        return None
    s = pd.to_numeric(df[col], errors="coerce")
    return s if s.notna().any() else None


def _line(ax, s: pd.Series | None, label: str, **kw) -> None:
    if s is None:
        return
    s = s.dropna()
    if s.empty:
        return
    marker = kw.pop("marker", None)
    if len(s) == 1:  # a line of one point has length zero and would not show: draw the point
        marker = "o"
    if len(s) <= MAX_POINTS:
        ax.plot(s.index, s.values, label=label, marker=marker, **kw)
        return
    bucket = np.arange(len(s)) * MAX_POINTS // len(s)
    groups = pd.Series(s.values).groupby(bucket)
    x = pd.Series(s.index.to_numpy(dtype="float64")).groupby(bucket).mean()
    (line,) = ax.plot(x, groups.mean(), label=label, **kw)
    ax.fill_between(x, groups.min(), groups.max(), color=line.get_color(), alpha=0.2, lw=0)


def _finish(ax, title: str, ylabel: str = "", log: bool = False) -> None:
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if log:
        ax.set_yscale("log")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)


def losses(run: Run, path: Path) -> Path | None:
    """Total, text and audio loss: train as lines, eval as points on the same axes."""
    train, ev = run.metrics("train"), run.metrics("eval")
    if train.empty and ev.empty:
        return None
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
    for ax, col in zip(axes, ("loss", "text_loss", "audio_loss"), strict=True):
        _line(ax, _series(train, col), "train", lw=1)
        s = _series(ev, col)
        if s is not None:
            ax.plot(s.index, s.values, "o-", label="eval", ms=4)
        _finish(ax, col.replace("_", " "), log=col == "text_loss")
    return _save(fig, path)


def quality(run: Run, path: Path) -> Path | None:
    """Is the voice getting better: the loss, WER and CER, and speaker similarity of the generations over steps,
    side by side; the base model's round is the step-0 point (a star). None without scored rounds."""
    curve = run.quality_curve()
    if curve.empty:
        return None
    train, ev = run.metrics("train"), run.metrics("eval")
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
    _line(axes[0], _series(train, "loss"), "train", lw=1)
    _line(axes[0], _series(ev, "loss"), "eval", marker="o", ms=4)
    _finish(axes[0], "loss")
    base = curve[curve["baseline"]] if "baseline" in curve else curve.iloc[:0]
    for ax, cols, title in ((axes[1], ("wer", "cer"), "error rate of the transcript (lower is better)"),
                            (axes[2], ("similarity",), "speaker similarity (higher is better)")):
        for col in cols:
            s = _series(curve, col)
            _line(ax, s, col.upper() if col != "similarity" else col, marker="o", ms=4)
            b = _series(base, col)
            if b is not None and b.notna().any():
                ax.plot(b.index, b.values, "*", color="gray", ms=10,
                        label="base model" if col == cols[0] else "_nolegend_")
        _finish(ax, title)
    return _save(fig, path)


def codebooks(run: Run, path: Path) -> Path | None:
    """Each codebook's loss and accuracy, train (lines) and eval (dashed with points)."""
    cbs = run.codebooks()
    if not cbs:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(13, 3.8))
    colors = plt.cm.viridis(np.linspace(0, 0.95, len(cbs)))
    for ax, kind in zip(axes, ("loss", "accuracy"), strict=True):
        train = run.codebook_loss("train") if kind == "loss" else run.codebook_accuracy("train")
        ev = run.codebook_loss("eval") if kind == "loss" else run.codebook_accuracy("eval")
        for cb, color in zip(cbs, colors, strict=True):
            _line(ax, _series(train, cb), f"cb{cb}", lw=1, color=color)
            s = _series(ev, cb)
            if s is not None:
                ax.plot(s.index, s.values, "o--", color=color, ms=3, lw=0.8)
        _finish(ax, f"audio {kind} per codebook (eval dashed)")
    return _save(fig, path)


def accuracy_heatmap(run: Run, path: Path, phase: str = "train") -> Path | None:
    """Codebook health at a glance: accuracy per codebook (rows) over steps (columns)."""
    acc = run.codebook_accuracy(phase)
    if acc.empty or acc.notna().sum().sum() == 0:
        return None
    fig, ax = plt.subplots(figsize=(13, 2.6))
    steps = acc.index.to_numpy()
    extent = (steps[0] - 0.5, steps[-1] + 0.5, acc.shape[1] - 0.5, -0.5)
    im = ax.imshow(acc.to_numpy().T, aspect="auto", interpolation="nearest", extent=extent, vmin=0,
                   vmax=max(float(np.nanmax(acc.to_numpy())), 1e-9), cmap="magma")
    ax.set_yticks(range(acc.shape[1]), [f"cb{c}" for c in acc.columns])
    ax.set_xlabel("step")
    ax.set_title(f"{phase} audio accuracy by codebook", fontsize=10)
    fig.colorbar(im, ax=ax, pad=0.01)
    return _save(fig, path)


def optimizer(run: Run, path: Path) -> Path | None:
    train = run.metrics("train")
    if train.empty:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(13, 3.2))
    _line(axes[0], _series(train, "lr"), "lr", lw=1)
    _finish(axes[0], "learning rate")
    _line(axes[1], _series(train, "grad_norm"), "grad norm", lw=1)
    clip = run.config.get("train", {}).get("max_grad_norm")
    if isinstance(clip, (int, float)) and clip > 0:
        axes[1].axhline(clip, color="gray", ls=":", lw=1, label=f"clip {clip}")
    _finish(axes[1], "gradient norm (before clipping)")
    return _save(fig, path)


def throughput(run: Run, path: Path) -> Path | None:
    train = run.metrics("train")
    if train.empty:
        return None
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.2))
    for ax, col, title in zip(axes, ("samples_per_s", "tokens_per_s", "peak_mem_mb"),
                              ("samples / s", "tokens / s", "peak memory (MB)"), strict=True):
        _line(ax, _series(train, col), col, lw=1)
        _finish(ax, title)
    return _save(fig, path)


def divergence(first_mismatch: pd.DataFrame, path: Path) -> Path | None:
    """Where predictions first leave the labels, per codebook, as training goes on (higher = later = better)."""
    audio = first_mismatch[first_mismatch["modality"] == "audio"] if not first_mismatch.empty else first_mismatch
    if audio.empty:
        return None
    window = int(audio["window"].max())
    # A slice that matched its whole window diverges somewhere past it: draw it at the window's edge.
    offset = audio["first_mismatch"].fillna(window)
    table = offset.groupby([audio["step"], audio["codebook"]]).mean().unstack("codebook")
    fig, ax = plt.subplots(figsize=(13, 3.2))
    colors = plt.cm.viridis(np.linspace(0, 0.95, table.shape[1]))
    for cb, color in zip(table.columns, colors, strict=True):
        _line(ax, table[cb], f"cb{int(cb)}", lw=1, color=color, marker=".")
    ax.axhline(window, color="gray", ls=":", lw=1, label=f"all {window} match")
    _finish(ax, "first mismatch: index of the first wrong target in the first window (mean over samples)",
            "target index")
    return _save(fig, path)


def overlay(a: Run, b: Run, names: tuple[str, str], path: Path) -> Path | None:
    """Two runs' curves on shared axes: losses, eval loss, accuracy, lr."""
    panels = [("train", "loss"), ("train", "text_loss"), ("train", "audio_loss"), ("eval", "loss"),
              ("eval", "audio_acc"), ("train", "lr")]
    panels = [(ph, col) for ph, col in panels
              if _series(a.metrics(ph), col) is not None or _series(b.metrics(ph), col) is not None]
    if not panels:
        return None
    cols = 3
    rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(13, 3.2 * rows), squeeze=False)
    for ax, (phase, col) in zip(axes.flat, panels, strict=False):
        for run, name, style in ((a, names[0], "-"), (b, names[1], "--")):
            s = _series(run.metrics(phase), col)
            if s is not None:
                _line(ax, s, name, lw=1, ls=style, marker="o" if phase == "eval" else None, ms=3)
        _finish(ax, f"{phase} {col.replace('_', ' ')}", log=col == "text_loss")
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    return _save(fig, path)


MEL_TICKS_HZ = (0, 250, 500, 1000, 2000, 4000, 8000, 16000)


def mel_panels(panels: list[tuple[str, Path | None]], path: Path) -> Path | None:
    """Mel spectrograms side by side on one color scale (label next to prediction, or one generation), at least
    900 px wide, time in seconds and frequency in Hz (on the mel scale) on the axes; None when no file can be
    read."""
    read = [(title, read_audio(p) if p is not None else None) for title, p in panels]
    mels = [(title, mel_db(*audio), audio[1]) for title, audio in read if audio is not None]
    if not mels:
        return None
    top = max(float(m.max()) for _, m, _ in mels)
    fig, axes = plt.subplots(1, len(mels), figsize=(max(9.0, 4.6 * len(mels)), 2.8), squeeze=False, sharey=True,
                             layout="constrained")
    for ax, (title, m, rate) in zip(axes.flat, mels, strict=True):
        image = ax.imshow(m, origin="lower", aspect="auto", cmap="magma", vmin=top - TOP_DB, vmax=top,
                          extent=(0, m.shape[1] * HOP / rate, 0, float(to_mel(rate / 2))))
        ticks = [f for f in MEL_TICKS_HZ if f <= rate / 2]
        ax.set_yticks(to_mel(ticks), [f"{f:g}" if f < 1000 else f"{f / 1000:g}k" for f in ticks])
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("time (s)")
    axes.flat[0].set_ylabel("frequency (Hz)")
    fig.colorbar(image, ax=list(axes.flat), pad=0.01, label="dB")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
