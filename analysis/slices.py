"""Prediction slices as aligned grids: target positions, predictions and labels, mismatches marked."""

from __future__ import annotations

import math

import pandas as pd

from .document import Cell, Doc


def _list(value) -> list:
    return [] if value is None or (isinstance(value, float) and math.isnan(value)) else list(value)


def _int(value) -> int | None:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else int(value)


def what(row) -> str:
    cb = _int(row.get("codebook"))
    return "text" if row.get("modality") == "text" else f"audio cb{cb}"


def windows(row) -> list[str]:
    """The first window, and the last one unless it repeats positions of the first (short targets)."""
    first, last = _list(row.get("first_pos")), _list(row.get("last_pos"))
    return ["first"] if not last or set(last) <= set(first) else ["first", "last"]


def _token(row, part: str, kind: str) -> list[str]:
    ids = _list(row.get(f"{part}_{kind}"))
    if row.get("modality") == "text":
        decoded = _list(row.get(f"{part}_{kind}_text"))
        if len(decoded) == len(ids):
            return [repr(t)[1:-1] for t in decoded]  # quotes dropped, whitespace and control characters shown
    return [str(i) for i in ids]


def slice_grid(doc: Doc, row) -> None:
    """One slice: rows pos / pred / label over the first (and last) K targets; wrong predictions marked."""
    pos, pred, label = [], [], []
    for part in windows(row):
        if pos:
            pos.append(Cell("…"))
            pred.append(Cell("…"))
            label.append(Cell("…"))
        ids_p, ids_l = _list(row.get(f"{part}_pred")), _list(row.get(f"{part}_label"))
        for p, txt_p, txt_l, ip, il in zip(_list(row.get(f"{part}_pos")), _token(row, part, "pred"),
                                           _token(row, part, "label"), ids_p, ids_l, strict=False):
            pos.append(Cell(str(p)))
            pred.append(Cell(txt_p, bad=ip != il))
            label.append(Cell(txt_l))
    n_t, n_m = _int(row.get("n_targets")), _int(row.get("n_match"))
    caption = (f"{row.get('phase')} step {row.get('step')} · sample {row.get('sample')} · {what(row)} · "
               f"{n_m}/{n_t} match")
    if _int(row.get("batch_targets")):
        caption += f" (batch {_int(row.get('batch_match'))}/{_int(row.get('batch_targets'))})"
    first = row.get("first_mismatch")
    note = ("first window all correct" if first is None or first != first else
            f"first mismatch at target {int(first)} (position {pos[int(first)].text})")
    doc.grid(caption, [("pos", pos), ("pred", pred), ("label", label)], note)


def slices_summary(doc: Doc, df: pd.DataFrame) -> None:
    """One line per sample: matches/targets per modality and codebook, so a step reads at a glance."""
    cols = sorted({what(r) for _, r in df.iterrows()}, key=lambda w: (w != "text", len(w), w))
    rows = []
    for (phase, sample), g in df.groupby(["phase", "sample"], sort=True):
        cells = {what(r): f"{_int(r['n_match'])}/{_int(r['n_targets'])}" for _, r in g.iterrows()}
        rows.append([f"{phase} sample {sample}", *[cells.get(c, "-") for c in cols]])
    doc.table(["matches / targets", *cols], rows)


def side_by_side(doc: Doc, a, b, names: tuple[str, str]) -> None:
    """The same slice of two runs: A's and B's predictions against the labels; cells where A and B disagree
    are marked (on B's row), as are labels that differ (the runs did not see the same batch)."""
    pos, pred_a, pred_b, lab_a, lab_b = [], [], [], [], []
    for part in windows(a):
        if pos:
            for r in (pos, pred_a, pred_b, lab_a, lab_b):
                r.append(Cell("…"))
        la, lb = _list(a.get(f"{part}_label")), _list(b.get(f"{part}_label"))
        pa_, pb = _list(a.get(f"{part}_pred")), _list(b.get(f"{part}_pred"))
        ta, tb = _token(a, part, "pred"), _token(b, part, "pred")
        tla, tlb = _token(a, part, "label"), _token(b, part, "label")
        for i, p in enumerate(_list(a.get(f"{part}_pos"))):
            pos.append(Cell(str(p)))
            pred_a.append(Cell(ta[i] if i < len(ta) else "", bad=i < len(la) and i < len(pa_) and pa_[i] != la[i]))
            pred_b.append(Cell(tb[i] if i < len(tb) else "", bad=i >= len(pb) or i >= len(pa_) or pb[i] != pa_[i]))
            lab_a.append(Cell(tla[i] if i < len(tla) else ""))
            lab_b.append(Cell(tlb[i] if i < len(tlb) else "", bad=i >= len(lb) or i >= len(la) or lb[i] != la[i]))
    caption = (f"{a.get('phase')} step {a.get('step')} · sample {a.get('sample')} · {what(a)} · "
               f"{names[0]} {_int(a.get('n_match'))}/{_int(a.get('n_targets'))} · "
               f"{names[1]} {_int(b.get('n_match'))}/{_int(b.get('n_targets'))} match")
    rows = [("pos", pos), (f"pred {names[0]}", pred_a), (f"pred {names[1]}", pred_b), (f"label {names[0]}", lab_a)]
    if any(c.bad for c in lab_b):
        rows.append((f"label {names[1]}", lab_b))
    doc.grid(caption, rows, f"marked: {names[0]}'s wrong predictions; on {names[1]}'s rows, where it differs from "
                            f"{names[0]}")
