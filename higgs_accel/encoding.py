"""The encode step of ``prepare`` and ``train``: files are read, decoded and resampled in DataLoader worker
processes while the codec encodes; on a GPU, files of equal length are encoded together while that proves exact.

Every file's codes must be exactly what encoding it alone gives. Padding shorter files to a batch's length cannot
give that: the codec's semantic model (HuBERT) normalizes its first convolution over the whole input and attends over
all of it without a padding mask, and the acoustic encoder's convolutions see the padding near the end. With the
full-size codec, padding a file by up to 40 ms changed about 1% of its codes and by up to 1 s about 11%
(bench/RESULTS.md). So only files with exactly the same number of samples (after resampling) share a batch.

Equal length is not enough either. The codec's last layers are matrix products over all frames of the batch at
once, and a BLAS library picks its blocking (on the CPU, even how it splits the sum between threads) by the number of
rows: on the CPU the features a file's codes are quantized from differ by up to 3e-5 between a batch and one file,
which moves a code when two codebook entries are that close. So batching is off on the CPU, where it is not faster
either (bench/RESULTS.md), and on accelerators it is checked: the last file of the first batch of each shape
(files x samples) is encoded again alone, exactly as ``CodeCache.encode`` encodes a file, and its codes and float
features are compared bit for bit. Any difference stops batching for the rest of the step and that batch is encoded
file by file; ``EncodeStats.batch_exact`` records the outcome. The check costs one encode per distinct (files,
samples), so fewer than ``MIN_BATCH`` files of one length are not batched: they would not win it back. Where
batching pays (a corpus cut into equal segments) there are few shapes. It checks one file of each shape, not every
file.

Files arrive longest first (by file size), so a batch too large for memory fails at the start, not hours in; up to
``WINDOW`` batches of decoded audio wait for a partner of equal length. Each file's entry is stored as soon as its
batch is encoded, atomically, so a kill loses at most the batch in flight. A file that does not decode to
non-silent samples of at least one frame, or whose batch the codec rejects, is handed to ``CodeCache.encode`` on
its own, which records its skip exactly as the one-at-a-time path does.

On the CPU the codec's time goes into convolutions and the acoustic encoder's Snake activations over tensors of tens
of MB (64 channels at 24,000 positions per second of audio). glibc serves blocks that large with a fresh ``mmap``
and unmaps them on ``free``, so every activation pays page faults to zero new memory. During the encode step
``retained_heap`` has glibc keep freed memory for reuse, with bit-identical codes; bench/RESULTS.md has the
speed-up (largest for files of 8 s and more, whose activations exceed glibc's largest mmap threshold).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import platform
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch

from .data import FileAudio, decode_audio

WINDOW = 4  # batches' worth of decoded files held while waiting for files of the same length
GPU_BATCH_SECONDS = 60.0  # data.encode_batch_seconds when unset, on an accelerator; on the CPU batching is off
MIN_BATCH = 4  # fewer files of one length are encoded one at a time: a new batch shape costs one more encode
SILENCE_PEAK = 1e-4  # below about -80 dBFS everywhere: nothing to learn

# glibc's mallopt parameters (malloc.h), and the thresholds left after the encode step: the largest glibc's dynamic
# mmap threshold reaches on 64-bit, and its trim threshold at that point (setting them fixes them for good).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_SETTLED_MMAP_THRESHOLD = 32 * 1024 * 1024  # DEFAULT_MMAP_THRESHOLD_MAX on 64-bit
_SETTLED_TRIM_THRESHOLD = 2 * _SETTLED_MMAP_THRESHOLD


def _glibc():
    """The C library, if it is glibc (mallopt's parameters are glibc's) and its heap was not tuned by the user (their
    environment settings stand); None otherwise."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    if "MALLOC_MMAP_THRESHOLD_" in os.environ or "MALLOC_TRIM_THRESHOLD_" in os.environ or (
            "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", "")):
        return None
    try:
        return ctypes.CDLL(None)
    except OSError:
        return None


@contextlib.contextmanager
def retained_heap():
    """Within the block, glibc keeps freed memory for reuse instead of unmapping large blocks and trimming the heap
    (the module docstring says why); after it, the thresholds stay fixed at the most glibc's own dynamic ones reach
    (32 MiB mmap, 64 MiB trim) and the kept memory goes back to the system. Only addresses change, never a computed
    value."""
    libc = _glibc()
    if libc is None:
        yield
        return
    most = 2**31 - 1  # mallopt takes an int
    libc.mallopt(_M_MMAP_THRESHOLD, most)
    libc.mallopt(_M_TRIM_THRESHOLD, most)
    try:
        yield
    finally:
        libc.mallopt(_M_MMAP_THRESHOLD, _SETTLED_MMAP_THRESHOLD)
        libc.mallopt(_M_TRIM_THRESHOLD, _SETTLED_TRIM_THRESHOLD)
        libc.malloc_trim(0)


@dataclass
class EncodeStats:
    """What one encode step did, for the summary line and the ``data_summary`` event."""

    encoded: int = 0             # files encoded by the codec (skips recorded without encoding not counted)
    audio_seconds: float = 0.0   # seconds of audio in those files
    wall_seconds: float = 0.0    # wall time of the whole step: decoding, encoding, storing
    batch_exact: bool | None = None  # whether the first batch of every shape gave its last file exactly what
    # encoding it alone gives (False: one did not, and batching stopped); None when no batch was encoded

    def row(self) -> list[float]:
        """This process's figures, as ``across_processes`` takes them from every process (NaN: no batch checked)."""
        return [self.audio_seconds, self.wall_seconds, float("nan") if self.batch_exact is None else self.batch_exact]

    @property
    def speed(self) -> float | None:
        """Seconds of audio encoded per second of wall time (= hours of audio per hour of compute)."""
        return self.audio_seconds / self.wall_seconds if self.audio_seconds and self.wall_seconds > 0 else None


def across_processes(rows) -> dict:
    """``data_summary``'s encode fields from every process's ``EncodeStats.row()`` (gathered): the audio all of them
    encoded over the slowest one's time, and whether every process that checked a batch found it exact."""
    audio_s, wall_s, exact = torch.as_tensor(rows, dtype=torch.float64).unbind(1)
    exact = exact[~exact.isnan()]
    return {"encode_speed": float(audio_s.sum() / wall_s.max()) if audio_s.sum() > 0 else None,
            "encode_batch_exact": bool(exact.min() == 1) if len(exact) else None}


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


def unencodable(wave: np.ndarray, hop: int, sample_rate: int) -> tuple[str, str] | None:
    """(reason, detail) when a decoded wave cannot become codes: shorter than one codec frame (the codec's
    convolutions reject it, or cannot frame it) or silent; None when the codec may encode it."""
    if len(wave) < hop:
        detail = "no samples" if len(wave) == 0 else (
            f"{len(wave) / sample_rate * 1000:.1f} ms, shorter than one codec frame "
            f"({hop / sample_rate * 1000:.0f} ms)")
        return "empty_audio", detail
    if float(np.abs(wave).max()) < SILENCE_PEAK:
        return "silent_audio", f"peak below {SILENCE_PEAK} (about -80 dBFS)"
    return None


def encode_waves(codec, waves: list, device) -> tuple[np.ndarray, torch.Tensor | None]:
    """Codes of equal-length mono ``waves`` (files, codebooks, frames; int16, as cached), and the float features
    they were quantized from (the codec's ``fc`` output; None if it has none): two runs of the same arithmetic give
    bit-identical features, so comparing them catches any difference, even one too small to move a code."""
    seen = []
    fc = getattr(codec, "fc", None)
    hook = fc.register_forward_hook(lambda module, args, out: seen.append(out)) if fc is not None else None
    try:
        with torch.no_grad():
            batch = torch.from_numpy(np.stack(waves))[:, None].to(device)
            codes = codec.encode(batch).audio_codes.cpu().numpy().astype(np.int16)
    finally:
        if hook is not None:
            hook.remove()
    return codes, (seen[-1] if seen else None)


def encode_all(todo: dict, cache, workers: int = 0, batch_seconds: float | None = None,
               progress: bool = False) -> EncodeStats:
    """Encode ``todo`` ({content hash: audio}, none of it cached yet) into ``cache``. ``workers``: decoding
    processes (0: decode in this process); ``batch_seconds``: most seconds of audio in one codec batch (files of
    equal length only; a file longer than this is encoded alone; None: ``GPU_BATCH_SECONDS`` on an accelerator, 0 on
    the CPU)."""
    if not todo:
        return EncodeStats()
    with retained_heap():
        return _encode_all(todo, cache, workers, batch_seconds, progress)


def _encode_all(todo: dict, cache, workers: int, batch_seconds: float | None, progress: bool) -> EncodeStats:
    start, stats = time.perf_counter(), EncodeStats()
    digests = sorted(todo, key=lambda d: -_size(todo[d]))
    audios = [todo[d] for d in digests]
    sizes = [_size(a) for a in audios]
    bar = _Progress(sizes, enabled=progress and sys.stderr.isatty())
    device = next(cache.codec.parameters()).device
    rate, hop = cache.sample_rate, cache.codec.config.hop_length
    if batch_seconds is None:
        batch_seconds = 0.0 if device.type == "cpu" else GPU_BATCH_SECONDS
    limit = batch_seconds * rate
    exact_shapes: set[tuple[int, int]] = set()  # (files, samples) of the batches checked (batching stops at a failure)

    def alone(i: int, samples: int = 0) -> None:
        before = cache.encode_calls
        cache.encode(audios[i], digests[i])
        if cache.encode_calls > before:
            stats.encoded += 1
            stats.audio_seconds += samples / rate
        bar.update(i, stats, start)

    def encode(group: list) -> None:
        nonlocal limit
        if 1 < len(group) < MIN_BATCH or (len(group) > 1 and not limit):  # too few, or batching stopped
            for item in group:
                encode([item])
            return
        try:
            codes, features = encode_waves(cache.codec, [w for _, w in group], device)
            shape = (len(group), len(group[-1][1]))
            if len(group) > 1 and shape not in exact_shapes:  # a batch shape not seen yet: its last file alone
                alone_codes, alone_features = encode_waves(cache.codec, [group[-1][1]], device)
                stats.batch_exact = bool(np.array_equal(alone_codes[0], codes[-1]) and (
                    features is None or torch.equal(alone_features[0], features[-1])))
                exact_shapes.add(shape)
        except Exception:  # noqa: BLE001 - one bad file must not sink its batch: each is retried alone
            for i, wave in group:
                alone(i, len(wave))
            return
        if len(group) > 1 and stats.batch_exact is False:  # the checked batch failed: one file at a time from now on
            limit = 0
            for item in group:
                encode([item])
            return
        if codes.shape[-1] == 0:  # shorter than one frame: the cache records why
            for i, _ in group:
                alone(i)
            return
        for (i, wave), arr in zip(group, codes):
            cache.store_codes(digests[i], arr)
            stats.encoded += 1
            stats.audio_seconds += len(wave) / rate
            bar.update(i, stats, start)

    loader = torch.utils.data.DataLoader(_Decoded(audios, rate), batch_size=None, shuffle=False,
                                         num_workers=workers, collate_fn=_as_is)
    waiting: dict[int, list] = {}  # length in samples -> decoded files of that length, in arrival order
    held = 0  # samples waiting
    for i, wave in loader:
        if wave is None or unencodable(wave, hop, rate):  # the cache records why
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
