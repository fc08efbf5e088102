"""Batched codec encoding, the encode step of ``prepare`` and ``train``: files are read, decoded and resampled in
DataLoader worker processes while the codec encodes, and files of equal length are encoded together.

Only files with exactly the same number of samples (after resampling) share a batch. Padding shorter files to a
batch's length changes their codes: the codec's semantic model (HuBERT) normalizes its first convolution over the
whole input and attends over all of it without a padding mask, and the acoustic encoder's convolutions see the
padding near the end. With the full-size codec, padding a file by up to 40 ms changed about 1% of its codes and by
up to 1 s about 11% (bench/RESULTS.md). So every file's codes are exactly what encoding it alone gives.

Files arrive longest first (by file size), so a batch too large for memory fails at the start, not hours in; up to
``WINDOW`` batches of decoded audio wait for a partner of equal length. Each file's entry is stored as soon as its
batch is encoded, atomically, so a kill loses at most the batch in flight. A file that does not decode to
non-silent samples of at least one frame, or whose batch the codec rejects, is handed to ``CodeCache.encode`` on
its own, which records its skip exactly as the one-at-a-time path does.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass

import numpy as np
import torch

from .config import DataConfig
from .data import FileAudio, decode_audio

WINDOW = 4  # batches' worth of decoded files held while waiting for files of the same length


@dataclass
class EncodeStats:
    """What one encode step did, for the summary line and the ``data_summary`` event."""

    encoded: int = 0             # files encoded by the codec (skips recorded without encoding not counted)
    audio_seconds: float = 0.0   # seconds of audio in those files
    wall_seconds: float = 0.0    # wall time of the whole step: decoding, encoding, storing

    @property
    def speed(self) -> float | None:
        """Seconds of audio encoded per second of wall time (= hours of audio per hour of compute)."""
        return self.audio_seconds / self.wall_seconds if self.audio_seconds and self.wall_seconds > 0 else None


class _Decoded(torch.utils.data.Dataset):
    """Item i: (i, mono float32 wave at the codec's rate), or (i, None) when decoding fails: the failure is recorded
    by ``CodeCache.encode`` in the main process, which decodes it again and names the error."""

    def __init__(self, audios: list, sample_rate: int):
        self.audios, self.sample_rate = audios, sample_rate

    def __len__(self) -> int:
        return len(self.audios)

    def __getitem__(self, i: int):
        try:
            return i, decode_audio(self.audios[i].read(), self.sample_rate)
        except Exception:  # noqa: BLE001 - any decoding error becomes that file's skip entry
            return i, None


def _as_is(item):
    return item


def _size(audio) -> int:
    """A cheap stand-in for the audio's length, used to order files so that equal lengths arrive together."""
    return audio.path.stat().st_size if isinstance(audio, FileAudio) else 0


class _Progress:
    """Files done, hours of audio done, hours of audio per hour of compute and an ETA (from the bytes left, since
    files arrive longest first), on a terminal only."""

    def __init__(self, sizes: list[int], enabled: bool):
        from tqdm import tqdm

        self.sizes, self.total, self.done_bytes = sizes, max(1, sum(sizes)), 0
        self.bar = tqdm(total=len(sizes), desc="encoding audio", unit="file", disable=not enabled,
                        bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} files [{elapsed}{postfix}]")

    def update(self, index: int, stats: EncodeStats, start: float) -> None:
        self.done_bytes += self.sizes[index]
        self.bar.update(1)
        if self.bar.disable:
            return
        elapsed = time.perf_counter() - start
        done = self.done_bytes / self.total if self.done_bytes else self.bar.n / max(1, self.bar.total)
        eta = elapsed * (1 - done) / done if done else 0.0
        self.bar.set_postfix_str(f"{stats.audio_seconds / 3600:.2f} h audio, {stats.audio_seconds / elapsed:.1f} h "
                                 f"audio/h, ETA {self.bar.format_interval(eta)}", refresh=False)

    def close(self) -> None:
        self.bar.close()


def encode_all(todo: dict, cache, workers: int = 0, batch_seconds: float | None = None,
               progress: bool = False) -> EncodeStats:
    """Encode ``todo`` ({content hash: audio}, none of it cached yet) into ``cache``. ``workers``: decoding
    processes (0: decode in this process); ``batch_seconds``: most seconds of audio in one codec batch (files of
    equal length only; a file longer than this is encoded alone; None: ``data.encode_batch_seconds``'s default)."""
    from .codes import SILENCE_PEAK

    start, stats = time.perf_counter(), EncodeStats()
    digests = sorted(todo, key=lambda d: -_size(todo[d]))
    audios = [todo[d] for d in digests]
    sizes = [_size(a) for a in audios]
    bar = _Progress(sizes, enabled=progress and sys.stderr.isatty())
    device = next(cache.codec.parameters()).device
    rate, hop = cache.sample_rate, cache.codec.config.hop_length

    def alone(i: int, samples: int = 0) -> None:
        before = cache.encode_calls
        cache.encode(audios[i], digests[i])
        if cache.encode_calls > before:
            stats.encoded += 1
            stats.audio_seconds += samples / rate
        bar.update(i, stats, start)

    def encode(group: list) -> None:
        try:
            with torch.no_grad():
                waves = torch.from_numpy(np.stack([w for _, w in group]))[:, None].to(device)
                codes = cache.codec.encode(waves).audio_codes.cpu().numpy().astype(np.int16)
        except Exception:  # noqa: BLE001 - one bad file must not sink its batch: each is retried alone
            for i, wave in group:
                alone(i, len(wave))
            return
        if codes.shape[-1] == 0:  # shorter than one frame: the cache records why
            for i, _ in group:
                alone(i)
            return
        for (i, wave), arr in zip(group, codes):
            cache._atomic(cache.dir / f"{digests[i]}.npy", lambda f, arr=arr: np.save(f, arr))
            cache.encode_calls += 1
            stats.encoded += 1
            stats.audio_seconds += len(wave) / rate
            bar.update(i, stats, start)

    loader = torch.utils.data.DataLoader(_Decoded(audios, rate), batch_size=None, shuffle=False,
                                         num_workers=workers, collate_fn=_as_is)
    waiting: dict[int, list] = {}  # length in samples -> decoded files of that length, in arrival order
    held = 0  # samples waiting
    limit = (DataConfig.encode_batch_seconds if batch_seconds is None else batch_seconds) * rate
    for i, wave in loader:
        if wave is None or len(wave) < hop or float(np.abs(wave).max()) < SILENCE_PEAK:  # the cache says why
            alone(i)
            continue
        group = waiting.setdefault(len(wave), [])
        group.append((i, wave))
        held += len(wave)
        if (len(group) + 1) * len(wave) > limit:  # the next file of this length would not fit
            held -= len(group) * len(wave)
            encode(waiting.pop(len(wave)))
        while held > WINDOW * limit:  # the oldest group has waited long enough for partners
            length, oldest = next(iter(waiting.items()))
            held -= len(oldest) * length
            encode(waiting.pop(length))
    for group in waiting.values():
        encode(group)
    bar.close()
    stats.wall_seconds = time.perf_counter() - start
    return stats
