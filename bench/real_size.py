"""The README workflow at the released size, through the command line, as a new user runs it: what each phase
costs in time, memory and disk, and whether it works.

Built once into --dir (kept; rebuilt only when the settings change): the Higgs Audio v2 model at the released
widths (28 layers, hidden 3072, 24/8 heads of 128, intermediate 8192, vocabulary 128,256, 8 codebooks of 1026 codes:
5.77 B parameters) with random bf16 weights, saved by save_pretrained in 5 GB shards; a codec at the released
settings (ratios [8,5,4,2,3]: 25 frames/s, 8 quantizers, 200 M parameters, random); the tiny preset's text
tokenizer, whose special tokens are the ids the model config names (bench/throughput.py); a few spoken utterances
(espeak-ng when installed, else higgs_accel.tiny's speech-like audio) and their manifest.

Then, each phase a fresh process (`python -m higgs_accel ...`): prepare; train 3 steps with a checkpoint each step,
SIGTERM once step 1's checkpoint is written (the run stops after step 2, status 75); train --resume latest; report;
export; plain transformers loading the export, whose adapted weights must equal PEFT's fp32 merge bit for bit and
whose logits on a fixed input must stay near the adapter model's (within 3x the bf16 noise floor, check_export);
generate about 1 s. Per phase: exit status, wall time, peak RSS of the process (VmHWM; with
CUDA also torch.cuda.max_memory_allocated), disk written, and for train the memory plan's prediction
(run_start.memory.predicted_gib) next to the measured peak. Prints a Markdown table (--out writes it too).

--family v3 runs the same workflow on Higgs TTS 3 at the released size (`tts3.RELEASE_TEXT_CONFIG`: Qwen3-4B's
widths, 36 layers, vocabulary 151,936, the fused audio embedding of 8 x 1026 rows tied to its head: 4.04 B
parameters) in the released layout (bf16 shards, the codec bundled in fp32, the model dir its own
`model.audio_tokenizer`); the export check then loads the export with `tts3.HiggsTts3` and compares its text and
audio logits on the v3 prompt of PROBE_TEXT.

The full v2 run needs about 13 GB of RAM (24 GB machine), 30 GB of disk and, on 2 CPU cores, about 10 minutes (the
first one also builds the model: a few minutes); v3 about 10 GB and 20 GB. --small checks the script in a few
minutes: 2 layers of hidden 256 (real vocabulary and codebooks) and the tiny codec.

    python bench/real_size.py --dir /data/real_size [--out bench/real_size.md]
    python bench/real_size.py --dir /data/real_size_v3 --family v3
    python bench/real_size.py --dir /tmp/real_size_small --small [--family v3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
GIB = 2**30
SMALL_HIDDEN = 256
UTTERANCES = ["The quick brown fox jumps over the lazy dog.", "Seven bright stars hum softly above quiet rivers.",
              "Small birds sing every morning in the old green hills.", "Please call Stella and ask her to bring "
              "these things with her from the store.", "A lazy dog sleeps while the river runs by.",
              "Every morning the birds sing above the hills."]
PROBE_TEXT = "The quick brown fox jumps over the lazy dog."
STOP_ENV = "REAL_SIZE_SIGTERM_AFTER_CHECKPOINT"  # the step whose checkpoint is followed by SIGTERM (run_phase)
NOISE_FACTOR = 3  # export vs adapter logits may differ by this many times the bf16 noise floor (check_export)


# ---------------------------------------------------------------- assets, built once


def settings(args) -> dict:
    return {"version": 2, "layers": args.layers, "small": args.small, "family": args.family}


def build_assets(root: Path, args) -> dict[str, Path]:
    """The model, codec and data under ``root`` (reused when READY names the same settings)."""
    v3 = args.family == "v3"
    paths = {"model": root / "model", "codec": root / ("model" if v3 else "codec"),
             "manifest": root / "data" / "train.jsonl"}
    ready = root / "READY"
    if ready.is_file() and json.loads(ready.read_text()) == settings(args):
        paths["reused"] = True
        return paths
    import torch
    from memory import narrow_widths
    from throughput import real_width_config, text_tokenizer
    from transformers import HiggsAudioV2ForConditionalGeneration

    for p in (paths["model"], paths["codec"], root / "data"):
        shutil.rmtree(p, ignore_errors=True)
    if v3:
        build_v3(paths["model"], args)
        build_speech(root / "data")
        ready.write_text(json.dumps(settings(args)))
        return paths
    torch.manual_seed(0)
    tokenizer = text_tokenizer(paths["model"])  # saved there: the model dir is the tokenizer's too
    config = real_width_config(tokenizer, args.layers, **(narrow_widths(SMALL_HIDDEN) if args.small else {}))
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # initialise straight into bf16: no fp32 copy of 5.77 B parameters
    try:
        model = HiggsAudioV2ForConditionalGeneration(config, use_text_head=True)
    finally:
        torch.set_default_dtype(default)
    model.save_pretrained(paths["model"], max_shard_size="200MB" if args.small else "5GB")
    print(f"built the model: {sum(p.numel() for p in model.parameters()) / 1e9:.2f} B parameters", flush=True)
    del model
    build_codec(paths["codec"], args.small)
    build_speech(root / "data")
    ready.write_text(json.dumps(settings(args)))
    return paths


def build_v3(out: Path, args) -> None:
    """Higgs TTS 3 in the released layout: random bf16 weights straight from ``tiny.build_tts3`` at the release's
    widths (--small: hidden 256), the codec bundled."""
    import torch
    from memory import narrow_widths
    from prepare import full_size_codec

    from higgs_accel.tiny import build_tts3
    from higgs_accel.tts3 import RELEASE_TEXT_CONFIG

    widths = {**RELEASE_TEXT_CONFIG, "num_hidden_layers": args.layers,
              **(narrow_widths(SMALL_HIDDEN) if args.small else {})}
    build_tts3(out, widths, codec=None if args.small else full_size_codec(), dtype=torch.bfloat16,
               max_shard_size="200MB" if args.small else "5GB")
    from higgs_accel.tts3 import HiggsTts3, Tts3Config

    with torch.device("meta"):
        model = HiggsTts3(Tts3Config.from_file(out / "config.json"))
    print(f"built the model: {sum(p.numel() for p in model.parameters()) / 1e9:.2f} B parameters", flush=True)


def build_codec(out: Path, small: bool) -> None:
    from higgs_accel.tiny import build_codec as tiny_codec

    if small:
        tiny_codec(out)
        return
    from prepare import full_size_codec

    codec = full_size_codec()
    codec.save_pretrained(out)


def build_speech(out: Path) -> None:
    import numpy as np
    import soundfile as sf

    from higgs_accel.tiny import SAMPLE_RATE, speech_like

    (out / "wav").mkdir(parents=True, exist_ok=True)
    espeak = shutil.which("espeak-ng")
    lines = []
    for i, text in enumerate(UTTERANCES):
        wav = out / "wav" / f"{i:02d}.wav"
        if espeak:
            subprocess.run([espeak, "-v", "en", "-s", "150", "-w", str(wav), text], check=True)
        else:
            sf.write(wav, speech_like(text, np.random.default_rng(i)), SAMPLE_RATE)
        lines.append(json.dumps({"audio": f"wav/{wav.name}", "text": text, "speaker": "espeak" if espeak else "tone"}))
    (out / "train.jsonl").write_text("\n".join(lines) + "\n")


def write_config(root: Path, paths: dict, run_dir: Path) -> Path:
    import yaml

    cfg = {"model": {"base": str(paths["model"]), "audio_tokenizer": str(paths["codec"]), "dtype": "bf16"},
           "data": {"train_manifest": str(paths["manifest"]), "codes_cache": str(root / "work" / "codes")},
           "train": {"output_dir": str(run_dir), "max_steps": 3, "batch_size": 1, "save_every": 1, "lr": 1e-4,
                     "warmup_steps": 0},
           "log": {"log_steps": 1}}
    path = root / "run.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


# ---------------------------------------------------------------- one phase, in its own process


def child(result: Path, argv: list[str]) -> None:
    """Run ``higgs-accel ARGV`` (or the export check) in this process, then write its status and peaks."""
    import runpy

    rc = 0
    if os.environ.get(STOP_ENV):
        sigterm_after_checkpoint(int(os.environ[STOP_ENV]))
    try:
        if argv[0] == "check-export":
            check_export(*argv[1:])
        else:
            sys.argv = ["higgs-accel", *argv]
            runpy.run_module("higgs_accel", run_name="__main__", alter_sys=True)
    except SystemExit as e:
        rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    from memory import proc_status_kib

    # VmHWM: this process's own peak since exec (getrusage's ru_maxrss would start from the parent's RSS at fork)
    info = {"rc": rc, "peak_rss": proc_status_kib("VmHWM") * 1024}
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        info["device_peak"] = torch.cuda.max_memory_allocated()
    result.write_text(json.dumps(info))
    sys.exit(rc)


def sigterm_after_checkpoint(step: int) -> None:
    """SIGTERM to this process right after the checkpoint of ``step`` is written: the stop a cluster scheduler sends,
    at a known point of the run (polling the event log from outside raced the last steps of a fast model)."""
    from higgs_accel import checkpoint

    save = checkpoint.save_checkpoint

    def save_then_stop(accelerator, module, scheduler, run_dir, state):
        path = save(accelerator, module, scheduler, run_dir, state)
        if state["step"] == step:
            os.kill(os.getpid(), signal.SIGTERM)
        return path

    checkpoint.save_checkpoint = save_then_stop


def check_export(export: str, base: str, adapter: str, out: str) -> None:
    """Plain transformers (v3: ``tts3.HiggsTts3``) loads the export. Every LoRA-adapted weight in it must equal PEFT's
    own LoRA layer merged in fp32 and cast (base weight + B @ A x scaling, read from the adapter model's modules),
    bit for bit; and its text and audio logits on PROBE_TEXT, against the adapter model's (bf16), must stay within
    NOISE_FACTOR x the bf16 noise floor: the logits' change when the same weights are each moved by about one bf16
    rounding (a random deep model amplifies it: 4% at 36 layers). One model in memory at a time. Exits 1 otherwise."""
    import gc

    import torch
    from transformers import AutoTokenizer, HiggsAudioV2ForConditionalGeneration

    from higgs_accel.config import ModelConfig
    from higgs_accel.family import V3
    from higgs_accel.loading import load_model, load_stack, model_family
    from higgs_accel.tts3 import released_key
    from higgs_accel.tts3_prompt import build_example

    device = "cuda" if torch.cuda.is_available() else "cpu"
    v3 = model_family(export) == V3
    if v3:
        stack = load_stack(ModelConfig(base=export, dtype="bf16"), weights=False)
        ids = build_example(stack.tokenizer, stack.ids, PROBE_TEXT, None)["input_ids"][None].to(device)

        def logits(model):
            with torch.no_grad():
                result = model(ids, with_text_logits=True)
                return [result.text_logits.float().cpu(), result.audio_logits.float().cpu()]

        def load(base, adapter=None):
            return load_stack(ModelConfig(base=base, dtype="bf16"), adapter).model
    else:
        ids = AutoTokenizer.from_pretrained(export)(PROBE_TEXT, return_tensors="pt").input_ids.to(device)

        def logits(model):
            with torch.no_grad():
                hidden = model.model(input_ids=ids).last_hidden_state
                return [head(hidden).float().cpu() for head in (model.text_lm_head, model.audio_lm_head)]

        def load(base, adapter=None):
            if adapter:
                return load_model(base, adapter, "bf16")
            return HiggsAudioV2ForConditionalGeneration.from_pretrained(base, use_text_head=True, dtype=torch.bfloat16)

    def rel(got, want):
        return max(float((g - w).abs().max() / w.abs().max()) for g, w in zip(got, want))

    got = logits(load(export).to(device).eval())
    gc.collect()
    adapted = load(base, adapter).get_base_model().to(device)  # the adapter's layers in place
    want = logits(adapted)
    tensor = export_tensors(Path(export))
    checked, wrong = 0, []
    with torch.no_grad():
        for name, m in adapted.named_modules():
            if not hasattr(m, "lora_A") or "default" not in m.lora_A:
                continue
            w = m.base_layer.weight
            delta = m.lora_B["default"].weight.float() @ m.lora_A["default"].weight.float()
            expected = (w.float() + delta * m.scaling["default"]).to(w.dtype).cpu()
            key = released_key(f"{name}.weight") if v3 else f"{name}.weight"
            checked += 1
            if not torch.equal(tensor(key), expected):
                wrong.append(key)
        torch.manual_seed(0)  # each adapted weight moved by about one bf16 rounding: the logits' noise floor
        for m in adapted.modules():
            if hasattr(m, "lora_A") and "default" in m.lora_A:
                w = m.base_layer.weight
                w.copy_((w.float() * (1 + 2**-9 * torch.randn_like(w, dtype=torch.float32))).to(w.dtype))
    floor = rel(logits(adapted), want)
    diff = rel(got, want)
    result = {"relative_max_diff": diff, "noise_floor": floor, "tensors_checked": checked, "tensors_wrong": len(wrong)}
    Path(out).write_text(json.dumps(result))
    print(f"export: {checked - len(wrong)} of {checked} adapted weights equal PEFT's fp32 merge, cast; logits vs the "
          f"adapter model: max relative difference {diff:.4f}, bf16 noise floor {floor:.4f}")
    if wrong or checked == 0 or not diff <= NOISE_FACTOR * floor:
        print(f"FAILED: first wrong weight {wrong[:1]}, or logits past {NOISE_FACTOR} x the floor", flush=True)
        sys.exit(1)


def export_tensors(export: Path):
    """One tensor of the export dir by key (its index, or its one file), read when asked."""
    from safetensors import safe_open

    index = export / "model.safetensors.index.json"
    where = json.loads(index.read_text())["weight_map"] if index.is_file() else None

    def get(key: str):
        with safe_open(str(export / (where[key] if where else "model.safetensors")), framework="pt") as f:
            return f.get_tensor(key)
    return get


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


def events(run_dir: Path) -> list[dict]:
    path = run_dir / "events.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_phase(name: str, argv: list[str], work: Path, stop_after_checkpoint: bool = False) -> dict:
    """One phase in a fresh process; ``stop_after_checkpoint``: the process sends itself SIGTERM once step 1's
    checkpoint is written (``sigterm_after_checkpoint``)."""
    result = work / f"{name}.phase.json"
    result.unlink(missing_ok=True)
    log = work / f"{name}.log"
    before = du(work)
    start = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    if stop_after_checkpoint:
        env[STOP_ENV] = "1"
    with log.open("w") as out:
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--phase-child", str(result), "--",
                               *argv], stdout=out, stderr=subprocess.STDOUT, cwd=REPO, env=env)
    wall = time.perf_counter() - start
    info = json.loads(result.read_text()) if result.is_file() else {"rc": proc.returncode, "peak_rss": None}
    text = log.read_text()
    print(f"{name}: exit {proc.returncode} in {wall:.1f} s (log: {log})", flush=True)
    return {"phase": name, "rc": proc.returncode, "wall": wall, "peak_rss": info.get("peak_rss"),
            "device_peak": info.get("device_peak"), "disk": du(work) - before, "log": text}


# ---------------------------------------------------------------- the workflow


def workflow(root: Path, paths: dict) -> list[dict]:
    work = root / "work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    run_dir, export = work / "run", work / "export"
    config = write_config(root, paths, run_dir)
    rows = []

    def phase(name, argv, expect=0, note="", **kw):
        r = run_phase(name, argv, work, **kw)
        r.update(expect=expect, note=note)
        rows.append(r)
        return r

    phase("prepare", ["prepare", "--config", str(config)])
    phase("train (SIGTERM in step 2)", ["train", "--config", str(config), "--no-report"], expect=75,
          stop_after_checkpoint=True)
    phase("train --resume latest", ["train", "--config", str(config), "--resume", "latest", "--no-report"])
    evs = events(run_dir)
    starts = [e for e in evs if e["event"] == "run_start"]
    steps = [e for e in evs if e["event"] == "train_step"]
    for r, start in zip(rows[1:3], starts):
        plan = start.get("memory") or {}
        r["note"] = (f"plan {plan.get('predicted_gib', float('nan')):.2f} GiB"
                     f" ({'with' if plan.get('gradient_checkpointing') else 'without'} checkpointing)")
        r["plan_gib"] = plan.get("predicted_gib")
    ends = [e for e in evs if e["event"] == "run_end"]
    rows[2]["note"] += f"; run_end {ends[-1].get('status') if ends else 'missing'}, steps " + \
        ",".join(str(e["step"]) for e in steps)
    phase("report", ["report", str(run_dir)])
    r = phase("export", ["export", "--run", str(run_dir), "--out", str(export)])
    said = re.search(r"writes ([\d.]+ GiB).*peak memory at most ([\d.]+ GiB)", r["log"])
    r["note"] = f"said before starting: writes {said[1]}, peak at most {said[2]}" if said else \
        "said no size or peak before starting (the fp32 export before merge.py)"
    check = work / "check.json"
    r = phase("transformers loads the export",
              ["check-export", str(export), str(paths["model"]), str(run_dir / "adapter"), str(check)])
    if check.is_file():
        c = json.loads(check.read_text())
        r["note"] = (f"{c['tensors_checked'] - c['tensors_wrong']} of {c['tensors_checked']} adapted weights exact; "
                     f"logits max relative diff {c['relative_max_diff']:.4f}, bf16 noise floor {c['noise_floor']:.4f}")
    phase("generate 1 s", ["generate", "--run", str(run_dir), "--text", PROBE_TEXT, "--out", str(work / "gen.wav"),
                           "--max-new-tokens", "33", "--seed", "0"])
    return rows


def gib(x) -> str:
    return "n/a" if x is None else f"{x / GIB:.2f}"


def table(rows: list[dict], header: list[str]) -> list[str]:
    out = [*header, "", "| phase | exit (expected) | wall s | peak RSS GiB | device peak GiB | disk written GiB "
           "| note |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        ok = "" if r["rc"] == r["expect"] else " **unexpected**"
        out.append(f"| {r['phase']} | {r['rc']} ({r['expect']}){ok} | {r['wall']:.1f} | {gib(r['peak_rss'])} | "
                   f"{gib(r['device_peak'])} | {gib(r['disk'])} | {r['note']} |")
    return out


def main() -> None:
    sys.path.insert(0, str(BENCH))
    if len(sys.argv) > 2 and sys.argv[1] == "--phase-child":
        child(Path(sys.argv[2]), sys.argv[4:])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", required=True, help="where the model, codec, data and the runs go (kept)")
    parser.add_argument("--layers", type=int, help="decoder layers (default 28, the released model; --small: 2)")
    parser.add_argument("--small", action="store_true",
                        help="check the script: 2 layers of hidden 256 (real vocabulary and codebooks), the tiny "
                             "codec; the figures mean nothing")
    parser.add_argument("--family", choices=["v2", "v3"], default="v2",
                        help="v2: Higgs Audio v2 (5.77 B); v3: Higgs TTS 3 (4.04 B, released layout)")
    parser.add_argument("--out", help="also write the Markdown table to this file")
    args = parser.parse_args()
    args.layers = args.layers or (2 if args.small else {"v2": 28, "v3": 36}[args.family])
    root = Path(args.dir).resolve()
    root.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    paths = build_assets(root, args)
    built = "reused" if paths.pop("reused", False) else f"built in {time.perf_counter() - start:.0f} s"

    import psutil
    import torch

    rows = workflow(root, paths)
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else \
        f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    codec = "codec bundled" if args.family == "v3" else f"codec {gib(du(paths['codec']))} GiB"
    header = [f"# Real-size workflow through the CLI ({date.today().isoformat()})", "",
              f"- device: {device}, {psutil.virtual_memory().total / GIB:.1f} GiB RAM; torch {torch.__version__}",
              f"- model: {'Higgs TTS 3' if args.family == 'v3' else 'Higgs Audio v2'}, {args.layers} layers"
              f"{' (--small widths)' if args.small else ''}, {gib(du(paths['model']))} GiB of safetensors; {codec}; "
              f"assets {built}",
              f"- command: `python {' '.join(sys.argv)}`"]
    lines = table(rows, header)
    print("\n".join(lines))
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")
    if any(r["rc"] != r["expect"] for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
