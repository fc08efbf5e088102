"""Batched encoding (higgs_accel.encoding) stores exactly what the one-at-a-time path stores."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from higgs_accel.codes import CodeCache, encode_missing
from higgs_accel.config import ModelConfig
from higgs_accel.data import FileAudio, Sample
from higgs_accel.loading import load_codec
from higgs_accel.tiny import speech_like
from tests.conftest import REPO, encoded_now, kill_when_encoded

RNG = np.random.default_rng(3)


@pytest.fixture(scope="module")
def codec(tiny):
    return load_codec(ModelConfig(audio_tokenizer=tiny["model.audio_tokenizer"]))


def _write(path: Path, seconds: float, sr: int, channels: int = 1, words: str = "old green hills") -> Path:
    wave = speech_like(" ".join([words] * 8), RNG, sr)[: int(seconds * sr)]
    if channels == 2:
        wave = np.stack([wave, 0.6 * wave], axis=1)
    sf.write(path, wave, sr)
    return path


def _corpus(root: Path) -> list[Path]:
    """Five files that are 36000 samples long at 24 kHz (one stereo, one from 16 kHz) and five of other lengths,
    rates and channel counts."""
    root.mkdir(parents=True, exist_ok=True)
    files = [_write(root / f"same{i}.wav", 1.5, 24000, words=w) for i, w in enumerate(["quiet rivers", "seven stars",
                                                                                       "lazy dog"])]
    files += [_write(root / "same-stereo.flac", 1.5, 24000, 2), _write(root / "same-16k.wav", 1.5, 16000)]
    files += [_write(root / "a.wav", 1.3, 8000), _write(root / "b.flac", 2.1, 48000, 2),
              _write(root / "c.ogg", 0.9, 22050), _write(root / "d.wav", 2.6, 24000, 2), _write(root / "e.wav", 0.7,
                                                                                               16000)]
    return files


def _samples(files: list[Path]) -> list[Sample]:
    return [Sample(source="m.jsonl", line=n, audio=FileAudio(f), text="x") for n, f in enumerate(files, start=1)]


def _sequential(files: list[Path], cache: CodeCache) -> None:
    """Today's path: each file decoded and encoded alone by the cache."""
    for f in files:
        cache.encode(FileAudio(f), cache.key(FileAudio(f)))


def _entries(cache: CodeCache) -> dict[str, bytes]:
    """Every entry's bytes; a skip's detail may name a buffer's address (soundfile's error), which is masked."""
    return {p.name: re.sub(rb"0x[0-9a-f]+", b"0x", p.read_bytes())
            for p in cache.dir.iterdir() if p.name.endswith((".npy", ".skip.json"))}


def _record_batches(codec, monkeypatch, fail_batches: bool = False) -> list[int]:
    sizes, real = [], codec.encode

    def encode(waves, *args, **kwargs):
        sizes.append(waves.shape[0])
        if fail_batches and waves.shape[0] > 1:
            raise RuntimeError("a batch the codec rejects")
        return real(waves, *args, **kwargs)

    monkeypatch.setattr(codec, "encode", encode)
    return sizes


def test_batched_codes_equal_one_at_a_time(codec, tmp_path, monkeypatch):
    files = _corpus(tmp_path / "audio")
    single = CodeCache(tmp_path / "single", codec)
    _sequential(files, single)
    sizes = _record_batches(codec, monkeypatch)
    batched = CodeCache(tmp_path / "batched", codec)
    stats = encode_missing(_samples(files), batched, batch_seconds=60)
    assert max(sizes) == 5 and len(sizes) == 6  # the five equal lengths in one batch, the others alone
    assert stats.encoded == batched.encode_calls == len(files)
    assert stats.audio_seconds == pytest.approx(5 * 1.5 + 1.3 + 2.1 + 0.9 + 2.6 + 0.7, abs=1e-3)
    assert stats.speed > 0
    assert len(_entries(single)) == len(files)
    assert _entries(batched) == _entries(single)  # byte for byte
    assert encode_missing(_samples(files), batched).encoded == 0 and batched.encode_calls == len(files)


def test_failures_in_workers_and_batches_are_skips_as_one_at_a_time(codec, tmp_path, monkeypatch):
    """An unreadable file decoded in a worker process, empty and silent files, and batches the codec rejects (each
    retried alone): the same entries, skips included, as the one-at-a-time path."""
    root = tmp_path / "audio"
    files = _corpus(root)[:5]
    (root / "corrupt.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEnot really audio" + bytes(range(200)))
    sf.write(root / "empty.wav", np.zeros(0, dtype=np.float32), 24000)
    sf.write(root / "silent.wav", np.zeros(36000, dtype=np.float32), 24000)
    files += [root / "corrupt.wav", root / "empty.wav", root / "silent.wav"]
    single = CodeCache(tmp_path / "single", codec)
    _sequential(files, single)
    reasons = sorted(json.loads(v)["reason"] for k, v in _entries(single).items() if k.endswith(".skip.json"))
    assert reasons == ["empty_audio", "silent_audio", "unreadable_audio"]
    sizes = _record_batches(codec, monkeypatch, fail_batches=True)
    batched = CodeCache(tmp_path / "batched", codec)
    stats = encode_missing(_samples(files), batched, workers=2)
    assert 5 in sizes and stats.encoded == 5
    assert _entries(batched) == _entries(single)


def test_one_file_at_a_time_when_batches_are_off(codec, tmp_path, monkeypatch):
    files = _corpus(tmp_path / "audio")[:5]
    sizes = _record_batches(codec, monkeypatch)
    cache = CodeCache(tmp_path / "codes", codec)
    encode_missing(_samples(files), cache, batch_seconds=0)
    assert sizes == [1] * 5 and len(_entries(cache)) == 5


# A `prepare` that logs the name of every entry it stores, to count stores across the killed run and the rerun.
_LOGGED_PREPARE = """
import sys
from higgs_accel import cli
from higgs_accel.codes import CodeCache
real = CodeCache._atomic
def logged(target, write):
    real(target, write)
    with open(sys.argv[1], "a") as f:
        f.write(target.name + "\\n")
CodeCache._atomic = staticmethod(logged)
sys.exit(cli.main(sys.argv[2:]))
"""


@pytest.mark.slow
def test_killed_batched_prepare_and_rerun_encode_each_file_once(tiny, tmp_path):
    rows = []
    for i in range(48):  # lengths repeat (the words differ only in the digits), so batches form
        sf.write(tmp_path / f"{i}.wav", speech_like(f"seven bright stars {i}", RNG), 24000)
        rows.append(json.dumps({"audio": f"{i}.wav", "text": f"seven bright stars {i}"}))
    (tmp_path / "m.jsonl").write_text("\n".join(rows) + "\n")
    log = tmp_path / "stored.txt"
    args = [sys.executable, "-c", _LOGGED_PREPARE, str(log), "prepare", f"model.base={tiny['model.base']}",
            f"model.audio_tokenizer={tiny['model.audio_tokenizer']}", f"data.train_manifest={tmp_path / 'm.jsonl'}",
            f"data.codes_cache={tmp_path / 'codes'}", f"train.output_dir={tmp_path / 'run'}", "data.num_workers=2",
            "data.encode_batch_seconds=8"]
    done = kill_when_encoded(args, tmp_path / "codes", 5)
    assert 5 <= len(done) < 48
    r = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "data train: 48 kept, 0 skipped" in r.stderr
    assert encoded_now(r.stderr) == 48 - len(done)
    stored = [n for n in log.read_text().split() if n.endswith(".npy")]
    assert len(stored) == len(set(stored)) == 48  # every file stored once over both runs, none encoded twice
