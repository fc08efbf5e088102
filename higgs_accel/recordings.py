"""Raw recordings -> clips: finding the sources and their text, decoding, voice-activity segmentation (silero-vad),
cutting in pauses, and the audio checks and loudness normalisation each clip gets.

A recording is cut only where the voice-activity model hears a pause; what it cannot cut into clips inside the
length limits, and what fails an audio check (clipping, a low signal-to-noise ratio), is a ``Rejected`` segment with
its reason, never a silent loss. Every step is a function of the wave and ``CutSettings``, so the dataset builder
(``dataset_dir``) can run them in worker processes.
"""

from __future__ import annotations

import csv
import hashlib
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

from .config import ConfigError, DataConfig
from .data import audio_error, resample

OUT_RATE = 24000        # the codec's rate: every clip is written at it, mono
VAD_RATE = 16000        # silero-vad's rate
VAD_WINDOW = 512        # samples per silero-vad decision at 16 kHz (32 ms)
AUDIO_SUFFIXES = (".wav", ".flac", ".mp3", ".ogg", ".oga", ".opus", ".m4a", ".aac", ".aif", ".aiff", ".au", ".w64")
LJSPEECH_METADATA = "metadata.csv"
COMMON_VOICE_TSVS = ("validated.tsv", "train.tsv", "dev.tsv", "test.tsv", "other.tsv")


def _doc(default, doc: str):
    return field(default=default, metadata={"doc": doc})


@dataclass(frozen=True)
class CutSettings:
    """How recordings become clips. Defaults: the trainer's ``data.*`` length limits, EBU R128's -23 LUFS."""

    min_seconds: float = _doc(DataConfig.min_seconds, "shortest clip kept (silence margins included)")
    max_seconds: float = _doc(DataConfig.max_seconds, "longest clip kept (silence margins included)")
    pause_seconds: float = _doc(0.3, "a pause at least this long ends a clip; shorter ones stay inside it")
    margin_seconds: float = _doc(0.15, "silence kept before and after the speech of each clip (at most half the "
                                       "pause to the next speech)")
    vad_threshold: float = _doc(0.5, "silero-vad speech probability above which a 32 ms window is speech")
    lufs: float = _doc(-23.0, "integrated loudness every clip is normalised to (ITU-R BS.1770, pyloudnorm)")
    true_peak_db: float = _doc(-1.0, "true-peak ceiling in dBFS: the gain is lowered so no clip exceeds it")
    min_snr_db: float = _doc(15.0, "clips whose speech is less than this many dB above their quietest part are "
                                   "rejected")
    clip_fraction: float = _doc(0.001, "clips with more than this fraction of samples at full scale are rejected "
                                       "as clipped")

    def check(self) -> None:
        """Bad values as one ConfigError line naming the flag."""
        if self.max_seconds <= 0:
            raise ConfigError(f"--max-seconds must be greater than 0, got {self.max_seconds}")
        if self.min_seconds < 0 or self.min_seconds > self.max_seconds:
            raise ConfigError(f"--min-seconds must be between 0 and --max-seconds ({self.max_seconds}), "
                              f"got {self.min_seconds}")
        if self.pause_seconds <= 0 or self.margin_seconds < 0:
            raise ConfigError("--pause-seconds must be greater than 0 and --margin-seconds not negative")
        if not 0 < self.vad_threshold < 1:
            raise ConfigError(f"--vad-threshold must be between 0 and 1, got {self.vad_threshold}")
        if self.true_peak_db > 0 or self.lufs >= 0:
            raise ConfigError("--lufs must be below 0 and the true-peak ceiling at most 0 dBFS")


# ---------------------------------------------------------------- sources


@dataclass(frozen=True)
class Source:
    """One recording to process: its file, its speaker, and its transcript when one came with it (then the file is
    one utterance and is not transcribed)."""

    path: Path
    speaker: str
    text: str | None = None

    @property
    def key(self) -> str:
        """A file-name-safe id, the same on every run for the same file: names its clips and its record."""
        stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", self.path.stem)[:40] or "audio"
        return f"{stem}-{hashlib.sha1(str(self.path).encode()).hexdigest()[:10]}"


def find_sources(paths: list[str], speaker: str | None = None) -> list[Source]:
    """Every recording under ``paths`` (files, or folders searched recursively), each once, in a stable order.

    Text comes from an LJSpeech ``metadata.csv`` (``id|text|normalized text``, audio in ``wavs/``), a Common
    Voice TSV (``path``, ``sentence``, ``client_id``; audio in ``clips/``) or a sidecar ``.txt`` beside the audio.
    Speaker: ``speaker``, else Common Voice's ``client_id``, else the first sub-folder under the folder given (the
    data set's own folder for metadata layouts, the file's folder for a file given alone). A path that does not
    exist is a ConfigError."""
    found: dict[Path, Source] = {}
    for given in paths:
        root = Path(given)
        if not root.exists():
            raise ConfigError(f"{given}: not found")
        root = root.resolve()
        if root.is_file():
            _add(found, Source(root, speaker or root.parent.name, _sidecar_text(root)))
            continue
        for folder in sorted([root, *(p for p in root.rglob("*") if p.is_dir())]):
            for source in _layout_sources(folder, speaker):
                _add(found, source)
        for file in sorted(p for p in root.rglob("*") if p.suffix.lower() in AUDIO_SUFFIXES and p.is_file()):
            if file not in found:
                inner = file.relative_to(root).parts
                _add(found, Source(file, speaker or (inner[0] if len(inner) > 1 else root.name), _sidecar_text(file)))
    return list(found.values())


def _add(found: dict, source: Source) -> None:
    found.setdefault(source.path, source)


def _sidecar_text(audio: Path) -> str | None:
    side = audio.with_suffix(".txt")
    if not side.is_file():
        return None
    try:
        text = " ".join(side.read_text(encoding="utf-8-sig").split())
    except UnicodeDecodeError:
        raise ConfigError(f"{side}: not valid UTF-8; save it as UTF-8") from None
    return text or None


def _layout_sources(folder: Path, speaker: str | None) -> list[Source]:
    """The sources a data set layout in ``folder`` names, with their text (none when it has no layout)."""
    out = []
    meta = folder / LJSPEECH_METADATA
    if meta.is_file() and (folder / "wavs").is_dir():
        with open(meta, encoding="utf-8-sig", newline="") as f:
            for n, row in enumerate(csv.reader(f, delimiter="|", quoting=csv.QUOTE_NONE), start=1):
                if len(row) < 2 or not row[0].strip():
                    raise ConfigError(f"{meta}:{n}: expected 'id|text|normalized text', got {'|'.join(row)!r}")
                text = (row[2] if len(row) > 2 and row[2].strip() else row[1]).strip()
                out.append(Source((folder / "wavs" / f"{row[0].strip()}.wav").resolve(), speaker or folder.name,
                                  text or None))
    for name in COMMON_VOICE_TSVS:
        tsv = folder / name
        if tsv.is_file() and (folder / "clips").is_dir():
            with open(tsv, encoding="utf-8-sig", newline="") as f:
                rows = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
                if not {"path", "sentence"} <= set(rows.fieldnames or ()):
                    raise ConfigError(f"{tsv}: a Common Voice TSV needs the columns 'path' and 'sentence'")
                for row in rows:
                    out.append(Source((folder / "clips" / row["path"]).resolve(),
                                      speaker or row.get("client_id") or folder.name,
                                      (row["sentence"] or "").strip() or None))
    return out


# ---------------------------------------------------------------- decoding


class Unreadable(Exception):
    """A source that cannot be decoded: ``reason`` (a word) and ``detail``."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


def read_recording(path: Path, block_seconds: float = 60.0) -> tuple[np.ndarray, int]:
    """The file as mono float32 at its own rate, decoded in blocks so only the mono wave is ever whole in memory."""
    if path.is_file() and path.stat().st_size == 0:
        raise Unreadable("empty_file", "the file is 0 bytes long")
    try:
        info = sf.info(str(path))
        if info.frames == 0:
            raise Unreadable("empty_audio", "the file holds no audio frames")
        blocks = [b.mean(axis=1) for b in sf.blocks(str(path), blocksize=int(info.samplerate * block_seconds),
                                                    dtype="float32", always_2d=True)]
    except Unreadable:
        raise
    except Exception as e:  # noqa: BLE001 - whatever the decoder says is the reason
        raise Unreadable("unreadable", audio_error(e)) from None
    wave = np.concatenate(blocks) if blocks else np.zeros(0, np.float32)
    if not len(wave):
        raise Unreadable("empty_audio", "the file holds no audio frames")
    return wave, info.samplerate


# ---------------------------------------------------------------- voice activity


_VAD = None


def vad_model():
    """The silero-vad model shipped in its package (one per process). Importing silero sets torch to one thread;
    the caller's thread count is put back."""
    global _VAD
    if _VAD is None:
        threads = torch.get_num_threads()
        from silero_vad import load_silero_vad

        _VAD = load_silero_vad()
        torch.set_num_threads(threads)
    return _VAD


def speech_probs(wave16k: np.ndarray, model, warmup: int = 32, max_streams: int = 128, shortest: int = 128,
                 longest: int = 1024) -> np.ndarray:
    """silero-vad's speech probability per 32 ms window of a 16 kHz wave.

    The model is recurrent; one window at a time runs about 40x real time on a CPU thread. The wave is therefore
    cut into up to ``max_streams`` streams of ``shortest`` to ``longest`` windows run side by side as one batch,
    each starting ``warmup`` windows (1 s) early so its state has settled by its first own window (the warm-up
    decisions are dropped)."""
    n = -(-len(wave16k) // VAD_WINDOW)
    if n == 0:
        return np.zeros(0, np.float32)
    length = min(longest, max(shortest, -(-n // max_streams)))
    padded = np.zeros((n + warmup + length) * VAD_WINDOW, np.float32)
    padded[warmup * VAD_WINDOW: warmup * VAD_WINDOW + len(wave16k)] = wave16k
    windows = torch.from_numpy(padded).view(-1, VAD_WINDOW)  # window i of the wave is row i + warmup
    starts = list(range(0, n, length))
    span = warmup + length
    out = np.zeros(len(starts) * length, np.float32)
    with torch.inference_mode():
        for first in range(0, len(starts), max_streams):
            group = starts[first:first + max_streams]
            batch = torch.stack([windows[s: s + span] for s in group])
            model.reset_states()
            probs = torch.stack([model(batch[:, t], VAD_RATE)[:, 0] for t in range(span)], dim=1)
            out[first * length:(first + len(group)) * length] = probs[:, warmup:].reshape(-1).numpy()
    return out[:n]


def speech_regions(wave16k: np.ndarray, threshold: float, model=None) -> list[tuple[float, float]]:
    """Speech as (start, end) seconds: silero-vad's decisions turned into regions by its own rule, keeping every
    pause of 100 ms or more (the grouping into clips is ``plan_clips``'s)."""
    from silero_vad import get_speech_timestamps_from_probs

    probs = speech_probs(wave16k, model or vad_model())
    stamps = get_speech_timestamps_from_probs(probs.tolist(), sampling_rate=VAD_RATE, threshold=threshold,
                                              min_speech_duration_ms=250, min_silence_duration_ms=100,
                                              speech_pad_ms=0, audio_length_samples=len(wave16k))
    return [(s["start"] / VAD_RATE, s["end"] / VAD_RATE) for s in stamps]


# ---------------------------------------------------------------- cutting


@dataclass
class Rejected:
    """A stretch of a source that did not become a clip, and why."""

    start: float
    end: float
    reason: str
    detail: str
    text: str | None = None
    scores: dict = field(default_factory=dict)


def plan_clips(regions: list[tuple[float, float]], duration: float, s: CutSettings
               ) -> tuple[list[tuple[float, float]], list[Rejected]]:
    """Clips (start, end seconds, margins included) from speech regions, cutting only in pauses.

    Regions closer than ``pause_seconds`` form one utterance. An utterance longer than ``max_seconds`` is split at
    its longest pause, again until each part fits; speech without a pause to split at is rejected. One shorter than
    ``min_seconds`` joins its neighbour across the shorter pause when the two fit ``max_seconds``, else it is
    rejected. Each clip keeps ``margin_seconds`` of silence at both ends, at most half the pause to its neighbour."""
    groups: list[list[tuple[float, float]]] = []
    for r in regions:
        if groups and r[0] - groups[-1][-1][1] < s.pause_seconds:
            groups[-1].append(r)
        else:
            groups.append([r])
    rejected: list[Rejected] = []
    fitting: list[list[tuple[float, float]]] = []
    budget = s.max_seconds - 2 * s.margin_seconds

    def split(g):
        if g[-1][1] - g[0][0] <= budget:
            fitting.append(g)
        elif len(g) == 1:
            rejected.append(Rejected(g[0][0], g[0][1], "no_pause",
                                     f"{g[0][1] - g[0][0]:.1f} s of speech without a pause, over --max-seconds "
                                     f"{s.max_seconds:g}"))
        else:
            cut = max(range(1, len(g)), key=lambda i: g[i][0] - g[i - 1][1])
            split(g[:cut])
            split(g[cut:])

    for g in groups:
        split(g)
    merged = _merge_short(fitting, s.min_seconds - 2 * s.margin_seconds, budget)
    clips = []
    for i, g in enumerate(merged):
        before = (g[0][0] - merged[i - 1][-1][1]) / 2 if i else g[0][0]
        after = (merged[i + 1][0][0] - g[-1][1]) / 2 if i + 1 < len(merged) else duration - g[-1][1]
        start, end = g[0][0] - min(s.margin_seconds, before), g[-1][1] + min(s.margin_seconds, after)
        if end - start < s.min_seconds:
            rejected.append(Rejected(start, end, "too_short", f"{end - start:.2f} s, under --min-seconds "
                                                              f"{s.min_seconds:g}"))
        else:
            clips.append((start, end))
    return clips, sorted(rejected, key=lambda r: r.start)


def _merge_short(groups: list, shortest: float, longest: float) -> list:
    """Utterances shorter than ``shortest`` joined to the neighbour across the shorter pause while the result is at
    most ``longest`` long."""
    groups = [list(g) for g in groups]
    i = 0
    while i < len(groups):
        g = groups[i]
        if g[-1][1] - g[0][0] >= shortest:
            i += 1
            continue
        options = []
        if i > 0 and g[-1][1] - groups[i - 1][0][0] <= longest:
            options.append((g[0][0] - groups[i - 1][-1][1], i - 1))
        if i + 1 < len(groups) and groups[i + 1][-1][1] - g[0][0] <= longest:
            options.append((groups[i + 1][0][0] - g[-1][1], i + 1))
        if not options:
            i += 1
            continue
        _, j = min(options)
        lo, hi = min(i, j), max(i, j)
        groups[lo:hi + 1] = [groups[lo] + groups[hi]]
        i = lo
    return groups


def trim_utterance(regions: list[tuple[float, float]], duration: float, s: CutSettings
                   ) -> tuple[tuple[float, float] | None, Rejected | None]:
    """A file that is one utterance (its text came with it): the span from its first to its last speech plus the
    margins, or the reason it cannot be a clip."""
    if not regions:
        return None, Rejected(0.0, duration, "no_speech", "the voice-activity model heard no speech")
    start, end = max(0.0, regions[0][0] - s.margin_seconds), min(duration, regions[-1][1] + s.margin_seconds)
    if end - start > s.max_seconds:
        return None, Rejected(start, end, "too_long", f"{end - start:.1f} s of one utterance, over --max-seconds "
                                                      f"{s.max_seconds:g}")
    if end - start < s.min_seconds:
        return None, Rejected(start, end, "too_short", f"{end - start:.2f} s, under --min-seconds {s.min_seconds:g}")
    return (start, end), None


# ---------------------------------------------------------------- audio checks and loudness


def clipped_fraction(wave: np.ndarray, level: float = 0.999) -> float:
    return float(np.mean(np.abs(wave) >= level)) if len(wave) else 0.0


def snr_db(wave: np.ndarray, sample_rate: int, frame_seconds: float = 0.02) -> float:
    """How far the loud part of a clip (95th percentile of 20 ms frame levels) stands above its quiet part (10th
    percentile: the margins and the pauses), in dB; digital silence counts as -100 dBFS."""
    n = int(sample_rate * frame_seconds)
    frames = wave[: len(wave) // n * n].reshape(-1, n)
    if not len(frames):
        return 0.0
    rms = np.sqrt(np.mean(frames.astype(np.float64) ** 2, axis=1))
    loud, quiet = np.percentile(rms, 95), max(np.percentile(rms, 10), 1e-5)
    return float(20 * np.log10(max(loud, 1e-5) / quiet))


def true_peak_db(wave: np.ndarray) -> float:
    """Peak of the wave oversampled 4x (ITU-R BS.1770-4's true peak), in dBFS."""
    from scipy.signal import resample_poly

    peak = float(np.max(np.abs(resample_poly(wave.astype(np.float64), 4, 1)))) if len(wave) else 0.0
    return 20 * np.log10(max(peak, 1e-10))


def normalise_loudness(wave: np.ndarray, sample_rate: int, lufs: float, ceiling_db: float
                       ) -> tuple[np.ndarray, float] | None:
    """The wave at ``lufs`` integrated loudness (pyloudnorm), its gain lowered where its true peak would pass
    ``ceiling_db``; with the loudness reached. None for a wave with no measurable loudness (silence)."""
    import pyloudnorm

    loudness = pyloudnorm.Meter(sample_rate).integrated_loudness(wave.astype(np.float64))
    if not np.isfinite(loudness):
        return None
    gain = min(lufs - loudness, ceiling_db - true_peak_db(wave))
    return (wave * 10 ** (gain / 20)).astype(np.float32), float(loudness + gain)


def write_wav(path: Path, wave: np.ndarray, sample_rate: int) -> None:
    """A complete 16-bit WAV at ``path`` or none (written aside, then renamed over it)."""
    from .codes import CodeCache

    CodeCache._atomic(path, lambda f: sf.write(f, wave, sample_rate, subtype="PCM_16", format="WAV"))


# ---------------------------------------------------------------- one source


@dataclass
class Clip:
    """A clip written to disk: where it came from and what its audio measured."""

    file: str
    start: float
    end: float
    lufs: float
    snr_db: float
    text: str | None


@dataclass
class Cut:
    """What ``cut_source`` made of one source: clips written, stretches rejected, or the reason it was skipped;
    with its duration and the seconds each stage took."""

    seconds: float = 0.0
    clips: list[Clip] = field(default_factory=list)
    rejected: list[Rejected] = field(default_factory=list)
    skip: tuple[str, str] | None = None
    timing: dict = field(default_factory=dict)


def cut_source(source: Source, s: CutSettings, clips_dir: Path) -> Cut:
    """Decode, segment, check, normalise and write the clips of one source (``<key>-<n>.wav`` in ``clips_dir``).
    Clips of an earlier, unfinished attempt at the same source are removed first."""
    for old in clips_dir.glob(f"{source.key}-*.wav"):
        old.unlink()
    out = Cut()
    t0 = time.perf_counter()
    try:
        wave, rate = read_recording(source.path)
    except Unreadable as e:
        out.skip = (e.reason, e.detail)
        return out
    out.seconds = len(wave) / rate
    t1 = time.perf_counter()
    regions = speech_regions(resample(wave, rate, VAD_RATE), s.vad_threshold)
    t2 = time.perf_counter()
    if source.text is not None:
        span, problem = trim_utterance(regions, out.seconds, s)
        spans, out.rejected = ([span] if span else []), ([problem] if problem else [])
    else:
        spans, out.rejected = plan_clips(regions, out.seconds, s)
        if not regions:
            out.rejected.append(Rejected(0.0, out.seconds, "no_speech", "the voice-activity model heard no speech"))
    normalise = write = 0.0
    for start, end in spans:
        t3 = time.perf_counter()
        native = wave[int(start * rate): int(end * rate)]
        if (fraction := clipped_fraction(native)) > s.clip_fraction:
            out.rejected.append(Rejected(start, end, "clipped", f"{fraction:.2%} of samples at full scale"))
            continue
        clip = resample(native, rate, OUT_RATE)
        if (snr := snr_db(clip, OUT_RATE)) < s.min_snr_db:
            out.rejected.append(Rejected(start, end, "low_snr", f"{snr:.1f} dB, under --min-snr-db {s.min_snr_db:g}"))
            continue
        levelled = normalise_loudness(clip, OUT_RATE, s.lufs, s.true_peak_db)
        if levelled is None:
            out.rejected.append(Rejected(start, end, "silent", "no measurable loudness"))
            continue
        t4 = time.perf_counter()
        name = f"{source.key}-{len(out.clips):05d}.wav"
        write_wav(clips_dir / name, levelled[0], OUT_RATE)
        normalise += t4 - t3
        write += time.perf_counter() - t4
        out.clips.append(Clip(name, round(start, 3), round(end, 3), round(levelled[1], 2), round(snr, 1),
                              source.text))
    out.rejected.sort(key=lambda r: r.start)
    out.timing = {"decode": t1 - t0, "vad": t2 - t1, "normalise": normalise, "write": write}
    return out
