"""Peak memory of one LoRA training step (forward + backward) at 2048 tokens with the real 128,256-token
vocabulary: masked heads (higgs-accel's DualLossModel) vs full logits (the model's own forward with labels and
audio_labels, which projects every position through the text head: 2048 x 128,256 fp32 logits are 1 GiB, and
its cross-entropy keeps as much again for backward).

The model has the real vocabulary, codebooks and head_dim but a narrow, shallow backbone (default hidden 1024,
2 layers), so the step fits and runs quickly on a CPU; the heads, which are what differs, are full size. The batch
is one voice-cloning TTS sample of exactly --seq tokens laid out by higgs_accel.chat (see throughput.py); LoRA is
the trainer's default. Each variant runs in a fresh process, built identically; the figure is the step's peak
memory above what was in use just before it (the model, its LoRA and the batch):
  CUDA  torch.cuda.max_memory_allocated() after reset_peak_memory_stats(), minus memory_allocated() before;
  CPU   the process's peak RSS (VmHWM, reset through /proc/self/clear_refs just before the step) minus its RSS
        then; glibc is told to map every allocation of 128 KiB or more on its own, so freed tensors leave RSS at
        once and the peak tracks live tensors, as the CUDA figure does.
The last line is the ratio masked / full (target <= 0.3).

--per-layer measures what one decoder layer keeps for backward: the masked step at 1 and 3 layers (bf16 weights
and the real width with --dtype bf16 --hidden 3072; a 512-token text vocabulary, which cancels out of the slope),
each in a fresh process; their slope per --seq tokens next to the analytic floor (higgs_accel.memory: both
RMSNorms' inputs and outputs, q/k/v, the attention output, gate, up and their product), and each step next to the
memory model's prediction. Its last line is the ratio measured / floor (target <= 1.3). --plain measures
transformers' and PEFT's own layers instead (the figure before higgs_accel.activations). --table prints the memory
model's table for the real model (--table-v3: for Higgs TTS 3's).

    python bench/memory.py [--seq 2048] [--hidden 1024] [--layers 2] [--lora-dropout 0] [--device auto] [--quick]
    python bench/memory.py --per-layer --hidden 3072 --dtype bf16 [--plain] [--layer-pair 1,3]
    python bench/memory.py --table [--table-v3]
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from higgs_accel.config import LoraConfig

VARIANTS = {"masked": "masked heads (DualLossModel)", "full": "full logits (model forward)"}
MIB = 2**20


# ---------------------------------------------------------------- one variant, in its own process


def proc_status_kib(field: str) -> int:
    return int(re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1))


def _reset_peak_rss() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # "5" resets VmHWM to the current RSS (Linux >= 4.0)


def narrow_widths(hidden: int) -> dict:
    """Config widths for a narrow backbone that keeps the real head_dim (128) and grouped KV heads."""
    if hidden == 3072:
        return {}  # the real widths are HiggsAudioV2Config's defaults
    heads = max(1, hidden // 128)
    return dict(hidden_size=hidden, num_attention_heads=heads, head_dim=hidden // heads,
                num_key_value_heads=heads // 2 if heads % 2 == 0 else heads,
                intermediate_size=max(128, round(hidden * 8 / 3 / 128) * 128))


def measure(variant: str, seq: int, hidden: int, layers: int, device: str, dtype: str, lora_dropout: float,
            vocab: int = 0, plain: bool = False) -> dict:
    """One step of ``variant`` in this process. ``vocab`` > 0 shrinks the text vocabulary (the per-layer figure
    does not depend on it); ``plain`` runs transformers' and PEFT's own layers instead of higgs-accel's lean ones."""
    import torch
    from throughput import forward_kwargs, real_width_config, synthetic_batches, text_tokenizer
    from transformers import HiggsAudioV2ForConditionalGeneration

    from higgs_accel.activations import lean_activations
    from higgs_accel.chat import SpecialIds
    from higgs_accel.config import TrainConfig
    from higgs_accel.loading import DTYPES
    from higgs_accel.losses import LossWeights
    from higgs_accel.model import DualLossModel, add_lora

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = text_tokenizer(Path(tmp))
    config = real_width_config(tokenizer, layers, seq, **narrow_widths(hidden),
                               **({"vocab_size": vocab} if vocab else {}))
    base = HiggsAudioV2ForConditionalGeneration(config, use_text_head=True).to(device, DTYPES[dtype])
    ids = SpecialIds.from_parts(tokenizer, config)
    peft_model = add_lora(base, LoraConfig(dropout=lora_dropout))
    if plain:
        lean_activations(peft_model, lean=False)
    peft_model.train()
    batch = {k: v.to(device) if torch.is_tensor(v) else v
             for k, v in synthetic_batches(tokenizer, ids, seq, 1, 1)[0].items()}
    t = TrainConfig()
    dual = DualLossModel(peft_model, ids, LossWeights.of(t)).to(device)

    def step():
        if variant == "masked":
            out = dual(batch)
            shape = out.text_logits_shape
        else:
            out = peft_model(**forward_kwargs(batch))
            shape = [*batch["input_ids"].shape, config.vocab_size]  # its text logits; it returns the audio ones
        out.loss.backward()
        return out.loss.item(), shape

    gc.collect()
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand back what building the model freed
        before = proc_status_kib("VmRSS") * 1024
        _reset_peak_rss()
    start = time.perf_counter()
    loss, shape = step()
    seconds = time.perf_counter() - start
    if cuda:
        peak = torch.cuda.max_memory_allocated() - before
    else:
        peak = proc_status_kib("VmHWM") * 1024 - before
    return {"variant": variant, "peak_bytes": peak, "before_bytes": before, "seconds": seconds, "loss": loss,
            "text_logits_shape": shape, "parameters": sum(p.numel() for p in base.parameters()),
            "config": config.to_dict(), "tokens": batch["input_ids"].numel(),
            "audio_targets": int((batch["audio_labels"] != -100).any(-1).sum()),
            "text_targets": int((batch["labels"] != -100).sum())}


# ---------------------------------------------------------------- both variants, each in a fresh process


def run_variant(variant: str, args, layers: int | None = None) -> dict:
    cmd = [sys.executable, __file__, "--child", variant, "--seq", str(args.seq), "--hidden", str(args.hidden),
           "--layers", str(layers or args.layers), "--device", args.device, "--dtype", args.dtype,
           "--lora-dropout", str(args.lora_dropout), "--vocab", str(args.vocab)] + (["--plain"] if args.plain else [])
    # A fixed mmap threshold: glibc otherwise raises it after each large free and then keeps freed blocks of up to
    # 32 MiB in its heap, which would make RSS lag the live tensors.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.stderr.write(done.stdout + done.stderr)
        raise SystemExit(f"the '{variant}' variant failed (exit {done.returncode}): {' '.join(cmd)}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def resolve_device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def per_layer(args) -> None:
    """The masked step at 1 and 3 layers: the slope is what one decoder layer keeps, next to the analytic floor
    and to higgs_accel.memory's prediction of each step."""
    from types import SimpleNamespace

    from higgs_accel.memory import DTYPE_BYTES, floor_values_per_token, predict

    lower, upper = (int(x) for x in args.layer_pair.split(","))
    runs = {n: run_variant("masked", args, layers=n) for n in (lower, upper)}
    for n, r in runs.items():
        c = SimpleNamespace(**r["config"])
        predicted = predict(c, LoraConfig(dropout=args.lora_dropout), r["tokens"], dtype=args.dtype,
                            audio_targets=r["audio_targets"], text_targets=r["text_targets"]).activations
        print(f"  {n} layer(s): measured +{r['peak_bytes'] / MIB:7.0f} MiB, memory model {predicted / MIB:7.0f} MiB "
              f"({predicted / r['peak_bytes'] - 1:+.1%}); {r['audio_targets']} audio and {r['text_targets']} text "
              f"targets, {r['seconds']:.1f} s")
    c = SimpleNamespace(**runs[upper]["config"])
    layer = (runs[upper]["peak_bytes"] - runs[lower]["peak_bytes"]) / (upper - lower)
    floor = floor_values_per_token(c) * DTYPE_BYTES[args.dtype] * args.seq
    print(f"per decoder layer per {args.seq} tokens: {layer / MIB:.0f} MiB measured (slope between {lower} and "
          f"{upper} layers), analytic floor {floor / MIB:.0f} MiB ({floor_values_per_token(c):,} values per token in "
          f"{args.dtype}); measured / floor: {layer / floor:.2f}x (target <= 1.3)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=2048, help="tokens in the step (one sample)")
    parser.add_argument("--hidden", type=int, default=1024, help="backbone width (3072: the real widths)")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--device", default="auto", help="auto (cuda when present), cpu or cuda[:N]")
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"), help="weights dtype")
    parser.add_argument("--lora-dropout", type=float, default=LoraConfig().dropout,
                        help="LoRA dropout (default: the trainer's); above 0 each adapted layer keeps a dropped copy "
                             "of its input for backward")
    parser.add_argument("--per-layer", action="store_true",
                        help="what one decoder layer keeps: the masked step at 1 and 3 layers (each in a fresh "
                             "process), their slope next to the analytic floor, and the memory model's prediction")
    parser.add_argument("--layer-pair", help="with --per-layer: the two depths measured (default 1,3; --quick 1,2)")
    parser.add_argument("--table", action="store_true",
                        help="print the memory model's table for the real model (sequence x batch x checkpointing); "
                             "measures nothing")
    parser.add_argument("--table-v3", action="store_true", help="--table for Higgs TTS 3 (4.04 B) instead")
    parser.add_argument("--vocab", type=int, default=None,
                        help="text vocabulary (default: the real 128,256; 512 with --per-layer, where the heads "
                             "cancel out of the slope)")
    parser.add_argument("--plain", action="store_true",
                        help="transformers' and PEFT's own layers instead of higgs-accel's lean ones (the 'before')")
    parser.add_argument("--quick", action="store_true", help="seq 256, hidden 128, 1 layer: checks the script")
    parser.add_argument("--child", choices=sorted(VARIANTS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.seq, args.hidden, args.layers = 256, 128, 1
    if args.vocab is None:
        args.vocab = 512 if args.per_layer else 0
    args.layer_pair = args.layer_pair or ("1,2" if args.quick else "1,3")
    if args.child:
        print(json.dumps(measure(args.child, args.seq, args.hidden, args.layers, args.device, args.dtype,
                                 args.lora_dropout, args.vocab, args.plain)))
        return

    args.device = resolve_device(args.device)
    how = "CUDA max_memory_allocated" if args.device.startswith("cuda") else "peak RSS"
    if args.table or args.table_v3:
        from higgs_accel.memory import real_model_config, real_tts3_config, table

        model = "Higgs TTS 3 (36 layers" if args.table_v3 else "the real model (28 layers"
        print(f"GPU memory of one training step of {model}, bf16 weights, default LoRA), every position an audio "
              "target; predicted by higgs_accel.memory from CPU measurements")
        print("\n".join(table(real_tts3_config() if args.table_v3 else real_model_config(), LoraConfig())))
        return
    layers = args.layer_pair.replace(",", " and ") if args.per_layer else args.layers
    print(f"one training step (forward + backward), batch 1 x {args.seq} tokens, vocabulary "
          f"{args.vocab or 128256:,}, hidden {args.hidden}, {layers} layer(s), LoRA dropout {args.lora_dropout}, "
          f"{args.dtype} on {args.device}, {'plain PEFT' if args.plain else 'lean'} layers; {how} above the memory "
          f"in use before the step, each run in a fresh process")
    if args.per_layer:
        per_layer(args)
        return
    results = {}
    for variant in VARIANTS:
        r = results[variant] = run_variant(variant, args)
        print(f"  {VARIANTS[variant]:<29}: peak +{r['peak_bytes'] / MIB:8.0f} MiB (model and batch before: "
              f"{r['before_bytes'] / MIB:.0f} MiB), text logits {r['text_logits_shape']}, loss {r['loss']:.4f}, "
              f"{r['seconds']:.1f} s")
    ratio = results["masked"]["peak_bytes"] / results["full"]["peak_bytes"]
    print(f"masked / full peak step memory: {ratio:.3f} (target <= 0.3)")


if __name__ == "__main__":
    main()
