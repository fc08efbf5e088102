"""Codec codes, encoded once and cached: keyed by the audio's content hash and the codec's identity.

Layout under the cache root: ``<codec id>/<sha256 of the audio bytes>.npy`` (int16, codebooks x frames), or
``<sha256>.skip.json`` for audio that cannot become codes (unreadable, silent, shorter than a frame), so a bad file
is decoded once too. Entries appear by atomic rename: an interrupted encode leaves no partial entry, and a rerun
resumes where it stopped. ``paths.jsonl`` remembers (path, size, mtime) -> hash so unchanged files are not hashed
again; a changed file gets a new hash and is encoded again.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from analysis.schema import write_text_atomic

from .config import error_line
from .data import (
    FileAudio,
    Sample,
    Skip,
    audio_error,
    decode_audio,
    in_line_order,
    load_splits,
    screen,
    strict_error,
    token_limit,
)
from .encoding import EncodeStats, encode_all, encode_waves, unencodable

MEMORY_BYTES = 256 * 2**20  # codes kept in memory per process once read: about 180 hours of audio


def default_cache_dir() -> Path:
    """Shared by every run on the machine, so a second run encodes nothing: $HIGGS_ACCEL_CACHE or ~/.cache."""
    return Path(os.environ.get("HIGGS_ACCEL_CACHE") or Path.home() / ".cache" / "higgs_accel") / "codes"


# Config entries that say where a codec came from or how it was saved, never what codes it makes: kept out of its
# identity, so the same codec from another dir, a relative path, a hub id or its local snapshot shares one cache.
PROVENANCE = ("_name_or_path", "_commit_hash", "transformers_version", "architectures", "dtype", "torch_dtype")


def _code_config(value):
    """The codec config as plain data without provenance entries (at any depth: sub-configs carry their own)."""
    if isinstance(value, dict):
        return {k: _code_config(v) for k, v in sorted(value.items()) if k not in PROVENANCE}
    if isinstance(value, (list, tuple)):
        return [_code_config(v) for v in value]
    return value


def codec_identity(codec) -> str:
    """Content only: the config fields that change codes, and the raw bytes of every weight and buffer (in their own
    dtype, no conversion: about 0.7 s for the full-size codec) with its name, dtype and shape. Never a path."""
    config = json.dumps(_code_config(codec.config.to_dict()), sort_keys=True, default=str)
    h = hashlib.sha256(config.encode())
    for name, t in sorted(codec.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name} {t.dtype} {tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()[:16]


class CodeCache:
    def __init__(self, root: str | Path, codec):
        self.codec = codec
        self.sample_rate = codec.config.sample_rate
        self.frame_rate = codec.config.frame_rate
        self.dir = Path(root) / codec_identity(codec)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.encode_calls = 0
        self._index = self._read_index()
        self._memory: dict[str, np.ndarray] = {}
        self._memory_bytes = 0

    # ------------------------------------------------ keys

    def _read_index(self) -> dict:
        index = {}
        path = self.dir / "paths.jsonl"
        if path.is_file():
            for line in path.read_text(errors="replace").splitlines():
                try:
                    key, digest = json.loads(line)
                except ValueError:
                    continue  # a line torn by a kill
                index[tuple(key)] = digest
        return index

    def key(self, audio) -> str:
        """The content hash of an audio reference; files are hashed once per (path, size, mtime)."""
        if isinstance(audio, FileAudio):
            st = audio.path.stat()
            stat_key = (str(audio.path.resolve()), st.st_size, st.st_mtime_ns)
            if stat_key in self._index:
                return self._index[stat_key]
            digest = hashlib.sha256(audio.read()).hexdigest()
            self._index[stat_key] = digest
            with open(self.dir / "paths.jsonl", "a") as f:  # one short line per write: appends stay whole
                f.write(json.dumps([list(stat_key), digest]) + "\n")
            return digest
        return hashlib.sha256(audio.read()).hexdigest()

    # ------------------------------------------------ entries

    def load(self, digest: str) -> np.ndarray:
        """Cached codes (read-only). The first read of each entry is kept in memory, up to ``MEMORY_BYTES`` per
        process, so later epochs read no files: codes are small (10 s of audio: 4 KB), files are slow to open."""
        codes = self._memory.get(digest)
        if codes is None:
            codes = np.load(self.dir / f"{digest}.npy")
            codes.flags.writeable = False
            if self._memory_bytes + codes.nbytes <= MEMORY_BYTES:
                self._memory[digest] = codes
                self._memory_bytes += codes.nbytes
        return codes

    def lookup(self, digest: str) -> np.ndarray | dict | None:
        """Cached codes, or the recorded reason the audio has none, or None if never encoded."""
        codes = self.dir / f"{digest}.npy"
        if codes.is_file():
            return np.load(codes, mmap_mode="r")
        skip = self.dir / f"{digest}.skip.json"
        if skip.is_file():
            return json.loads(skip.read_text())
        return None

    def codes(self, audio) -> np.ndarray:
        """Codes of one audio, encoded now if not cached; ValueError if the audio cannot have any."""
        digest = self.key(audio)
        entry = self.lookup(digest)
        if entry is None:
            entry = self.encode(audio, digest)
        if isinstance(entry, dict):
            raise ValueError(f"{audio}: {entry['reason']}: {entry['detail']}")
        return np.asarray(entry)

    def encode(self, audio, digest: str) -> np.ndarray | dict:
        """Decode, check and encode one audio; store and return its codes or the reason it has none. Nothing about
        one file can raise: a failure is that file's reason, with its path."""
        try:
            wave = decode_audio(audio.read(), self.sample_rate)
        except Exception as e:  # noqa: BLE001 - soundfile, the resampler and the OS raise many types for bad files
            return self._store_skip(digest, "unreadable_audio", audio_error(e))
        if why := unencodable(wave, self.codec.config.hop_length, self.sample_rate):
            return self._store_skip(digest, *why)
        try:
            arr = encode_waves(self.codec, [wave], next(self.codec.parameters()).device)[0][0]
        except Exception as e:  # noqa: BLE001 - the codec may reject one input; that is this file's reason
            detail = error_line(e)[:300 + len(type(e).__name__) + 2]
            if isinstance(e, torch.OutOfMemoryError):  # passing, not the file's fault: not stored, a rerun retries
                return {"reason": "encode_failed", "detail": detail}
            return self._store_skip(digest, "encode_failed", detail)
        if arr.shape[-1] == 0:
            self.encode_calls += 1
            return self._store_skip(digest, "empty_audio", "shorter than one codec frame")
        return self.store_codes(digest, arr)

    def store_codes(self, digest: str, arr: np.ndarray) -> np.ndarray:
        """Store the codes the codec just gave one file (counted in ``encode_calls``)."""
        self.encode_calls += 1
        self._atomic(self.dir / f"{digest}.npy", lambda f: np.save(f, arr))
        return arr

    def _store_skip(self, digest: str, reason: str, detail: str) -> dict:
        entry = {"reason": reason, "detail": detail}
        write_text_atomic(json.dumps(entry), self.dir / f"{digest}.skip.json")
        return entry

    @staticmethod
    def _atomic(target: Path, write) -> None:
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, target)


def _refs(sample: Sample):
    return [("ref_codes", sample.ref_audio), ("codes", sample.audio)] if sample.ref_audio else [("codes", sample.audio)]


def encode_missing(samples: list[Sample], cache: CodeCache, progress: bool = False, *, workers: int = 0,
                   batch_seconds: float | None = None):
    """Encode what the cache lacks (this process's share of the samples), decoded by ``workers`` processes, in
    batches of equal-length files where the device proves them exact (see ``encoding``); return an
    ``encoding.EncodeStats``."""
    todo = {}
    for s in samples:
        for _, audio in _refs(s):
            try:
                if not audio.exists():
                    continue
                digest = cache.key(audio)
            except OSError:
                continue  # resolve reports it, with the path
            if digest not in todo and cache.lookup(digest) is None:
                todo[digest] = audio
    return encode_all(todo, cache, workers, batch_seconds, progress)


def resolve(samples: list[Sample], cache: CodeCache, min_seconds: float, max_seconds: float,
            encode: bool = True) -> tuple[list[Sample], list[Skip]]:
    """Check every sample against the cache (encoding what is missing unless ``encode`` is off); return the kept
    samples, each with its cache keys and frame count, and a Skip for every other one."""
    kept, skips = [], []
    for s in samples:
        problem, frames = None, 0
        for attr, audio in _refs(s):
            try:
                found = audio.exists()
                digest = cache.key(audio) if found else ""
            except OSError as e:
                problem = Skip(s.source, s.line, "unreadable_audio", f"{audio}: {audio_error(e)}")
                break
            if not found:
                problem = Skip(s.source, s.line, "missing_file", f"audio not found: {audio}")
                break
            entry = cache.lookup(digest)
            if entry is None and encode:
                entry = cache.encode(audio, digest)
            if entry is None:
                problem = Skip(s.source, s.line, "not_encoded", f"{audio} has no cached codes")
                break
            if isinstance(entry, dict):
                problem = Skip(s.source, s.line, entry["reason"], f"{audio}: {entry['detail']}")
                break
            setattr(s, attr, digest)
            frames += entry.shape[-1]
            seconds = entry.shape[-1] / cache.frame_rate
            if attr == "codes" and not min_seconds <= seconds <= max_seconds:
                problem = Skip(s.source, s.line, "length",
                               f"{audio}: {seconds:.2f}s outside [{min_seconds}, {max_seconds}]")
        if problem is None:
            s.frames = frames
            kept.append(s)
        else:
            skips.append(problem)
    return kept, skips


@dataclass
class PreparedData:
    """Both splits checked against a complete codes cache and screened (``data.screen``): the kept samples (with
    their cache keys and frame counts), a Skip for every other one, and what screening counted per split."""

    cache: CodeCache
    train: list[Sample]
    val: list[Sample]
    train_skips: list[Skip]
    val_skips: list[Skip]
    encoded: int  # by this process, in this call
    longest_tokens: dict[str, int]  # split -> positions of its longest kept sample
    duplicates: dict[str, int]  # split -> lines repeating an earlier line's audio and texts
    encoding: EncodeStats  # this process's encode step: files, seconds of audio, wall time

    def check_strict(self, strict: bool) -> None:
        problems = self.train_skips + self.val_skips
        if strict and problems:
            raise strict_error(problems)


def prepare_data(cfg, state, codec, tokenizer, ids, max_positions: int) -> PreparedData:
    """Read both manifests, encode what the cache lacks (each process of ``state`` its share, in parallel), check
    every sample against the now complete cache, then screen the texts and lengths (``ids``: the family's special
    ids, which lay the samples out; ``max_positions``: the model's ``max_position_embeddings``). ``higgs-accel
    prepare`` and training's setup both call this, so they keep and skip the same samples."""
    data = cfg.data
    cache = CodeCache(data.codes_cache or default_cache_dir(), codec.to(state.device))
    train, val, train_skips, val_skips = load_splits(data, cfg.train.seed)
    mine = (train + val)[state.process_index::state.num_processes]
    encoding = encode_missing(mine, cache, progress=state.is_main_process, workers=data.num_workers,
                              batch_seconds=data.encode_batch_seconds)
    state.wait_for_everyone()
    limit = token_limit(data, max_positions)
    splits = {}
    for split, samples, skips in (("train", train, train_skips), ("val", val, val_skips)):
        resolved, more = resolve(samples, cache, data.min_seconds, data.max_seconds)
        screened = screen(resolved, tokenizer, ids, data, limit)
        splits[split] = (screened.kept, in_line_order(skips + more + screened.skips), screened)
    (train, train_skips, train_screen), (val, val_skips, val_screen) = splits["train"], splits["val"]
    return PreparedData(cache, train, val, train_skips, val_skips, encoding.encoded,
                        {"train": train_screen.longest_tokens, "val": val_screen.longest_tokens},
                        {"train": train_screen.duplicates, "val": val_screen.duplicates}, encoding)
