"""How fast is the analysis package on a long run, and how much smaller is Parquet than the JSON lines?

Builds a synthetic run of 1,000,000 events (by default) in the trainer's schema and layout: events.jsonl plus
one compacted Parquet part per family (float64 metrics, int64 counters, list<int32> slices, JSON text for
nested values). It is written here with pyarrow directly, so the benchmark needs neither torch nor the trainer.
Then it times ``load_run`` and ``write_report``; the last line prints the figures against their targets
(report under 10 s, Parquet at most one fifth of the JSON lines).

    python bench/analysis_speed.py [--events 1000000] [--dir /tmp/analysis-bench] [--keep]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from analysis import load_run  # noqa: E402 - the repo root must be importable first
from analysis.report import write_report  # noqa: E402

CODEBOOKS, SAMPLES, K, LOG_STEPS, EVAL_EVERY = 8, 2, 5, 2, 500
VOCAB = 1026
TEXT_TOKENS = ["<|audio_eos|>", "<|eot_id|>", "Hello", " world", "."]
REPORT_TARGET_S, SIZE_TARGET = 10.0, 0.2
COMMON = dict(level="info", run_id="bench0000000", rank=0, schema_version=1)


class Clock:
    """Monotonic seq and ISO timestamps, as the trainer's processor chain stamps them."""

    def __init__(self):
        self.seq = 0
        self.t0 = datetime(2026, 1, 1, tzinfo=timezone.utc)

    def stamp(self, step: int) -> dict:
        ts = (self.t0 + timedelta(seconds=0.2 * step, microseconds=self.seq % 1000)).isoformat()
        out = {"seq": self.seq, "ts": ts.replace("+00:00", "Z")}
        self.seq += 1
        return out


def metrics(rng: np.random.Generator, step: int, total: int, train: bool) -> dict:
    progress = step / total
    cb_loss = 7.0 * np.exp(-3 * progress) + 1.5 + rng.normal(0, 0.05, CODEBOOKS)
    cb_acc = np.clip(0.7 * progress + rng.normal(0, 0.02, CODEBOOKS), 0, 1)
    text_loss = 5.8 * np.exp(-6 * progress) + 0.01
    out = {"loss": float(text_loss + cb_loss.sum()), "text_loss": float(text_loss),
           "audio_loss": float(cb_loss.sum()), "text_acc": float(min(1.0, 2 * progress)),
           "audio_acc": float(cb_acc.mean()), "text_targets": 8, "audio_targets": 880, "tokens": 294,
           "audio_frames": 142, "samples": 4}
    for cb in range(CODEBOOKS):
        out[f"audio_loss_cb{cb}"] = float(cb_loss[cb])
        out[f"audio_acc_cb{cb}"] = float(cb_acc[cb])
    if train:
        out.update(lr=3e-3 * (1 - progress), grad_norm=float(abs(rng.normal(1, 0.3))), step_time_s=0.2,
                   samples_per_s=float(20 + rng.normal(0, 1)), tokens_per_s=float(1500 + rng.normal(0, 50)),
                   peak_mem_mb=936.5)
    return out


def slices(rng: np.random.Generator, step: int, total: int, phase: str) -> list[dict]:
    hit = step / total  # the share of predictions that match their label grows as training goes on
    rows = []
    for sample in range(SAMPLES):
        label = [int(x) for x in rng.integers(0, len(TEXT_TOKENS), 2)]
        pred = [lab if rng.random() < hit else 0 for lab in label]
        rows.append({"modality": "text", "sample": sample, "codebook": None, "first_pos": [66, 67],
                     "first_pred": pred, "first_label": label, "last_pos": [66, 67], "last_pred": pred,
                     "last_label": label, "n_targets": 2, "n_match": sum(p == lab for p, lab in zip(pred, label)),
                     "first_pred_text": [TEXT_TOKENS[t] for t in pred],
                     "first_label_text": [TEXT_TOKENS[t] for t in label],
                     "last_pred_text": [TEXT_TOKENS[t] for t in pred],
                     "last_label_text": [TEXT_TOKENS[t] for t in label],
                     "logits_shape": [8, 400], "labels_shape": [4, 76]})
        for cb in range(CODEBOOKS):
            fl, ll = rng.integers(0, VOCAB, K), rng.integers(0, VOCAB, K)
            fp = np.where(rng.random(K) < hit, fl, rng.integers(0, VOCAB, K))
            lp = np.where(rng.random(K) < hit, ll, rng.integers(0, VOCAB, K))
            start = 37 + cb
            rows.append({"modality": "audio", "sample": sample, "codebook": cb,
                         "first_pos": list(range(start, start + K)), "first_pred": fp.tolist(),
                         "first_label": fl.tolist(), "last_pos": list(range(start + 17, start + 17 + K)),
                         "last_pred": lp.tolist(), "last_label": ll.tolist(), "n_targets": 22,
                         "n_match": int((fp == fl).sum() + (lp == ll).sum()), "batch_match": int(97 * hit),
                         "batch_targets": 97, "logits_shape": [125, 8, VOCAB], "labels_shape": [4, 38, 8]})
    for r in rows:
        r["phase"] = phase
    return rows


def events(n_events: int, seed: int = 0):
    """Yield (family, event) in log order until n_events: the same stream a long training run writes."""
    rng = np.random.default_rng(seed)
    clock = Clock()
    per_step = 1 + SAMPLES * (1 + CODEBOOKS) / LOG_STEPS
    total = max(1, int(n_events / per_step))
    config = {"preset": "", "model": {"base": "bosonai/higgs-tts-2-3b-base"}, "lora": {"r": 16},
              "train": {"max_steps": total, "lr": 3e-3, "eval_every": EVAL_EVERY}, "log": {"log_steps": LOG_STEPS}}
    emitted = 0

    def event(name: str, step: int, phase: str = "train", **fields) -> tuple[str, dict]:
        nonlocal emitted
        emitted += 1
        return name, {**fields, "event": name, "phase": phase, "epoch": step // 1000, "step": step, **COMMON,
                      **clock.stamp(step)}

    for split in ("train", "val"):
        yield event("data_summary", 0, split=split, kept=16000, skipped=3, skipped_by_reason={"length": 3})
    yield event("run_start", 0, config=config, run_dir="runs/bench", versions={"python": "3.11", "torch": "2.11"},
                git_commit="0" * 40, device="cuda:0", hardware={"platform": "Linux", "cpu_count": 2, "gpu": "H100"},
                world_size=8, mixed_precision="bf16", trainable_params=24_000_000, total_params=3_600_000_000,
                total_steps=total, steps_per_epoch=1000, train_samples=16000, val_samples=400, resumed=False)
    step = 0
    while emitted < n_events - 1:
        step += 1
        yield event("train_step", step, **metrics(rng, step, total, True))
        if step % LOG_STEPS == 0:
            for row in slices(rng, step, total, "train"):
                yield event("pred_slice", step, **row)
        if step % EVAL_EVERY == 0:
            yield event("eval", step, "eval", **metrics(rng, step, total, False))
    yield event("run_end", step, status="finished", error=None, elapsed_s=0.2 * step, total_steps=total,
                completed_steps=step)


def _type(values: list) -> pa.DataType:
    """The trainer's column typing (higgs_accel.sinks), restated so this script stays torch-free."""
    present = [v for v in values if v is not None]
    if not present:
        return pa.float64()
    if all(isinstance(v, bool) for v in present):
        return pa.bool_()
    if all(isinstance(v, int) and not isinstance(v, bool) for v in present):
        return pa.int64()
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in present):
        return pa.float64()
    if all(isinstance(v, str) for v in present):
        return pa.string()
    if all(isinstance(v, list) for v in present):
        first = next((x for v in present for x in v), 0)
        return pa.list_(pa.string() if isinstance(first, str) else pa.int32())
    return pa.string()


def write_run(run_dir: Path, n_events: int) -> None:
    run_dir.mkdir(parents=True)
    rows: dict[str, list[dict]] = {}
    with open(run_dir / "events.jsonl", "w", encoding="utf-8") as f:
        for family, e in events(n_events):
            f.write(json.dumps(e) + "\n")
            rows.setdefault(family, []).append(e)
    for family, fam_rows in rows.items():
        names = list(dict.fromkeys(k for r in fam_rows for k in r))
        arrays = {}
        for name in names:
            values = [r.get(name) for r in fam_rows]
            tp = _type(values)
            if tp == pa.string():
                values = [v if v is None or isinstance(v, str) else json.dumps(v) for v in values]
            arrays[name] = pa.array(values, type=tp)
        folder = run_dir / "events" / family
        folder.mkdir(parents=True)
        pq.write_table(pa.table(arrays), folder / f"part-{fam_rows[0]['seq']:012d}.parquet")


def size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--dir", help="where to build the run (default: a temporary directory)")
    parser.add_argument("--keep", action="store_true", help="keep the synthetic run afterwards")
    args = parser.parse_args()
    base = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="analysis-bench-"))
    run_dir = base / "run"
    if run_dir.exists():
        shutil.rmtree(run_dir)
    try:
        t = time.perf_counter()
        write_run(run_dir, args.events)
        print(f"built {args.events:,} events in {time.perf_counter() - t:.1f} s under {run_dir}")
        jsonl, parquet = size(run_dir / "events.jsonl"), size(run_dir / "events")
        print(f"events.jsonl {jsonl / 1e6:.1f} MB, events/ {parquet / 1e6:.1f} MB")

        t = time.perf_counter()
        run = load_run(run_dir)
        t_load = time.perf_counter() - t
        print(f"load_run {t_load:.2f} s: {len(run.steps):,} steps, "
              f"{sum(tb.num_rows for tb in run.tables.values()):,} events")

        t = time.perf_counter()
        paths = write_report(run_dir)
        t_report = time.perf_counter() - t
        print(f"report {t_report:.2f} s: {', '.join(str(p) for p in paths)}")

        shutil.rmtree(run_dir / "events")  # a crashed run without Parquet: the events.jsonl fallback
        t = time.perf_counter()
        load_run(run_dir)
        t_jsonl = time.perf_counter() - t
        print(f"load_run from events.jsonl alone {t_jsonl:.2f} s")
        print(f"report {t_report:.2f} s = {t_report / REPORT_TARGET_S:.2f} of the {REPORT_TARGET_S:.0f} s target; "
              f"load_run {t_load:.2f} s; parquet/jsonl size {parquet / jsonl:.3f} (target <= {SIZE_TARGET})")
    finally:
        if not args.keep:
            shutil.rmtree(base if not args.dir else run_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
