"""Run B against run A: config changes, metrics joined on optimizer step, overlaid curves, slices side by side,
the first step where losses part, and ``--fail-if-worse`` gates for CI."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from . import plots
from .audio import AUDIO_MB, audio_diff, diff_section
from .document import Doc
from .run import METRIC_FAMILIES, Run, better, load_run, ranges, spread
from .schema import flatten
from .slices import MARKS, same_sample, side_by_side

NAMES = ("A", "B")
HEADLINE = ("loss", "text_loss", "audio_loss", "text_acc", "audio_acc")
# run_start fields that are not config but explain a difference just as often.
_RUN_FIELDS = ("versions", "hardware", "world_size", "mixed_precision", "git_commit", "trainable_params", "device")


def _num(v) -> float | None:
    try:
        v = float(v)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def compare(a: float | None, b: float | None, metric: str) -> dict:
    """B against A: absolute and relative change and which side is better ("A", "B", "=" or None)."""
    a, b = _num(a), _num(b)
    out = {"a": a, "b": b, "abs": None, "rel": None, "better": None}
    if a is None or b is None:
        return out
    out["abs"] = b - a
    out["rel"] = (b - a) / abs(a) if a else None
    direction = better(metric)
    if direction is not None:
        out["better"] = "=" if a == b else ("B" if (b < a) == (direction == "lower") else "A")
    return out


def _own_paths(run: Run, flat: dict) -> dict:
    """Values that are paths under the run's own directory, written relative to it (``RUN_DIR/tiny/model``): two
    runs whose assets live in their own dirs do not differ there."""
    roots = {str(Path(r)) for r in (run.start.get("run_dir"), run.config.get("train", {}).get("output_dir"))
             if isinstance(r, str) and r}
    roots |= {str(run.path), str(run.path.resolve())}

    def rel(v):
        if not isinstance(v, str):
            return v
        for root in sorted(roots, key=len, reverse=True):
            if v == root:
                return "RUN_DIR"
            if v.startswith(root.rstrip("/") + "/"):
                return "RUN_DIR/" + v[len(root.rstrip("/")) + 1:]
        return v

    return {k: rel(v) for k, v in flat.items()}


def config_diff(a: Run, b: Run, show_all: bool = False) -> dict[str, list]:
    fa, fb = ({**_own_paths(r, flatten(r.config, "config")),
               **{f"run.{k}": v for k in _RUN_FIELDS for k, v in flatten(r.start.get(k), k).items()}} for r in (a, b))
    keys = list(dict.fromkeys([*fa, *fb]))
    return {k: [fa.get(k), fb.get(k)] for k in keys if show_all or fa.get(k) != fb.get(k)}


def _final(df: pd.DataFrame, col: str) -> tuple[float | None, int | None]:
    if col not in df:
        return None, None
    s = pd.to_numeric(df[col], errors="coerce").dropna()
    return (float(s.iloc[-1]), int(s.index[-1])) if len(s) else (None, None)


def _best(df: pd.DataFrame, col: str) -> tuple[float | None, int | None]:
    if col not in df or better(col) is None:
        return None, None
    s = pd.to_numeric(df[col], errors="coerce").dropna()
    if s.empty:
        return None, None
    step = s.idxmin() if better(col) == "lower" else s.idxmax()
    return float(s.loc[step]), int(step)


def metric_diff(a: Run, b: Run) -> dict:
    out = {}
    for phase in METRIC_FAMILIES:
        ma, mb = a.metrics(phase), b.metrics(phase)
        if ma.empty and mb.empty:
            continue
        cols = [c for c in dict.fromkeys([*ma.columns, *mb.columns]) if better(c) is not None
                and c not in ("step_time_s",)]
        final = {c: {**compare(_final(ma, c)[0], _final(mb, c)[0], c), "step_a": _final(ma, c)[1],
                     "step_b": _final(mb, c)[1]} for c in cols}
        best = {c: {**compare(_best(ma, c)[0], _best(mb, c)[0], c), "step_a": _best(ma, c)[1],
                    "step_b": _best(mb, c)[1]} for c in cols}
        common = sorted(set(ma.index) & set(mb.index))
        at_steps = [{"step": int(s), "metric": c, **compare(ma.at[s, c], mb.at[s, c], c)}
                    for s in spread(common, 10) for c in HEADLINE if c in ma and c in mb]
        out[phase] = {"final": final, "best": best, "common_steps": len(common), "at_steps": at_steps,
                      "only_a": ranges([int(s) for s in set(ma.index) - set(mb.index)]),
                      "only_b": ranges([int(s) for s in set(mb.index) - set(ma.index)])}
    return out


def first_difference(a: Run, b: Run) -> dict | None:
    """The first common train step whose losses differ at all (for runs meant to be identical)."""
    ma, mb = a.metrics("train"), b.metrics("train")
    cols = [c for c in ma.columns if c in mb and ("loss" in c)]
    common = sorted(set(ma.index) & set(mb.index))
    if not cols or not common:
        return None
    ja, jb = ma.loc[common, cols].astype("float64"), mb.loc[common, cols].astype("float64")
    differs = ~((ja == jb) | (ja.isna() & jb.isna()))
    rows = differs.any(axis=1)
    if not rows.any():
        return {"step": None, "common_steps": len(common), "fields": {}}
    step = rows.idxmax()
    fields = {c: [_num(ja.at[step, c]), _num(jb.at[step, c])] for c in cols if differs.at[step, c]}
    return {"step": int(step), "common_steps": len(common), "fields": fields}


def parse_gate(text: str) -> tuple[str, str, float]:
    """``PHASE.METRIC[:TOLERANCE]`` as (phase, metric, tolerance); without a tolerance any worsening fails (0)."""
    metric, sep, tol = text.partition(":")
    phase, dot, col = metric.partition(".")
    if not dot or phase not in METRIC_FAMILIES or not col:
        raise ValueError(f"--fail-if-worse {text!r}: expected PHASE.METRIC or PHASE.METRIC:TOLERANCE like eval.loss "
                         f"or eval.loss:0.05 (PHASE: {', '.join(METRIC_FAMILIES)})")
    try:
        tolerance = float(tol) if sep else 0.0
    except ValueError:
        raise ValueError(f"--fail-if-worse {text!r}: tolerance {tol!r} is not a number") from None
    if not math.isfinite(tolerance):
        raise ValueError(f"--fail-if-worse {text!r}: tolerance {tol!r} is not a finite number")
    if better(col) is None:
        raise ValueError(f"--fail-if-worse {text!r}: {col} has no better direction (use a loss or acc, or "
                         "quality.wer, quality.cer, quality.similarity)")
    return phase, col, tolerance


def _nonfinite_named(value, col: str) -> bool:
    """Whether an event's ``nonfinite`` list (a list, an array, or JSON text in some parts) names ``col``."""
    if isinstance(value, str):
        value = json.loads(value) if value.startswith("[") else [value]
    return value is not None and not isinstance(value, float) and col in list(value)


def _gate_final(df: pd.DataFrame, col: str) -> tuple[float | None, int | None, bool]:
    """The gate's final value: at the last step that logged ``col`` as a number or as NaN/inf (named in
    ``nonfinite``). A plain null (a step without targets) is skipped; the bool says the value is non-finite."""
    if col not in df:
        return None, None, False
    values = pd.to_numeric(df[col], errors="coerce")
    bad = np.isinf(values)
    if "nonfinite" in df:
        bad |= df["nonfinite"].map(lambda v: _nonfinite_named(v, col)).astype(bool)
    logged = values[values.notna() | bad]
    if logged.empty:
        return None, None, False
    step = int(logged.index[-1])
    return (None, step, True) if bad.loc[step] else (float(logged.iloc[-1]), step, False)


def run_problems(a: Run, b: Run) -> list[str]:
    """Why B's final values cannot stand for a finished run: B did not finish, or stopped before A's last step."""
    out = []
    if b.status != "finished":
        out.append(f"B has not finished (status {b.status})")
    last_a, last_b = max(a.steps, default=0), max(b.steps, default=0)
    if last_b < last_a:
        out.append(f"B ended at step {last_b}, before A's last step {last_a}")
    return out


def check_gate(a: Run, b: Run, text: str) -> dict:
    """B's final value may be worse than A's by at most the tolerance, in the metric's own units (absolute):
    for losses B - A <= tol, for accuracies A - B <= tol. The gate also fails when B lacks the metric, when
    B's final value is NaN/inf, when B did not finish and when B stopped before A's last step. A metric
    neither run has is bad input (ValueError)."""
    phase, col, tol = parse_gate(text)
    ma, mb = a.metrics(phase), b.metrics(phase)
    if phase == "quality":
        # Scoring is optional: a run without it is a wrong pair of runs for this gate, not a worse one.
        for name, run, m in (("A", a, ma), ("B", b, mb)):
            if _gate_final(m, col)[1] is None:
                what = "no scored generation rounds (quality_summary events; set eval.asr_model and/or " \
                    "eval.speaker_model)" if m.empty else f"no {col} in its scored rounds (no scorer for it)"
                raise ValueError(f"--fail-if-worse {text!r}: run {name} ({run.path}) has {what}")
    if col not in ma and col not in mb:
        raise ValueError(f"--fail-if-worse {text!r}: neither run has {phase}.{col}")
    va = _final(ma, col)[0]
    vb, step_b, nonfinite_b = _gate_final(mb, col)
    problems = run_problems(a, b)
    if nonfinite_b:
        problems.append(f"B's final {phase}.{col} (step {step_b}) is NaN/inf")
    elif va is None or vb is None:
        problems.append(f"{phase}.{col} missing in {'A' if va is None else 'B'}")
    worse_by = None
    if va is not None and vb is not None:
        worse_by = vb - va if better(col) == "lower" else va - vb
        if worse_by > tol:
            problems.append(f"B is worse by {worse_by:.4g} (tolerance {tol:g})")
    return {"gate": text, "a": va, "b": vb, "worse_by": worse_by, "ok": not problems,
            "why": "; ".join(problems) or "within tolerance"}


def diff(a: Run, b: Run, show_all: bool = False, gates: list[str] = ()) -> dict:
    """The comparison as plain data (diff.json); ``audio`` only when a run has eval audio."""
    out = {"a": str(a.path), "b": str(b.path), "status": [a.status, b.status],
           "steps": [len(a.steps), len(b.steps)], "config": config_diff(a, b, show_all),
           "metrics": metric_diff(a, b), "first_difference": first_difference(a, b),
           "gates": [check_gate(a, b, g) for g in gates]}
    audio = audio_diff(a, b)
    if audio is not None:
        out["audio"] = audio
    return out


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _pct(v) -> str:
    return "-" if v is None else f"{v:+.1%}"


def build_doc(a: Run, b: Run, result: dict, out: Path | None, audio_mb: float = AUDIO_MB) -> Doc:
    doc = Doc(f"Diff: {b.path.name} (B) against {a.path.name} (A)")
    doc.table(["", "A", "B"], [["run dir", str(a.path), str(b.path)], ["status", *result["status"]],
                               ["train steps", *result["steps"]]], align_right=False)
    if result["gates"]:
        doc.heading("Gates")
        doc.table(["gate", "A", "B", "result"], [[g["gate"], g["a"], g["b"], ("ok: " if g["ok"] else "FAIL: ")
                                                  + g["why"]] for g in result["gates"]], align_right=False)
    doc.heading("Config" + ("" if len(result["config"]) else ": identical"))
    if result["config"]:
        doc.table(["key", "A", "B"], [[k, json.dumps(v[0]), json.dumps(v[1])] for k, v in result["config"].items()],
                  align_right=False)
    first = result["first_difference"]
    doc.heading("First difference")
    if first is None:
        doc.para("No common train steps to compare.")
    elif first["step"] is None:
        doc.para(f"Losses are identical on all {first['common_steps']} common train steps.")
    else:
        doc.para(f"Train losses first differ at step **{first['step']}** (of {first['common_steps']} common steps): "
                 + ", ".join(f"{k} {_fmt(v[0])} vs {_fmt(v[1])}" for k, v in first["fields"].items()))
    for phase, m in result["metrics"].items():
        doc.heading(f"{phase.capitalize()} metrics")
        rows = []
        for col, f in m["final"].items():
            bst = m["best"][col]
            if f["a"] is None and f["b"] is None:
                continue
            rows.append([col, f["a"], f["b"], f["abs"], _pct(f["rel"]), f["better"] or "-",
                         bst["a"], bst["b"], _pct(bst["rel"]), bst["better"] or "-"])
        doc.table(["metric", "final A", "final B", "change", "rel", "better", "best A", "best B", "rel", "better"],
                  rows)
        notes = [f"{m['common_steps']} common steps"]
        if m["only_a"]:
            notes.append(f"steps only in A: {m['only_a']}")
        if m["only_b"]:
            notes.append(f"steps only in B: {m['only_b']}")
        doc.para("; ".join(notes) + ".")
        if m["at_steps"]:
            steps = list(dict.fromkeys(r["step"] for r in m["at_steps"]))
            cols = list(dict.fromkeys(r["metric"] for r in m["at_steps"]))
            cell = {(r["step"], r["metric"]): r for r in m["at_steps"]}
            doc.table(["step", *[f"{c} A → B" for c in cols]],
                      [[s, *[f"{_fmt(cell[s, c]['a'])} → {_fmt(cell[s, c]['b'])} ({_pct(cell[s, c]['rel'])})"
                             for c in cols]] for s in steps])
    if out is not None:
        doc.heading("Curves")
        doc.image(plots.overlay(a, b, NAMES, out / "curves.png"), "A (solid) and B (dashed)")
    slices(doc, a, b)
    diff_section(doc, a, b, NAMES, audio_mb, out)
    return doc


def slices(doc: Doc, a: Run, b: Run) -> None:
    """Predictions of both runs for the same samples: the last common eval's slices (the same validation batch in
    both), and the last common train step at which both runs saw the same samples (``sample_key``)."""
    shown = []
    for phase in ("eval", "train"):
        common = sorted(set(a.slice_steps(phase)) & set(b.slice_steps(phase)))
        same = a.same_sample_steps(b, phase)
        if not common:
            continue
        if not same:
            shown.append((phase, None, f"the runs saw different samples at each of the {len(common)} common {phase} "
                                       "steps with slices (another data order or data): not compared"))
            continue
        note = "" if len(same) == len(common) else (f"the same samples at {len(same)} of the {len(common)} common "
                                                    f"{phase} steps with slices")
        shown.append((phase, same[-1], note))
    if not shown:
        return
    doc.heading("Predictions side by side")
    doc.para("Only samples both runs saw: each run's prediction against the one label. " + MARKS)
    doc.bullets([f"{phase}: {note}" for phase, _, note in shown if note])
    for phase, step, _ in shown:
        if step is None:
            continue
        sa, sb = a.slices_at(step, phase), b.slices_at(step, phase)
        by_b = {_slice_key(r): r for _, r in sb.iterrows()}
        with doc.details(f"{phase} step {step}", open=True):
            for _, ra in sa.iterrows():
                rb = by_b.get(_slice_key(ra))
                if rb is not None and same_sample(ra, rb):
                    side_by_side(doc, ra, rb, NAMES)


def _slice_key(r) -> tuple:
    return r["modality"], -1 if r["codebook"] != r["codebook"] else int(r["codebook"]), int(r["sample"])


def run_diff(path_a, path_b, as_json: bool = False, show_all: bool = False, out=None, gates=(),
             audio_mb: float = AUDIO_MB) -> int:
    a, b = load_run(path_a), load_run(path_b)
    result = diff(a, b, show_all, list(gates))
    out_dir = Path(out) if out else None
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
    doc = build_doc(a, b, result, out_dir, audio_mb)
    if out_dir is not None:
        (out_dir / "diff.json").write_text(json.dumps(result, indent=1, default=str), encoding="utf-8")
        (out_dir / "diff.md").write_text(doc.markdown(out_dir), encoding="utf-8")
        (out_dir / "diff.html").write_text(doc.html(out_dir), encoding="utf-8")
        print(f"diff: {out_dir / 'diff.md'}, {out_dir / 'diff.html'}, {out_dir / 'diff.json'}", file=sys.stderr)
    print(json.dumps(result, indent=1, default=str) if as_json else doc.markdown(out_dir or Path(".")))
    failed = [g for g in result["gates"] if not g["ok"]]
    for g in failed:
        print(f"analysis diff: {g['gate']} failed: {g['why']}", file=sys.stderr)
    return 1 if failed else 0

