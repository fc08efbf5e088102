"""The benchmarks run end to end at tiny sizes and print their ratio last. Their figures are not checked against
targets: tests assert behaviour, never wall-clock (bench/RESULTS.md holds the measured figures)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


COMMANDS = {
    "throughput": ["throughput.py", "--quick", "--rounds", "1", "--plain"],
    "memory": ["memory.py", "--quick"],
    "memory_per_layer": ["memory.py", "--per-layer", "--quick"],
    "gpu": ["gpu_real_size.py"],
    "dataset": ["dataset.py", "--quick"],
}


@pytest.fixture(scope="module")
def launched() -> dict[str, subprocess.Popen]:
    """All benches started at once: most of each run is importing torch and transformers on one core, so running
    them side by side keeps the module near the time of the slowest instead of their sum."""
    procs = {name: subprocess.Popen([sys.executable, str(ROOT / "bench" / cmd[0]), *cmd[1:]], cwd=ROOT,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name, cmd in COMMANDS.items()
             if name != "gpu" or not torch.cuda.is_available()}
    yield procs
    for p in procs.values():
        if p.poll() is None:
            p.kill()
            p.communicate()


def finished(launched: dict, name: str) -> list[str]:
    """The bench's stdout lines, after checking it exited 0."""
    out, err = launched[name].communicate(timeout=300)
    code = launched[name].returncode
    assert code == 0, f"{COMMANDS[name][0]} exited {code}\n{out[-3000:]}\n{err[-3000:]}"
    lines = out.strip().splitlines()
    assert lines, f"{COMMANDS[name][0]} printed nothing"
    return lines


def test_throughput_quick_prints_the_ratio_and_both_paths_train_the_same_loss(launched):
    lines = finished(launched, "throughput")
    assert re.match(r"higgs-accel / Trainer tokens/s: \d+\.\d+x \(mid; tiny \d+\.\d+x\)", lines[-1]), lines[-1]
    # Each size reports both losses on one batch; the comparison is only fair if they are the same objective.
    same = [re.search(r"loss (\S+) \(DualLossModel\) vs (\S+) \(model forward\)", x) for x in lines]
    pairs = [(float(m[1]), float(m[2])) for m in same if m]
    assert len(pairs) == 2, lines
    for ours, theirs in pairs:
        assert ours == pytest.approx(theirs, rel=1e-4)


def test_memory_quick_prints_the_ratio_and_masked_heads_use_less(launched):
    lines = finished(launched, "memory")
    m = re.fullmatch(r"masked / full peak step memory: (\d+\.\d+) \(target <= 0\.3\)", lines[-1])
    assert m, lines[-1]
    # Not the target, only the direction: the masked step never builds the (tokens x 128,256) logits.
    assert 0 < float(m[1]) < 1


PREDICTED = re.compile(r"  (\d+) layer\(s\): measured \+ *(\d+) MiB, memory model *(\d+) MiB \(([+-]\d+\.\d)%\)")


def test_memory_per_layer_quick_prints_the_slope_next_to_the_floor_and_the_prediction(launched):
    lines = finished(launched, "memory_per_layer")
    m = re.fullmatch(r"per decoder layer per 256 tokens: (\d+) MiB measured \(slope between 1 and 2 layers\), "
                     r"analytic floor (\d+) MiB \([\d,]+ values per token in fp32\); measured / floor: "
                     r"(\d+\.\d+)x \(target <= 1\.3\)", lines[-1])
    assert m, lines[-1]
    assert [int(p[1]) for p in map(PREDICTED.match, lines) if p] == [1, 2], lines


@pytest.mark.slow
def test_memory_model_predicts_the_measured_step_within_10_percent():
    """A bf16 model of hidden 512 (big enough that allocator noise is small next to the step), 1 and 2 layers,
    1024 tokens, each measured in a fresh process by bench/memory.py."""
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "memory.py"), "--per-layer", "--hidden", "512",
                           "--seq", "1024", "--dtype", "bf16", "--layer-pair", "1,2"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    rows = [m for m in map(PREDICTED.match, done.stdout.splitlines()) if m]
    assert [int(m[1]) for m in rows] == [1, 2], done.stdout
    for m in rows:
        measured, predicted = int(m[2]), int(m[3])
        assert abs(predicted - measured) <= 0.1 * measured, m[0]


def test_dataset_quick_prints_the_real_time_factor_and_every_stage(launched):
    lines = finished(launched, "dataset")
    assert re.fullmatch(r"decode\+VAD\+normalise\+write: \d+x real time \(target 50x\)", lines[-1]), lines[-1]
    stages = [m[1] for m in map(re.compile(r"  (\w+) +\d+\.\d+ s +\d+x real time").match, lines) if m]
    assert stages[:2] == ["decode", "vad"] and "asr" in stages and "write" in stages, lines


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without a GPU")
def test_gpu_real_size_without_cuda_exits_cleanly_with_its_message(launched):
    lines = finished(launched, "gpu")
    assert "no CUDA device" in lines[-1] and "nothing measured" in lines[-1]


def test_throughput_times_the_loops_own_step(monkeypatch, tmp_path):
    """bench/throughput.py's step is loop.train_step itself: a change to the loop's step shows in the bench."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import throughput
    finally:
        sys.path.remove(str(ROOT / "bench"))
    from higgs_accel import loop

    assert throughput.loop is loop
    calls = []
    real = loop.train_step

    def spy(state, batches, *args, **kwargs):
        calls.append(len(batches))
        return real(state, batches, *args, **kwargs)

    monkeypatch.setattr(loop, "train_step", spy)
    torch.manual_seed(0)
    size = throughput.QUICK["tiny"]
    peft_model, ids, tokenizer, _ = throughput.build(size, tmp_path)
    batches = throughput.synthetic_batches(tokenizer, ids, size.seq, size.batch, n_batches=1)
    dual = throughput.DualLossModel(peft_model, ids, throughput.LossWeights.of(throughput.TrainConfig()))
    assert len(throughput.time_loop(dual, batches, warmup=1, steps=1)) == 2
    assert len(throughput.time_loop(peft_model, batches, warmup=1, steps=1, model_forward=True)) == 2
    assert calls == [1] * 4


@pytest.mark.slow
@pytest.mark.parametrize("family", ["v2", "v3"])
def test_real_size_small_runs_the_readme_workflow_through_the_cli(tmp_path, family):
    """bench/real_size.py --small (a minute each): every phase of the workflow exits as expected, each in its row;
    the SIGTERM lands after step 1's checkpoint, always (the stopped run ends at step 2)."""
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "real_size.py"), "--dir", str(tmp_path), "--small",
                           "--family", family], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = re.findall(r"^\| ([^|]+?) \| (\d+) \((\d+)\) \|", done.stdout, re.M)
    assert [r[0] for r in rows] == ["prepare", "train (SIGTERM in step 2)", "train --resume latest", "report", "export",
                                    "transformers loads the export", "generate 1 s"], done.stdout
    assert all(got == want for _, got, want in rows), rows
    stopped = (tmp_path / "work" / "train (SIGTERM in step 2).log").read_text()
    assert "stopped by SIGTERM at step 2" in stopped
