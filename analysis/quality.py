"""Scored generations in the report (``quality`` and ``quality_summary`` events, docs/quality.md): each round's
WER, CER and speaker similarity, the base model's round first, and the worst utterances of the last round with a
player, the mel picture, the text asked for and the transcript heard."""

from __future__ import annotations

import math
from pathlib import Path

from .audio import AUDIO_MB, TINY_CODEC, Budget, fmt_num, mel_cell, tiny_codec
from .document import Doc
from .run import Run, spread
from .schema import step_dir_name

WORST = 5  # utterances of the last round the report lists
ROUNDS = 12  # rounds the table shows at most (first and last included); the plot has them all


def worst(rows: list[dict], n: int = WORST) -> list[dict]:
    """The ``n`` worst utterances: highest WER first, then lowest similarity; a missing value counts as neither
    bad nor good (it sorts after every number of its kind)."""
    def key(r: dict) -> tuple:
        wer, sim = _finite(r.get("wer")), _finite(r.get("similarity"))
        return (wer is None, -(wer or 0.0), sim is None, sim or 0.0)

    return sorted(rows, key=key)[:n]


def _transcript(text) -> str:
    """A transcript cell: "-" without ASR (or when it failed), "(nothing)" when it heard no words."""
    return "-" if text is None else text if text.strip() else "(nothing)"


def _finite(v) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def report_section(doc: Doc, run: Run, audio_mb: float = AUDIO_MB, out: Path | None = None) -> None:
    """The "Speech quality" section; nothing for a run without ``quality_summary`` events."""
    curve = run.quality_curve()
    if curve.empty:
        return
    doc.heading("Speech quality")
    doc.para("Generations scored by an ASR model (word and character error rate of its transcript against the "
             "text asked for, after normalisation) and a speaker-verification model (cosine similarity to the "
             "reference voice); step 0 is the base model without the adapter, what the fine-tune must beat. "
             "WER and CER are pooled over a round's prompts, similarity is their mean.")
    if tiny_codec(run):
        doc.para(TINY_CODEC)
    summaries = run.frame("quality_summary")
    last = summaries.iloc[-1].to_dict() if not summaries.empty else {}
    doc.bullets([f"{name}: `{last[key]}`" for key, name in (("asr_model", "ASR model"),
                                                            ("speaker_model", "speaker model"),
                                                            ("reference", "reference voice"))
                 if isinstance(last.get(key), str) and last[key]])
    shown = spread(list(curve.index), ROUNDS)
    doc.table(["step", "model", "WER", "CER", "similarity"],
              [[int(step), "base" if curve.at[step, "baseline"] else "fine-tuned",
                *[fmt_num(_finite(curve.at[step, c]) if c in curve else None) for c in ("wer", "cer", "similarity")]]
               for step in shown])
    step, baseline, rows = run.quality_round()
    if not rows:
        return
    picked = worst(rows)
    which = "the base model's round" if baseline else f"the last round (step {step})"
    doc.heading(f"Worst utterances of {which}", 3)
    doc.para(f"The {len(picked)} of {len(rows)} with the highest WER, then the lowest similarity.")
    budget = Budget(int(audio_mb * 1e6))
    table = []
    for r in picked:
        audio = budget.cell(r.get("path"), r.get("file"))
        error = r.get("error")
        table.append([r.get("prompt"), audio if audio is not None else (error or "-"),
                      mel_cell([("generated", r.get("file"))], out,
                               f"{step_dir_name(step)}-quality-{r.get('prompt')}"),
                      r.get("text") or "-", _transcript(r.get("transcript")),
                      fmt_num(r.get("wer")), fmt_num(r.get("cer")), fmt_num(r.get("similarity"))])
    doc.table(["prompt", "generated", "mel", "text asked for", "transcript", "WER", "CER", "similarity"], table,
              align_right=False)
