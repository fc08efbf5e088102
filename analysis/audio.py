"""The audio the trainer writes at each eval, in reports and diffs: the label next to the teacher-forced
prediction (``eval_audio`` events) and free-running speech for fixed prompts (``generate_audio`` events).

In HTML each WAV is a player with the file inlined as a base64 data URI, so the page stays one file; the total
inlined is capped (``audio_mb``): all eval steps when they fit, else evenly spread ones (first and last
included), and what was left out is said. In Markdown each WAV is a relative link.
"""

from __future__ import annotations

from pathlib import Path

from . import plots
from .document import Audio, Doc, Picture
from .run import Run, ranges, spread
from .schema import step_dir_name

AUDIO_MB = 20.0  # default cap on the WAV bytes inlined into one HTML page (base64 adds a third)
STOPPED = {"eos": "at EOS", "max_length": "length limit (no EOS)"}
_INTRO = ("At each eval the trainer decodes a few eval samples to WAV: the label codes, and the codes the model "
          "predicts for each frame given the true previous frames (teacher forcing, argmax). `acc` is the share "
          "of codes predicted right, overall and per codebook (cb0 first). Generated samples are the model "
          "speaking the prompts on its own: they should stop at EOS, not at the length limit.")


TINY_CODEC = ("This run used `--preset tiny`: its audio is decoded by the preset's random tiny codec. Other codes give "
              "other sounds, so label and prediction can be told apart by ear and in the mel pictures, but it is not "
              "speech: judge the codes (acc), not the voice.")


def tiny_codec(run: Run) -> bool:
    """Whether the run's audio comes from the tiny preset's random codec: ``--preset tiny`` without a codec of the
    user's own (the preset fills ``model.audio_tokenizer`` with RUN_DIR/tiny/codec only where it is unset)."""
    config = run.config
    if config.get("preset") != "tiny":
        return False
    codec = (config.get("model") or {}).get("audio_tokenizer") or ""
    run_dir = run.start.get("run_dir")
    return not codec or (isinstance(run_dir, str) and Path(codec) == Path(run_dir) / "tiny" / "codec")


def _size(path: Path | None) -> int:
    try:
        return path.stat().st_size if path is not None else 0
    except OSError:
        return 0


def step_bytes(samples: dict[str, list[dict]]) -> int:
    """WAV bytes of one step's samples (``Run.audio_at``) that exist on this machine."""
    return sum(_size(r.get(k)) for r in samples["eval"] for k in ("label_file", "pred_file")) + \
        sum(_size(r.get("file")) for r in samples["generate"])


def choose(sizes: dict[int, int], budget: int) -> list[int]:
    """Steps to show: all when their audio fits the budget, else the most evenly spread steps that fit (first
    and last included), but at least the first, middle and last (within which the budget is kept per file)."""
    steps = sorted(sizes)
    if sum(sizes.values()) <= budget:
        return steps
    for n in range(len(steps) - 1, 3, -1):
        chosen = spread(steps, n)
        if sum(sizes[s] for s in chosen) <= budget:
            return chosen
    return spread(steps, 3)


class Budget:
    """Bytes left to inline; files are inlined in the order the page shows them, until the cap."""

    def __init__(self, limit: int):
        self.left, self.refused = limit, 0

    def cell(self, recorded, file: Path | None) -> Audio | None:
        if not isinstance(recorded, str) or not recorded:
            return None  # nothing was written (a reason or an error says why)
        inline = False
        if file is not None:
            size = _size(file)
            inline = size <= self.left
            self.left -= size if inline else 0
            self.refused += not inline
        return Audio(Path(recorded).name, file, inline)


def fmt_num(v, fmt: str = ".3f") -> str:
    return format(v, fmt) if isinstance(v, (int, float)) and v == v else "-"


def _int(v) -> str:
    return str(v) if isinstance(v, int) else "-"


def _acc_cb(values) -> str:
    return " ".join(fmt_num(v, ".2f") for v in values) if isinstance(values, list) and values else "-"


def _seconds(row: dict) -> str:
    label, pred = row.get("label_seconds"), row.get("pred_seconds")
    if isinstance(label, (int, float)) and isinstance(pred, (int, float)) and abs(label - pred) > 1e-6:
        return f"{label:.2f} / {pred:.2f}"
    return fmt_num(label if isinstance(label, (int, float)) else pred, ".2f")


def _stopped(row: dict) -> str:
    stopped = row.get("stopped")
    return STOPPED.get(stopped, str(stopped)) if stopped else "-"


def _eval_cells(row: dict | None, budget: Budget) -> list:
    """label, prediction, acc of one eval_audio event (or dashes when the run lacks that sample)."""
    if row is None:
        return ["-", "-", "-"]
    label = budget.cell(row.get("label_path"), row.get("label_file"))
    pred = budget.cell(row.get("pred_path"), row.get("pred_file"))
    reason = row.get("reason")
    return [label if label is not None else (f"no file: {reason}" if reason else "-"),
            pred if pred is not None else "-", fmt_num(row.get("acc"))]


def _generate_cells(row: dict | None, budget: Budget) -> list:
    """audio, stopped, seconds of one generate_audio event."""
    if row is None:
        return ["-", "-", "-"]
    audio = budget.cell(row.get("path"), row.get("file"))
    error = row.get("error")
    return [audio if audio is not None else (f"error: {error}" if error else "-"), _stopped(row),
            fmt_num(row.get("seconds"), ".2f")]


def _left_out(steps: list[int], shown: list[int], total: int, audio_mb: float, budget: Budget) -> list[str]:
    notes = []
    left = sorted(set(steps) - set(shown))
    if left:
        notes.append(f"Eval steps {ranges(left)} are left out ({total / 1e6:.1f} MB of audio in all, over the "
                     f"{audio_mb:g} MB cap on audio inlined into the HTML; `--audio-mb` raises it); their files are "
                     f"under `RUN_DIR/samples/`.")
    if budget.refused:
        notes.append(f"{budget.refused} file(s) of the steps shown are linked, not inlined: over the "
                     f"{audio_mb:g} MB cap.")
    return notes


def mel_cell(panels: list[tuple[str, Path | None]], out: Path | None, name: str) -> Picture | str:
    """A table cell with the mel spectrograms of these files side by side (written under ``out``/mel), or "-"."""
    if out is None:
        return "-"
    (out / "mel").mkdir(parents=True, exist_ok=True)
    path = plots.mel_panels(panels, out / "mel" / f"{name}.png")
    return Picture(path, "mel spectrogram") if path is not None else "-"


def report_section(doc: Doc, run: Run, audio_mb: float = AUDIO_MB, out: Path | None = None) -> None:
    """Players (HTML) or links (Markdown) for the run's eval audio; nothing for a run without any. With ``out``
    (where the report is written) each eval pair and each generation gets its mel spectrogram picture."""
    steps = run.audio_steps()
    if not steps:
        return
    doc.heading("Audio samples")
    doc.para(_INTRO)
    if tiny_codec(run):
        doc.para(TINY_CODEC)
    at = {s: run.audio_at(s) for s in steps}
    sizes = {s: step_bytes(at[s]) for s in steps}
    shown = choose(sizes, int(audio_mb * 1e6))
    budget = Budget(int(audio_mb * 1e6))
    tables = []
    for step in shown:
        ev = [[r.get("sample"), *_eval_cells(r, budget),
               mel_cell([("label", r.get("label_file")), ("prediction", r.get("pred_file"))], out,
                    f"{step_dir_name(step)}-sample-{r.get('sample')}"),
               _acc_cb(r.get("acc_cb")), _seconds(r), _int(r.get("n_frames"))] for r in at[step]["eval"]]
        gen = [[r.get("prompt"), r.get("text") or "-", *_generate_cells(r, budget),
                mel_cell([("generated", r.get("file"))], out, f"{step_dir_name(step)}-prompt-{r.get('prompt')}"),
                _int(r.get("new_tokens"))] for r in at[step]["generate"]]
        tables.append((step, ev, gen))
    doc.bullets(_left_out(steps, shown, sum(sizes.values()), audio_mb, budget))
    for step, ev, gen in tables:
        doc.heading(f"Audio at step {step}", 3)
        if ev:
            doc.table(["sample", "label", "prediction", "acc", "mel: label | prediction", "acc per codebook",
                       "seconds", "frames"], ev, align_right=False)
        if gen:
            doc.table(["prompt", "text", "generated", "stopped", "seconds", "mel", "new tokens"], gen,
                      align_right=False)


def _by(rows: list[dict], key: str) -> dict:
    return {r.get(key): r for r in rows}


def _keys(a: dict, b: dict) -> list:
    return sorted(dict.fromkeys([*a, *b]), key=lambda k: (not isinstance(k, int), k if isinstance(k, int) else 0,
                                                          str(k)))


def audio_diff(a: Run, b: Run) -> dict | None:
    """The eval audio of both runs matched by step and sample (prompt): acc and how generation stopped; None when
    neither run has audio."""
    sa, sb = a.audio_steps(), b.audio_steps()
    if not sa and not sb:
        return None
    common = sorted(set(sa) & set(sb))
    out = {"common_steps": common, "only_a": ranges(sorted(set(sa) - set(sb))),
           "only_b": ranges(sorted(set(sb) - set(sa))), "eval": [], "generate": []}
    for step in common:
        xa, xb = a.audio_at(step), b.audio_at(step)
        ea, eb = _by(xa["eval"], "sample"), _by(xb["eval"], "sample")
        for k in _keys(ea, eb):
            ra, rb = ea.get(k, {}), eb.get(k, {})
            out["eval"].append({"step": step, "sample": k, "acc_a": ra.get("acc"), "acc_b": rb.get("acc"),
                                "pred_a": _str(ra.get("pred_file")), "pred_b": _str(rb.get("pred_file")),
                                "label_a": _str(ra.get("label_file")), "label_b": _str(rb.get("label_file"))})
        ga, gb = _by(xa["generate"], "prompt"), _by(xb["generate"], "prompt")
        for k in _keys(ga, gb):
            ra, rb = ga.get(k, {}), gb.get(k, {})
            out["generate"].append({"step": step, "prompt": k, "text": ra.get("text") or rb.get("text"),
                                    "stopped_a": ra.get("stopped"), "stopped_b": rb.get("stopped"),
                                    "seconds_a": ra.get("seconds"), "seconds_b": rb.get("seconds"),
                                    "path_a": _str(ra.get("file")), "path_b": _str(rb.get("file"))})
    return out


def _str(path: Path | None) -> str | None:
    return None if path is None else str(path)


def diff_section(doc: Doc, a: Run, b: Run, names: tuple[str, str] = ("A", "B"), audio_mb: float = AUDIO_MB,
                 out: Path | None = None) -> None:
    """Both runs' audio at the same eval steps side by side; nothing when neither run has audio. With ``out``
    (where the diff is written) each row gets the mel spectrograms of both runs side by side."""
    sa, sb = a.audio_steps(), b.audio_steps()
    if not sa and not sb:
        return
    na, nb = names
    doc.heading("Audio samples, side by side")
    common = sorted(set(sa) & set(sb))
    notes = []
    if set(sa) - set(sb):
        notes.append(f"Eval steps with audio only in {na}: {ranges(sorted(set(sa) - set(sb)))}.")
    if set(sb) - set(sa):
        notes.append(f"Eval steps with audio only in {nb}: {ranges(sorted(set(sb) - set(sa)))}.")
    if not common:
        doc.para(f"No eval step has audio in both runs ({na}: {len(sa)} steps, {nb}: {len(sb)} steps).")
        doc.bullets(notes)
        return
    doc.para(f"Matched by step and sample: {na}'s label and prediction, then {nb}'s (teacher forced, argmax); "
             f"generated speech of each prompt.")
    tiny = [name for name, run in zip(names, (a, b), strict=True) if tiny_codec(run)]
    if tiny:
        doc.para(f"Run {' and '.join(tiny)}: " + TINY_CODEC)
    at = {s: (a.audio_at(s), b.audio_at(s)) for s in common}
    sizes = {s: step_bytes(at[s][0]) + step_bytes(at[s][1]) for s in common}
    shown = choose(sizes, int(audio_mb * 1e6))
    budget = Budget(int(audio_mb * 1e6))
    tables = []
    for step in shown:
        xa, xb = at[step]
        ea, eb = _by(xa["eval"], "sample"), _by(xb["eval"], "sample")
        ev = [[k, *_eval_cells(ea.get(k), budget), *_eval_cells(eb.get(k), budget),
               mel_cell([("label", (ea.get(k) or eb.get(k) or {}).get("label_file")),
                     (f"{na} prediction", (ea.get(k) or {}).get("pred_file")),
                     (f"{nb} prediction", (eb.get(k) or {}).get("pred_file"))], out,
                    f"{step_dir_name(step)}-sample-{k}")]
              for k in _keys(ea, eb)]
        ga, gb = _by(xa["generate"], "prompt"), _by(xb["generate"], "prompt")
        gen = [[k, _text(ga.get(k), gb.get(k), names), *_generate_cells(ga.get(k), budget),
                *_generate_cells(gb.get(k), budget),
                mel_cell([(na, (ga.get(k) or {}).get("file")), (nb, (gb.get(k) or {}).get("file"))], out,
                     f"{step_dir_name(step)}-prompt-{k}")] for k in _keys(ga, gb)]
        tables.append((step, ev, gen))
    doc.bullets(notes + _left_out(common, shown, sum(sizes.values()), audio_mb, budget))
    for step, ev, gen in tables:
        doc.heading(f"Audio at step {step}", 3)
        if ev:
            doc.table(["sample", f"{na} label", f"{na} prediction", f"{na} acc", f"{nb} label", f"{nb} prediction",
                       f"{nb} acc", f"mel: label | {na} | {nb}"], ev, align_right=False)
        if gen:
            doc.table(["prompt", "text", f"{na} generated", f"{na} stopped", f"{na} seconds", f"{nb} generated",
                       f"{nb} stopped", f"{nb} seconds", f"mel: {na} | {nb}"], gen, align_right=False)


def _text(ra: dict | None, rb: dict | None, names: tuple[str, str]) -> str:
    ta, tb = (ra or {}).get("text"), (rb or {}).get("text")
    if ta and tb and ta != tb:
        return f"{names[0]}: {ta} / {names[1]}: {tb}"
    return ta or tb or "-"
