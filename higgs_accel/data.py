"""Data in: JSONL manifests, saved `datasets` datasets and audiofolders -> checked samples -> padded batches.

Audio is read through soundfile (wav, flac, ogg, mp3, any rate and channel count), downmixed to mono and
resampled to the codec's rate. Every bad sample becomes a ``Skip`` that names the file and line (or dataset
index) and the reason; it never stops a run.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

from .chat import IGNORE, special_tokens_in
from .config import ConfigError
from .family import build_example, sequence_lengths

MANIFEST_SUFFIXES = (".jsonl", ".json")
AUDIOFOLDER_METADATA = ("metadata.jsonl", "metadata.csv")
BUFFER_REPR = re.compile(r"<_io\.BytesIO object at 0x[0-9a-fA-F]+>:?\s*")


# ---------------------------------------------------------------- audio references

@dataclass(frozen=True)
class FileAudio:
    """Audio stored as a file."""

    path: Path

    def exists(self) -> bool:
        return self.path.is_file()

    def read(self) -> bytes:
        return self.path.read_bytes()

    def __str__(self) -> str:
        return str(self.path)


@dataclass(frozen=True)
class DatasetAudio:
    """Audio stored in a row of a `datasets` dataset (bytes, or a path), read only when needed."""

    dataset: object
    index: int
    column: str

    def _value(self) -> dict:
        return self.dataset[self.index][self.column]

    def exists(self) -> bool:
        v = self._value()
        return bool(v.get("bytes")) or (bool(v.get("path")) and Path(v["path"]).is_file())

    def read(self) -> bytes:
        v = self._value()
        return v["bytes"] if v.get("bytes") else Path(v["path"]).read_bytes()

    def __str__(self) -> str:
        return f"{self.column}[{self.index}]"


@dataclass
class Sample:
    """One training example: the target utterance and, for voice cloning, a reference."""

    source: str                  # manifest path or dataset dir
    line: int                    # 1-based manifest (or metadata.csv) line, or 0-based dataset row
    audio: FileAudio | DatasetAudio
    text: str
    speaker: str = ""
    ref_audio: FileAudio | DatasetAudio | None = None
    ref_text: str = ""
    scene: str = ""
    system: str = ""
    codes: str = ""              # cache key of the target audio's codes, set by codes.resolve
    ref_codes: str = ""
    frames: int = 0              # audio frames of target and reference, set by codes.resolve


@dataclass
class Skip:
    source: str
    line: int
    reason: str
    detail: str

    def __str__(self) -> str:
        return f"{self.source}:{self.line}: {self.reason}: {self.detail}"


def decode_audio(data: bytes, sample_rate: int) -> np.ndarray:
    """Any soundfile-readable bytes as mono float32 at ``sample_rate``."""
    wave, sr = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    return resample(wave.mean(axis=1), sr, sample_rate)


def resample(wave: np.ndarray, sample_rate: int, target_rate: int) -> np.ndarray:
    """A mono wave at ``sample_rate`` as contiguous float32 at ``target_rate``."""
    wave = np.asarray(wave, np.float32).reshape(-1)
    if sample_rate != target_rate and len(wave):
        import torchaudio

        wave = torchaudio.functional.resample(torch.from_numpy(wave), sample_rate, target_rate).numpy()
    return np.ascontiguousarray(wave, dtype=np.float32)


def audio_error(e: Exception) -> str:
    """Why audio could not be read, in words: soundfile names the in-memory buffer it was given, not the file."""
    message = BUFFER_REPR.sub("", getattr(e, "error_string", None) or str(e))
    return f"{type(e).__name__}: {message}"


def load_audio(path: str | Path, sample_rate: int) -> np.ndarray:
    return decode_audio(Path(path).read_bytes(), sample_rate)


# ---------------------------------------------------------------- sources


class _BadField(ValueError):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


def _describe(value) -> str:
    shown = json.dumps(value, default=str) if isinstance(value, (int, float, list, dict)) else repr(value)
    return f"{type(value).__name__} {shown[:40]}{'...' if len(shown) > 40 else ''}"


def _text(row, name: str, required: bool, numbers: bool = False) -> str:
    """A text field's value ('' for an absent optional one); a missing, empty or non-string value raises
    ``_BadField`` with its reason. ``numbers``: integers are taken as text (speaker ids often are numbers)."""
    value = row.get(name)
    if numbers and isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if value is None:
        if required:
            raise _BadField("missing_field", f"no '{name}' field" if name not in row else f"'{name}' is null")
        return ""
    if not isinstance(value, str):
        raise _BadField("bad_field", f"'{name}' must be a string, got {_describe(value)}")
    _encodable(name, value)
    if not value.strip():
        if required:
            raise _BadField("empty_text", f"'{name}' is {'empty' if not value else 'only whitespace'}")
        return ""
    return value


def _audio(row, name: str, required: bool, audio_of):
    """An audio field as a reference (None for an absent optional one): a path string, or what the reader already
    made of the row's audio (a dataset's Audio column)."""
    value = row.get(name)
    if isinstance(value, str) and not value.strip():
        value = None
    if value is None:
        if required:
            raise _BadField("missing_field", f"no '{name}' field" if name not in row else f"'{name}' is empty")
        return None
    if not isinstance(value, (str, FileAudio, DatasetAudio)):
        raise _BadField("bad_field", f"'{name}' must be a path string, got {_describe(value)}")
    if isinstance(value, str):
        _encodable(name, value)
    return audio_of(value, name)


def _encodable(name: str, value: str) -> None:
    """JSON escapes can spell lone surrogates (``"\\ud800"``), which no tokenizer or file system takes."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise _BadField("not_utf8", f"'{name}' holds {value[e.start]!r}, which is not valid UTF-8") from None


def _row_to_sample(row, fields, source: str, line: int, audio_of) -> Sample | Skip:
    """One manifest row (dict) -> Sample, or a Skip naming the field at fault and why."""
    if not isinstance(row, dict):
        return Skip(source, line, "invalid_json", f"line is a JSON {type(row).__name__}, not an object")
    try:
        audio = _audio(row, fields.audio_field, True, audio_of)
        text = _text(row, fields.text_field, True)
        ref = _audio(row, fields.ref_audio_field, False, audio_of)
        return Sample(source=source, line=line, audio=audio, text=text, ref_audio=ref,
                      ref_text=_text(row, fields.ref_text_field, ref is not None),
                      speaker=_text(row, fields.speaker_field, False, numbers=True),
                      scene=_text(row, fields.scene_field, False), system=_text(row, fields.system_field, False))
    except _BadField as e:
        return Skip(source, line, e.reason, e.detail)


def _file_audio(root: Path):
    return lambda value, _column: FileAudio(root / value)


def json_error(e: json.JSONDecodeError, line: str) -> str:
    """What is wrong with one manifest line and where, as a column of that line (characters, counted from 1)."""
    where = "the end of the line" if e.pos >= len(line.rstrip()) else f"column {e.pos + 1}"
    return f"{e.msg.removesuffix(' at')} at {where}"


def read_manifest(path: str | Path, fields) -> tuple[list[Sample], list[Skip]]:
    """A JSONL manifest: one JSON object per line, audio paths relative to the manifest's folder."""
    path = Path(path)
    samples, skips = [], []
    with open(path, "rb") as f:
        for n, raw in enumerate(f, start=1):
            try:
                text = raw.decode("utf-8-sig" if n == 1 else "utf-8")  # a byte-order mark (Windows tools) is fine
            except UnicodeDecodeError as e:
                skips.append(Skip(str(path), n, "not_utf8", f"line is not valid UTF-8 ({e.reason} at byte {e.start})"))
                continue
            if not text.strip():
                continue
            text = text.rstrip("\r\n")  # parsed alone, so a line cut short is an error at its end, not at "line 2"
            try:
                row = json.loads(text)
            except json.JSONDecodeError as e:
                skips.append(Skip(str(path), n, "invalid_json", json_error(e, text)))
                continue
            out = _row_to_sample(row, fields, str(path), n, _file_audio(path.parent))
            (samples if isinstance(out, Sample) else skips).append(out)
    return samples, skips


def read_audiofolder(root: Path, fields) -> tuple[list[Sample], list[Skip]]:
    """An audiofolder dir: audio files next to metadata.jsonl or metadata.csv with a ``file_name`` column."""
    meta = next(root / m for m in AUDIOFOLDER_METADATA if (root / m).is_file())
    audio_fields = dataclasses.replace(fields, audio_field="file_name")
    if meta.suffix == ".jsonl":
        return read_manifest(meta, audio_fields)
    samples, skips = [], []
    with open(meta, newline="", encoding="utf-8-sig") as f:
        try:
            for n, row in enumerate(csv.DictReader(f), start=2):
                out = _row_to_sample(row, audio_fields, str(meta), n, _file_audio(root))
                (samples if isinstance(out, Sample) else skips).append(out)
        except UnicodeDecodeError as e:  # decoded in blocks, not rows: no row to skip, the file must be fixed
            raise ConfigError(f"{meta}: not valid UTF-8 ({e.reason}); save it as UTF-8") from None
    return samples, skips


def read_hf_dataset(root: Path, fields) -> tuple[list[Sample], list[Skip]]:
    """A `datasets` dataset saved with ``save_to_disk``; its audio column is read as bytes, decoded by us."""
    try:
        import datasets
    except ImportError:
        raise ConfigError(f"{root} is a `datasets` dataset: pip install datasets") from None
    ds = datasets.load_from_disk(str(root))
    if isinstance(ds, datasets.DatasetDict):
        raise ConfigError(f"{root} holds several splits ({', '.join(ds)}): point to one, e.g. {root}/{next(iter(ds))}")
    if fields.audio_field not in ds.column_names:
        raise ConfigError(f"'data.audio_field': {root} has no column '{fields.audio_field}' "
                          f"(columns: {', '.join(ds.column_names)})")
    audio = {}
    for name in (fields.audio_field, fields.ref_audio_field):
        if name in ds.column_names:
            if isinstance(ds.features[name], datasets.Audio):
                ds = ds.cast_column(name, datasets.Audio(decode=False))
            audio[name] = _audio_refs(ds, name, root)
    samples, skips = [], []
    for index, row in enumerate(ds.select_columns([c for c in ds.column_names if c not in audio])):
        row = {**row, **{name: refs[index] for name, refs in audio.items()}}
        out = _row_to_sample(row, fields, str(root), index, lambda ref, _column: ref)
        (samples if isinstance(out, Sample) else skips).append(out)
    return samples, skips


def _audio_refs(ds, name: str, root: Path) -> list:
    """Per row: a reference to its audio (paths resolve against the dataset dir), or None when absent; read from
    the Arrow column so no audio bytes are loaded here."""
    import pyarrow as pa
    import pyarrow.compute as pc

    col = ds.data.column(name).combine_chunks()
    if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
        return [FileAudio(root / v) if v else None for v in col.to_pylist()]
    present = pc.and_(col.is_valid(), pc.or_(col.field("bytes").is_valid(), col.field("path").is_valid()))
    present = pc.fill_null(present, False).to_pylist()
    return [DatasetAudio(ds, i, name) if ok else None for i, ok in enumerate(present)]


def read_source(path: str, fields) -> tuple[list[Sample], list[Skip]]:
    """Dispatch on what ``path`` is: a JSONL manifest, a saved dataset dir, or an audiofolder dir."""
    p = Path(path)
    if p.is_file():
        return read_manifest(p, fields)
    if p.is_dir():
        if any((p / m).is_file() for m in AUDIOFOLDER_METADATA):
            return read_audiofolder(p, fields)
        if (p / "dataset_info.json").is_file() or (p / "state.json").is_file() or (p / "dataset_dict.json").is_file():
            return read_hf_dataset(p, fields)
        raise ConfigError(f"{path}: a dir must be a `datasets` save_to_disk dir or an audiofolder "
                          f"(audio files with {' or '.join(AUDIOFOLDER_METADATA)})")
    raise ConfigError(f"{path}: not found")


def in_line_order(skips: list[Skip]) -> list[Skip]:
    """Skips found by different checks (parsing, audio, screening) listed as a person reads the source: by line,
    each source in the order it first appears."""
    sources = {s.source: i for i, s in reversed(list(enumerate(skips)))}
    return sorted(skips, key=lambda s: (sources[s.source], s.line))


def strict_error(problems: list[Skip]) -> ConfigError:
    """``data.strict``: the one failure that lists every bad sample (so nothing else needs to print them)."""
    return ConfigError(f"'data.strict': {len(problems)} bad sample(s):\n"
                       + "\n".join(f"  {p}" for p in in_line_order(problems)))


def load_splits(cfg, seed: int) -> tuple[list[Sample], list[Sample], list[Skip], list[Skip]]:
    """Train and validation samples, then the lines each split's source could not parse (kept apart so every skip is
    reported under its own split): a separate source, or a seeded ``val_fraction`` of the training one."""
    train, skips = read_source(cfg.train_manifest, cfg)
    if cfg.val_manifest:
        val, val_skips = read_source(cfg.val_manifest, cfg)
        return train, val, skips, val_skips
    if cfg.val_fraction > 0 and len(train) > 1:
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed)).tolist()
        held = set(order[:max(1, round(cfg.val_fraction * len(train)))])
        return [s for i, s in enumerate(train) if i not in held], [train[i] for i in sorted(held)], skips, []
    return train, [], skips, []


# ---------------------------------------------------------------- checks that need the tokenizer


def token_limit(cfg, max_positions: int) -> int:
    """The most positions one sample may take (0: no limit): ``data.max_tokens`` (default ``max_positions``, the
    model's ``max_position_embeddings``), and no more than ``data.max_tokens_per_batch`` when that is set, so that
    every sample fits in a batch of its own."""
    return min((n for n in (cfg.max_tokens or max_positions, cfg.max_tokens_per_batch) if n), default=0)


def special_token_skip(sample: Sample, tokenizer) -> Skip | None:
    """A Skip when a text of the sample (transcript, reference transcript, scene, system prompt) spells out a special
    token, naming the field and the token."""
    for name in ("text", "ref_text", "scene", "system"):
        if found := special_tokens_in(getattr(sample, name), tokenizer):
            return Skip(sample.source, sample.line, "special_token",
                        f"'{name}' contains the special token {found[0]}")
    return None


def _too_long(sample: Sample, tokens: int, limit: int) -> Skip:
    return Skip(sample.source, sample.line, "too_long", f"{tokens} tokens, over the limit of {limit}")


@dataclass
class Screened:
    """What ``screen`` kept, left out and counted."""

    kept: list[Sample]
    skips: list[Skip]
    longest_tokens: int     # positions of the longest kept sample
    duplicates: int         # lines repeating an earlier line's audio content and texts (dropped or not)


def screen(samples: list[Sample], tokenizer, ids, cfg, limit: int) -> Screened:
    """The checks after ``codes.resolve`` (which knows the audio's content and frames): special tokens in the texts,
    sequences over ``limit`` positions (``token_limit``), and repeated lines (dropped with ``data.drop_duplicates``)."""
    kept, skips, seen, duplicates = [], [], {}, 0
    lengths = sequence_lengths(samples, tokenizer, ids, cfg.system_prompt)
    longest = 0
    for s, n in zip(samples, lengths):
        if problem := special_token_skip(s, tokenizer):
            skips.append(problem)
            continue
        if limit and n > limit:
            skips.append(_too_long(s, n, limit))
            continue
        key = (s.codes, s.text, s.ref_codes, s.ref_text, s.scene, s.system)
        if key in seen:
            duplicates += 1
            if cfg.drop_duplicates:
                skips.append(Skip(s.source, s.line, "duplicate", f"same audio and text as {seen[key]}"))
                continue
        seen.setdefault(key, f"{s.source}:{s.line}")
        longest = max(longest, n)
        kept.append(s)
    return Screened(kept, skips, longest, duplicates)


# ---------------------------------------------------------------- dataset, samplers, collator

class HiggsDataset(torch.utils.data.Dataset):
    """Samples whose codes are cached; items are built on access from the cache, never from the audio files.

    An item that cannot be built is a Skip naming its line, never an exception: a ``StopIteration`` escaping
    ``__getitem__`` would make the DataLoader end the epoch early, silently."""

    def __init__(self, samples: list[Sample], cache, tokenizer, ids, data_cfg):
        self.samples, self.cache, self.tokenizer, self.ids, self.cfg = samples, cache, tokenizer, ids, data_cfg

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict | Skip:
        s = self.samples[i]
        try:
            codes = self.cache.load(s.codes)
            ref = self.cache.load(s.ref_codes) if s.ref_audio is not None else None
        except (OSError, ValueError) as e:  # an entry deleted or damaged mid-run: skip, as before training
            return Skip(s.source, s.line, "missing_codes", f"{type(e).__name__}: {e}")
        if problem := special_token_skip(s, self.tokenizer):  # screened before training; checked again for safety
            return problem
        try:
            example = build_example(s, codes, ref, self.tokenizer, self.ids, self.cfg)
        except Exception as e:  # noqa: BLE001 - StopIteration included: see the class doc
            return Skip(s.source, s.line, "build_failed", f"{type(e).__name__}: {e}")
        limit = token_limit(self.cfg, 0)
        if limit and len(example["input_ids"]) > limit:
            return _too_long(s, len(example["input_ids"]), limit)
        return example

    def lengths(self) -> list[int]:
        """Sequence length of each sample, exactly as built, without building it."""
        return sequence_lengths(self.samples, self.tokenizer, self.ids, self.cfg.system_prompt)


class EpochSampler(torch.utils.data.Sampler):
    """A shuffle that depends only on (seed, epoch), so a resumed run sees the same order."""

    def __init__(self, n: int, seed: int, shuffle: bool = True):
        self.n, self.seed, self.shuffle, self.epoch = n, seed, shuffle, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def epoch_generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        if not self.shuffle:
            return iter(range(self.n))
        return iter(torch.randperm(self.n, generator=self.epoch_generator()).tolist())


class LengthGroupedBatches(torch.utils.data.Sampler):
    """Batches of similar length, so little of each batch is padding.

    The shuffled order is cut into windows of ``batch_size * window`` samples; each window is sorted by length and
    cut into batches (of ``batch_size``, or as many samples as fit ``max_tokens`` padded positions); the batches are
    then shuffled. Accelerate sets the epoch through ``.sampler`` and shards the batches across processes.

    There is deliberately no ``batch_size`` attribute: accelerate's ``BatchSamplerShard`` would take the batches for
    fixed-size ones and silently drop every round whose last batch is short. Without it, it deals whole batches to
    the processes in turn and repeats the first ones so that every process gets the same number."""

    def __init__(self, sampler: EpochSampler, lengths: list[int], batch_size: int, max_tokens: int = 0,
                 window: int = 50):
        self.sampler, self.lengths, self.size = sampler, lengths, batch_size
        self.max_tokens, self.window = max_tokens, window

    def _batches(self) -> list[list[int]]:
        order = list(self.sampler)
        span = self.size * self.window
        batches = []
        for start in range(0, len(order), span):
            chunk = sorted(order[start:start + span], key=lambda i: -self.lengths[i])
            batch: list[int] = []
            for i in chunk:
                full = len(batch) == self.size if not self.max_tokens else (
                    batch and (len(batch) + 1) * self.lengths[batch[0]] > self.max_tokens)
                if full:
                    batches.append(batch)
                    batch = []
                batch.append(i)
            if batch:
                batches.append(batch)
        if self.sampler.shuffle:
            perm = torch.randperm(len(batches), generator=self.sampler.epoch_generator()).tolist()
            batches = [batches[i] for i in perm]
        return batches

    def __iter__(self):
        return iter(self._batches())

    def __len__(self) -> int:
        return len(self._batches())


def collate(items: list, pad_id: int, stream_eos: int) -> dict:
    """Right-pad text and audio (audio frames with stream EOS, like transformers' processor); items that failed to
    load travel as ``skipped`` so the loop can report them."""
    skipped = [x for x in items if isinstance(x, Skip)]
    items = [x for x in items if not isinstance(x, Skip)]
    if not items:
        return {"skipped": skipped}

    def pad(key, value, length):
        return torch.stack([_pad_rows(x[key], length, value) for x in items])

    lengths = torch.tensor([len(x["input_ids"]) for x in items])
    frames = torch.tensor([len(x["audio_input_ids"]) for x in items])
    max_len, max_frames = int(lengths.max()), int(frames.max())
    return {
        "input_ids": pad("input_ids", pad_id, max_len),
        "attention_mask": (torch.arange(max_len)[None] < lengths[:, None]).long(),
        "labels": pad("labels", IGNORE, max_len),
        "audio_input_ids": pad("audio_input_ids", stream_eos, max_frames),
        "audio_input_ids_mask": torch.arange(max_frames)[None] < frames[:, None],
        "audio_labels": pad("audio_labels", IGNORE, max_frames),
        "skipped": skipped,
    }


def _pad_rows(x: torch.Tensor, length: int, value: int) -> torch.Tensor:
    out = x.new_full((length, *x.shape[1:]), value)
    out[: len(x)] = x
    return out
