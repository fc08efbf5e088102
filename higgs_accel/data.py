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
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

from .chat import IGNORE, build_example
from .config import ConfigError

MANIFEST_SUFFIXES = (".jsonl", ".json")
AUDIOFOLDER_METADATA = ("metadata.jsonl", "metadata.csv")


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
    line: int                    # 1-based manifest line, or dataset row index
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


def load_audio(path: str | Path, sample_rate: int) -> np.ndarray:
    return decode_audio(Path(path).read_bytes(), sample_rate)


# ---------------------------------------------------------------- sources


def _row_to_sample(row, fields, source: str, line: int, audio_of) -> Sample | Skip:
    """One manifest row (dict) -> Sample, or a Skip naming what is wrong with it."""
    if not isinstance(row, dict):
        return Skip(source, line, "invalid_json", "line is not a JSON object")
    missing = [f for f in (fields.audio_field, fields.text_field) if not row.get(f)]
    if missing:
        return Skip(source, line, "missing_field", f"missing or empty field(s): {', '.join(missing)}")
    text = row[fields.text_field]
    if not isinstance(text, str) or not text.strip():
        return Skip(source, line, "empty_text", "transcript is empty")
    ref = row.get(fields.ref_audio_field)
    if ref and not row.get(fields.ref_text_field):
        return Skip(source, line, "missing_field", f"'{fields.ref_audio_field}' needs '{fields.ref_text_field}'")

    def text_of(name):
        value = row.get(name)
        return "" if value is None else str(value)

    return Sample(source=source, line=line, audio=audio_of(row[fields.audio_field], fields.audio_field), text=text,
                  speaker=text_of(fields.speaker_field), ref_text=text_of(fields.ref_text_field),
                  ref_audio=audio_of(ref, fields.ref_audio_field) if ref else None,
                  scene=text_of(fields.scene_field), system=text_of(fields.system_field))


def _file_audio(root: Path):
    return lambda value, _column: FileAudio(root / str(value))


def read_manifest(path: str | Path, fields) -> tuple[list[Sample], list[Skip]]:
    """A JSONL manifest: one JSON object per line, audio paths relative to the manifest's folder."""
    path = Path(path)
    samples, skips = [], []
    with open(path, "rb") as f:
        for n, raw in enumerate(f, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                skips.append(Skip(str(path), n, "not_utf8", f"line is not valid UTF-8 ({e.reason} at byte {e.start})"))
                continue
            if not text.strip():
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError as e:
                skips.append(Skip(str(path), n, "invalid_json", f"{e.msg} at column {e.colno}"))
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
    with open(meta, newline="", encoding="utf-8") as f:
        for n, row in enumerate(csv.DictReader(f), start=2):
            out = _row_to_sample(row, audio_fields, str(meta), n, _file_audio(root))
            (samples if isinstance(out, Sample) else skips).append(out)
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


# ---------------------------------------------------------------- dataset, samplers, collator

class HiggsDataset(torch.utils.data.Dataset):
    """Samples whose codes are cached; items are built on access from the cache, never from the audio files."""

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
        return build_example(s, codes, ref, self.tokenizer, self.ids, self.cfg.system_prompt,
                             self.cfg.train_on_prompt, self.cfg.train_audio_eos)

    def lengths(self) -> list[int]:
        """Sequence length of each sample, estimated without building it: audio frames plus text tokens."""
        return [s.frames + len(self.tokenizer(s.text + s.ref_text + s.scene, add_special_tokens=False)["input_ids"])
                for s in self.samples]


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
