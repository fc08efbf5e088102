"""Real data: many formats and rates, every kind of bad input, datasets and audiofolders, the codes cache."""

from __future__ import annotations

import copy
import io
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import soundfile as sf
import torch
from accelerate.data_loader import prepare_data_loader, skip_first_batches
from accelerate.utils import DataLoaderConfiguration
from torch.utils.data import DataLoader
from transformers import HiggsAudioV2TokenizerModel

from higgs_accel.cli import main
from higgs_accel.codes import CodeCache, codec_identity, resolve
from higgs_accel.config import ConfigError, DataConfig, ModelConfig
from higgs_accel.data import EpochSampler, LengthGroupedBatches, read_source
from higgs_accel.loading import load_codec
from higgs_accel.tiny import speech_like
from tests.conftest import REPO, encoded_now, kill_when_encoded, of, train_run

RNG = np.random.default_rng(0)


def _speech(text: str, sr: int, channels: int = 1) -> np.ndarray:
    wave = speech_like(text, RNG, sr)
    return np.stack([wave, 0.7 * wave], axis=1) if channels == 2 else wave


def build_corpus(root: Path) -> tuple[Path, dict[int, str]]:
    """A manifest with good files in five formats and rates (some stereo, one voice-cloning sample) and one line
    for each kind of bad input; returns the manifest and {line: reason} of the planted problems."""
    root.mkdir(parents=True, exist_ok=True)
    good = [("a.wav", 8000, 1, "WAV"), ("b.flac", 16000, 2, "FLAC"), ("c.ogg", 22050, 1, "OGG"),
            ("d.mp3", 44100, 2, "MP3"), ("e.wav", 48000, 2, "WAV"), ("f.flac", 24000, 1, "FLAC")]
    lines = []
    for name, sr, ch, fmt in good:
        text = f"quick brown fox {name[0]} jumps over"
        sf.write(root / name, _speech(text, sr, ch), sr, format=fmt)
        lines.append(json.dumps({"audio": name, "text": text, "speaker": "s1"}))
    lines.append(json.dumps({"audio": "b.flac", "text": "say it like that", "ref_audio": "a.wav",
                             "ref_text": "quick brown fox a jumps over", "scene": "a quiet room"}))
    (root / "corrupt.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEnot really audio" + bytes(RNG.integers(0, 255, 500)))
    sf.write(root / "empty.wav", np.zeros(0, dtype=np.float32), 24000)
    sf.write(root / "silent.wav", np.zeros(24000, dtype=np.float32), 24000)
    sf.write(root / "long.wav", _speech("the quick brown fox " * 12, 24000), 24000)
    planted = {}

    def bad(line: str, reason: str):
        lines.append(line)
        planted[len(lines)] = reason

    bad(json.dumps({"audio": "nope.wav", "text": "missing"}), "missing_file")
    bad(json.dumps({"audio": "corrupt.wav", "text": "corrupt"}), "unreadable_audio")
    bad(json.dumps({"audio": "empty.wav", "text": "empty"}), "empty_audio")
    bad(json.dumps({"audio": "silent.wav", "text": "silence"}), "silent_audio")
    bad(json.dumps({"audio": "a.wav", "text": "   "}), "empty_text")
    bad('{"audio": "a.wav", "text": "broken', "invalid_json")
    bad(json.dumps({"text": "no audio field"}), "missing_field")
    bad(json.dumps({"audio": "long.wav", "text": "too long"}), "length")
    manifest = root / "train.jsonl"
    text = "\n".join(lines).encode() + b"\n" + '{"audio": "a.wav", "text": "caf\xe9"}'.encode("latin-1") + b"\n"
    manifest.write_bytes(text)
    planted[len(lines) + 1] = "not_utf8"
    return manifest, planted


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return build_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def codec(tiny):
    return load_codec(ModelConfig(audio_tokenizer=tiny["model.audio_tokenizer"]))


def test_run_completes_and_skips_exactly_the_planted_problems(corpus, tiny, tmp_path, monkeypatch):
    manifest, planted = corpus
    cache_dir = tmp_path / "codes"
    overrides = dict(data__train_manifest=str(manifest), data__val_manifest="", data__max_seconds=6.0,
                     data__codes_cache=str(cache_dir), train__max_steps=6, train__batch_size=2,
                     train__eval_every=0, train__save_every=0)
    events = train_run(tmp_path / "run1", tiny, cache_dir, **overrides)
    skips = of(events, "data_skip")
    assert {e["line"]: e["reason"] for e in skips} == planted
    assert all(e["source"] == str(manifest) for e in skips)
    summary = of(events, "data_summary")[0]
    assert summary["kept"] == 7 and summary["skipped"] == len(planted) and summary["codec_encodes"] > 0
    assert of(events, "run_end")[0]["status"] == "finished"

    # A second run (6 steps = several epochs of 7 samples) reads every code from the cache: zero encodes.
    calls = []
    real = HiggsAudioV2TokenizerModel.encode
    monkeypatch.setattr(HiggsAudioV2TokenizerModel, "encode", lambda *a, **k: calls.append(1) or real(*a, **k))
    events = train_run(tmp_path / "run2", tiny, cache_dir, **overrides)
    assert calls == [] and of(events, "data_summary")[0]["codec_encodes"] == 0
    assert max(e["epoch"] for e in of(events, "train_step")) >= 1


def test_min_seconds_and_val_manifest_skips_are_reported_under_their_split(tiny, codes_cache, tmp_path):
    rows = []
    for i, seconds in enumerate((0.4, 1.2, 2.0)):
        t = np.arange(int(seconds * 24000)) / 24000
        sf.write(tmp_path / f"{i}.wav", (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), 24000)
        rows.append({"audio": f"{i}.wav", "text": f"tone {i}"})
    train = _manifest(tmp_path, rows)
    val = tmp_path / "val.jsonl"
    val.write_text("{broken\n" + json.dumps({"audio": "1.wav", "text": "tone"}) + "\n")
    events = train_run(tmp_path / "run", tiny, codes_cache, data__train_manifest=train, data__val_manifest=str(val),
                       data__min_seconds=1.0, train__max_steps=1, train__batch_size=2, train__eval_every=0,
                       train__save_every=0)
    skips = of(events, "data_skip")
    assert [(e["split"], e["source"], e["line"], e["reason"]) for e in skips] == [
        ("train", train, 1, "length"), ("val", str(val), 1, "invalid_json")]
    assert "0.40s outside [1.0, 30.0]" in skips[0]["detail"]
    assert {e["split"]: (e["kept"], e["skipped"]) for e in of(events, "data_summary")} == {"train": (2, 1),
                                                                                          "val": (1, 1)}


def test_prepare_counts_val_manifest_problems_under_val(tiny, codes_cache, tmp_path, capsys):
    wav = Path(tiny["data.train_manifest"]).parent / json.loads(Path(tiny["data.train_manifest"]).read_text()
                                                                 .splitlines()[0])["audio"]
    (tmp_path / "train.jsonl").write_text(json.dumps({"audio": str(wav), "text": "fine"}) + "\n")
    (tmp_path / "val.jsonl").write_text("{broken\n" + json.dumps({"audio": str(wav), "text": "fine"}) + "\n")
    pairs = [("model.base", tiny["model.base"]), ("model.audio_tokenizer", tiny["model.audio_tokenizer"]),
             ("data.train_manifest", str(tmp_path / "train.jsonl")), ("data.val_manifest", str(tmp_path / "val.jsonl")),
             ("data.codes_cache", str(codes_cache)), ("train.output_dir", str(tmp_path / "run"))]
    assert main(["prepare", *(f"{k}={v}" for k, v in pairs)]) == 0
    err = capsys.readouterr().err
    assert "data train: 1 kept, 0 skipped (none)" in err
    assert "data val: 1 kept, 1 skipped (invalid_json: 1)" in err


def test_strict_lists_every_problem(corpus, tiny, tmp_path):
    manifest, planted = corpus
    with pytest.raises(ConfigError) as err:
        train_run(tmp_path, tiny, tmp_path / "codes", data__train_manifest=str(manifest), data__strict=True,
                  data__max_seconds=6.0)
    message = str(err.value)
    assert f"{len(planted)} bad sample(s)" in message
    for line, reason in planted.items():
        assert f"{manifest}:{line}: {reason}" in message
    assert not (tmp_path / "adapter").exists()


def test_formats_rates_and_channels_become_24k_mono_codes(corpus, codec, tmp_path):
    manifest, _ = corpus
    samples, _ = read_source(str(manifest), DataConfig())
    kept, _ = resolve(samples, CodeCache(tmp_path, codec), 0.0, 6.0)
    by_name = {Path(str(s.audio)).name: s for s in kept if s.ref_audio is None}
    assert set(by_name) == {"a.wav", "b.flac", "c.ogg", "d.mp3", "e.wav", "f.flac"}
    for name, s in by_name.items():
        seconds = sf.info(str(s.audio)).duration
        assert abs(s.frames / 25 - seconds) < 0.1, name  # 25 frames/s whatever the input rate
    cloned = next(s for s in kept if s.ref_audio is not None)
    assert cloned.ref_codes and cloned.codes and cloned.scene == "a quiet room"


def test_saved_dataset_and_audiofolder_inputs(codec, tmp_path):
    import datasets

    waves = {f"u{i}.wav": _speech(f"hills and rivers {i}", 24000) for i in range(3)}
    texts = {name: f"hills and rivers {i}" for i, name in enumerate(waves)}
    blobs = []
    for name, wave in waves.items():
        buf = io.BytesIO()
        sf.write(buf, wave, 24000, format="WAV")
        blobs.append({"bytes": buf.getvalue(), "path": name})
    table = pa.table({"speech": pa.array(blobs + [None]),
                      "sentence": list(texts.values()) + ["no audio"]})
    ds = datasets.Dataset(table).cast_column("speech", datasets.Audio(decode=False))
    ds.save_to_disk(str(tmp_path / "ds"))
    fields = DataConfig(audio_field="speech", text_field="sentence")
    samples, skips = read_source(str(tmp_path / "ds"), fields)
    assert [s.text for s in samples] == list(texts.values())
    assert [(s.line, s.reason) for s in skips] == [(3, "missing_field")]
    kept, _ = resolve(samples, CodeCache(tmp_path / "c", codec), 0, 30)
    assert len(kept) == 3 and all(s.frames > 0 for s in kept)

    folder = tmp_path / "folder"
    folder.mkdir()
    for name, wave in waves.items():
        sf.write(folder / name, wave, 24000)
    (folder / "metadata.csv").write_text("file_name,transcription\n" + "".join(
        f"{n},{t}\n" for n, t in texts.items()) + "gone.wav,missing file\n")
    samples, skips = read_source(str(folder), DataConfig(text_field="transcription"))
    kept, more = resolve(samples, CodeCache(tmp_path / "c", codec), 0, 30)
    assert len(kept) == 3 and [(s.line, s.reason) for s in skips + more] == [(5, "missing_file")]


def test_changed_file_reencodes_and_unchanged_is_not_rehashed(codec, tmp_path):
    path = tmp_path / "x.wav"
    sf.write(path, _speech("old green hills", 24000), 24000)
    samples, _ = read_source(_manifest(tmp_path, [{"audio": "x.wav", "text": "t"}]), DataConfig())
    cache = CodeCache(tmp_path / "codes", codec)
    resolve(samples, cache, 0, 30)
    first = samples[0].codes
    again = CodeCache(tmp_path / "codes", codec)  # a new process: the path index says it is unchanged
    resolve(samples, again, 0, 30)
    assert again.encode_calls == 0 and samples[0].codes == first
    time.sleep(0.01)
    sf.write(path, _speech("quiet rivers sing", 24000), 24000)
    resolve(samples, again, 0, 30)
    assert again.encode_calls == 1 and samples[0].codes != first


def test_codes_are_read_from_disk_once_then_from_memory(codec, tmp_path, monkeypatch):
    from higgs_accel import codes as codes_module

    sf.write(tmp_path / "x.wav", _speech("old green hills", 24000), 24000)
    samples, _ = read_source(_manifest(tmp_path, [{"audio": "x.wav", "text": "t"}]), DataConfig())
    cache = CodeCache(tmp_path / "codes", codec)
    resolve(samples, cache, 0, 30)
    reads = []
    real_load = np.load
    monkeypatch.setattr(codes_module.np, "load", lambda *a, **k: reads.append(a[0]) or real_load(*a, **k))
    first, second = cache.load(samples[0].codes), cache.load(samples[0].codes)
    assert len(reads) == 1 and np.array_equal(first, second) and not first.flags.writeable
    monkeypatch.setattr(codes_module, "MEMORY_BYTES", 0)  # over the limit: read every time, kept nowhere
    small = CodeCache(tmp_path / "codes", codec)
    small.load(samples[0].codes), small.load(samples[0].codes)
    assert len(reads) == 3


def test_other_codec_weights_get_their_own_cache_and_reencode(codec, tiny, tmp_path):
    sf.write(tmp_path / "x.wav", _speech("old green hills", 24000), 24000)
    samples, _ = read_source(_manifest(tmp_path, [{"audio": "x.wav", "text": "t"}]), DataConfig())
    cache = CodeCache(tmp_path / "codes", codec)
    resolve(samples, cache, 0, 30)
    reloaded = CodeCache(tmp_path / "codes", load_codec(ModelConfig(audio_tokenizer=tiny["model.audio_tokenizer"])))
    resolve(samples, reloaded, 0, 30)
    assert reloaded.dir == cache.dir and reloaded.encode_calls == 0

    torch.manual_seed(123)
    other = HiggsAudioV2TokenizerModel(codec.config).eval()
    retrained = CodeCache(tmp_path / "codes", other)
    resolve(samples, retrained, 0, 30)
    assert retrained.dir != cache.dir and retrained.encode_calls == 1


def test_codec_identity_sees_every_weight_not_just_sums(codec):
    """Two codecs whose every tensor has the same sum (a single 1 moved within one weight) are different codecs."""
    name = next(n for n, p in codec.named_parameters() if p.numel() > 1)
    identities = set()
    for position in (0, 1):
        moved = copy.deepcopy(codec)
        with torch.no_grad():
            moved.get_parameter(name).zero_().view(-1)[position] = 1.0
        identities.add(codec_identity(moved))
    assert len(identities) == 2 and codec_identity(codec) not in identities
    assert codec_identity(copy.deepcopy(codec)) == codec_identity(codec)


def _manifest(root: Path, rows: list[dict]) -> str:
    path = root / "m.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.mark.slow
def test_killed_prepare_leaves_no_corrupt_entry_and_resumes(tiny, tmp_path):
    rows = []
    for i in range(60):
        sf.write(tmp_path / f"{i}.wav", _speech(f"seven bright stars {i}", 24000), 24000)
        rows.append({"audio": f"{i}.wav", "text": f"seven bright stars {i}"})
    manifest = _manifest(tmp_path, rows)
    args = [sys.executable, "-m", "higgs_accel", "prepare", f"model.base={tiny['model.base']}",
            f"model.audio_tokenizer={tiny['model.audio_tokenizer']}", f"data.train_manifest={manifest}",
            f"data.codes_cache={tmp_path / 'codes'}", f"train.output_dir={tmp_path / 'run'}"]
    done = kill_when_encoded(args, tmp_path / "codes", 5)
    assert 5 <= len(done) < 60
    for entry in done:
        assert np.load(entry).shape[0] == 8
    r = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "data train: 60 kept, 0 skipped" in r.stderr
    assert encoded_now(r.stderr) == 60 - len(done)


def test_length_grouping_wastes_less_padding_and_covers_every_sample_once():
    lengths = [int(x) for x in RNG.integers(50, 600, 400)]

    def padding(batches):
        return sum(len(b) * max(lengths[i] for i in b) - sum(lengths[i] for i in b) for b in batches)

    order = EpochSampler(len(lengths), seed=1)
    grouped = list(LengthGroupedBatches(order, lengths, batch_size=8))
    shuffled = [list(order)[i:i + 8] for i in range(0, len(lengths), 8)]
    assert padding(grouped) < 0.3 * padding(shuffled)
    assert sorted(i for b in grouped for i in b) == list(range(len(lengths)))
    assert grouped == list(LengthGroupedBatches(EpochSampler(len(lengths), seed=1), lengths, batch_size=8))
    order.set_epoch(1)
    assert list(LengthGroupedBatches(order, lengths, batch_size=8)) != grouped

    capped = list(LengthGroupedBatches(EpochSampler(len(lengths), 1), lengths, batch_size=8, max_tokens=2000))
    assert all(len(b) * max(lengths[i] for i in b) <= 2000 for b in capped if len(b) > 1)
    assert sorted(i for b in capped for i in b) == list(range(len(lengths)))


def _prepared(lengths: list[int], max_tokens: int, rank: int, epoch: int = 0):
    """A fresh length-grouped loader put through accelerate's own preparation for rank ``rank`` of 2, with the
    dataloader settings ``Accelerator()`` uses by default; set to ``epoch``."""
    config = DataLoaderConfiguration()
    batches = LengthGroupedBatches(EpochSampler(len(lengths), seed=1), lengths, batch_size=8, max_tokens=max_tokens)
    loader = DataLoader(range(len(lengths)), batch_sampler=batches, collate_fn=list)
    prepared = prepare_data_loader(loader, num_processes=2, process_index=rank, split_batches=config.split_batches,
                                   dispatch_batches=config.dispatch_batches, even_batches=config.even_batches,
                                   use_seedable_sampler=config.use_seedable_sampler)
    prepared.set_epoch(epoch)
    return prepared, batches


@pytest.mark.parametrize("max_tokens", [0, 2000])
def test_two_processes_see_every_sample_each_epoch(max_tokens):
    """197 samples in batches of 8 (or of at most 2000 tokens) leave short batches and an odd batch count."""
    lengths = [int(x) for x in np.random.default_rng(3).integers(50, 600, 197)]
    orders = []
    for epoch in (0, 1):
        per_rank = []
        for rank in range(2):
            prepared, batches = _prepared(lengths, max_tokens, rank, epoch)
            per_rank.append(list(prepared))
            assert len(prepared) == len(per_rank[-1])  # what steps_per_epoch is computed from
        everything = list(batches)  # the same epoch, unsharded
        assert len(per_rank[0]) == len(per_rank[1]) == -(-len(everything) // 2)
        # batches dealt in turn, whole; only the last round is topped up, with the epoch's first batch
        dealt = [b for pair in zip(*per_rank) for b in pair]
        assert dealt == everything + everything[:len(dealt) - len(everything)]
        assert sorted({i for b in dealt for i in b}) == list(range(len(lengths)))
        orders.append(dealt)
    assert orders[0] != orders[1]
    assert [list(_prepared(lengths, max_tokens, r, 1)[0]) for r in range(2)] == [orders[1][0::2], orders[1][1::2]]


def test_resume_mid_epoch_on_two_processes_continues_the_same_order():
    """What the loop does on resume: a fresh process sets the epoch on the prepared loader, then skips the batches
    already consumed (accelerate's skip loader cannot reach our sampler's epoch itself under several processes)."""
    lengths = [int(x) for x in np.random.default_rng(4).integers(50, 600, 90)]
    for rank in range(2):
        full = list(_prepared(lengths, 0, rank, epoch=2)[0])
        assert full != list(_prepared(lengths, 0, rank)[0])
        prepared, _ = _prepared(lengths, 0, rank)
        prepared.set_epoch(2)
        assert list(skip_first_batches(prepared, 3)) == full[3:]


def test_codes_lost_mid_run_skip_the_sample_and_training_goes_on(tiny, codes_cache, tmp_path, monkeypatch):
    lost = {}
    real = CodeCache.load

    def load(self, digest):
        if not lost:
            lost[digest] = True
        if digest in lost:
            raise OSError(f"{digest}.npy: No such file or directory")
        return real(self, digest)

    monkeypatch.setattr(CodeCache, "load", load)
    events = train_run(tmp_path, tiny, codes_cache, train__max_steps=4, train__eval_every=0, train__save_every=0)
    skips = [e for e in of(events, "data_skip") if e["reason"] == "missing_codes"]
    assert skips and all(e["step"] <= 4 for e in skips)
    assert of(events, "run_end")[0]["status"] == "finished"

    # With one sample a batch the lost sample is a whole batch: skipped, and no step is taken without data.
    events = train_run(tmp_path / "one", tiny, codes_cache, train__max_steps=20, train__batch_size=1,
                       train__eval_every=0, train__save_every=0)
    steps = of(events, "train_step")
    assert [e["step"] for e in steps] == list(range(1, 21))
    assert all(e["samples"] == 1 and e["loss"] is not None for e in steps)
    assert len([e for e in of(events, "data_skip") if e["reason"] == "missing_codes"]) >= 1
