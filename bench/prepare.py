"""Codec real-time factor (tiny and full-size random codec), how long the loop waits for data with cached codes, and
the encode step's throughput over a corpus, today's one file at a time against the encode pipeline.

Real-time factor = seconds of audio encoded per second of wall time. The data-wait fraction is the sum of the
``data_wait_s`` over the sum of ``step_time_s`` of a tiny-preset run whose codes are already cached.
Target: the loop waits for data less than 5% of its step time.
Encode throughput (``--encode``): the full-size codec over ``--files`` WAV files of different lengths, half of them
cut to ``--segment-s`` (corpora cut into equal segments), each mode in a fresh process, alternating over
``--rounds`` rounds, each into an empty cache: "one at a time" is the path before the pipeline (``CodeCache.encode``
per file, glibc's default heap), "pipeline" is ``encode_missing`` with its defaults for the device and ``--workers``
decoding processes. Also whether the two stored the same bytes, whether a batch of equal-length segments gives bit
for bit the features and codes of single files on the device, and (``--pad``) the share of codes that survives
padding each file to a multiple of N samples (what batching files of different lengths would cost).
Targets: 1.5x on the CPU, 200x real time on an H100/H200-class GPU.
Usage: python bench/prepare.py [--seconds 10] [--steps 60] [--encode --device cuda --files 200 --workers 4]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
from transformers import HiggsAudioV2TokenizerModel

from higgs_accel.codes import CodeCache, encode_missing
from higgs_accel.config import ModelConfig, load_config
from higgs_accel.data import FileAudio, Sample
from higgs_accel.encoding import encode_waves
from higgs_accel.loading import load_codec
from higgs_accel.loop import train
from higgs_accel.memory import real_codec_config
from higgs_accel.tiny import ensure_tiny_assets, speech_like


def full_size_codec() -> HiggsAudioV2TokenizerModel:
    """The released codec's architecture (``memory.real_codec_config``: 25 frames/s, 8 codebooks) with random
    weights, its codebooks spread out: zero codebooks would map every frame to code 0."""
    torch.manual_seed(0)
    codec = HiggsAudioV2TokenizerModel(real_codec_config()).eval()
    for q in codec.quantizer.quantizers:
        q.codebook.embed.normal_(0.0, 0.02)
        q.codebook.embed_avg.copy_(q.codebook.embed)
    return codec


def real_time_factor(codec, seconds: float) -> float:
    wave = speech_like(" ".join(["quiet rivers and old green hills"] * int(seconds)), np.random.default_rng(0))
    wave = torch.from_numpy(wave[: int(seconds * 24000)])[None, None]
    with torch.no_grad():
        codec.encode(wave[..., :24000])  # warm-up
        start = time.perf_counter()
        codes = codec.encode(wave).audio_codes
    assert codes.shape[1] == 8
    return seconds / (time.perf_counter() - start)


def data_wait_fraction(root: Path, steps: int) -> float:
    assets = ensure_tiny_assets(root / "tiny")
    pairs = [("preset", "tiny"), ("train.max_steps", steps), ("train.eval_every", 0), ("train.save_every", 0),
             ("log.level", "warning"), ("data.codes_cache", str(root / "codes")), *assets.items()]
    for run in ("warm-cache", "cached"):  # the first run fills the cache; the second is measured
        train(load_config(None, [(k, v, "bench") for k, v in [*pairs, ("train.output_dir", str(root / run))]]))
    events = [json.loads(x) for x in (root / "cached" / "events.jsonl").read_text().splitlines()]
    steps_ = [e for e in events if e["event"] == "train_step"][3:]  # past warm-up
    return sum(e["data_wait_s"] for e in steps_) / sum(e["step_time_s"] for e in steps_)


def corpus(root: Path, files: int, min_s: float, max_s: float, segment_s: float) -> list[Path]:
    """Speech-like 24 kHz mono WAV files: every second one ``segment_s`` long, the others of random lengths (uniform
    in seconds between ``min_s`` and ``max_s``)."""
    rng = np.random.default_rng(1)
    root.mkdir(parents=True, exist_ok=True)
    long = speech_like(" ".join(["quiet rivers and old green hills"] * int(max(max_s, segment_s) + 2)), rng)
    paths = []
    for i, seconds in enumerate(rng.uniform(min_s, max_s, files)):
        start = int(rng.integers(0, 24000))
        sf.write(root / f"{i}.wav", long[start: start + int((segment_s if i % 2 else seconds) * 24000)], 24000)
        paths.append(root / f"{i}.wav")
    return paths


def encode_once(mode: str, paths: list[Path], cache_dir: Path, workers: int, device: str) -> float:
    """One mode over the corpus into an empty cache, in this (fresh) process; its wall seconds."""
    cache = CodeCache(cache_dir, full_size_codec().to(device))
    samples = [Sample(source="bench", line=i, audio=FileAudio(p), text="x") for i, p in enumerate(paths)]
    start = time.perf_counter()
    if mode == "pipeline":
        encode_missing(samples, cache, workers=workers)
    else:
        for s in samples:
            cache.encode(s.audio, cache.key(s.audio))
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start


def encode_throughput(paths: list[Path], root: Path, rounds: int, workers: int, device: str) -> dict:
    """Audio seconds per second of each mode, per round, each run in a process of its own (no warm heap, no
    primitives built by the other mode), and whether the two modes stored the same bytes."""
    seconds = sum(sf.info(p).frames / sf.info(p).samplerate for p in paths)
    speeds: dict[str, list[float]] = {"one at a time": [], "pipeline": []}
    for r in range(rounds):
        for mode in (list(speeds) if r % 2 == 0 else list(reversed(speeds))):
            out = subprocess.run([sys.executable, __file__, "--encode-once", mode, "--cache", str(root / f"{mode}-{r}"),
                                  "--workers", str(workers), "--device", device, *map(str, paths)],
                                 capture_output=True, text=True, check=True)
            speeds[mode].append(seconds / float(out.stdout.split()[-1]))
    stored = [{p.name: p.read_bytes() for p in (root / f"{mode}-0").glob("*/*.npy")} for mode in speeds]
    return {"speeds": speeds, "same_bytes": stored[0] == stored[1] and len(stored[0]) == len(paths),
            "audio_s": seconds}


def batch_exactness(codec, paths: list[Path], device) -> tuple[float, float]:
    """The equal-length segments encoded as one batch against each alone on ``device``: the share of identical
    codes and the largest difference between the features the codes are quantized from (0.0: bit for bit)."""
    waves = [sf.read(p, dtype="float32")[0] for p in paths]
    waves = [w for w in waves if len(w) == len(waves[1])]
    batched, features = encode_waves(codec, waves, device)
    alone = [encode_waves(codec, [w], device) for w in waves]
    diff = max(float((features[i] - f[0]).abs().max()) for i, (_, f) in enumerate(alone))
    return float((batched == np.concatenate([c for c, _ in alone])).mean()), diff


def padding_agreement(codec, paths: list[Path], pad: int, device) -> float:
    """Share of codes unchanged when each file is zero-padded to a multiple of ``pad`` samples and its codes
    trimmed to its own frame count: the cost of batching files of different lengths with padding."""
    same = total = 0
    with torch.no_grad():
        for p in paths:
            wave = torch.from_numpy(sf.read(p, dtype="float32")[0])[None, None].to(device)
            alone = codec.encode(wave).audio_codes[0]
            padded = codec.encode(torch.nn.functional.pad(wave, (0, -wave.shape[-1] % pad))).audio_codes[0]
            same += int((padded[:, : alone.shape[-1]] == alone).sum())
            total += alone.numel()
    return same / total


def report_encode(args, root: Path) -> None:
    paths = corpus(root / "audio", args.files, args.min_s, args.max_s, args.segment_s)
    out = encode_throughput(paths, root / "codes", args.rounds, args.workers, args.device)
    for mode, speeds in out["speeds"].items():
        print(f"{mode}: " + ", ".join(f"{x:.2f}" for x in speeds) + " audio s per s")
    codec = full_size_codec().to(args.device)
    same, diff = batch_exactness(codec, paths, args.device)
    print(f"a batch of {args.files // 2} equal-length segments against each alone: {100 * same:.2f}% identical codes, "
          f"features {'bit for bit equal' if diff == 0 else f'differ by up to {diff:.2e}'}")
    for pad in args.pad:
        kept = padding_agreement(codec, paths, pad, args.device)
        print(f"padded to a multiple of {pad} samples: {100 * kept:.2f}% of codes unchanged")
    print(f"{args.files} files, {out['audio_s']:.0f} s of audio, {args.device}, {torch.get_num_threads()} threads, "
          f"{args.workers} decoding worker(s); both modes stored the same bytes: {out['same_bytes']}")
    ratios = [b / s for b, s in zip(out["speeds"]["pipeline"], out["speeds"]["one at a time"])]
    rounds = ", ".join(f"{r:.2f}" for r in ratios)
    print(f"pipeline / one at a time: {statistics.median(ratios):.2f}x (rounds: {rounds}); pipeline up to "
          f"{max(out['speeds']['pipeline']):.1f}x real time (target >= 1.5x on the CPU, >= 200x real time on a GPU)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--encode", action="store_true", help="measure only the encode step's throughput")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--files", type=int, default=12)
    parser.add_argument("--min-s", type=float, default=2.0)
    parser.add_argument("--max-s", type=float, default=12.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--segment-s", type=float, default=4.0)
    parser.add_argument("--pad", type=int, nargs="*", default=[])
    parser.add_argument("--encode-once", choices=["one at a time", "pipeline"], help=argparse.SUPPRESS)
    parser.add_argument("--cache", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("paths", nargs="*", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.encode_once:  # one mode in a fresh process (encode_throughput starts it): its wall seconds
        print(encode_once(args.encode_once, args.paths, args.cache, args.workers, args.device))
        return
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        if args.encode:
            report_encode(args, root)
            return
        tiny = load_codec(ModelConfig(audio_tokenizer=ensure_tiny_assets(root / "tiny")["model.audio_tokenizer"]))
        rtf_tiny = real_time_factor(tiny, args.seconds)
        big = full_size_codec()
        params = sum(p.numel() for p in big.parameters()) / 1e6
        rtf_full = real_time_factor(big, args.seconds)
        del big
        wait = data_wait_fraction(root, args.steps)
    print(f"tiny codec: {rtf_tiny:.1f}x real time; full-size codec ({params:.0f} M params): {rtf_full:.2f}x real time "
          f"on {torch.get_num_threads()} CPU threads")
    print(f"data wait with cached codes: {100 * wait:.2f}% of step time (target < 5%)")


if __name__ == "__main__":
    main()
