"""The dataset command's speed: hours of recordings processed per hour of wall time, split into decode, VAD,
normalise (resampling, audio checks, loudness) and write, then transcription with a tiny ASR model (the pipeline's
overhead) and with a real-size Whisper large-v3 of random weights (what transcription costs on this device).

Recordings: espeak-ng sentences with pauses of 0.3-1.2 s over faint noise, as 44.1 kHz stereo FLAC files of
``--minutes`` in all. Stage seconds are what ``dataset_dir.build`` records per source, summed; the ratio printed
last is audio seconds over decode + VAD + normalise + write seconds in one process. ``--workers`` runs the whole
build (tiny ASR included) again over that many processes and reports its wall time. Whisper large-v3 (1.55 B
parameters, 128 mel bins, 51,866 tokens) is built from its configuration with random weights, no download; its
decoding is capped at ``--tokens`` tokens a clip (a random decoder never ends; a 5 s transcript is about 20 tokens).
Target: decode + VAD + normalise at least 50x real time on 2 CPU cores.
Usage: python bench/dataset.py [--minutes 12] [--files 4] [--workers 2] [--whisper-clips 4] [--device cuda] [--quick]
"""

from __future__ import annotations

import argparse
import io
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

from higgs_accel.data import resample
from higgs_accel.dataset_dir import BuildOptions, build, run_id
from higgs_accel.events import EventLog
from higgs_accel.recordings import OUT_RATE, find_sources
from higgs_accel.tiny import WORDS, build_asr, build_whisper_asr
from higgs_accel.transcribe import Transcriber

STAGES = ("decode", "vad", "normalise", "write", "asr")


def make_recordings(folder: Path, minutes: float, files: int, seed: int = 0) -> float:
    """``files`` FLAC recordings of ``minutes`` in all; return their seconds."""
    rng = np.random.default_rng(seed)
    sentences = []
    for i in range(16):
        words = rng.choice(WORDS, size=int(rng.integers(5, 14)))
        wav = subprocess.run(["espeak-ng", "--stdout", "-s", str(150 + 5 * (i % 6)), " ".join(words)],
                             capture_output=True, check=True).stdout
        wave, rate = sf.read(io.BytesIO(wav), dtype="float32")
        sentences.append(resample(wave, rate, 44100))
    folder.mkdir(parents=True, exist_ok=True)
    total = 0.0
    for f in range(files):
        pieces, seconds = [], 0.0
        while seconds < minutes * 60 / files:
            pause = np.zeros(int(rng.uniform(0.3, 1.2) * 44100), np.float32)
            speech = sentences[int(rng.integers(len(sentences)))] * rng.uniform(0.3, 1.0)
            pieces += [pause, speech.astype(np.float32)]
            seconds += (len(pause) + len(speech)) / 44100
        wave = np.concatenate(pieces)
        wave += 1e-3 * rng.standard_normal(len(wave)).astype(np.float32)
        sf.write(folder / f"rec{f}.flac", np.stack([wave, 0.8 * wave], axis=1), 44100)
        total += len(wave) / 44100
    return total


def run_build(src: Path, out: Path, asr: Path, workers: int) -> tuple[float, dict, int]:
    """Wall seconds, stage seconds and clips of one build of ``src`` into a new ``out``."""
    opts = BuildOptions(asr_model=str(asr), workers=workers, val_fraction=0.0)
    out.mkdir(parents=True)
    log = EventLog(out, run_id(out))
    start = time.perf_counter()
    built = build(find_sources([str(src)]), out, opts, log)
    wall = time.perf_counter() - start
    log.close()
    return wall, built.summary["timing"], built.summary["clips"]


def whisper_large_v3(folder: Path, tokens: int, device: str) -> Transcriber:
    """Whisper large-v3's shapes with random weights, in transformers' pipeline with a small tokenizer (ids it
    cannot spell are suppressed: the vocabulary projection still has all 51,866 rows)."""
    from transformers import (
        WhisperConfig,
        WhisperFeatureExtractor,
        WhisperForConditionalGeneration,
        WhisperTokenizer,
        pipeline,
    )

    build_whisper_asr(folder)  # tokenizer and generation settings
    tiny = WhisperForConditionalGeneration.from_pretrained(folder)
    tokenizer = WhisperTokenizer.from_pretrained(folder)
    cfg = WhisperConfig(vocab_size=51866, num_mel_bins=128, d_model=1280, encoder_layers=32, decoder_layers=32,
                        encoder_attention_heads=20, decoder_attention_heads=20, encoder_ffn_dim=5120,
                        decoder_ffn_dim=5120, max_source_positions=1500, max_target_positions=448,
                        pad_token_id=tiny.config.pad_token_id, bos_token_id=tiny.config.bos_token_id,
                        eos_token_id=tiny.config.eos_token_id,
                        decoder_start_token_id=tiny.config.decoder_start_token_id)
    torch.manual_seed(0)
    model = WhisperForConditionalGeneration(cfg).eval()
    gen = tiny.generation_config
    gen.suppress_tokens = list(range(len(tokenizer), cfg.vocab_size))
    gen.max_new_tokens, gen.max_length = tokens, None
    model.generation_config = gen
    pipe = pipeline("automatic-speech-recognition", model=model, tokenizer=tokenizer,
                    feature_extractor=WhisperFeatureExtractor(feature_size=128), device=device,
                    dtype=torch.float32 if device == "cpu" else torch.bfloat16)
    return Transcriber(pipe, batch_size=4)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=12.0)
    p.add_argument("--files", type=int, default=4)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--whisper-clips", type=int, default=4, help="clips transcribed by the large-v3 shapes (0: skip)")
    p.add_argument("--tokens", type=int, default=24)
    p.add_argument("--device", default="cpu", help="device of the Whisper large-v3 shapes (cuda: bf16)")
    p.add_argument("--quick", action="store_true", help="1 minute, no workers run, no Whisper large-v3")
    a = p.parse_args()
    if a.quick:
        a.minutes, a.files, a.workers, a.whisper_clips = 1.0, 2, 1, 0
    print(f"torch threads {torch.get_num_threads()}, cpu")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        audio = make_recordings(tmp / "src", a.minutes, a.files)
        build_asr(tmp / "asr", says="a")
        # One short build first: the one-off imports and model loads (silero, pyloudnorm, the pipeline) are not
        # what an hour of recordings costs.
        make_recordings(tmp / "warm", 0.2, 1, seed=1)
        run_build(tmp / "warm", tmp / "warm-out", tmp / "asr", 1)
        wall, timing, clips = run_build(tmp / "src", tmp / "out1", tmp / "asr", 1)
        print(f"audio {audio / 60:.1f} min in {a.files} files -> {clips} clips; one process, wall {wall:.1f} s "
              f"({audio / wall:.0f}x real time, tiny ASR included)")
        for stage in STAGES:
            t = timing.get(stage, 0.0)
            print(f"  {stage:9s} {t:7.2f} s  {audio / max(t, 1e-9):8.0f}x real time")
        if a.workers > 1:
            wall2, _, clips2 = run_build(tmp / "src", tmp / f"out{a.workers}", tmp / "asr", a.workers)
            print(f"--workers {a.workers}: wall {wall2:.1f} s ({audio / wall2:.0f}x real time, tiny ASR and process "
                  f"start included), {clips2} clips")
        if a.whisper_clips:
            files = sorted((tmp / "out1" / "clips").iterdir())[: a.whisper_clips]
            waves = [sf.read(f, dtype="float32")[0] for f in files]
            seconds = sum(len(w) for w in waves) / OUT_RATE
            asr = whisper_large_v3(tmp / "whisper", a.tokens, a.device)
            asr.transcribe(waves[:1], OUT_RATE)  # warm-up
            start = time.perf_counter()
            asr.transcribe(waves, OUT_RATE)
            t = time.perf_counter() - start
            print(f"whisper large-v3 shapes (random, {a.tokens} tokens a clip, batch 4, {a.device}): "
                  f"{len(waves)} clips of {seconds:.1f} s in {t:.1f} s: {t / len(waves):.1f} s a clip, "
                  f"{seconds / t:.2f}x real time")
        cut = sum(timing.get(s, 0.0) for s in ("decode", "vad", "normalise", "write"))
        print(f"decode+VAD+normalise+write: {audio / cut:.0f}x real time (target 50x)")


if __name__ == "__main__":
    main()
