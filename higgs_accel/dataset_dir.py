"""The folder the ``dataset`` command builds, and building it: which sources are done, the clips and records each
finished source leaves, the train/val manifests, and the summary (events and a Markdown page).

Layout of DIR::

    clips/<source key>-<n>.wav     24 kHz mono 16-bit clips
    state/sources/<key>.json       one record per finished source: its clips, rejections or skip, timings
    train.jsonl, val.jsonl         manifests the trainer reads (``audio`` relative to DIR)
    events.jsonl, events/          the event log (JSON lines + Parquet, as training writes it)
    summary.md                     the summary of the last run

Resuming: a source whose record exists for the same file (size, modification time) and the same settings is not
redone. Every file is written aside and renamed, and a source's record is written only after its clips, so a kill
leaves either a finished source or one that is redone from the start (its stray clips removed first). The
manifests and the summary are rebuilt from the records at the end of every run.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import closing
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from pathlib import Path

import soundfile as sf
import torch

from analysis.schema import write_text_atomic

from .config import ConfigError
from .events import EventLog
from .recordings import OUT_RATE, Cut, CutSettings, Rejected, Source, cut_source
from .transcribe import MAX_CHARS_PER_SECOND, Transcriber, judge

CLIPS_DIR = "clips"
RECORDS_DIR = "state/sources"
RUN_ID_FILE = "state/run_id"
TRAIN_FILE, VAL_FILE, SUMMARY_FILE = "train.jsonl", "val.jsonl", "summary.md"
LENGTH_EDGES = (0.0, 2.0, 4.0, 6.0, 8.0, 10.0, 15.0, 20.0, 30.0)  # seconds; the last bin holds everything above


@dataclass
class BuildOptions:
    """Everything a build depends on besides its sources and folder."""

    cut: CutSettings = field(default_factory=CutSettings)
    asr_model: str = field(default="", metadata={"doc": "ASR model for clips without text (hub id or dir)"})
    language: str = field(default="", metadata={"doc": "language the Whisper ASR model is told (empty: detected)"})
    max_chars_per_second: float = field(default=MAX_CHARS_PER_SECOND,
                                        metadata={"doc": "transcripts longer than this per second are rejected"})
    val_fraction: float = field(default=0.05, metadata={"doc": "fraction of the sources held out for val.jsonl"})
    seed: int = field(default=0, metadata={"doc": "which sources are held out"})
    workers: int = field(default=1, metadata={"doc": "processes decoding and segmenting sources in parallel"})
    asr_batch_size: int = field(default=8, metadata={"doc": "clips per ASR pipeline call"})
    device: str = field(default="cpu", metadata={"doc": "device the ASR model runs on"})
    strict: bool = field(default=False, metadata={"doc": "fail, listing them, when any source was skipped"})

    def fingerprint(self) -> dict:
        """What a finished source's clips depend on: a record made with other values is redone."""
        return {**asdict(self.cut), "asr_model": self.asr_model, "language": self.language,
                "max_chars_per_second": self.max_chars_per_second}


@dataclass
class Built:
    """What a build did: sources processed now, sources already done, and the summary of the whole folder."""

    processed: int
    reused: int
    summary: dict
    skips: list[tuple[str, str, str]]   # (source, reason, detail)


# ---------------------------------------------------------------- records


def _record_path(out: Path, source: Source) -> Path:
    return out / RECORDS_DIR / f"{source.key}.json"


def _file_id(path: Path) -> dict:
    try:
        st = path.stat()
    except OSError:
        return {"size": None, "mtime_ns": None}
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _finished(out: Path, source: Source, fingerprint: dict) -> dict | None:
    """The record of ``source`` when it is finished for this file and these settings."""
    try:
        record = json.loads(_record_path(out, source).read_text())
    except (OSError, ValueError):
        return None
    same = record.get("settings") == fingerprint and {k: record.get(k) for k in ("size", "mtime_ns")} == \
        _file_id(source.path) and record.get("speaker") == source.speaker and record.get("given_text") == source.text
    return record if same else None


def _rejected_row(r: Rejected) -> dict:
    return {"start": round(r.start, 3), "end": round(r.end, 3), "reason": r.reason, "detail": r.detail,
            "text": r.text, **r.scores}


def _record(source: Source, cut: Cut, fingerprint: dict, clips: list[dict], rejected: list[Rejected]) -> dict:
    return {"source": str(source.path), "key": source.key, "speaker": source.speaker, "given_text": source.text,
            **_file_id(source.path), "settings": fingerprint, "seconds": round(cut.seconds, 3),
            "skip": {"reason": cut.skip[0], "detail": cut.skip[1]} if cut.skip else None, "clips": clips,
            "rejected": [_rejected_row(r) for r in sorted(rejected, key=lambda r: r.start)],
            "timing": {k: round(v, 4) for k, v in cut.timing.items()}}


# ---------------------------------------------------------------- transcription


class _LazyTranscriber:
    """The ASR model, loaded the first time a clip needs it: sources that bring their text never load it."""

    def __init__(self, opts: BuildOptions):
        self.opts, self.model = opts, None

    def __call__(self) -> Transcriber:
        if self.model is None:
            if not self.opts.asr_model:
                raise ConfigError("clips without text need --asr-model (e.g. openai/whisper-large-v3)")
            self.model = Transcriber.load(self.opts.asr_model, self.opts.language, self.opts.device,
                                          self.opts.asr_batch_size)
        return self.model


def _finish_source(source: Source, cut: Cut, out: Path, opts: BuildOptions, asr: _LazyTranscriber) -> dict:
    """The clips of one cut source as manifest lines, transcribing those without text; rejected ones deleted."""
    rejected = list(cut.rejected)
    todo = [c for c in cut.clips if c.text is None]
    transcripts = {}
    transcriber = asr() if todo else None  # loading the model is not this source's transcription time
    start = time.perf_counter()
    if todo:
        waves = [sf.read(str(out / CLIPS_DIR / c.file), dtype="float32")[0] for c in todo]
        transcripts = dict(zip((c.file for c in todo), transcriber.transcribe(waves, OUT_RATE)))
    cut.timing["asr"] = time.perf_counter() - start
    lines = []
    for c in cut.clips:
        line = {"audio": f"{CLIPS_DIR}/{c.file}", "text": c.text, "speaker": source.speaker,
                "source": str(source.path), "start": c.start, "end": c.end, "seconds": round(c.end - c.start, 3),
                "lufs": c.lufs, "snr_db": c.snr_db}
        if c.file in transcripts:
            t = transcripts[c.file]
            problem = judge(t, c.end - c.start, opts.max_chars_per_second)
            if problem:
                (out / CLIPS_DIR / c.file).unlink()
                rejected.append(Rejected(c.start, c.end, *problem, text=t.text, scores=t.scores()))
                continue
            line.update(text=t.text, asr_model=opts.asr_model, **t.scores())
        lines.append(line)
    return _record(source, cut, opts.fingerprint(), lines, rejected)


# ---------------------------------------------------------------- the split


def held_out(sources: list[Source], fraction: float, seed: int) -> set[Path]:
    """The sources whose clips go to val.jsonl: a seeded ``fraction`` of them (at least one when there are two or
    more and the fraction is above 0; never all), chosen by a hash of their path, so a recording never feeds both
    splits and the choice does not depend on the order sources were given in."""
    if fraction <= 0 or len(sources) < 2:
        return set()
    n = min(len(sources) - 1, max(1, round(fraction * len(sources))))
    order = sorted(sources, key=lambda s: hashlib.sha1(f"{seed}:{s.path}".encode()).hexdigest())
    return {s.path for s in order[:n]}


# ---------------------------------------------------------------- building


def _worker_init() -> None:
    torch.set_num_threads(1)  # one process per core: the VAD and the resampler each on their own


def _cuts(pending: list[Source], s: CutSettings, clips: Path, workers: int):
    """(source, cut) for each pending source as it finishes: in this process, or over ``workers`` processes."""
    if workers <= 1 or len(pending) <= 1:
        for source in pending:
            yield source, cut_source(source, s, clips)
        return
    pool = ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=_worker_init)
    try:
        futures = {pool.submit(cut_source, source, s, clips): source for source in pending}
        for future in as_completed(futures):
            yield futures[future], future.result()
    finally:  # an error in the main process (or Ctrl-C) stops the sources not started yet
        pool.shutdown(wait=True, cancel_futures=True)


def _clean_partial(out: Path) -> None:
    """Files a killed run was writing when it died (``*.pid.tmp``): never complete, never referenced."""
    for folder in (out / CLIPS_DIR, out / RECORDS_DIR):
        for tmp in folder.glob("*.tmp"):
            tmp.unlink()


def run_id(out: Path) -> str:
    """The id of the dataset folder's event log, kept across runs."""
    path = out / RUN_ID_FILE
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(uuid.uuid4().hex[:12], path)
    return path.read_text().strip()


def build(sources: list[Source], out: Path, opts: BuildOptions, log: EventLog,
          progress: Callable[[float, float], None] = lambda done, total: None) -> Built:
    """Process every source not yet finished in ``out``, then write the manifests and the summary from all
    records. ``progress(seconds, total)`` is called first with 0 and the seconds of audio to process, then with
    the seconds of each source as it is finished."""
    opts.cut.check()
    for folder in (CLIPS_DIR, RECORDS_DIR):
        (out / folder).mkdir(parents=True, exist_ok=True)
    _clean_partial(out)
    fingerprint = opts.fingerprint()
    records = {s.path: _finished(out, s, fingerprint) for s in sources}
    pending = [s for s in sources if records[s.path] is None]
    val = held_out(sources, opts.val_fraction, opts.seed)
    log.emit("dataset_start", out_dir=str(out), sources=len(sources), pending=len(pending), workers=opts.workers,
             settings=fingerprint)
    asr = _LazyTranscriber(opts)
    total = expected_seconds(pending)
    progress(0.0, total)
    with closing(_cuts(pending, opts.cut, out / CLIPS_DIR, opts.workers)) as cuts:
        for source, cut in cuts:
            record = _finish_source(source, cut, out, opts, asr)
            write_text_atomic(json.dumps(record, ensure_ascii=False), _record_path(out, source))
            records[source.path] = record
            _emit_source(log, record, "val" if source.path in val else "train")
            progress(record["seconds"], total)
    done = [records[s.path] for s in sources]
    skips = [(r["source"], r["skip"]["reason"], r["skip"]["detail"]) for r in done if r["skip"]]
    if opts.strict and skips:
        raise ConfigError(f"--strict: {len(skips)} source(s) skipped:\n" +
                          "\n".join(f"  {src}: {reason}: {detail}" for src, reason, detail in skips))
    for name, split in ((TRAIN_FILE, False), (VAL_FILE, True)):
        lines = [line for s, r in zip(sources, done) if (s.path in val) == split for line in r["clips"]]
        write_text_atomic("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in lines), out / name)
    summary = summarize(done, val)
    log.emit("dataset_summary", **summary)
    write_text_atomic(summary_markdown(summary, out), out / SUMMARY_FILE)
    return Built(len(pending), len(sources) - len(pending), summary, skips)


def _emit_source(log: EventLog, record: dict, split: str) -> None:
    if record["skip"]:
        log.emit("data_skip", level="warning", split="dataset", source=record["source"], line=0,
                 reason=record["skip"]["reason"], detail=record["skip"]["detail"])
        return
    for r in record["rejected"]:
        log.emit("dataset_reject", source=record["source"], **r)
    log.emit("dataset_source", source=record["source"], speaker=record["speaker"], split=split,
             seconds=record["seconds"], clips=len(record["clips"]), rejected=len(record["rejected"]),
             clip_seconds=round(sum(c["seconds"] for c in record["clips"]), 3), timing=record["timing"])


# ---------------------------------------------------------------- summary


def summarize(records: list[dict], val: set[Path]) -> dict:
    """Hours in and kept, clips per split and speaker, a length histogram, rejections and skips per reason, and
    the seconds each stage took (over the records, so resumed runs count every source once)."""
    clips = [(c, Path(r["source"]) in val) for r in records for c in r["clips"]]
    lengths = [c["seconds"] for c, _ in clips]
    counts = [0] * len(LENGTH_EDGES)
    for x in lengths:
        counts[max(i for i, e in enumerate(LENGTH_EDGES) if x >= e)] += 1
    timing = Counter()
    for r in records:
        timing.update(r["timing"])
    return {
        "sources": len(records), "sources_skipped": sum(bool(r["skip"]) for r in records),
        "hours_in": round(sum(r["seconds"] for r in records) / 3600, 5),
        "hours_kept": round(sum(lengths) / 3600, 5),
        "clips": len(clips), "train_clips": sum(not v for _, v in clips), "val_clips": sum(v for _, v in clips),
        "speakers": dict(sorted(Counter(c["speaker"] for c, _ in clips).items())),
        "rejected_by_reason": dict(sorted(Counter(x["reason"] for r in records for x in r["rejected"]).items())),
        "skipped_by_reason": dict(sorted(Counter(r["skip"]["reason"] for r in records if r["skip"]).items())),
        "length_edges": [float(e) for e in LENGTH_EDGES], "length_counts": counts,
        "timing": {k: round(v, 3) for k, v in sorted(timing.items())},
    }


def summary_markdown(summary: dict, out: Path) -> str:
    rows = [f"# Dataset {out}", "",
            f"- in: {summary['hours_in']:.3f} h from {summary['sources']} sources "
            f"({summary['sources_skipped']} skipped)",
            f"- kept: {summary['hours_kept']:.3f} h in {summary['clips']} clips "
            f"({summary['train_clips']} train, {summary['val_clips']} val)", "",
            f"Train on it: `higgs-accel train data.train_manifest={out / TRAIN_FILE} "
            f"data.val_manifest={out / VAL_FILE}`", ""]

    def table(title: str, head: str, items: dict, unit: str = "clips") -> None:
        if items:
            rows.extend([f"## {title}", "", f"| {head} | {unit} |", "| --- | --- |",
                         *(f"| {k} | {v} |" for k, v in items.items()), ""])

    edges = summary["length_edges"]
    table("Clip lengths", "seconds", {f"{lo:g}-{hi:g}" if hi else f"{lo:g}+": n for lo, hi, n in
                                      zip(edges, [*edges[1:], None], summary["length_counts"])})
    table("Speakers", "speaker", summary["speakers"])
    table("Rejected segments", "reason", summary["rejected_by_reason"], "segments")
    table("Skipped sources", "reason", summary["skipped_by_reason"], "sources")
    return "\n".join(rows)


def expected_seconds(sources: list[Source]) -> float:
    """Seconds of audio the sources hold, from their headers (0 for one that cannot be read): the progress total."""
    total = 0.0
    for s in sources:
        try:
            info = sf.info(str(s.path))
            total += info.frames / info.samplerate
        except Exception:  # noqa: BLE001 - an unreadable source is skipped later, with its reason
            continue
    return total

