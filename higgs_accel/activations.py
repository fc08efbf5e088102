"""What the LoRA training step keeps for backward, cut to what backward needs.

Autograd on the plain PEFT model keeps, per decoder layer, copies of the same data several times over:
  - PEFT casts each adapted layer's input to the adapter dtype (fp32) before ``lora_A``, and ``lora_A`` keeps that
    cast for its weight gradient: q, k and v each keep their own fp32 copy of the one normed input, and gate and up
    of theirs. With LoRA dropout each projection also keeps its own dropped copy and mask.
  - RMSNorm upcasts its input to fp32 and keeps that fp32 copy (twice the bytes of a bf16 input).
  - The MLP keeps SiLU's input (gate) and output, and up, where gate and up are enough.

Each of these is a cheap, deterministic function of a tensor backward keeps anyway (or of its own bf16 input), so
here it runs under ``Recompute``: forward without a graph, only the function's tensor inputs saved, and backward
runs it again with grad and differentiates that. The ops are the same as in the plain graph, so are the losses and
the gradients (up to the order in which autograd sums a tensor's gradient contributions). The price is recomputing
a cast, a rank-r matmul pair, a norm and a SiLU per layer in backward: elementwise work and 2 x r / hidden of a
projection's FLOPs. Inputs are saved with ``save_for_backward``, so gradient checkpointing, which hooks what is
saved, still drops them between forward and backward.

LoRA dropout: one mask per shared input, not one per projection. q, k and v (and gate and up) see the same dropped
input; the mask is drawn from a seed taken from torch's global CPU generator and rebuilt from that seed in backward,
so no mask is stored, and checkpointing (which restores the generators before recomputing) rebuilds the same masks.
"""

from __future__ import annotations

import weakref
from functools import partial

import torch
import torch.nn.functional as F
from peft.tuners.lora.layer import Linear as PeftLoraLinear
from torch import nn
from transformers.models.higgs_audio_v2.modeling_higgs_audio_v2 import HiggsAudioV2MLP, HiggsAudioV2RMSNorm


class Recompute(torch.autograd.Function):
    """``fn(*tensors)`` whose graph is rebuilt in backward from the saved ``tensors`` instead of being kept."""

    @staticmethod
    def forward(ctx, fn, *tensors):
        device = tensors[0].device.type
        ctx.fn = fn
        ctx.autocast = (device, torch.get_autocast_dtype(device), torch.is_autocast_enabled(device))
        ctx.save_for_backward(*tensors)
        return fn(*tensors)

    @staticmethod
    def backward(ctx, *grads):
        device, dtype, enabled = ctx.autocast
        leaves = [t.detach().requires_grad_(need) for t, need in zip(ctx.saved_tensors, ctx.needs_input_grad[1:])]
        with torch.enable_grad(), torch.autocast(device, dtype=dtype, enabled=enabled):
            out = ctx.fn(*leaves)
        wanted = [t for t in leaves if t.requires_grad]
        got = iter(torch.autograd.grad(out, wanted, grads))
        return None, *(next(got) if t.requires_grad else None for t in leaves)


def keep_mask(like: torch.Tensor, seed: int, p: float) -> torch.Tensor:
    """The dropout keep-mask for ``seed``: the same on every call, so backward rebuilds forward's."""
    generator = torch.Generator(device=like.device).manual_seed(seed)
    return torch.rand(like.shape, generator=generator, device=like.device) >= p


def lora_branch(x, a, b, *, dtype: torch.dtype, scaling: float, p: float, seed: int | None):
    """``lora_B(lora_A(dropout(x))) * scaling`` with x cast to ``dtype`` first, as PEFT's vanilla LoRA computes it."""
    h = x.to(dtype)
    if p:
        h = h.masked_fill(~keep_mask(h, seed, p), 0.0) * (1.0 / (1.0 - p))
    return F.linear(F.linear(h, a), b) * scaling


class MaskSeeds:
    """One dropout seed per input tensor: the projections that share an input (q/k/v, gate/up) share its mask."""

    def __init__(self):
        self.last = (lambda: None, -1, 0)

    def seed_for(self, x: torch.Tensor) -> int:
        ref, version, seed = self.last
        if ref() is not x or version != x._version:
            seed = int(torch.randint(0, 2**62, ()).item())
            self.last = (weakref.ref(x), x._version, seed)
        return seed


class LeanLoraLinear(PeftLoraLinear):
    """PEFT's LoRA Linear; when training vanilla LoRA the adapter branch runs under ``Recompute``."""

    mask_seeds: MaskSeeds

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        active = [a for a in self.active_adapters if a in self.lora_A]
        if (self.disable_adapters or self.merged or not torch.is_grad_enabled() or kwargs.get("adapter_names")
                or any(a in self.lora_variant for a in active)):
            return super().forward(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        result_dtype = result.dtype
        for name in active:
            a, b = self.lora_A[name].weight, self.lora_B[name].weight
            dropout = self.lora_dropout[name]
            p = dropout.p if isinstance(dropout, nn.Dropout) and dropout.training else 0.0
            dtype = a.dtype if getattr(self, "cast_input_dtype_enabled", True) else x.dtype
            fn = partial(lora_branch, dtype=dtype, scaling=self.scaling[name], p=p,
                         seed=self.mask_seeds.seed_for(x) if p else None)
            result = result + Recompute.apply(fn, x, a, b)
        return result.to(result_dtype)


class LeanRMSNorm(HiggsAudioV2RMSNorm):
    """Keeps its input in its own dtype (bf16) for backward instead of the fp32 upcast; frozen weight only."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.weight.requires_grad or not torch.is_grad_enabled():
            return super().forward(hidden_states)
        return Recompute.apply(super().forward, hidden_states)


class LeanMLP(HiggsAudioV2MLP):
    """Keeps gate and up for backward, not SiLU's output as well."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled():
            return super().forward(x)
        return self.down_proj(Recompute.apply(self.gated, self.gate_proj(x), self.up_proj(x)))

    def gated(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        return self.act_fn(gate) * up


LEAN = {PeftLoraLinear: LeanLoraLinear, HiggsAudioV2RMSNorm: LeanRMSNorm, HiggsAudioV2MLP: LeanMLP}


def lean_activations(model: nn.Module, lean: bool = True) -> int:
    """Switch the model's LoRA layers, RMSNorms and MLPs to their lean classes in place (same parameters, same
    state dict, same forward), or with ``lean=False`` back to transformers' and PEFT's own; returns how many
    modules changed."""
    swap = LEAN if lean else {v: k for k, v in LEAN.items()}
    seeds, changed = MaskSeeds(), 0
    for module in model.modules():
        cls = swap.get(type(module))
        if cls is not None:
            module.__class__ = cls
            changed += 1
        if isinstance(module, LeanLoraLinear):
            module.mask_seeds = seeds
    return changed
