"""``higgs-accel dataset``: recordings made by the tests (espeak-ng speech, noise, silence, broken files) through the
real silero-vad and a tiny ASR the tests build, read back: clips, manifests, rejections, resume, training."""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyloudnorm
import pytest
import soundfile as sf

from analysis.schema import EVENTS_DIR, read_parts
from higgs_accel.commands import dataset
from higgs_accel.config import ConfigError
from higgs_accel.data import resample
from higgs_accel.recordings import CutSettings, plan_clips, speech_regions, vad_model
from higgs_accel.tiny import build_asr, build_whisper_asr
from higgs_accel.transcribe import Transcript, compression_ratio, judge

from .conftest import REPO, events_of, of, train_run

SENTENCES = ["The quick brown fox jumps over the lazy dog.", "Seven bright stars hum softly above the quiet river.",
             "Small birds sing every morning in the old green hills.", "A long recording holds several sentences."]
PAUSE = 0.8  # seconds of silence between sentences

pytestmark = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="needs espeak-ng (apt-get install espeak-ng)")


def speak(text: str) -> tuple[np.ndarray, int]:
    wav = subprocess.run(["espeak-ng", "--stdout", "-s", "170", text], capture_output=True, check=True).stdout
    wave, rate = sf.read(io.BytesIO(wav), dtype="float32")
    return wave, rate


@pytest.fixture(scope="module")
def speech() -> tuple[np.ndarray, int]:
    """The four sentences, each after a pause, ending in a pause: mono at espeak's rate (22050 Hz)."""
    pieces, rate = [], 0
    for text in SENTENCES:
        wave, rate = speak(text)
        pieces += [np.zeros(int(PAUSE * rate), np.float32), wave]
    pieces.append(np.zeros(int(PAUSE * rate), np.float32))
    return np.concatenate(pieces), rate


def write_long(path: Path, speech, gain: float = 1.0) -> Path:
    """The recording as 44.1 kHz stereo Ogg Vorbis (channels at different levels)."""
    wave, rate = speech
    wave = gain * resample(wave, rate, 44100)
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, np.stack([wave, 0.6 * wave], axis=1), 44100, format="OGG", subtype="VORBIS")
    return path


@pytest.fixture(scope="module")
def ctc_asr(tmp_path_factory) -> Path:
    """A tiny CTC recogniser that hears 'a' in anything."""
    out = tmp_path_factory.mktemp("asr")
    build_asr(out, says="a")
    return out


def main(*argv: str) -> int:
    """``higgs-accel dataset ARGV`` in this process, as cli.main runs it (a ConfigError is one line and status 2)."""
    parser = argparse.ArgumentParser(prog="higgs-accel")
    dataset.add_parser(parser.add_subparsers())
    args = parser.parse_args(["dataset", *argv])
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"higgs-accel: error: {e}", file=sys.stderr)
        return 2


def lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x, dtype=np.float64)))) if len(x) else 0.0


# ---------------------------------------------------------------- the long recording


def test_long_recording_becomes_one_clip_per_sentence(tmp_path, speech, ctc_asr):
    src = write_long(tmp_path / "in" / "ann" / "talk.ogg", speech)
    out = tmp_path / "out"
    assert main(str(tmp_path / "in"), "--out", str(out), "--asr-model", str(ctc_asr), "--min-seconds", "1",
                "--max-seconds", "8") == 0
    rows = lines(out / "train.jsonl")
    assert lines(out / "val.jsonl") == []  # one source: nothing to hold out
    assert len(rows) == len(SENTENCES)
    starts = [r["start"] for r in rows]
    assert starts == sorted(starts) and all(r["source"] == str(src.resolve()) for r in rows)
    for r in rows:
        info = sf.info(out / r["audio"])
        assert (info.samplerate, info.channels) == (24000, 1)
        wave, _ = sf.read(out / r["audio"], dtype="float32")
        assert 1 <= len(wave) / 24000 <= 8 and abs(len(wave) / 24000 - r["seconds"]) < 0.01
        edge = int(0.03 * 24000)  # the first and last 30 ms are the silence margin
        assert rms(wave[:edge]) < 0.01 * rms(wave) and rms(wave[-edge:]) < 0.01 * rms(wave)
        loudness = pyloudnorm.Meter(24000).integrated_loudness(wave.astype(np.float64))
        assert abs(loudness - (-23.0)) <= 1.0
        assert r["speaker"] == "ann" and r["text"] == "a" and r["asr_model"] == str(ctc_asr)
        assert r["avg_logprob"] is None and r["compression_ratio"] > 0  # a CTC model has no token log-probabilities
    # Each clip holds one sentence: the pauses between clips are where the recording was silent.
    total = len(speech[0]) / speech[1]
    for k, r in enumerate(rows):
        assert k * (PAUSE + 1) < r["end"] and r["start"] < total
    summary = of(events_of(out), "dataset_summary")[-1]
    assert summary["clips"] == len(SENTENCES) and summary["sources"] == 1 and sum(summary["length_counts"]) == 4
    parquet = read_parts(out / EVENTS_DIR / "dataset_summary").to_pylist()
    assert parquet[-1]["clips"] == len(SENTENCES) and parquet[-1]["hours_in"] == pytest.approx(total / 3600, 1e-3)
    assert "| ann | 4 |" in (out / "summary.md").read_text()


def test_batched_vad_decides_like_silero_one_window_at_a_time(speech):
    from silero_vad import get_speech_timestamps

    wave16 = resample(*speech, 16000)
    ours = speech_regions(wave16, 0.5)
    theirs = [(s["start"] / 16000, s["end"] / 16000)
              for s in get_speech_timestamps(wave16, vad_model(), speech_pad_ms=0, min_silence_duration_ms=100)]
    assert len(ours) == len(theirs) == len(SENTENCES)
    assert np.abs(np.array(ours) - np.array(theirs)).max() <= 0.1


def test_plan_clips_merges_short_speech_and_splits_long_speech_at_its_longest_pause():
    s = CutSettings(min_seconds=2.0, max_seconds=6.0, pause_seconds=0.3, margin_seconds=0.1)
    # A 0.5 s word close to the next utterance joins it; a 9 s stretch is split at its longest pause (0.25 s,
    # shorter than pause_seconds, so it was one utterance); 7 s without any pause cannot be cut.
    regions = [(1.0, 1.5), (2.0, 4.0),
               (6.0, 8.0), (8.1, 10.0), (10.25, 13.0), (13.1, 15.0),
               (20.0, 27.0)]
    clips, rejected = plan_clips(regions, 30.0, s)
    assert clips == [(0.9, 4.1), (5.9, 10.1), (10.15, 15.1)]
    assert [(r.reason, r.start, r.end) for r in rejected] == [("no_pause", 20.0, 27.0)]
    # The margin never reaches past the middle of the pause to the next clip.
    tight, _ = plan_clips([(1.0, 3.0), (3.35, 5.0)], 6.0, CutSettings(pause_seconds=0.3, margin_seconds=0.5))
    assert tight == [(0.5, 3.175), (3.175, 5.5)]
    short, rejected = plan_clips([(1.0, 1.4)], 3.0, CutSettings(min_seconds=1.0, margin_seconds=0.1))
    assert short == [] and [r.reason for r in rejected] == ["too_short"]


# ---------------------------------------------------------------- what is not speech


def test_noise_and_silence_give_no_clips_and_count_why(tmp_path, ctc_asr):
    (tmp_path / "in").mkdir()
    rng = np.random.default_rng(0)
    sf.write(tmp_path / "in" / "noise.wav", (0.2 * rng.standard_normal(48000 * 6)).astype(np.float32), 48000)
    sf.write(tmp_path / "in" / "silence.flac", np.zeros(16000 * 6, np.float32), 16000)
    hum = 0.3 * np.sin(2 * np.pi * 50 * np.arange(24000 * 6) / 24000)
    sf.write(tmp_path / "in" / "hum.wav", hum.astype(np.float32), 24000)
    out = tmp_path / "out"
    assert main(str(tmp_path / "in"), "--out", str(out), "--asr-model", str(ctc_asr)) == 0
    assert lines(out / "train.jsonl") == [] and lines(out / "val.jsonl") == []
    assert list((out / "clips").iterdir()) == []
    summary = of(events_of(out), "dataset_summary")[-1]
    assert summary["clips"] == 0 and summary["rejected_by_reason"] == {"no_speech": 3}
    rejects = of(events_of(out), "dataset_reject")
    assert sorted(Path(r["source"]).name for r in rejects) == ["hum.wav", "noise.wav", "silence.flac"]


def test_audio_checks_reject_clipped_and_noisy_speech(tmp_path, speech, ctc_asr):
    wave, rate = speech
    (tmp_path / "in").mkdir()
    sf.write(tmp_path / "in" / "loud.wav", np.clip(8 * wave, -1, 1), rate)
    noisy = wave + 0.5 * rms(wave) * np.random.default_rng(1).standard_normal(len(wave)).astype(np.float32)
    sf.write(tmp_path / "in" / "noisy.wav", noisy, rate)
    out = tmp_path / "out"
    assert main(str(tmp_path / "in"), "--out", str(out), "--asr-model", str(ctc_asr), "--min-snr-db", "30") == 0
    reasons = {Path(r["source"]).name: r["reason"] for r in of(events_of(out), "dataset_reject")}
    assert reasons == {"loud.wav": "clipped", "noisy.wav": "low_snr"}


# ---------------------------------------------------------------- text that comes with the audio


def test_ljspeech_and_sidecar_text_are_kept_and_nothing_is_transcribed(tmp_path, speech):
    lj = tmp_path / "LJSpeech-1.1"
    (lj / "wavs").mkdir(parents=True)
    rows = []
    for i, text in enumerate(SENTENCES[:2]):
        wave, rate = speak(text)
        sf.write(lj / "wavs" / f"LJ001-{i:04d}.wav", resample(wave, rate, 16000), 16000)
        rows.append(f"LJ001-{i:04d}|{text.upper()}|{text}")
    (lj / "metadata.csv").write_text("\n".join(rows) + "\n")
    side = tmp_path / "notes" / "bob"
    side.mkdir(parents=True)
    wave, rate = speak(SENTENCES[2])
    sf.write(side / "memo.flac", wave, rate)
    (side / "memo.txt").write_text(SENTENCES[2] + "\n")
    out = tmp_path / "out"
    # An ASR model that cannot load: the run succeeds only because no clip needs it.
    assert main(str(lj), str(tmp_path / "notes"), "--out", str(out), "--asr-model", "nobody/no-such-asr",
                "--val-fraction", "0") == 0
    got = {r["text"]: r for r in lines(out / "train.jsonl")}
    assert set(got) == set(SENTENCES[:3])
    assert got[SENTENCES[0]]["speaker"] == "LJSpeech-1.1" and got[SENTENCES[2]]["speaker"] == "bob"
    assert not any("asr_model" in r for r in got.values())
    for r in got.values():
        assert sf.info(out / r["audio"]).samplerate == 24000


# ---------------------------------------------------------------- transcription


def test_asr_rules_each_fire_on_a_crafted_transcript():
    def verdict(text, seconds=3.0, logprob=-0.2):
        found = judge(Transcript(text, logprob, compression_ratio(text)), seconds)
        return found and found[0]

    assert verdict("The quick brown fox jumps over the lazy dog.") is None
    assert verdict("") == verdict("   ") == "asr_empty"
    assert verdict("thank you " * 20, seconds=20.0) == "asr_repetition"
    assert verdict("The quick brown fox jumps over the lazy dog.", logprob=-1.5) == "asr_low_logprob"
    assert verdict("The quick brown fox jumps over the lazy dog.", logprob=None) is None  # CTC: no log-probability
    assert verdict("Seven bright stars hum softly above the quiet river, all night long.", seconds=1.0) == \
        "asr_too_long"


def test_rejected_transcripts_leave_no_clip(tmp_path, speech, ctc_asr):
    write_long(tmp_path / "in" / "talk.ogg", speech)
    whisper = tmp_path / "whisper"
    build_whisper_asr(whisper)  # hears nothing in anything
    empty, long = tmp_path / "empty", tmp_path / "long"
    assert main(str(tmp_path / "in"), "--out", str(empty), "--asr-model", str(whisper), "--language", "en") == 0
    assert main(str(tmp_path / "in"), "--out", str(long), "--asr-model", str(ctc_asr),
                "--max-chars-per-second", "0.1") == 0
    for out, reason in ((empty, "asr_empty"), (long, "asr_too_long")):
        assert lines(out / "train.jsonl") == [] and list((out / "clips").iterdir()) == []
        rejects = of(events_of(out), "dataset_reject")
        assert [r["reason"] for r in rejects] == [reason] * len(SENTENCES)
    # Whisper generates tokens: its average log-probability is recorded with the rejection.
    assert all(r["avg_logprob"] is not None and r["text"] == "" for r in of(events_of(empty), "dataset_reject"))


# ---------------------------------------------------------------- resume, skips, strict


@pytest.mark.slow
def test_killed_and_rerun_each_source_once_and_a_second_rerun_does_nothing(tmp_path, speech, ctc_asr):
    for i in range(8):
        write_long(tmp_path / "in" / f"take{i}.ogg", speech, gain=0.5 + 0.05 * i)
    out = tmp_path / "out"
    argv = [str(tmp_path / "in"), "--out", str(out), "--asr-model", str(ctc_asr)]
    script = ("import argparse, sys; from higgs_accel.commands import dataset; p = argparse.ArgumentParser(); "
              "dataset.add_parser(p.add_subparsers()); a = p.parse_args(sys.argv[1:]); sys.exit(a.func(a))")
    proc = subprocess.Popen([sys.executable, "-c", script, "dataset", *argv], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    records = out / "state" / "sources"
    deadline = time.time() + 120
    while time.time() < deadline and len(list(records.glob("*.json"))) < 2:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    finished = len(list(records.glob("*.json")))
    assert 2 <= finished < 8, "the kill came too late to test a resume"
    for clip in (out / "clips").glob("*.wav"):  # whatever the kill left is a whole file
        sf.read(clip)

    assert main(*argv) == 0
    starts = of(events_of(out), "dataset_start")
    assert starts[-1]["pending"] == 8 - finished
    rows = lines(out / "train.jsonl") + lines(out / "val.jsonl")
    assert len(rows) == 8 * len(SENTENCES)
    assert sorted({r["source"] for r in rows}) == sorted(str(p.resolve()) for p in (tmp_path / "in").iterdir())
    assert {r["audio"] for r in rows} == {f"clips/{p.name}" for p in (out / "clips").iterdir()}
    assert not list(out.rglob("*.tmp"))
    val_sources = {r["source"] for r in lines(out / "val.jsonl")}
    assert len(val_sources) == 1 and not val_sources & {r["source"] for r in lines(out / "train.jsonl")}

    before = {p: p.stat().st_mtime_ns for p in records.iterdir()}
    manifests = (out / "train.jsonl").read_text(), (out / "val.jsonl").read_text()
    assert main(*argv) == 0
    assert of(events_of(out), "dataset_start")[-1]["pending"] == 0
    assert {p: p.stat().st_mtime_ns for p in records.iterdir()} == before
    assert ((out / "train.jsonl").read_text(), (out / "val.jsonl").read_text()) == manifests
    # Every source has exactly one dataset_source event across the three runs, kill included.
    per_source = [e["source"] for e in of(events_of(out), "dataset_source")]
    assert sorted(per_source) == sorted(set(per_source)) and len(per_source) == 8


def test_unreadable_and_empty_files_are_skipped_and_strict_lists_them(tmp_path, speech, ctc_asr, capsys):
    write_long(tmp_path / "in" / "good.ogg", speech)
    (tmp_path / "in" / "broken.wav").write_bytes(b"RIFF this is not a wave file")
    (tmp_path / "in" / "empty.flac").write_bytes(b"")
    out = tmp_path / "out"
    assert main(str(tmp_path / "in"), "--out", str(out), "--asr-model", str(ctc_asr)) == 0
    skips = {Path(e["source"]).name: e["reason"] for e in of(events_of(out), "data_skip")}
    assert skips == {"broken.wav": "unreadable", "empty.flac": "empty_file"}
    assert of(events_of(out), "dataset_summary")[-1]["skipped_by_reason"] == {"empty_file": 1, "unreadable": 1}
    capsys.readouterr()
    assert main(str(tmp_path / "in"), "--out", str(out), "--asr-model", str(ctc_asr), "--strict") == 2
    err = capsys.readouterr().err
    assert "--strict: 2 source(s) skipped" in err
    assert "broken.wav: unreadable" in err and "empty.flac: empty_file" in err


@pytest.mark.parametrize("argv, message", [
    (["missing-dir"], "missing-dir: not found"),
    (["IN", "--min-seconds", "9", "--max-seconds", "5"], "--min-seconds must be between 0 and --max-seconds"),
    (["IN", "--asr-model", "./no/such/dir"], "--asr-model: model dir not found"),
])
def test_bad_input_is_one_line_and_status_2(tmp_path, capsys, argv, message):
    (tmp_path / "IN").mkdir()
    sf.write(tmp_path / "IN" / "x.wav", np.zeros(2400, np.float32), 24000)
    os.chdir(tmp_path)
    assert main(*argv, "--out", str(tmp_path / "out")) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_no_text_and_no_asr_model_is_one_line(tmp_path, speech, capsys):
    write_long(tmp_path / "in" / "talk.ogg", speech)
    assert main(str(tmp_path / "in"), "--out", str(tmp_path / "out")) == 2
    assert "need --asr-model" in capsys.readouterr().err


# ---------------------------------------------------------------- the output trains


def test_the_output_trains_one_step(tmp_path, speech, ctc_asr, tiny, codes_cache):
    for name in ("one", "two"):
        write_long(tmp_path / "in" / f"{name}.ogg", speech)
    out = tmp_path / "out"
    assert main(str(tmp_path / "in"), "--out", str(out), "--asr-model", str(ctc_asr), "--val-fraction", "0.5") == 0
    events = train_run(tmp_path / "run", tiny, codes_cache, data__train_manifest=str(out / "train.jsonl"),
                       data__val_manifest=str(out / "val.jsonl"), train__max_steps=1, train__save_every=0,
                       train__eval_every=1)
    start = of(events, "run_start")[0]
    assert start["train_samples"] == start["val_samples"] == len(SENTENCES)
    assert len(of(events, "train_step")) == 1 and of(events, "eval") and not of(events, "data_skip")


@pytest.mark.slow
def test_workers_make_the_same_dataset(tmp_path, speech, ctc_asr):
    for i in range(3):
        write_long(tmp_path / "in" / f"take{i}.ogg", speech, gain=0.6 + 0.1 * i)
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(str(tmp_path / "in"), "--out", str(one), "--asr-model", str(ctc_asr)) == 0
    assert main(str(tmp_path / "in"), "--out", str(two), "--asr-model", str(ctc_asr), "--workers", "2") == 0
    for name in ("train.jsonl", "val.jsonl"):
        assert (one / name).read_text() == (two / name).read_text()
    for clip in (one / "clips").iterdir():
        assert clip.read_bytes() == (two / "clips" / clip.name).read_bytes()
