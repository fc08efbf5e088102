"""The training loop: plain Accelerate, read top to bottom. Setup lives in ``setup``; the loop in ``train``."""

from __future__ import annotations

import math
import os
import platform
import shutil
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import yaml

from analysis.schema import EVENTS_DIR, EVENTS_FILE, SAMPLES_DIR, flatten

from . import checkpoint as ckpt
from .chat import SpecialIds
from .codes import PreparedData, prepare_data
from .config import ConfigError, RunConfig, validate_for_model
from .data import EpochSampler, HiggsDataset, LengthGroupedBatches, collate
from .events import EventLog, capture_library_logs
from .loading import load_base_model, load_codec, load_text_tokenizer, resolve_checkpoints
from .losses import LossWeights, n_stats, summarize
from .memory import plan as plan_memory
from .model import DualLossModel, add_lora, count_parameters
from .samples import generation_options, samples_dir, write_eval_audio, write_generated
from .sinks import ConsoleSink, ParquetSink, TrackerSink
from .slices import build_slices
from .tiny import apply_tiny_preset

if TYPE_CHECKING:
    from accelerate import Accelerator
    from torch.utils.data import DataLoader
    from transformers import HiggsAudioV2TokenizerModel, PreTrainedTokenizerBase

# Counts of each train_step summed into run_end: what this process session trained on (since its start or resume).
TOTALS = ("samples", "tokens", "audio_frames", "text_targets", "audio_targets")


@dataclass
class TrainState:
    """What the loop works with, built by ``setup``."""

    cfg: RunConfig
    run_dir: Path
    accelerator: Accelerator
    log: EventLog
    model: torch.nn.Module  # the DualLossModel, wrapped by accelerate (DDP) with 2+ processes
    tokenizer: PreTrainedTokenizerBase
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    train_loader: DataLoader
    val_loader: DataLoader | None
    total_steps: int
    start: dict  # step, epoch, batches_in_epoch and run_id to start from (a checkpoint's, or zeros)
    codec: HiggsAudioV2TokenizerModel
    ids: SpecialIds
    weights: LossWeights
    generation: dict  # keyword arguments of samples.write_generated


def train(cfg: RunConfig) -> Path:
    """Run (or resume) one fine-tuning run; return its run dir. Every event goes through ``state.log.emit``."""
    state = setup(cfg)
    accelerator, log, t = state.accelerator, state.log, cfg.train
    step, epoch, consumed = state.start["step"], state.start["epoch"], state.start["batches_in_epoch"]
    params = [p for p in state.model.parameters() if p.requires_grad]
    stats = torch.zeros(n_stats(state.ids.num_codebooks), device=accelerator.device)
    started, tick, data_wait = time.time(), time.perf_counter(), 0.0
    status, error, totals, last = "crashed", None, Counter(dict.fromkeys(TOTALS, 0)), None
    try:
        state.model.train()
        while step < state.total_steps:
            # Set on the prepared loader: with 2+ processes the set_epoch of accelerate's skip loader (used on
            # resume) does not reach our sampler, and the skip loader takes its epoch from this one.
            state.train_loader.set_epoch(epoch)
            batches = state.train_loader
            if consumed:
                batches = accelerator.skip_first_batches(batches, consumed)
            for batch, waited in timed(batches):
                consumed += 1
                data_wait += waited
                for skip in batch["skipped"]:
                    emit_skip(log, "train", skip)
                weight = 1.0
                if "input_ids" not in batch:  # every sample of this batch vanished from the cache mid-run
                    if accelerator.num_processes == 1 or last is None:
                        continue
                    # Redo the last batch at weight 0: every process must run the same forwards and backwards,
                    # or DDP's gradient all-reduce waits forever for the one that skipped.
                    batch, weight = last, 0.0
                last = batch
                with accelerator.accumulate(state.model):
                    out = state.model(batch)
                    accelerator.backward(out.loss * weight)
                    stats += out.stats * weight
                    if accelerator.sync_gradients:
                        grad_norm = accelerator.clip_grad_norm_(params, t.max_grad_norm or math.inf)
                    state.optimizer.step()
                    state.optimizer.zero_grad(set_to_none=True)
                if not accelerator.sync_gradients:
                    continue
                state.scheduler.step()
                step += 1
                log.bind(step=step, epoch=epoch, phase="train")
                now = time.perf_counter()
                totals.update(log_train_step(state, stats, grad_norm, now - tick, data_wait, out, batch, step))
                stats.zero_()
                data_wait = 0.0
                if t.eval_every and step % t.eval_every == 0 and step < state.total_steps:
                    evaluate(state, step)
                if t.save_every and step % t.save_every == 0:
                    save(state, step, epoch, consumed)
                tick = time.perf_counter()
                if step >= state.total_steps:
                    break
            else:
                epoch, consumed = epoch + 1, 0
        evaluate(state, step)
        adapter = ckpt.save_adapter(accelerator, state.model, state.run_dir)
        log.emit("adapter_saved", path=str(adapter))
        status = "finished"
    except KeyboardInterrupt:
        status, error = "interrupted", "KeyboardInterrupt"
        raise
    except Exception as e:
        error = f"{type(e).__name__}: {e}"
        raise
    finally:
        log.emit("run_end", level="info" if status == "finished" else "error", status=status, error=error,
                 elapsed_s=time.time() - started, total_steps=state.total_steps, completed_steps=step, **totals)
        log.close()
    return state.run_dir


def timed(batches):
    """Yield (batch, seconds spent waiting for it)."""
    it = iter(batches)
    while True:
        start = time.perf_counter()
        try:
            batch = next(it)
        except StopIteration:
            return
        yield batch, time.perf_counter() - start


def log_train_step(state: TrainState, stats, grad_norm, step_time: float, data_wait: float, out, batch,
                   step: int) -> dict:
    """One device-to-host read for all metrics of the step, then one event (plus slices on log steps); returns the
    step's counts for the run's totals."""
    cfg, accelerator = state.cfg, state.accelerator
    grad_share = grad_norm.detach().float().reshape(1) / accelerator.num_processes
    values = accelerator.reduce(torch.cat([stats, grad_share]), "sum").tolist()
    metrics = summarize(values[:-1], state.weights)
    state.log.emit("train_step", **metrics, lr=state.scheduler.get_last_lr()[0], grad_norm=values[-1],
                   step_time_s=step_time, data_wait_s=data_wait,
                   samples_per_s=metrics["samples"] / max(step_time, 1e-9),
                   tokens_per_s=metrics["tokens"] / max(step_time, 1e-9), peak_mem_mb=peak_memory_mb())
    if step % cfg.log.log_steps == 0 and accelerator.is_main_process:
        emit_slices(state, out, batch)
    return {k: metrics[k] for k in TOTALS}


def emit_slices(state: TrainState, out, batch) -> None:
    lc = state.cfg.log
    try:
        rows = build_slices(out, batch, state.tokenizer, lc.slice_samples, lc.slice_k, lc.slice_codebooks)
    except Exception as e:  # noqa: BLE001 - a slice that cannot be built never stops training
        state.log.report_error("pred_slice", e)
        return
    for row in rows:
        state.log.emit("pred_slice", **row)


@torch.no_grad()
def evaluate(state: TrainState, step: int) -> None:
    if state.val_loader is None:
        return
    accelerator = state.accelerator
    state.log.bind(phase="eval")
    state.model.eval()
    # Unwrapped: eval has no gradients to sync, and the processes may hold different numbers of val batches.
    model = accelerator.unwrap_model(state.model)
    stats = torch.zeros(n_stats(state.ids.num_codebooks), device=accelerator.device)
    first = None
    for batch in state.val_loader:
        if "input_ids" not in batch:
            continue
        out = model(batch)
        stats += out.stats
        first = first or (out, batch)
    state.model.train()
    values = accelerator.reduce(stats, "sum").tolist()
    state.log.emit("eval", **summarize(values, state.weights))
    if first and accelerator.is_main_process:
        emit_slices(state, *first)
        emit_audio(state, first, step)
    state.log.flush()
    state.log.bind(phase="train")


def emit_audio(state: TrainState, first, step: int) -> None:
    """Eval audio to listen to: teacher-forced predictions next to labels, and every ``generate_every`` evals
    (and at the end) free-running speech for the fixed prompts. Failures are reported, never raised."""
    lc, out_dir, eval_every = state.cfg.log, samples_dir(state.run_dir, step), state.cfg.train.eval_every
    # Counted from the step, not from evals seen by this process, so a resumed run generates at the same steps.
    nth_eval = step // eval_every if eval_every else 1
    try:
        if lc.eval_audio_samples:
            for row in write_eval_audio(*first, state.codec, state.ids, out_dir, lc.eval_audio_samples):
                state.log.emit("eval_audio", level="warning" if row["reason"] else "info", **row)
        if lc.generate_every and (nth_eval % lc.generate_every == 0 or step >= state.total_steps):
            model = state.accelerator.unwrap_model(state.model)
            for row in write_generated(model, state.tokenizer, state.codec, state.ids, lc.generate_prompts, out_dir,
                                       state.cfg.data.system_prompt, lc.generate_max_new_tokens, **state.generation):
                state.log.emit("generate_audio", level="warning" if row["error"] else "info", **row)
    except Exception as e:  # noqa: BLE001 - listening material never stops training
        state.log.report_error("eval_audio", e)


def save(state: TrainState, step: int, epoch: int, consumed: int) -> None:
    progress = {"step": step, "epoch": epoch, "batches_in_epoch": consumed, "run_id": state.start["run_id"]}
    path = ckpt.save_checkpoint(state.accelerator, state.model, state.scheduler, state.run_dir, progress)
    state.log.emit("checkpoint", path=str(path), adapter=str(path / ckpt.ADAPTER))
    state.log.flush()


def peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


# ---------------------------------------------------------------- setup


def setup(cfg: RunConfig) -> TrainState:
    """The accelerator, the run dir and the event log first, so that whatever fails after them is an event; then
    model, data and optimizer (torchtune's ``setup`` -> ``_setup_*``), and the run_start event."""
    from accelerate.utils import broadcast_object_list

    accelerator = _setup_accelerator(cfg)
    run_dir = Path(cfg.train.output_dir)
    resume_from = prepare_run_dir(cfg, run_dir, accelerator)
    start = {"step": 0, "epoch": 0, "batches_in_epoch": 0, "run_id": uuid.uuid4().hex[:12]}
    if resume_from:
        start = ckpt.read_state(resume_from)
    start["run_id"] = broadcast_object_list([start["run_id"]])[0]
    log = _setup_log(cfg, accelerator, run_dir, start)
    try:
        return _setup_training(cfg, accelerator, run_dir, log, start, resume_from)
    except BaseException as e:
        log.emit("run_end", level="error", status="failed", error=f"{type(e).__name__}: {e}", elapsed_s=0.0,
                 total_steps=0, completed_steps=start["step"])
        log.close()
        raise


def _setup_accelerator(cfg: RunConfig) -> Accelerator:
    from accelerate import Accelerator

    t = cfg.train
    accelerator = Accelerator(gradient_accumulation_steps=t.grad_accum, mixed_precision=t.mixed_precision or None,
                              log_with=cfg.log.log_with or None, project_dir=str(Path(t.output_dir)))
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != accelerator.num_processes:
        raise ConfigError(f"launched as {launched} processes but accelerate sees {accelerator.num_processes}: each "
                          "would train alone and write the same run dir. Without GPUs use `ACCELERATE_USE_CPU=1 "
                          "accelerate launch --multi_gpu --num_processes N --num_machines 1 ...`")
    return accelerator


def _setup_log(cfg: RunConfig, accelerator: Accelerator, run_dir: Path, start: dict) -> EventLog:
    """The event log with its sinks on the main process; library logs routed into it until it closes."""
    sinks = []
    if accelerator.is_main_process:
        sinks = [ParquetSink(run_dir / EVENTS_DIR, cfg.log.parquet_flush_events, cfg.log.parquet_flush_seconds),
                 ConsoleSink(0, cfg.log.log_steps, cfg.log.level)]
        if cfg.log.log_with:
            config = {k: v if isinstance(v, (int, float, str, bool)) else str(v)
                      for k, v in flatten(cfg.to_dict()).items()}
            accelerator.init_trackers(run_dir.name, config=config)
            sinks.append(TrackerSink(accelerator))
    log = EventLog(run_dir, start["run_id"], rank=accelerator.process_index, is_main=accelerator.is_main_process,
                   sinks=sinks)
    capture_library_logs(log, accelerator.is_main_process)
    log.bind(step=start["step"], epoch=start["epoch"], phase="train")
    return log


def _setup_training(cfg: RunConfig, accelerator: Accelerator, run_dir: Path, log: EventLog, start: dict,
                    resume_from: Path | None) -> TrainState:
    """Model, data, optimizer and schedule, prepared by accelerate; then the run_start event."""
    from accelerate.utils import set_seed

    t = cfg.train
    if cfg.preset == "tiny":
        with accelerator.main_process_first():
            apply_tiny_preset(cfg, run_dir / "tiny")
    set_seed(t.seed)
    tokenizer, codec, base, ids, checkpoints = _setup_model(cfg, accelerator)
    generation = generation_options(cfg.log, codec) if accelerator.is_main_process else {}
    data = _setup_data(cfg, accelerator, log, codec, tokenizer, ids, base.config.max_position_embeddings)
    weights = LossWeights.of(t)
    # Recompute activations only when the step is predicted not to fit (model.gradient_checkpointing: auto).
    memory_plan = plan_memory(cfg, base.config, accelerator.device, longest=data.longest_tokens["train"] or None)
    model = DualLossModel(add_lora(base, cfg.lora, memory_plan["gradient_checkpointing"]), ids, weights)
    trainable, total = count_parameters(model)
    if cfg.model.compile:
        model.lm.model.compile(dynamic=True)  # the backbone only: the heads run on data-dependent positions
    train_loader, val_loader = _setup_loaders(cfg, data, tokenizer, ids)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=t.lr,
                                  weight_decay=t.weight_decay, fused=torch.cuda.is_available() or None)
    model, optimizer, train_loader, val_loader = _setup_distributed(accelerator, model, optimizer, train_loader,
                                                                    val_loader)
    steps_per_epoch = math.ceil(len(train_loader) / t.grad_accum)
    total_steps = t.max_steps or t.epochs * steps_per_epoch
    scheduler = _setup_scheduler(cfg, accelerator, optimizer, total_steps)
    for sink in log.sinks:
        if isinstance(sink, ConsoleSink):
            sink.total = total_steps

    log.emit("run_start", config=cfg.to_dict(), run_dir=str(run_dir), versions=versions(), git_commit=git_commit(),
             device=str(accelerator.device), hardware=hardware(), world_size=accelerator.num_processes,
             mixed_precision=accelerator.mixed_precision, trainable_params=trainable, total_params=total,
             total_steps=total_steps, steps_per_epoch=steps_per_epoch, train_samples=len(data.train),
             val_samples=len(data.val), resumed=bool(resume_from), checkpoints=checkpoints,
             memory=memory_plan)
    if resume_from:
        ckpt.load_checkpoint(accelerator, resume_from, scheduler)
        log.emit("run_resume", checkpoint=str(resume_from), from_step=start["step"])
    return TrainState(cfg, run_dir, accelerator, log, model, tokenizer, optimizer, scheduler, train_loader,
                      val_loader, total_steps, start, codec, ids, weights, generation)


def _setup_model(cfg: RunConfig, accelerator: Accelerator):
    """Text tokenizer, codec, base model and the special ids, from the checkpoints the config names (converted
    first if in the authors' original layout); the config's codebook-dependent settings are checked against the
    model's own codebook count. Also returns run_start's record of the checkpoints."""
    with accelerator.main_process_first():
        model_cfg, checkpoints = resolve_checkpoints(cfg.model)
    tokenizer, codec = load_text_tokenizer(model_cfg), load_codec(model_cfg)
    base = load_base_model(model_cfg)
    ids = SpecialIds.from_parts(tokenizer, base.config)
    validate_for_model(cfg, ids.num_codebooks)
    return tokenizer, codec, base, ids, checkpoints


def _setup_data(cfg: RunConfig, accelerator: Accelerator, log: EventLog, codec, tokenizer, ids: SpecialIds,
                max_positions: int) -> PreparedData:
    """Both splits against a complete codes cache (``prepare_data``, as ``higgs-accel prepare`` does), reported as
    events; strict data checks and an empty training set stop here."""
    data = prepare_data(cfg, accelerator, codec, tokenizer, ids.num_codebooks, max_positions)
    data.check_strict(cfg.data.strict)  # before the skips are reported: the error lists them, once
    # Summed over the processes: each encoded its share.
    encodes = int(accelerator.reduce(torch.tensor(data.cache.encode_calls, device=accelerator.device), "sum"))
    audio_s, wall_s = accelerator.gather(torch.tensor([[data.encoding.audio_seconds, data.encoding.wall_seconds]],
                                                      dtype=torch.float64, device=accelerator.device)).cpu().unbind(1)
    speed = float(audio_s.sum() / wall_s.max()) if audio_s.sum() > 0 else None  # the slowest process sets the pace
    report_data(log, "train", data.train, data.train_skips, encodes, data, speed)
    report_data(log, "val", data.val, data.val_skips, encodes, data, speed)
    if not data.train:
        raise ConfigError(f"'data.train_manifest': no usable sample in {cfg.data.train_manifest}")
    return data


def _setup_loaders(cfg: RunConfig, data: PreparedData, tokenizer, ids: SpecialIds):
    t = cfg.train
    # Loaders draw their worker seeds from their own generator, never from the global RNG: otherwise each new
    # iterator (an eval, a resumed epoch) would shift the dropout masks and break exact resume.
    loader = partial(torch.utils.data.DataLoader, num_workers=cfg.data.num_workers,
                     collate_fn=partial(collate, pad_id=ids.pad, stream_eos=ids.stream_eos),
                     generator=torch.Generator().manual_seed(t.seed), pin_memory=torch.cuda.is_available(),
                     persistent_workers=cfg.data.num_workers > 0)
    train_ds = HiggsDataset(data.train, data.cache, tokenizer, ids, cfg.data)
    order = EpochSampler(len(train_ds), t.seed)
    if cfg.data.group_by_length or cfg.data.max_tokens_per_batch:
        batches = LengthGroupedBatches(order, train_ds.lengths(), t.batch_size, cfg.data.max_tokens_per_batch)
        train_loader = loader(train_ds, batch_sampler=batches)
    else:
        train_loader = loader(train_ds, sampler=order, batch_size=t.batch_size)
    val_loader = None
    if data.val:
        val_loader = loader(HiggsDataset(data.val, data.cache, tokenizer, ids, cfg.data), batch_size=t.batch_size)
    return train_loader, val_loader


def _setup_distributed(accelerator: Accelerator, model, optimizer, train_loader, val_loader):
    from accelerate.data_loader import prepare_data_loader

    model, optimizer, train_loader = accelerator.prepare(model, optimizer, train_loader)
    if val_loader is not None:
        # Sharded without even_batches: padding the last round with repeats would count those samples twice.
        val_loader = prepare_data_loader(val_loader, accelerator.device, accelerator.num_processes,
                                         accelerator.process_index, put_on_device=True, even_batches=False)
    return model, optimizer, train_loader, val_loader


def _setup_scheduler(cfg: RunConfig, accelerator: Accelerator, optimizer, total_steps: int):
    from transformers import get_scheduler

    t = cfg.train
    name = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[t.scheduler]
    scheduler = get_scheduler(name, optimizer, num_warmup_steps=t.warmup_steps, num_training_steps=total_steps)
    ckpt.keep_trainable_only(accelerator)
    return scheduler


def prepare_run_dir(cfg: RunConfig, run_dir: Path, accelerator) -> Path | None:
    """Refuse to mix two runs in one dir; return the checkpoint to resume from, if any."""
    resume_from = ckpt.find_checkpoint(run_dir, cfg.resume).path if cfg.resume else None
    if accelerator.is_main_process:
        if not resume_from and (run_dir / EVENTS_FILE).exists():
            if not cfg.train.overwrite and got_to_training(run_dir):
                raise ConfigError(f"'train.output_dir': {run_dir} already holds a run; pass --resume latest to "
                                  f"continue it, train.overwrite=true to replace it, or another --output-dir")
            for name in (EVENTS_FILE, EVENTS_DIR, ckpt.CHECKPOINTS, ckpt.ADAPTER, "report", SAMPLES_DIR):
                path = run_dir / name
                shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    accelerator.wait_for_everyone()
    return resume_from


def got_to_training(run_dir: Path) -> bool:
    """Whether the run in ``run_dir`` reached an optimizer step. One that failed while starting (a bad model dir,
    strict data checks) did not, and is replaced without asking: there is nothing in it to lose."""
    if (run_dir / ckpt.CHECKPOINTS).is_dir() or (run_dir / ckpt.ADAPTER).is_dir():
        return True
    with open(run_dir / EVENTS_FILE, encoding="utf-8", errors="replace") as f:
        return any('"train_step"' in line for line in f)


def report_data(log: EventLog, split: str, kept: list, skips: list, codec_encodes: int, data: PreparedData,
                encode_speed: float | None) -> None:
    for s in skips:
        emit_skip(log, split, s)
    log.emit("data_summary", level="warning" if data.duplicates[split] else "info", split=split, kept=len(kept),
             skipped=len(skips), skipped_by_reason=dict(Counter(s.reason for s in skips)), codec_encodes=codec_encodes,
             longest_tokens=data.longest_tokens[split], duplicates=data.duplicates[split], encode_speed=encode_speed)


def emit_skip(log: EventLog, split: str, s) -> None:
    log.emit("data_skip", level="warning", split=split, source=s.source, line=s.line, reason=s.reason,
             detail=s.detail)


def versions() -> dict:
    import accelerate
    import peft
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "accelerate": accelerate.__version__, "peft": peft.__version__}


def hardware() -> dict:
    info = {"platform": platform.platform(), "cpu_count": os.cpu_count()}
    if torch.cuda.is_available():
        info.update(gpu=torch.cuda.get_device_name(0), gpu_count=torch.cuda.device_count())
    return info


def git_commit() -> str | None:
    import subprocess

    try:
        r = subprocess.run(["git", "rev-parse", "--verify", "-q", "HEAD"], capture_output=True, text=True, timeout=5,
                           cwd=Path(__file__).parent)
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout.strip() if r.returncode == 0 else None

