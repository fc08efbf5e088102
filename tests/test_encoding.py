"""The encode step (higgs_accel.encoding) stores exactly what the one-at-a-time path stores."""

from __future__ import annotations

import ctypes
import json
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pytest
import soundfile as sf
import torch

from analysis.load import read_events
from higgs_accel import encoding
from higgs_accel.codes import CodeCache, encode_missing
from higgs_accel.config import ModelConfig
from higgs_accel.data import FileAudio, Sample, decode_audio
from higgs_accel.loading import load_codec
from higgs_accel.tiny import speech_like
from tests.conftest import REPO, encoded_now, kill_when_encoded, train_run

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


def _record_batches(codec, monkeypatch, exact: bool = True, fail: bool = False, move_a_code: bool = False,
                    nudge: bool = False, fail_first_check: bool = False) -> list[int]:
    """Record the batch size of every codec call. ``exact``: a batch is encoded file by file inside, as on a device
    whose batches give bit for bit what single files give (the CPU's do not: see the last test); then ``fail``: a
    batch raises; ``move_a_code``: it returns one code changed; ``nudge``: its features (the ``fc`` output the codes
    are quantized from) move by one ulp, as a batched matrix product summing in another order would;
    ``fail_first_check``: the first single-file call right after a batch raises."""
    sizes, real, failed = [], codec.encode, []

    def encode(waves, *args, **kwargs):
        sizes.append(waves.shape[0])
        if fail_first_check and not failed and waves.shape[0] == 1 and sizes[-2:-1] > [1]:
            failed.append(True)
            raise RuntimeError("out of memory, once")
        if waves.shape[0] == 1 or not exact:
            return real(waves, *args, **kwargs)
        if fail:
            raise RuntimeError("a batch the codec rejects")
        hooks = [codec.fc.register_forward_hook(lambda m, a, out: torch.nextafter(out, out + 1), prepend=True)
                 for _ in range(nudge)]
        try:
            codes = torch.cat([real(w[None], *args, **kwargs).audio_codes for w in waves])
        finally:
            for hook in hooks:
                hook.remove()
        if move_a_code:
            codes[-1, 0, 0] = (codes[-1, 0, 0] + 1) % codec.config.codebook_size
        return SimpleNamespace(audio_codes=codes)

    monkeypatch.setattr(codec, "encode", encode)
    return sizes


def test_batched_codes_equal_one_at_a_time(codec, tmp_path, monkeypatch):
    files = _corpus(tmp_path / "audio")
    single = CodeCache(tmp_path / "single", codec)
    _sequential(files, single)
    sizes = _record_batches(codec, monkeypatch)
    batched = CodeCache(tmp_path / "batched", codec)
    stats = encode_missing(_samples(files), batched, batch_seconds=60)
    # The five equal lengths in one batch, its last file checked alone (one more call), the five others alone.
    assert sizes.count(5) == 1 and len(sizes) == 7 and stats.batch_exact is True
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
    sizes = _record_batches(codec, monkeypatch, fail=True)
    batched = CodeCache(tmp_path / "batched", codec)
    stats = encode_missing(_samples(files), batched, workers=2, batch_seconds=60)
    assert 5 in sizes and stats.encoded == 5
    assert _entries(batched) == _entries(single)


def _eight_equal_lengths(root: Path) -> list[Path]:
    """The corpus and three more 1.5 s files: eight of equal length, five of other lengths."""
    return _corpus(root) + [_write(root / f"more{i}.wav", 1.5, 24000, words=w)
                            for i, w in enumerate(["red fox", "blue moon", "cold tea"])]


def _step_against_single(codec, tmp_path: Path, monkeypatch, files: list[Path], **fake):
    """``files`` encoded one at a time into one cache, then by the encode step (up to 6 s of audio per batch) with the
    codec faked as ``fake`` says (see ``_record_batches``) into another: (codec call sizes, the step's stats, whether
    both caches hold the same bytes)."""
    single = CodeCache(tmp_path / "single", codec)
    _sequential(files, single)
    sizes = _record_batches(codec, monkeypatch, **fake)
    cache = CodeCache(tmp_path / "step", codec)
    stats = encode_missing(_samples(files), cache, batch_seconds=6)
    assert stats.encoded == cache.encode_calls == len(files)
    return sizes, stats, _entries(cache) == _entries(single)


def test_each_batch_shape_is_checked_once_and_short_groups_go_alone(codec, tmp_path, monkeypatch):
    files = _eight_equal_lengths(tmp_path / "audio")
    files += [_write(tmp_path / "audio" / f"two{i}.wav", 2.0, 24000, words=w)
              for i, w in enumerate(["green hills", "old roads", "dark woods", "new snow"])]
    sizes, stats, same = _step_against_single(codec, tmp_path, monkeypatch, files)
    # The 1.5 s files in two batches of 4 (one shape, checked once); the 2.0 s ones (3 + 1, too few) and others alone.
    assert sizes.count(4) == 2 and len(sizes) == 2 + 1 + 4 + 5
    assert stats.batch_exact is True and same


@pytest.mark.parametrize("fake", ["move_a_code", "nudge"])
def test_batching_stops_when_a_batch_is_not_exact(codec, tmp_path, monkeypatch, fake):
    """The last file of the first batch is encoded again alone on the device; one moved code, or features one ulp
    off (too little to move a code), stop batching for the rest of the step (files waiting for partners included),
    and that batch is encoded file by file."""
    sizes, stats, same = _step_against_single(codec, tmp_path, monkeypatch, _eight_equal_lengths(tmp_path / "audio"),
                                              **{fake: True})
    first = sizes.index(4)  # the 2.1 s and 2.6 s files come first (longest first), alone
    assert sizes[first:first + 6] == [4, 1, 1, 1, 1, 1] and sizes.count(4) == 1 and len(sizes) == 1 + 1 + 13
    assert stats.batch_exact is False and same


def test_a_check_that_fails_to_run_loses_nothing(codec, tmp_path, monkeypatch):
    """The check's single-file encode raises once: that batch's files are encoded alone and the next batch of the
    same shape is checked instead."""
    sizes, stats, same = _step_against_single(codec, tmp_path, monkeypatch, _eight_equal_lengths(tmp_path / "audio"),
                                              fail_first_check=True)
    first = sizes.index(4)
    assert sizes[first:first + 8] == [4, 1, 1, 1, 1, 1, 4, 1] and len(sizes) == 2 + 2 + 4 + 5
    assert stats.batch_exact is True and same


def test_the_batch_check_tells_the_truth_about_this_cpu(codec, tmp_path, monkeypatch):
    """The real codec, no fakes: the check's verdict is what comparing a batch with one file alone says (today the
    CPU's differ: its convolutions and matrix products block by batch size), and the entries are the one-at-a-time
    path's either way. Without ``data.encode_batch_seconds`` the CPU does not batch."""
    files = _eight_equal_lengths(tmp_path / "audio")
    waves = [decode_audio(FileAudio(f).read(), codec.config.sample_rate) for f in files[:4]]
    codes, features = encoding.encode_waves(codec, waves, "cpu")
    alone_codes, alone_features = encoding.encode_waves(codec, waves[-1:], "cpu")
    exact = bool((codes[-1] == alone_codes[0]).all()) and torch.equal(features[-1], alone_features[0])
    sizes, stats, same = _step_against_single(codec, tmp_path, monkeypatch, files, exact=False)
    assert stats.batch_exact is exact and sizes.count(4) == (2 if exact else 1) and same
    assert encode_missing(_samples(files), CodeCache(tmp_path / "default", codec)).batch_exact is None


def test_processes_combine_speed_and_verdict():
    nan = float("nan")
    assert encoding.across_processes([[10.0, 2.0, nan], [20.0, 4.0, 1.0]]) == {
        "encode_speed": 7.5, "encode_batch_exact": True}  # all the audio over the slowest process's time
    assert encoding.across_processes([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])["encode_batch_exact"] is False
    assert encoding.across_processes([[0.0, 0.0, nan], [0.0, 0.1, nan]]) == {
        "encode_speed": None, "encode_batch_exact": None}
    assert encoding.EncodeStats(batch_exact=False).row() == [0.0, 0.0, 0.0]


def test_a_run_reports_the_batch_check_and_the_speed(tiny, tmp_path):
    """Training on four equal-length files with batches on: ``data_summary`` carries this CPU's verdict (what it is
    is checked above) as a boolean column, and how fast encoding went."""
    rows = []
    for i, words in enumerate(["quiet rivers", "seven stars", "lazy dog", "red fox"]):
        _write(tmp_path / f"{i}.wav", 1.5, 24000, words=words)
        rows.append(json.dumps({"audio": f"{i}.wav", "text": words}))
    (tmp_path / "m.jsonl").write_text("\n".join(rows) + "\n")
    events = train_run(tmp_path / "run", tiny, tmp_path / "codes", data__train_manifest=str(tmp_path / "m.jsonl"),
                       data__val_manifest="", data__encode_batch_seconds=60, train__max_steps=1, train__eval_every=0,
                       train__save_every=0)
    summary = next(e for e in events if e["event"] == "data_summary")
    assert summary["codec_encodes"] == 4 and summary["encode_speed"] > 0
    assert summary["encode_batch_exact"] in (True, False)
    assert read_events(tmp_path / "run")["data_summary"].schema.field("encode_batch_exact").type == pa.bool_()


def test_a_warm_cache_trains_exactly_as_a_cold_one(tiny, tmp_path):
    """The encode step draws randomness only when it has files to encode; the LoRA weights and so the losses must
    not depend on it."""
    runs = [train_run(tmp_path / name, tiny, tmp_path / "codes", train__max_steps=3, train__eval_every=0,
                      train__save_every=0) for name in ("cold", "warm")]
    assert [next(e for e in events if e["event"] == "data_summary")["codec_encodes"] for events in runs][1] == 0
    cold, warm = ([e["loss"] for e in events if e["event"] == "train_step"] for events in runs)
    assert len(cold) == 3 and cold == warm  # (Adam's first update is about lr x sign: step 2 alone may agree)


def test_retained_heap_sets_and_settles_glibc_thresholds(monkeypatch):
    calls = []

    class FakeLibc:
        def mallopt(self, param, value):
            calls.append(("mallopt", param, value))
            return 1

        def malloc_trim(self, pad):
            calls.append(("malloc_trim", pad))
            return 1

    monkeypatch.setattr(encoding, "_glibc", FakeLibc)
    with pytest.raises(RuntimeError), encoding.retained_heap():
        assert calls == [("mallopt", -3, 2**31 - 1), ("mallopt", -1, 2**31 - 1)]
        raise RuntimeError("an encode step that fails still settles the heap")
    assert calls[2:] == [("mallopt", -3, 32 * 2**20), ("mallopt", -1, 64 * 2**20), ("malloc_trim", 0)]
    monkeypatch.setattr(encoding, "_glibc", lambda: None)  # not glibc: nothing to set
    with encoding.retained_heap():
        pass
    assert len(calls) == 5


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                      "fsmblks", "uordblks", "fordblks", "keepcost")]


@pytest.mark.skipif(encoding._glibc() is None or not hasattr(encoding._glibc(), "mallinfo2"), reason="glibc >= 2.33")
def test_retained_heap_keeps_large_blocks_in_the_heap_on_this_glibc():
    """The real C library: inside the block a large allocation comes from the heap, not from a fresh mmap (what
    costs the page faults); after it, glibc maps one again (its threshold is back at 32 MiB). The size is 48 MiB
    more than all the free memory the heap holds, so no free chunk left by earlier tests can serve it, and the
    chunk's own IS_MMAPPED bit says where it came from, not the process-wide count of mapped blocks, which another
    thread's free can change in between (with a fixed 48 MiB and that count the test failed once in CI)."""
    libc = encoding._glibc()
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    libc.mallinfo2.restype = _MallInfo2

    def mapped(extra: int) -> bool:
        block = libc.malloc(libc.mallinfo2().fordblks + extra)
        assert block
        is_mmapped = bool(ctypes.c_size_t.from_address(block - ctypes.sizeof(ctypes.c_size_t)).value & 2)
        libc.free(block)
        return is_mmapped

    with encoding.retained_heap():
        assert not mapped(48 * 2**20)
    assert mapped(48 * 2**20)


def test_a_heap_the_user_tuned_is_left_alone(monkeypatch):
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=1048576")
    assert encoding._glibc() is None


def test_one_file_at_a_time_when_batches_are_off(codec, tmp_path, monkeypatch):
    files = _corpus(tmp_path / "audio")[:5]
    sizes = _record_batches(codec, monkeypatch)
    cache = CodeCache(tmp_path / "codes", codec)
    encode_missing(_samples(files), cache, batch_seconds=0)
    assert sizes == [1] * 5 and len(_entries(cache)) == 5


# A `prepare` that logs the name of every entry it stores and the size of every codec call, to count stores across
# the killed run and the rerun. Its codec encodes a batch file by file inside, so batches are exact and go on (this
# CPU's are not: see above) and the kill lands among batched stores.
_LOGGED_PREPARE = """
import sys
import torch
from types import SimpleNamespace
from transformers import HiggsAudioV2TokenizerModel
from higgs_accel import cli
from higgs_accel.codes import CodeCache
real, real_encode = CodeCache._atomic, HiggsAudioV2TokenizerModel.encode
def logged(target, write):
    real(target, write)
    with open(sys.argv[1], "a") as f:
        f.write(target.name + "\\n")
def exact(self, waves, *args, **kwargs):
    with open(sys.argv[1], "a") as f:
        f.write(f"batch {len(waves)}\\n")
    return SimpleNamespace(audio_codes=torch.cat([real_encode(self, w[None]).audio_codes for w in waves]))
CodeCache._atomic = staticmethod(logged)
HiggsAudioV2TokenizerModel.encode = exact
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
            "data.encode_batch_seconds=12"]
    done = kill_when_encoded(args, tmp_path / "codes", 5)
    assert 5 <= len(done) < 48
    r = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "data train: 48 kept, 0 skipped" in r.stderr
    assert encoded_now(r.stderr) == 48 - len(done) and "x real time)" in r.stderr
    stored = [n for n in log.read_text().split() if n.endswith(".npy")]
    assert len(stored) == len(set(stored)) == 48  # every file stored once over both runs, none encoded twice
    assert max(int(n) for n in re.findall(r"batch (\d+)", log.read_text())) >= 4  # in batches
