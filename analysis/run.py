"""``load_run``: one run's events as pandas DataFrames, plus answers to the questions people ask first."""

from __future__ import annotations

import difflib
import json
import re
from datetime import datetime
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from .load import read_events, run_status
from .schema import EVENTS_DIR, EVENTS_FILE, SAMPLES_DIR, parse_time, step_dir_name

LOSS_FIELDS = ("loss", "text_loss", "audio_loss")
# The event family behind each phase of ``Run.metrics``: what --fail-if-worse PHASE.METRIC names.
METRIC_FAMILIES = {"train": "train_step", "eval": "eval", "quality": "quality_summary"}
_CB = re.compile(r"audio_(acc|loss)_cb(\d+)$")
_MISMATCH_COLUMNS = ("step", "modality", "codebook", "sample", "first_pos", "first_pred", "first_label")


# The event families the trainer writes (docs/events.md, one section each): a run without events of one of them
# still answers ``run.<family>`` with an empty frame; any other name is a typo and raises AttributeError.
EVENT_FAMILIES = ("run_start", "data_skip", "data_summary", "train_step", "eval", "pred_slice", "eval_audio",
                  "generate_audio", "quality", "quality_summary", "checkpoint", "adapter_saved", "run_resume",
                  "checkpoint_skipped", "run_lock_taken_over", "log_error", "library_log", "run_end")


def load_run(path: str | Path) -> Run:
    """Read RUN_DIR (Parquet, completed from events.jsonl for crashed or running runs)."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such run directory")
    if not (path / EVENTS_FILE).is_file() and not (path / EVENTS_DIR).is_dir():
        raise FileNotFoundError(f"{path}: neither events.jsonl nor events/ found; is this a run directory?")
    return Run(path, read_events(path))


def load_runs(paths, table: str = "train_step") -> pd.DataFrame:
    """One event table of several runs as one frame, with a first column ``run`` naming each run (its directory
    name; the parent's name is added when two runs share one): ``load_runs(dirs).groupby("run")``."""
    runs = [load_run(p) for p in paths]
    names = [r.path.name for r in runs]
    names = [f"{r.path.parent.name}/{n}" if names.count(n) > 1 else n for r, n in zip(runs, names, strict=True)]
    if runs and table not in runs[0].table_names():
        getattr(runs[0], table)  # raises AttributeError naming the tables
    frames = [r.frame(table).assign(run=name) for r, name in zip(runs, names, strict=True)]
    frames = [f for f in frames if not f.empty]
    if not frames:
        return pd.DataFrame(columns=["run"])
    df = pd.concat(frames, ignore_index=True)
    return df[["run", *[c for c in df.columns if c != "run"]]]


def _decode(value):
    """Nested values are JSON text in Parquet and in the tables built from events.jsonl."""
    if isinstance(value, str) and value[:1] in "{[":
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


class Run:
    """A run directory's events. ``run.<family>`` is a DataFrame per event family (``run.train_step``,
    ``run.eval``, ``run.pred_slice``, ...; empty if the run has none), ``run.tables`` the pyarrow tables.
    Steps redone after a resume appear once (the superseded rule), repeated events are dropped."""

    def __init__(self, path: Path, tables: dict[str, pa.Table]):
        self.path = Path(path)
        self.tables = tables
        self._frames: dict[str, pd.DataFrame] = {}
        self._phase_masks: dict[str, pa.ChunkedArray] = {}
        self._mismatch: dict[str, pd.DataFrame] = {}

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r}, status={self.status!r}, steps={len(self.steps)})"

    def __getattr__(self, name: str) -> pd.DataFrame:
        if name.startswith("_"):
            raise AttributeError(name)
        if name in self.tables or name in EVENT_FAMILIES:
            return self.frame(name)
        names = self.table_names()
        near = difflib.get_close_matches(name, names, n=1)
        hint = f"did you mean {near[0]!r}? " if near else ""
        raise AttributeError(f"{type(self).__name__} has no attribute or event table {name!r}; {hint}"
                             f"tables: {', '.join(names)}")

    def __dir__(self) -> list[str]:
        return sorted(set(super().__dir__()) | set(self.table_names()))

    def table_names(self) -> list[str]:
        """Every event table ``run.<name>`` answers: the run's own, and the documented families it has none of."""
        return sorted(set(self.tables) | set(EVENT_FAMILIES))

    def frame(self, family: str) -> pd.DataFrame:
        """All events of one family, in seq order; an empty DataFrame if there are none."""
        if family not in self._frames:
            table = self.tables.get(family)
            if table is None:
                self._frames[family] = pd.DataFrame()
            else:
                if "seq" in table.column_names:
                    table = table.sort_by("seq")
                self._frames[family] = _pandas(table)
        return self._frames[family]

    # ------------------------------------------------------------ run level

    def _events(self, family: str) -> list[dict]:
        table = self.tables.get(family)
        if table is None:
            return []
        rows = table.sort_by("seq").to_pylist() if "seq" in table.column_names else table.to_pylist()
        return [{k: _decode(v) for k, v in r.items()} for r in rows]

    @cached_property
    def start(self) -> dict:
        """The last run_start event (a resumed run has one per launch), nested fields decoded."""
        events = self._events("run_start")
        return events[-1] if events else {}

    @property
    def config(self) -> dict:
        return self.start.get("config") or {}

    @cached_property
    def end(self) -> dict | None:
        """run_end of the latest launch; None if that launch has not ended (crashed or still running). A start
        that failed before training (a resume with a bad path, say) does not hide how the launch before it ended."""
        last_start = self.start.get("seq", -1)
        ends = [e for e in self._events("run_end") if e.get("seq", 0) > last_start]
        trained = [e for e in ends if e.get("status") != "failed"]
        return (trained or ends or [None])[-1]

    @property
    def start_seconds(self) -> list[float]:
        """The wall time of each start of the run, in order (from the latest run_end's ``start_elapsed_s``; a log
        written before that field: its ``elapsed_s`` alone); empty when the launch has not ended."""
        end = self.end or {}
        times = end.get("start_elapsed_s")
        if times is not None and not isinstance(times, str) and len(times):  # a list, or an array from Parquet
            return [float(t) for t in times]
        elapsed = end.get("elapsed_s")
        return [float(elapsed)] if isinstance(elapsed, (int, float)) else []

    def elapsed_text(self) -> str:
        """The run's training time over all its starts, as a report says it ("" when unknown):
        ``12.3 s`` for one start, ``100.4 s over 2 starts (94.6 s + 5.8 s)`` for a resumed run."""
        times = self.start_seconds
        if not times:
            return ""
        if len(times) == 1:
            return f"{times[0]:.1f} s"
        return f"{sum(times):.1f} s over {len(times)} starts ({' + '.join(f'{t:.1f} s' for t in times)})"

    @cached_property
    def last_event_time(self) -> datetime | None:
        latest = None
        for table in self.tables.values():
            if "ts" in table.column_names and table.num_rows:
                ts = pc.max(table.column("ts")).as_py()
                latest = ts if latest is None or (ts and ts > latest) else latest
        return latest if isinstance(latest, datetime) else parse_time(latest)

    @property
    def status(self) -> str:
        return run_status(self.end, self.last_event_time)

    @cached_property
    def data_summary(self) -> dict[str, dict]:
        """split -> kept, skipped, skipped_by_reason (the latest launch's count when a run was resumed)."""
        return {e["split"]: e for e in self._events("data_summary")}

    # ------------------------------------------------------------ metrics

    def metrics(self, phase: str = "train") -> pd.DataFrame:
        """train_step (phase "train"), eval (phase "eval") or scored generation rounds of the fine-tuned model
        (phase "quality": ``quality_summary`` events that are not the baseline) metrics, indexed by optimizer
        step, one row each."""
        df = self.frame(METRIC_FAMILIES[phase])
        if phase == "quality" and not df.empty:
            df = df[~_is_baseline(df)]
        if df.empty or "step" not in df:
            return pd.DataFrame(index=pd.Index([], name="step", dtype="int64"))
        return df.drop_duplicates("step", keep="last").set_index("step").sort_index()

    def quality_curve(self) -> pd.DataFrame:
        """WER, CER and similarity of each scored generation round by step (``metrics("quality")``), with the base
        model's round (``baseline`` true, the last one) as the step-0 row, where the fine-tune starts from. A
        ``baseline`` column says which row that is. Empty without ``quality_summary`` events."""
        rounds = self.metrics("quality").assign(baseline=False)
        summaries = self.frame("quality_summary")
        base = summaries[_is_baseline(summaries)] if not summaries.empty else summaries
        if not base.empty:
            row = base.iloc[[-1]].assign(step=0, baseline=True).set_index("step")
            rounds = pd.concat([row, rounds.drop(index=0, errors="ignore")])
        return rounds[[c for c in ("wer", "cer", "similarity", "baseline") if c in rounds]]

    def quality_round(self) -> tuple[int | None, bool, list[dict]]:
        """(step, baseline, the ``quality`` events) of the last scored round of the fine-tuned model, else of the
        base model's round; each event also holds ``file``, the scored WAV on this machine (``sample_file``) or
        None. (None, False, []) without ``quality`` events."""
        rows = [e for e in self._events("quality") if isinstance(e.get("step"), int)]
        tuned = [e for e in rows if not e.get("baseline")]
        rows = tuned or rows
        if not rows:
            return None, False, []
        step = max(e["step"] for e in rows)
        last = {}
        for e in rows:
            if e["step"] == step:
                last[e.get("prompt")] = e  # a repeated event (a resumed round): the last one counts
        return step, not tuned, [{**e, "file": self.sample_file(e.get("path"), step)} for e in last.values()]

    @property
    def steps(self) -> list[int]:
        return self.metrics("train").index.tolist()

    def loss_curve(self, phase: str = "train") -> pd.DataFrame:
        """Total, text and audio loss by step."""
        m = self.metrics(phase)
        return m[[c for c in LOSS_FIELDS if c in m]]

    def codebooks(self) -> list[int]:
        cols = list(self.metrics("train").columns) + list(self.metrics("eval").columns)
        return sorted({int(m.group(2)) for c in cols if (m := _CB.match(c))})

    def _per_codebook(self, kind: str, phase: str) -> pd.DataFrame:
        m = self.metrics(phase)
        cols = {cb: f"audio_{kind}_cb{cb}" for cb in self.codebooks() if f"audio_{kind}_cb{cb}" in m}
        out = pd.DataFrame({cb: m[c].astype("float64") for cb, c in cols.items()}, index=m.index)
        out.columns.name = "codebook"
        return out

    def codebook_accuracy(self, phase: str = "train") -> pd.DataFrame:
        """Matrix step x codebook of audio accuracy (NaN where a step had no targets)."""
        return self._per_codebook("acc", phase)

    def codebook_loss(self, phase: str = "train") -> pd.DataFrame:
        return self._per_codebook("loss", phase)

    # ------------------------------------------------------------ prediction slices

    def _phase_mask(self, phase: str | None) -> pa.ChunkedArray | None:
        """Which pred_slice rows belong to ``phase`` (None: all rows), computed once per phase."""
        table = self.tables["pred_slice"]
        if phase is None or "phase" not in table.column_names:
            return None
        if phase not in self._phase_masks:
            self._phase_masks[phase] = pc.equal(table.column("phase"), phase)
        return self._phase_masks[phase]

    def _slice_rows(self, phase: str | None, columns: tuple[str, ...] | None = None,
                    step: int | None = None) -> pa.Table | None:
        """The pred_slice rows of a phase (and step), only ``columns`` when given: a long run holds millions of
        token lists, and copying the ones a question does not need costs more than answering it."""
        table = self.tables.get("pred_slice")
        if table is None or table.num_rows == 0:
            return None
        mask = self._phase_mask(phase)
        if step is not None:
            at = pc.equal(table.column("step"), step)
            mask = at if mask is None else pc.and_(mask, at)
        if columns is not None:
            table = table.select([c for c in columns if c in table.column_names])
        if mask is not None:
            table = _rows_where(table, mask)
        return table if table.num_rows else None

    def slice_steps(self, phase: str = "train") -> list[int]:
        table = self._slice_rows(phase, ("step",))
        if table is None:
            return []
        return sorted(pc.unique(table.column("step")).to_pylist())

    def slice_samples(self, phase: str = "train") -> pd.DataFrame:
        """step, sample and a key per sample logged in slices: ``sample_key`` (a content hash), or in logs from
        before it the labels of the sample's text slice, which tell samples apart just as well."""
        table = self._slice_rows(phase, ("step", "sample", "modality", "sample_key", "first_label", "last_label"))
        if table is None:
            return pd.DataFrame(columns=["step", "sample", "key"])
        df = table.to_pandas()
        if "sample_key" in df and df["sample_key"].notna().all():
            df["key"] = df["sample_key"]
        else:
            df = df[df["modality"] == "text"].copy()
            df["key"] = [repr((list(f), list(la))) for f, la in zip(df["first_label"], df["last_label"], strict=True)]
        return df[["step", "sample", "key"]].drop_duplicates(["step", "sample"]).reset_index(drop=True)

    def same_sample_steps(self, other: Run, phase: str = "train") -> list[int]:
        """Steps at which this run and ``other`` logged slices of the same sample (at the same batch index)."""
        joined = self.slice_samples(phase).merge(other.slice_samples(phase), on=["step", "sample", "key"])
        return sorted(int(s) for s in joined["step"].unique())

    def slices_at(self, step: int, phase: str | None = "train") -> pd.DataFrame:
        """The prediction slices logged at ``step`` (text rows first, then audio by codebook and sample), with
        ``first_mismatch``: the index of the first target in the first window where prediction != label."""
        table = self._slice_rows(phase, step=step)
        if table is None:
            return pd.DataFrame()
        df = table.to_pandas()
        df["first_mismatch"] = _first_mismatch(table)
        order = [c for c in ("phase", "modality", "codebook", "sample") if c in df]
        return df.sort_values(order, key=_text_first, na_position="first").reset_index(drop=True)

    # ------------------------------------------------------------ audio samples

    @cached_property
    def _audio(self) -> dict[int, dict[str, list[dict]]]:
        by_step: dict[int, dict[str, list[dict]]] = {}
        for family, kind, key in (("eval_audio", "eval", "sample"), ("generate_audio", "generate", "prompt")):
            rows: dict[tuple, dict] = {}
            for e in self._events(family):
                if isinstance(e.get("step"), int):
                    rows[e["step"], e.get(key)] = e  # a repeated event: the last one counts
            for (step, _), e in sorted(rows.items(), key=lambda kv: (kv[0][0], _order(kv[0][1]))):
                by_step.setdefault(step, {"eval": [], "generate": []})[kind].append(e)
        return dict(sorted(by_step.items()))

    def audio_steps(self) -> list[int]:
        """Eval steps with audio samples (``eval_audio`` or ``generate_audio`` events)."""
        return list(self._audio)

    def audio_at(self, step: int) -> dict[str, list[dict]]:
        """The audio samples of one eval step: ``{"eval": [...], "generate": [...]}``, one dict per
        ``eval_audio`` event (by sample) and per ``generate_audio`` event (by prompt), every field of the event.
        Each also holds the WAV files found on this machine, as Paths or None: ``pred_file`` and ``label_file``
        (eval), ``file`` (generate). A recorded path that does not exist here (a run copied from another
        machine) is looked up by file name under RUN_DIR/samples/<step dir>/."""
        found = self._audio.get(step, {"eval": [], "generate": []})
        out = {"eval": [], "generate": []}
        for e in found["eval"]:
            out["eval"].append({**e, "pred_file": self.sample_file(e.get("pred_path"), step),
                                "label_file": self.sample_file(e.get("label_path"), step)})
        for e in found["generate"]:
            out["generate"].append({**e, "file": self.sample_file(e.get("path"), step)})
        return out

    def sample_file(self, recorded, step: int | None = None) -> Path | None:
        """The file an audio event recorded, on this machine: the path itself, else the same file name under
        RUN_DIR/samples/ (in the recorded step folder, or in step-<8 digits>), else None."""
        if not isinstance(recorded, str) or not recorded:
            return None
        path = Path(recorded)
        candidates = [path] if path.is_absolute() else [self.path / path, path]
        root = self.path / SAMPLES_DIR
        if path.parent.name:
            candidates.append(root / path.parent.name / path.name)
        if isinstance(step, int):
            candidates.append(root / step_dir_name(step) / path.name)
        return next((c for c in candidates if c.is_file()), None)

    def first_mismatch(self, phase: str = "train") -> pd.DataFrame:
        """Per slice: step, modality, codebook, sample and where predictions first diverge from the labels
        (``first_mismatch``: index among the first K targets, NaN when all K match; ``first_mismatch_pos``:
        that target's position in the sequence)."""
        if phase not in self._mismatch:
            self._mismatch[phase] = _mismatch_frame(self._slice_rows(phase, _MISMATCH_COLUMNS))
        return self._mismatch[phase].copy()


def _is_baseline(df: pd.DataFrame) -> pd.Series:
    """Which ``quality`` / ``quality_summary`` rows score the base model (``baseline`` true)."""
    if "baseline" not in df:
        return pd.Series(False, index=df.index)
    return df["baseline"].map(lambda v: v is True or v == 1).astype(bool)


def _rows_where(table: pa.Table, mask) -> pa.Table:
    """``table.filter(mask)``, without the copy when the mask keeps every row (a run without eval slices) or none."""
    kept = pc.sum(pc.fill_null(mask, False)).as_py() or 0
    if kept == table.num_rows:
        return table
    return table.slice(0, 0) if kept == 0 else table.filter(mask)


def _pandas(table: pa.Table) -> pd.DataFrame:
    """``table`` as pandas, an integer column that holds nulls (``codebook`` of text slices) as nullable ``Int64``
    rather than float64."""
    df = table.to_pandas()
    for name, column in zip(table.column_names, table.columns):
        if pa.types.is_integer(column.type) and column.null_count:
            df[name] = df[name].astype("Int64")
    return df


def _mismatch_frame(table: pa.Table | None) -> pd.DataFrame:
    cols = ["step", "modality", "codebook", "sample"]
    if table is None:
        return pd.DataFrame(columns=[*cols, "first_mismatch", "first_mismatch_pos", "window"])
    df = table.select([c for c in cols if c in table.column_names]).to_pandas()
    first = _first_mismatch(table)
    df["first_mismatch"] = first
    positions = table.column("first_pos").combine_chunks()
    df["window"] = pc.fill_null(pc.list_value_length(positions), 0).to_numpy(zero_copy_only=False)
    # The sequence position of that target: index into each row's slice of the flattened positions.
    flat = pc.list_flatten(positions).to_numpy(zero_copy_only=False).astype("float64")
    offsets = positions.offsets.to_numpy()
    starts = offsets[:-1] - offsets[0]
    found = ~np.isnan(first) & (np.nan_to_num(first, nan=0) < df["window"].to_numpy())
    pos = np.full(len(df), np.nan)
    pos[found] = flat[starts[found] + first[found].astype("int64")]
    df["first_mismatch_pos"] = pos
    return df


def _text_first(col: pd.Series) -> pd.Series:
    return col.map({"text": 0, "audio": 1}) if col.name == "modality" else col


def _first_mismatch(table: pa.Table) -> np.ndarray:
    """Index of the first prediction != label among the first K targets of each slice; NaN if none differs."""
    preds = table.column("first_pred").combine_chunks()
    labels = table.column("first_label").combine_chunks()
    out = np.full(table.num_rows, np.nan)
    flat_p = pc.list_flatten(preds).to_numpy(zero_copy_only=False)
    flat_l = pc.list_flatten(labels).to_numpy(zero_copy_only=False)
    if len(flat_p) != len(flat_l):  # windows of unequal length: compare row by row
        for i, (p, lab) in enumerate(zip(preds.to_pylist(), labels.to_pylist(), strict=False)):
            bad = [k for k, (a, b) in enumerate(zip(p or [], lab or [], strict=False)) if a != b]
            out[i] = bad[0] if bad else np.nan
        return out
    parents = pc.list_parent_indices(preds).to_numpy(zero_copy_only=False)
    lengths = pc.fill_null(pc.list_value_length(preds), 0).to_numpy(zero_copy_only=False)
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    within = np.arange(len(flat_p)) - offsets[parents]
    miss = flat_p != flat_l
    rows, first = np.unique(parents[miss], return_index=True)
    out[rows] = within[miss][first]
    return out


def _order(value) -> tuple:
    """Sort key for sample and prompt indices that may be null or odd in hand-made events."""
    return (0, value, "") if isinstance(value, (int, float)) else (1, 0, str(value))


def spread(items: list, n: int) -> list:
    """At most n items, evenly spread, first and last included."""
    if len(items) <= n:
        return items
    if n <= 1:
        return items[-1:] if n == 1 else []
    idx = np.unique(np.linspace(0, len(items) - 1, n).round().astype(int))
    return [items[i] for i in idx]


def ranges(steps: list[int]) -> str:
    """[1, 2, 3, 7, 9, 10] -> "1-3, 7, 9-10"."""
    out, start, prev = [], None, None
    for s in sorted(steps):
        if start is None:
            start = prev = s
        elif s == prev + 1:
            prev = s
        else:
            out.append(f"{start}-{prev}" if prev != start else str(start))
            start = prev = s
    if start is not None:
        out.append(f"{start}-{prev}" if prev != start else str(start))
    return ", ".join(out)


def better(metric: str) -> str | None:
    """Which direction is better for a metric name: "lower" (losses, error rates, time, memory), "higher"
    (accuracy, speaker similarity, throughput) or None (lr, counts)."""
    name = metric.rsplit(".", 1)[-1]
    if "loss" in name or name in ("grad_norm", "step_time_s", "peak_mem_mb", "wer", "cer"):
        return "lower"
    if "acc" in name or name in ("samples_per_s", "tokens_per_s", "similarity"):
        return "higher"
    return None
