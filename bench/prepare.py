"""Codec real-time factor (tiny and full-size random codec) and how long the loop waits for data with cached codes.

Real-time factor = seconds of audio encoded per second of wall time. The data-wait fraction is the sum of the
``data_wait_s`` over the sum of ``step_time_s`` of a tiny-preset run whose codes are already cached.
Target: the loop waits for data less than 5% of its step time.
Usage: python bench/prepare.py [--seconds 10] [--steps 60]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from transformers import HiggsAudioV2TokenizerConfig, HiggsAudioV2TokenizerModel

from higgs_accel.config import ModelConfig, load_config
from higgs_accel.loading import load_codec
from higgs_accel.loop import train
from higgs_accel.tiny import ensure_tiny_assets, speech_like


def full_size_codec() -> HiggsAudioV2TokenizerModel:
    """The real architecture with random weights: 25 frames/s and 8 codebooks need hop 960 and 2 kbps."""
    cfg = HiggsAudioV2TokenizerConfig(
        target_bandwidths=[0.5, 1, 1.5, 2],
        acoustic_model_config={"downsampling_ratios": [8, 5, 4, 2, 3], "upsampling_ratios": [8, 5, 4, 2, 3]})
    return HiggsAudioV2TokenizerModel(cfg).eval()


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
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
