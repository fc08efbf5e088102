"""Real-size Higgs Audio v2 LoRA training on one CUDA GPU: tokens/s, model FLOPs utilisation (MFU) and peak
memory of higgs-accel's training step, with and without gradient checkpointing, at 2048 and 4096 tokens per
sample and batch 1 to 8. Without CUDA it prints why and exits with status 0, measuring nothing.

Model: HiggsAudioV2Config's defaults (the real architecture: 28 layers, hidden 3072, 24 heads / 8 KV heads of
128, intermediate 8192, vocabulary 128,256, a DualFFN audio MLP per layer) with 8 codebooks of 1026 codes and the
text head, random weights in bf16 (as ``model.dtype: bf16``), sdpa attention. LoRA: the trainer's default (r 16 on
q/k/v/o and gate/up/down of both MLPs). Each step is loop.train's step body: DualLossModel forward (heads only at
labelled positions), backward, clipping at 1.0, fused AdamW, one read of the step's statistics. The batches are
voice-cloning TTS samples of exactly --seqs tokens, laid out by higgs_accel.chat (see throughput.py). A
configuration that runs out of memory is recorded as OOM, and larger batches of that row are then not tried.

FLOPs per step, counting only work the step has to do (recomputation under checkpointing is not counted):
    tokens x (4 N_frozen + 6 N_lora)            frozen weights: 2 forward + 2 for the input gradient; LoRA
                                                 weights: 2 forward + 4 backward (input and weight gradients)
  + samples x layers x 6 seq^2 x heads x head_dim  causal attention: QK^T and AV at half the square, x3 for backward
  + 4 x hidden x (8 x 1026) x audio targets + 4 x hidden x 128,256 x text targets   (the heads, frozen)
where N_frozen = layers x (q, k, v, o + one MLP's gate, up, down) weights, the matmul weights a token passes
through (each token takes the text or the audio MLP, not both), and N_lora = layers x r x (in + out) summed over
the same projections. MFU = those FLOPs / step time / the device's dense bf16 peak (H100 SXM and H200: 989
TFLOPS; --peak-tflops for another). The "MFU 6N" column is the usual full-fine-tuning estimate,
6 x (N_frozen + N_lora) x tokens, for comparison with published figures (it counts weight gradients LoRA never
computes, so it reads 1.5x high on the dense part, and ignores attention).

    python bench/gpu_real_size.py --out bench/gpu_real_size.md [--seqs 2048,4096] [--batches 1,2,4,8]
"""

from __future__ import annotations

import argparse
import gc
import platform
import sys
import time
from datetime import date
from pathlib import Path

from higgs_accel.memory import ALLOCATOR_OVERHEAD

# Dense bf16 tensor-core peaks (TFLOPS, no sparsity) by a substring of torch.cuda.get_device_name(); first match.
PEAK_BF16_TFLOPS = [("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("H200", 989.0), ("H800", 989.0),
                    ("B200", 2250.0), ("A100", 312.0), ("A800", 312.0), ("L40S", 362.0), ("L4", 121.0)]
LR, MAX_GRAD_NORM = 2e-4, 1.0
NO_CUDA = ("gpu_real_size.py: no CUDA device (torch.cuda.is_available() is False), nothing measured. Run it on a "
           "GPU machine: python bench/gpu_real_size.py --out bench/gpu_real_size.md")


def peak_tflops(device_name: str, override: float | None) -> float | None:
    if override:
        return override
    return next((v for k, v in PEAK_BF16_TFLOPS if k in device_name), None)


def projection_shapes(c) -> list[tuple[int, int]]:
    """(in, out) of the matmuls one token passes through in one layer: attention, then one of the two MLPs."""
    attn, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    h, inter = c.hidden_size, c.intermediate_size
    return [(h, attn), (h, kv), (h, kv), (attn, h), (h, inter), (h, inter), (inter, h)]


def step_flops(c, r: int, seq: int, batch: int, text_targets: int, audio_targets: int) -> tuple[float, float]:
    """(FLOPs the step needs, the 6N estimate) for a batch of ``batch`` samples of ``seq`` tokens; see the top."""
    shapes = projection_shapes(c)
    n_frozen = c.num_hidden_layers * sum(i * o for i, o in shapes)
    n_lora = c.num_hidden_layers * r * sum(i + o for i, o in shapes)
    tokens = seq * batch
    dense = tokens * (4 * n_frozen + 6 * n_lora)
    attention = batch * c.num_hidden_layers * 6 * seq**2 * c.num_attention_heads * c.head_dim
    heads = 4 * c.hidden_size * (c.num_codebooks * c.codebook_size * audio_targets + c.vocab_size * text_targets)
    return dense + attention + heads, 6 * (n_frozen + n_lora) * tokens


def run_config(dual, batches: list[dict], warmup: int, steps: int, cuda: bool) -> dict:
    """Time ``steps`` steps after ``warmup``; the peak memory covers all of them."""
    import torch

    params = [p for p in dual.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR, weight_decay=0.0, fused=cuda or None)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = 0.0
    for i in range(warmup + steps):
        if i == warmup:
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
        out = dual(batches[i % len(batches)])
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        out.stats.tolist()  # the loop's one device-to-host read per step, which also waits for the step
    if cuda:
        torch.cuda.synchronize()
    return {"seconds": (time.perf_counter() - start) / steps,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
            "tokens": batches[0]["input_ids"].numel(),
            "text_targets": out.text_logits_shape[0], "audio_targets": out.audio_logits_shape[0]}


def build(args, device: str, max_seq: int):
    """(DualLossModel on the real-size, randomly initialised model with LoRA; the tokenizer; the base config)."""
    import tempfile

    import torch
    from throughput import real_width_config, text_tokenizer
    from transformers import HiggsAudioV2ForConditionalGeneration

    from higgs_accel.chat import SpecialIds
    from higgs_accel.config import LoraConfig, TrainConfig
    from higgs_accel.losses import LossWeights
    from higgs_accel.model import DualLossModel, add_lora

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = text_tokenizer(Path(tmp))
    small = dict(hidden_size=128, intermediate_size=256, num_attention_heads=2, num_key_value_heads=1, head_dim=64)
    config = real_width_config(tokenizer, args.layers, max_seq, **(small if args.cpu_check else {}))
    dtype = torch.float32 if args.cpu_check else torch.bfloat16
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # initialise straight into the target dtype, on the device: no fp32 copy
    try:
        with torch.device(device):
            base = HiggsAudioV2ForConditionalGeneration(config, use_text_head=True)
    finally:
        torch.set_default_dtype(default)
    t = TrainConfig()
    ids = SpecialIds.from_parts(tokenizer, config)
    dual = DualLossModel(add_lora(base, LoraConfig()), ids, LossWeights.of(t))
    dual.to(device).train()
    return dual, tokenizer, ids, config


def set_checkpointing(dual, on: bool) -> None:
    """What add_lora(gradient_checkpointing=True) turns on, under transformers 5's name for it."""
    if on:
        dual.lm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        dual.lm.activation_checkpointing_disable()


def predicted(config, seq: int, batch: int, mode: str, audio_targets: int | None = None, text_targets: int = 0) -> str:
    """higgs_accel.memory's live peak for the configuration, in GiB (every position an audio target unless the run
    counted them)."""
    from higgs_accel.config import LoraConfig
    from higgs_accel.memory import GIB, predict

    p = predict(config, LoraConfig(), seq * batch, gradient_checkpointing=mode == "on", audio_targets=audio_targets,
                text_targets=text_targets)
    return f"{p.allocated / GIB:.1f}"


def fmt(x, spec: str, none: str = "n/a") -> str:
    return none if x is None else format(x, spec)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="also write the markdown table (with the set-up) to this file")
    parser.add_argument("--seqs", help="tokens per sample, comma-separated (default 2048,4096)")
    parser.add_argument("--batches", help="samples per step, comma-separated (default 1,2,4,8)")
    parser.add_argument("--checkpointing", default="off,on", help="gradient checkpointing settings to run: off,on")
    parser.add_argument("--layers", type=int, help="decoder layers (default 28: the real model)")
    parser.add_argument("--warmup", type=int, help="untimed steps per configuration (default 2)")
    parser.add_argument("--steps", type=int, help="timed steps per configuration (default 5)")
    parser.add_argument("--peak-tflops", type=float, help="dense bf16 peak of the device, if not in the table")
    parser.add_argument("--cpu-check", action="store_true",
                        help="check this script without a GPU: a narrow fp32 model on the CPU (defaults: seq 128, "
                             "batch 1,2,4, 2 layers, 1+1 steps) and a simulated OOM for every batch above the "
                             "smallest; the figures mean nothing")
    args = parser.parse_args()
    defaults = dict(seqs="128", batches="1,2,4", layers=2, warmup=1, steps=1) if args.cpu_check else \
        dict(seqs="2048,4096", batches="1,2,4,8", layers=28, warmup=2, steps=5)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)

    import torch

    cuda = torch.cuda.is_available()
    if not cuda and not args.cpu_check:
        print(NO_CUDA)
        return
    seqs = [int(x) for x in args.seqs.split(",")]
    batch_sizes = sorted(int(x) for x in args.batches.split(","))
    modes = [m.strip() for m in args.checkpointing.split(",")]
    if not set(modes) <= {"off", "on"} or not modes:
        parser.error("--checkpointing takes off, on or off,on")
    device = "cuda" if cuda and not args.cpu_check else "cpu"
    name = torch.cuda.get_device_name(0) if device == "cuda" else f"CPU ({platform.processor() or 'unknown'})"
    peak = None if device == "cpu" else peak_tflops(name, args.peak_tflops)

    dual, tokenizer, ids, config = build(args, device, max(seqs))
    from throughput import synthetic_batches

    from higgs_accel.config import LoraConfig

    lora_r = LoraConfig().r
    total = sum(p.numel() for p in dual.parameters())
    trainable = sum(p.numel() for p in dual.parameters() if p.requires_grad)
    weights_gib = torch.cuda.memory_allocated() / 2**30 if device == "cuda" else None
    header = [
        f"# Real-size LoRA training step ({date.today().isoformat()})",
        "",
        f"- device: {name}; dense bf16 peak {fmt(peak, '.0f')} TFLOPS; torch {torch.__version__}",
        f"- model: {config.num_hidden_layers} layers, hidden {config.hidden_size}, vocabulary {config.vocab_size:,}, "
        f"{total / 1e9:.2f} B parameters ({fmt(weights_gib, '.1f')} GiB on the device), LoRA r {lora_r}: "
        f"{trainable / 1e6:.1f} M trainable",
        f"- {args.warmup} warm-up + {args.steps} timed steps per configuration; command: "
        f"`python {' '.join(sys.argv)}`",
        "- MFU formula: see the docstring of bench/gpu_real_size.py",
        "",
        "- predicted GiB: higgs_accel.memory's live peak (max_memory_allocated; the device needs "
        f"{ALLOCATOR_OVERHEAD:.2f}x that for the caching allocator), from CPU measurements",
        "",
        "| grad ckpt | seq | batch | tokens/step | step s | tokens/s | TFLOPS | MFU | MFU 6N | peak GiB "
        "| predicted GiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for line in header:
        print(line, flush=True)
    rows, best = [], None
    for mode in modes:
        set_checkpointing(dual, mode == "on")
        for seq in seqs:
            failed_at = None
            for b in batch_sizes:
                cells = [mode, str(seq), str(b), f"{seq * b:,}"]
                if failed_at is not None:
                    rows.append("| " + " | ".join(cells + [f"OOM (not run: batch {failed_at} ran out)"] + [""] * 5
                                                  + [predicted(config, seq, b, mode)]) + " |")
                    print(rows[-1], flush=True)
                    continue
                result = None
                batches = [{k: v.to(device) if torch.is_tensor(v) else v for k, v in x.items()}
                           for x in synthetic_batches(tokenizer, ids, seq, b, n_batches=2)]
                try:
                    if args.cpu_check and b > batch_sizes[0]:
                        raise torch.OutOfMemoryError("simulated by --cpu-check")
                    result = run_config(dual, batches, args.warmup, args.steps, device == "cuda")
                except torch.OutOfMemoryError:
                    pass
                # Out of the except block, the traceback and the tensors its frames held are gone: free them all.
                del batches
                for p in dual.parameters():
                    p.grad = None
                gc.collect()
                if device == "cuda":
                    torch.cuda.empty_cache()
                if result is None:
                    failed_at = b
                    rows.append("| " + " | ".join(cells + ["OOM"] + [""] * 5 + [predicted(config, seq, b, mode)])
                                + " |")
                    print(rows[-1], flush=True)
                    continue
                flops, flops_6n = step_flops(config, lora_r, seq, b, result["text_targets"], result["audio_targets"])
                s = result["seconds"]
                mfu = flops / s / (peak * 1e12) if peak else None
                mfu_6n = flops_6n / s / (peak * 1e12) if peak else None
                cells += [f"{s:.3f}", f"{seq * b / s:,.0f}", f"{flops / s / 1e12:.1f}", fmt(mfu, ".1%"),
                          fmt(mfu_6n, ".1%"), fmt(result["peak_gib"], ".1f"),
                          predicted(config, seq, b, mode, result["audio_targets"], result["text_targets"])]
                rows.append("| " + " | ".join(cells) + " |")
                print(rows[-1], flush=True)
                # Ranked by achieved FLOPs/s, which is what MFU divides by a constant (and known without a peak).
                if best is None or flops / s > best[0]:
                    best = (flops / s, mfu, f"grad ckpt {mode}, seq {seq}, batch {b}, {seq * b / s:,.0f} tokens/s, "
                                            f"{flops / s / 1e12:.1f} TFLOPS")
    if args.out:
        Path(args.out).write_text("\n".join(header + rows) + "\n")
        print(f"wrote {args.out}")
    if best is None:
        print("best MFU: none (every configuration ran out of memory)")
    else:
        print(f"best MFU: {fmt(best[1], '.1%')} ({best[2]})")


if __name__ == "__main__":
    main()
