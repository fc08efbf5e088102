"""Mel spectrograms of the run's WAV files, in numpy: what a person looks at next to what they hear.

WAV files are read with the standard library (PCM, as the trainer writes them); other files with ``soundfile``
when it is installed. Anything unreadable gives None: a missing picture never stops a report.
"""

from __future__ import annotations

import wave
from functools import lru_cache
from pathlib import Path

import numpy as np

N_FFT = 1024
HOP = 256
N_MELS = 64
TOP_DB = 80.0  # dynamic range shown below the loudest bin


def read_audio(path: Path) -> tuple[np.ndarray, int] | None:
    """Mono float samples in [-1, 1] and the sample rate, or None."""
    try:
        with wave.open(str(path), "rb") as w:
            width, channels, rate = w.getsampwidth(), w.getnchannels(), w.getframerate()
            raw = w.readframes(w.getnframes())
        if width == 1:
            x = (np.frombuffer(raw, np.uint8).astype(np.float32) - 128) / 128
        elif width in (2, 4):
            dtype = np.int16 if width == 2 else np.int32
            x = np.frombuffer(raw, dtype).astype(np.float32) / np.iinfo(dtype).max
        elif width == 3:
            b = np.frombuffer(raw, np.uint8).reshape(-1, 3).astype(np.int32)
            x = ((b[:, 0] | b[:, 1] << 8 | b[:, 2] << 16) << 8 >> 8).astype(np.float32) / 2**23
        else:
            return None
        return x.reshape(-1, channels).mean(axis=1), rate
    except (OSError, EOFError, wave.Error):
        pass
    try:
        import soundfile

        x, rate = soundfile.read(str(path), dtype="float32", always_2d=True)
        return x.mean(axis=1), rate
    except Exception:  # noqa: BLE001 - not installed, or not audio
        return None


def to_mel(hz):
    """Hz on the mel scale (HTK formula): the unit of a picture's frequency axis."""
    return 2595 * np.log10(1 + np.asarray(hz, dtype=np.float64) / 700)


@lru_cache(maxsize=8)
def _filterbank(rate: int, n_fft: int, n_mels: int) -> np.ndarray:
    """Triangular filters evenly spaced on the mel scale, shape (n_mels, n_fft // 2 + 1)."""
    edges = 700 * (10 ** (np.linspace(0, to_mel(rate / 2), n_mels + 2) / 2595) - 1)
    freqs = np.linspace(0, rate / 2, n_fft // 2 + 1)
    lower, center, upper = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    rise = (freqs - lower) / np.maximum(center - lower, 1e-9)
    fall = (upper - freqs) / np.maximum(upper - center, 1e-9)
    return np.clip(np.minimum(rise, fall), 0, None)


def mel_db(x: np.ndarray, rate: int) -> np.ndarray:
    """Log-mel power in dB, shape (N_MELS, frames); at least one frame (short audio is zero-padded)."""
    x = np.pad(x.astype(np.float64), (N_FFT // 2, N_FFT // 2))
    if len(x) < N_FFT:
        x = np.pad(x, (0, N_FFT - len(x)))
    n = 1 + (len(x) - N_FFT) // HOP
    frames = np.lib.stride_tricks.as_strided(x, (n, N_FFT), (x.strides[0] * HOP, x.strides[0]))
    power = np.abs(np.fft.rfft(frames * np.hanning(N_FFT), axis=1)) ** 2
    return 10 * np.log10(np.maximum(_filterbank(rate, N_FFT, N_MELS) @ power.T, 1e-10))
