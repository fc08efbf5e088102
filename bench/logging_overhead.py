"""Step time of the tiny preset with events off, with log_steps=50 and with log_steps=1, in one process.

Each configuration trains the same steps; the step time is the median gap between consecutive optimizer steps,
taken by a wrapper around the loop's one logging call (which, for "events off", does nothing else).
Targets: log_steps=50 at most 1.01x and log_steps=1 at most 1.05x the step time with events off.
Usage: python bench/logging_overhead.py [--steps 200] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from higgs_accel import loop
from higgs_accel.config import load_config
from higgs_accel.tiny import ensure_tiny_assets

REAL_LOG_STEP = loop.log_train_step


def step_time(root: Path, name: str, steps: int, log_steps: int | None, assets: dict) -> float:
    stamps: list[float] = []

    def timed(*args, **kwargs):
        stamps.append(time.perf_counter())
        if log_steps is not None:
            REAL_LOG_STEP(*args, **kwargs)

    overrides = [("preset", "tiny"), ("train.output_dir", str(root / name)), ("train.max_steps", steps),
                 ("train.eval_every", 0), ("train.save_every", 0), ("log.level", "warning"),
                 ("log.log_steps", log_steps or 1), ("data.codes_cache", str(root / "codes")), *assets.items()]
    loop.log_train_step = timed
    try:
        loop.train(load_config(None, [(k, v, "bench") for k, v in overrides]))
    finally:
        loop.log_train_step = REAL_LOG_STEP
    gaps = [b - a for a, b in zip(stamps[5:], stamps[6:])]  # skip warm-up steps
    return statistics.median(gaps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        assets = ensure_tiny_assets(root / "tiny")
        configs = {"off": None, "log_steps=50": 50, "log_steps=1": 1}
        times: dict[str, list[float]] = {k: [] for k in configs}
        for r in range(args.rounds):
            for name, log_steps in configs.items():
                times[name].append(step_time(root, f"{name}-{r}", args.steps, log_steps, assets))
        # The best round of each configuration: noise on a shared machine only ever adds time.
        best = {name: min(t) for name, t in times.items()}
        for name in configs:
            print(f"{name:>13}: median step {1000 * best[name]:.2f} ms (best of {args.rounds} rounds)")
        print(f"step-time ratio vs events off: log_steps=50 {best['log_steps=50'] / best['off']:.3f}x "
              f"(target <= 1.01), log_steps=1 {best['log_steps=1'] / best['off']:.3f}x (target <= 1.05)")


if __name__ == "__main__":
    main()
