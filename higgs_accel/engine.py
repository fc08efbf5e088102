"""The distributed engine of a run (single process, DDP, FSDP2, DeepSpeed ZeRO): the Accelerator built for it, what
actually runs (for ``run_start``), refusal of silent engine swaps, and full weights out of sharded parameters.

accelerate decides the engine from its launcher's environment (``accelerate launch --use_fsdp`` sets
``ACCELERATE_USE_FSDP``, ``FSDP_VERSION``, ...), and on a machine without GPUs it quietly drops FSDP and DeepSpeed
and runs plain multi-process CPU DDP. This module compares what was asked for with what runs, so a run never trains
with an engine nobody chose, and drives FSDP2 on the CPU on purpose (torch's ``fully_shard`` works over gloo).
"""

from __future__ import annotations

import os
from contextlib import contextmanager

import torch

from .config import ConfigError

CHECKPOINT_WRAPPER = "_checkpoint_wrapped_module."  # the name part torch's activation-checkpoint wrapper inserts


def _flag(env, name: str) -> bool:
    return env.get(name, "false").lower() in ("true", "1", "yes")


def requested(env=None) -> dict:
    """The engine the launcher asked for, from its environment: ``{"engine": "fsdp2" | "fsdp1" | "deepspeed" |
    "ddp" | "single", "zero_stage": int | None}``."""
    env = os.environ if env is None else env
    if _flag(env, "ACCELERATE_USE_DEEPSPEED"):
        stage = env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
        return {"engine": "deepspeed", "zero_stage": int(stage) if stage and stage.isdigit() else None}
    if _flag(env, "ACCELERATE_USE_FSDP"):
        return {"engine": f"fsdp{env.get('FSDP_VERSION', '1')}", "zero_stage": None}
    return {"engine": "ddp" if int(env.get("WORLD_SIZE", "1")) > 1 else "single", "zero_stage": None}


def build_accelerator(allow_fallback: bool = False, **kwargs):
    """``Accelerator(**kwargs)`` running the engine the launcher asked for, or ConfigError (one line).

    FSDP2 asked for on a machine without CUDA is driven on the CPU deliberately: accelerate's state only turns FSDP
    on for GPU-like distributed types, so the plugin is built from the launcher's environment and the distributed
    type set to FSDP; accelerate's own FSDP2 prepare, clipping and state saving then run unchanged over gloo."""
    from accelerate.accelerator import Accelerator
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    want = requested()
    if want["engine"] == "deepspeed" and not torch.cuda.is_available():
        raise ConfigError("DeepSpeed needs CUDA GPUs and this machine has none: launch with the DDP or FSDP2 config "
                          "(configs/accelerate/), see docs/distributed.md")
    cpu_fsdp2 = want["engine"] == "fsdp2" and not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", 1)) > 1
    plugin = FullyShardedDataParallelPlugin() if cpu_fsdp2 else None  # reads the launcher's FSDP_* settings
    accelerator = Accelerator(fsdp_plugin=plugin, **kwargs)
    if cpu_fsdp2 and accelerator.distributed_type == DistributedType.MULTI_CPU:
        # Both shared states: every later AcceleratorState() copies the process state's type over its own.
        PartialState().distributed_type = accelerator.state.distributed_type = DistributedType.FSDP
        accelerator.state.fsdp_plugin = plugin
        if accelerator.mixed_precision != "no":
            plugin.set_mixed_precision(accelerator.mixed_precision)
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    # Never allowed: the processes would each train alone into one run dir.
    if launched != accelerator.num_processes:
        raise ConfigError(f"launched as {launched} processes but accelerate sees {accelerator.num_processes}: each "
                          "would train alone and write the same run dir. Without GPUs set ACCELERATE_USE_CPU=1: "
                          f"`ACCELERATE_USE_CPU=1 torchrun --nproc_per_node {launched} -m higgs_accel train ...` or "
                          f"`ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes {launched} "
                          "--num_machines 1 -m higgs_accel train ...`")
    check(accelerator, want, allow_fallback)
    return accelerator


def check_accumulation(accelerator, grad_accum: int) -> None:
    """The loop accumulates micro-batches itself (``loop.backward``), but accelerate's DeepSpeed wrapper runs the
    engine's optimizer step inside every ``backward``: with DeepSpeed, ``train.grad_accum`` above 1 would step on
    each micro-batch. Refused with one line until that path is built and checked on a GPU."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.DEEPSPEED and grad_accum > 1:
        raise ConfigError(f"'train.grad_accum' {grad_accum} is not supported under DeepSpeed yet (its engine steps "
                          "inside every backward); use train.batch_size, more processes, or FSDP2")


def check(accelerator, want: dict | None = None, allow_fallback: bool = False) -> None:
    """ConfigError when the engine running is not the one asked for, unless ``allow_fallback``."""
    want = want or requested()
    running = describe(accelerator)
    if want["engine"] == running["engine"] or allow_fallback:
        return
    raise ConfigError(f"the launcher asked for {want['engine']} but accelerate runs {running['engine']} "
                      f"(distributed type {running['distributed_type']}); fix the launch (docs/distributed.md) or set "
                      "train.allow_engine_fallback=true to train with it anyway")


def describe(accelerator) -> dict:
    """The engine that actually runs, for ``run_start``: accelerate's distributed type, the engine's name, FSDP
    version and sharding strategy, DeepSpeed ZeRO stage, mixed precision and the rank layout."""
    from accelerate.utils import DistributedType

    state, kind = accelerator.state, accelerator.distributed_type
    info = {"engine": "ddp" if accelerator.num_processes > 1 else "single", "distributed_type": kind.value,
            "fsdp_version": None, "sharding_strategy": None, "zero_stage": None,
            "mixed_precision": accelerator.mixed_precision}
    if kind == DistributedType.FSDP:
        plugin = state.fsdp_plugin
        info["engine"], info["fsdp_version"] = f"fsdp{plugin.fsdp_version}", plugin.fsdp_version
        if plugin.fsdp_version == 2:
            info["sharding_strategy"] = "FULL_SHARD" if plugin.reshard_after_forward else "SHARD_GRAD_OP"
        else:
            info["sharding_strategy"] = plugin.sharding_strategy.name
    elif kind == DistributedType.DEEPSPEED:
        info["engine"] = "deepspeed"
        info["zero_stage"] = state.deepspeed_plugin.zero_stage
    local = int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes))
    info.update(world_size=accelerator.num_processes, local_world_size=local,
                num_machines=max(1, accelerator.num_processes // max(local, 1)))
    return info


def grad_norm_tensor(value, device) -> torch.Tensor:
    """What ``accelerator.clip_grad_norm_`` returns, as a plain tensor: a tensor under DDP, a DTensor under FSDP2, a
    float (or None before its first step: NaN here) under DeepSpeed. Every process must call it (FSDP2 may reduce)."""
    from torch.distributed.tensor import DTensor

    if isinstance(value, DTensor):
        return value.full_tensor()
    return torch.as_tensor(float("nan") if value is None else value, device=device)


def nonfinite_flags(accelerator, tensors) -> list[bool]:
    """Whether each tensor holds a NaN or inf in any of its shards: one device-to-host read, the same answer on
    every process (every process must call it). Sharded parameters are checked piece by piece where they live."""
    from torch.distributed.tensor import DTensor

    local = [t.to_local() if isinstance(t, DTensor) else t for t in tensors]
    if not local:
        return []
    bad = torch.stack([~torch.isfinite(t.detach()).all() for t in local]).to(torch.int32)
    return [n > 0 for n in accelerator.reduce(bad, "sum").tolist()]


def _zero3(accelerator) -> bool:
    from accelerate.utils import DistributedType

    return (accelerator.distributed_type == DistributedType.DEEPSPEED
            and accelerator.state.deepspeed_plugin.zero_stage == 3)


def gather_trainable(accelerator, module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every trainable parameter of ``module`` (e.g. the PeftModel inside the prepared model: LoRA and
    modules_to_save) as a full CPU tensor, named as in ``module`` without wrapper parts; on the main process, and
    ``{}`` elsewhere. Every process must call it: gathering sharded parameters is a collective. The result goes to
    ``peft_model.save_pretrained(dir, state_dict=...)``, which writes the standard adapter."""
    from torch.distributed.tensor import DTensor

    named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    out = {}
    with _gathered(accelerator, [p for _, p in named]):
        for name, p in named:
            full = p.full_tensor() if isinstance(p, DTensor) else p
            if accelerator.is_main_process:
                out[name.replace(CHECKPOINT_WRAPPER, "")] = full.detach().to("cpu", copy=True)
    return out


def save_adapter(accelerator, peft_model, directory) -> None:
    """The standard PEFT adapter of ``peft_model`` (the PeftModel inside the prepared model) written to
    ``directory`` by the main process, from weights gathered out of whatever sharding the engine uses. Every process
    must call it. Replaces ``peft_model.save_pretrained(directory)`` on the main process alone, which would write
    each sharded parameter's local piece."""
    state = gather_trainable(accelerator, peft_model)
    if accelerator.is_main_process:
        with plain_module_names(peft_model):
            peft_model.save_pretrained(directory, state_dict=state)


@contextmanager
def plain_module_names(model: torch.nn.Module):
    """The model's own module names for the block: activation-checkpoint wrappers (accelerate's FSDP activation
    checkpointing inserts them) are taken out of the module tree, because PEFT derives adapter keys from module
    names. Local to this process; no forward may run inside."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper

    wrapped = [(name, m) for name, m in model.named_modules() if isinstance(m, CheckpointWrapper)]
    for name, m in wrapped:
        model.set_submodule(name, m._checkpoint_wrapped_module)
    try:
        yield
    finally:
        for name, m in wrapped:
            model.set_submodule(name, m)


@contextmanager
def _gathered(accelerator, params):
    if _zero3(accelerator):
        import deepspeed

        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            yield
    else:
        yield


@contextmanager
def full_parameters(accelerator, model: torch.nn.Module):
    """Within this block every process holds the full parameters of ``model``, so any process may run forwards
    alone (generation on the main process, uneven eval batches) without waiting on the others. Every process must
    enter it. Costs one full copy of the weights per process for its duration."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.FSDP and accelerator.state.fsdp_plugin.fsdp_version == 2:
        from torch.distributed.fsdp import FSDPModule

        units = [m for m in model.modules() if isinstance(m, FSDPModule)]
        resharding = [m._get_fsdp_state()._fsdp_param_group for m in units]
        before = [bool(g and g._reshard_after_forward) for g in resharding]
        # FSDP2 records each forward to order its backward prefetches; forwards run here by one process alone would
        # make that process prefetch differently from the others in the next backward, and the collectives hang.
        order = units[0]._get_fsdp_state()._comm_ctx.post_forward_order
        recorded = len(order)
        for m in units:
            m.set_reshard_after_forward(False, recurse=False)
            m.unshard()
        try:
            yield
        finally:
            del order[recorded:]
            for m, keep in zip(units, before):
                m.reshard()
                m.set_reshard_after_forward(keep, recurse=False)
    elif _zero3(accelerator):
        with _gathered(accelerator, list(model.parameters())):
            yield
    else:
        yield
