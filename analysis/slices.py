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


def _axis(values: list[int]) -> list[int | None]:
    """Sorted distinct positions, with None where a gap lies between two of them (drawn as an ellipsis)."""
    out: list[int | None] = []
    for v in sorted(set(values)):
        if out and v > out[-1] + 1:
            out.append(None)
        out.append(v)
    return out


def _cells(row, key: str, axis: list[int | None], kind: str = "pred") -> list[Cell]:
    """One row of a grid: this slice's predictions (or labels) at each axis position, wrong predictions marked
    with the label; blank where the slice has no target."""
    at: dict[int, tuple[str, str, bool]] = {}
    for part in windows(row):
        ids_p, ids_l = _list(row.get(f"{part}_pred")), _list(row.get(f"{part}_label"))
        for x, tp, tl, ip, il in zip(_list(row.get(f"{part}_{key}")), _token(row, part, "pred"),
                                     _token(row, part, "label"), ids_p, ids_l, strict=False):
            at[int(x)] = (tp, tl, ip != il)
    out = []
    for x in axis:
        if x is None:
            out.append(Cell("…"))
        elif x not in at:
            out.append(Cell(""))
        elif kind == "label":
            out.append(Cell(at[x][1]))
        else:
            out.append(Cell(at[x][0], bad=at[x][2], label=at[x][1] if kind == "pred+label" else None))
    return out


def _match(rows) -> str:
    m = sum(_int(r.get("n_match")) or 0 for r in rows)
    t = sum(_int(r.get("n_targets")) or 0 for r in rows)
    return f"{m}/{t}"


def sample_grid(doc: Doc, rows: list) -> None:
    """One sample of one step, compact: its text slice (position, prediction, label) and one grid of its audio
    slices with a column per code frame and a row per codebook; wrong predictions marked, the label with them."""
    text = [r for r in rows if r.get("modality") == "text"]
    audio = sorted((r for r in rows if r.get("modality") == "audio"), key=lambda r: _int(r.get("codebook")) or 0)
    head = rows[0]
    parts = [f"{head.get('phase')} step {head.get('step')} · sample {head.get('sample')}"]
    if text:
        parts.append(f"text {_match(text)}")
    if audio:
        parts.append(f"audio {_match(audio)} match")
    caption = " · ".join(parts)
    grids = []
    for r in text:
        axis = _axis([p for part in windows(r) for p in _list(r.get(f"{part}_pos"))])
        grids.append(("text", [("pos", [Cell("…") if x is None else Cell(str(x)) for x in axis]),
                               ("pred", _cells(r, "pos", axis)), ("label", _cells(r, "pos", axis, "label"))]))
    if audio:
        # Audio rows of old logs have no frame numbers: their positions stand in (the delay then shows).
        key = "frame" if all(_list(r.get("first_frame")) for r in audio) else "pos"
        axis = _axis([f for r in audio for part in windows(r) for f in _list(r.get(f"{part}_{key}"))])
        grids.append(("audio", [(key, [Cell("…") if x is None else Cell(str(x)) for x in axis]),
                                *[(f"cb{_int(r.get('codebook'))}", _cells(r, key, axis, "pred+label"))
                                  for r in audio]]))
    for i, (_, grid_rows) in enumerate(grids):  # how marks read is said once, above the grids (MARKS)
        doc.grid(caption if i == 0 else "", grid_rows)


MARKS = ("Wrong predictions are marked: in HTML red, with the label under them; in Markdown the audio rows show "
         "`prediction/label` and a `^` marks a wrong text token.")


def step_summary(df: pd.DataFrame) -> str:
    """Matches over targets of one step's slices, text and audio apart: "text 4/4, audio 45/336 match"."""
    rows = [r for _, r in df.iterrows()]
    text = [r for r in rows if r.get("modality") == "text"]
    audio = [r for r in rows if r.get("modality") == "audio"]
    return ", ".join(part for part in (f"text {_match(text)}" if text else "",
                                       f"audio {_match(audio)}" if audio else "") if part) + " match"


def step_grids(doc: Doc, df: pd.DataFrame) -> None:
    """Every sample of one step's slices (``Run.slices_at``), one compact grid each."""
    for _, g in df.groupby(["phase", "sample"], sort=True):
        sample_grid(doc, [r for _, r in g.iterrows()])


def same_sample(a, b) -> bool:
    """Whether two runs' slices are of the same sample: equal ``sample_key`` where both runs logged one (older logs
    did not), else equal labels."""
    ka, kb = a.get("sample_key"), b.get("sample_key")
    if isinstance(ka, str) and isinstance(kb, str):
        return ka == kb
    return all(_list(a.get(f"{p}_label")) == _list(b.get(f"{p}_label")) for p in ("first", "last"))


def side_by_side(doc: Doc, a, b, names: tuple[str, str]) -> None:
    """The same slice of the same sample in two runs: A's and B's predictions against the one label, each run's
    wrong predictions marked."""
    axis = _axis([p for part in windows(a) for p in _list(a.get(f"{part}_pos"))])
    caption = (f"{a.get('phase')} step {a.get('step')} · sample {a.get('sample')} · {what(a)} · "
               f"{names[0]} {_int(a.get('n_match'))}/{_int(a.get('n_targets'))} · "
               f"{names[1]} {_int(b.get('n_match'))}/{_int(b.get('n_targets'))} match")
    rows = [("pos", [Cell("…") if x is None else Cell(str(x)) for x in axis]),
            (f"pred {names[0]}", _cells(a, "pos", axis)), (f"pred {names[1]}", _cells(b, "pos", axis)),
            ("label", _cells(a, "pos", axis, "label"))]
    doc.grid(caption, rows)
