"""The training loop: plain Accelerate, read top to bottom. Setup lives in ``setup``; the loop in ``train``."""

from __future__ import annotations

import contextlib
import math
import os
import platform
import shutil
import sys
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from analysis.schema import flatten, read_jsonl, start_seconds

from . import checkpoint as ckpt
from . import engine, family
from .chat import SpecialIds
from .codes import PreparedData, prepare_data
from .config import (
    TINY_PRESETS,
    ConfigError,
    RunConfig,
    check_codec_codebooks,
    check_model_parts,
    validate_for_model,
)
from .data import EpochSampler, HiggsDataset, LengthGroupedBatches, collate
from .encoding import across_processes
from .events import EventLog, capture_library_logs
from .loading import ModelStack, load_stack, model_family
from .lock import RunLock, acquire_for_run
from .losses import LossWeights, n_stats, summarize
from .memory import plan as plan_memory
from .model import DualLossModel, add_lora, count_parameters
from .quality import QualityScorer, emit_round, score_round, training_reference
from .run_dir import EVENTS_DIR, EVENTS_FILE, RUN_OUTPUTS, TINY_DIR, write_run_config
from .samples import generation_options, samples_dir, write_eval_audio, write_generated
from .sinks import ConsoleSink, ParquetSink, TrackerSink
from .slices import build_slices
from .stopping import NonFiniteGuard, RunEnded, StopSignals, stopped_line
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
    scorer: QualityScorer | None  # eval.asr_model / eval.speaker_model on the main process, when generating
    reference: tuple | None  # (voice the generations should speak in, its rate), for speaker similarity
    lock: RunLock | None  # held by the main process until the run ends
    earlier_s: list[float]  # the wall time of each earlier start of this run (``start_seconds``), for run_end
    last_batch: dict | None = None  # the last batch trained on: redone at weight 0 when a step's batches vanish


def train(cfg: RunConfig, changed: dict | None = None) -> RunEnded:
    """Run (or resume) one fine-tuning run; return its run dir and how it ended. Every event goes through
    ``state.log.emit``. ``changed``: the keys a resume changed from the run's saved config (``{key: [old, new]}``,
    recorded in ``run_resume``)."""
    started = time.time()
    state = setup(cfg, changed or {}, started)
    accelerator, log, t = state.accelerator, state.log, cfg.train
    step = saved_at = state.start["step"]
    params = [p for p in state.model.parameters() if p.requires_grad]
    stats = torch.zeros(n_stats(state.ids.num_codebooks), device=accelerator.device)
    signals, guard = StopSignals(t.stop_signals), NonFiniteGuard(t.on_nonfinite, t.max_nonfinite_steps)
    steps = step_batches(state, state.start["epoch"], state.start["batches_in_epoch"])
    tick, ended, message = time.perf_counter(), None, None
    status, error, totals = "crashed", None, Counter(dict.fromkeys(TOTALS, 0))
    try:
        score_baseline(state)
        state.model.train()
        while step < state.total_steps and ended is None:
            epoch, consumed, batches, data_wait = next(steps)
            for skip in (s for b in batches for s in b["skipped"]):
                emit_skip(log, "train", skip)
            done = train_step(state, batches, stats, params, t.max_grad_norm, guard, lambda: signals.requested)
            if done is None:  # every sample of the step vanished from the cache mid-run (one process): no step
                continue
            out, batch, values, skipped, lr = done
            step += 1
            log.bind(step=step, epoch=epoch, phase="train")
            now = time.perf_counter()
            counts, stop = log_train_step(state, values, skipped, guard, now - tick, data_wait, out, batch, lr, step)
            totals.update(counts)
            stats.zero_()
            if guard.diverged:  # no eval, no save: the last checkpoint holds the last good weights
                ended, message = "diverged", guard.diverged_line(step, ckpt.newest_complete(state.run_dir))
                break
            if t.eval_every and step % t.eval_every == 0 and step < state.total_steps:
                evaluate(state, step)
            if (t.save_every and step % t.save_every == 0) or (stop and saved_at != step):
                save(state, step, epoch, consumed)
                saved_at = step
            # Every process got the same answer from the step's reduce: all stop at this step. A stop in the last
            # step stops nothing: the run finishes (final eval and adapter) as it would have.
            if stop and step < state.total_steps:
                ended, message = signals.status, stopped_line(signals, step, ckpt.checkpoint_dir(state.run_dir, step),
                                                              state.run_dir)
            tick = time.perf_counter()
        if ended is None:
            evaluate(state, step)
            adapter = ckpt.save_adapter(accelerator, state.model, state.run_dir)
            log.emit("adapter_saved", path=str(adapter))
        status = ended or "finished"
    except KeyboardInterrupt:  # Ctrl-C when SIGINT is not one of train.stop_signals
        status, error = "interrupted", "KeyboardInterrupt"
        raise
    except Exception as e:
        error = f"{type(e).__name__}: {e}"
        raise
    finally:
        signals.restore()
        end_run(log, state.lock, status, error, time.time() - started, state.earlier_s, state.total_steps, step,
                message=message, nonfinite_steps=guard.total, **totals)
    # A run that ended (finished or stopped) leaves the process group cleanly: left to interpreter exit, gloo's
    # threads can die joinable and abort the process (SIGABRT, exit -6) after a finished run.
    accelerator.state.destroy_process_group()
    return RunEnded(state.run_dir, status)


def end_run(log: EventLog, lock: RunLock | None, status: str, error: str | None, elapsed_s: float,
            earlier_s: list[float], total_steps: int, completed_steps: int, **trained) -> None:
    """The one ``run_end`` of a start, then the log closes and the run-dir lock is released. ``elapsed_s``: this
    start's wall time; ``earlier_s``: each earlier start's, so the run's whole time is there too. A start that ends
    with an ``error`` raises it afterwards: the console leaves it to the command to print. ``trained``
    (message, nonfinite_steps and the ``TOTALS``) only from a start that reached training: a ``failed`` one has
    none (docs/events.md)."""
    if error is not None:
        # The exception goes on to the command, which says it once (one line, or its traceback): not the console too.
        for sink in [s for s in log.sinks if isinstance(s, ConsoleSink)]:
            log.sinks.remove(sink)
            sink.close()
    starts = [*earlier_s, elapsed_s]
    log.emit("run_end", level="info" if status == "finished" else "error", status=status, error=error,
             elapsed_s=elapsed_s, start_elapsed_s=starts, total_elapsed_s=sum(starts), total_steps=total_steps,
             completed_steps=completed_steps, **trained)
    log.close()
    if lock:
        lock.release()


def step_batches(state: TrainState, epoch: int, consumed: int):
    """Yield (epoch, batches consumed in it, the step's micro-batches, seconds waited for them) per optimizer step,
    forever: ``grad_accum`` micro-batches, fewer at the end of an epoch. A step's batches are read before its
    first backward, so its targets can be counted first (``backward``)."""
    accelerator, size = state.accelerator, state.cfg.train.grad_accum
    while True:
        # Set on the prepared loader: with 2+ processes the set_epoch of accelerate's skip loader (used on resume)
        # does not reach our sampler, and the skip loader takes its epoch from this one.
        state.train_loader.set_epoch(epoch)
        loader = accelerator.skip_first_batches(state.train_loader, consumed) if consumed else state.train_loader
        group, waited = [], 0.0
        for batch, wait in timed(loader):
            group.append(batch)
            waited, consumed = waited + wait, consumed + 1
            if len(group) == size:
                yield epoch, consumed, group, waited
                group, waited = [], 0.0
        if group:
            yield epoch, consumed, group, waited
        epoch, consumed = epoch + 1, 0


def train_step(state: TrainState, batches: list[dict], stats: torch.Tensor, params: list, max_grad_norm: float,
               guard: NonFiniteGuard, stop_requested=None):
    """One optimizer step: forward and backward of its micro-batches (``backward``), clipping, the step's one
    all-reduce and device-to-host read (``reduce_step``, carrying ``stop_requested()``: asked after the backward, so
    a stop signal that arrives during the step stops at this step), the update unless ``guard`` skips it, and the
    schedule. Returns (the last output, its batch, the reduced values, whether the update was skipped, the lr of the
    step's update, read before the schedule moves on), or None when the step had nothing to train on. ``state``
    needs only ``accelerator``, ``model``, ``optimizer``, ``scheduler`` and ``last_batch``: bench/throughput.py
    times this very function."""
    accelerator = state.accelerator
    out, batch = backward(state, batches, stats)
    if out is None:
        return None
    grad_norm = engine.grad_norm_tensor(accelerator.clip_grad_norm_(params, max_grad_norm or math.inf),
                                        accelerator.device)
    values = reduce_step(state, stats, grad_norm, bool(stop_requested and stop_requested()))
    # A non-finite loss makes the norm non-finite; after the gradient all-reduce every process has the same norm, so
    # all skip (or stop) the same step. A skipped step still advances the schedule and the data.
    skipped = guard.bad(values[-2])
    lr = state.optimizer.param_groups[0]["lr"]
    if not skipped:
        state.optimizer.step()
    state.optimizer.zero_grad(set_to_none=True)
    state.scheduler.step()
    return out, batch, values, skipped, lr


def backward(state: TrainState, batches: list[dict], stats: torch.Tensor):
    """Forward and backward of one optimizer step's micro-batches; returns the last (output, batch), or (None,
    None) when there is nothing to train on.

    The step's loss is that of one big batch: each micro-batch's summed losses are divided by the target counts of
    the whole step (all its micro-batches on all processes, one all-reduce), so splitting a batch by accumulation
    or processes changes neither the gradient nor the logged loss. Accumulation is ours, not accelerate's
    ``accumulate`` (the Accelerator has gradient_accumulation_steps=1, so ``backward`` does not divide): only the
    last backward syncs, the others run under ``no_sync``. DDP averages the processes' gradients, where the step
    needs their sum: hence the loss times the number of processes."""
    accelerator, model = state.accelerator, state.model
    unwrapped = accelerator.unwrap_model(model)
    todo = [(b, 1.0) for b in batches if "input_ids" in b]
    if not todo:
        # Every sample of the step vanished from the cache. With 2+ processes, redo the last batch at weight 0:
        # every process must run the synced backward, or DDP's gradient all-reduce waits forever for this one.
        if accelerator.num_processes == 1 or state.last_batch is None:
            return None, None
        todo = [(state.last_batch, 0.0)]
    state.last_batch = todo[-1][0]
    counts = sum(unwrapped.count_targets(b) * w for b, w in todo)
    counts = accelerator.reduce(counts, "sum").tolist()
    scale = accelerator.num_processes
    for i, (batch, weight) in enumerate(todo):
        with accelerator.no_sync(model) if i < len(todo) - 1 else contextlib.nullcontext():
            out = model(batch, counts)
            accelerator.backward(out.loss * (weight * scale))
        stats += out.stats * weight
    return out, batch


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


def reduce_step(state: TrainState, stats, grad_norm, stop: bool) -> list[float]:
    """The step's summed statistics, then its gradient norm, then whether any process was asked to stop, summed
    over the processes in one all-reduce and read to the host once (the stop flag rides along, so every process
    stops at the same step)."""
    accelerator = state.accelerator
    grad_share = grad_norm.detach().float().reshape(1) / accelerator.num_processes
    flag = grad_share.new_tensor([float(stop)])
    return accelerator.reduce(torch.cat([stats, grad_share, flag]), "sum").tolist()


def log_train_step(state: TrainState, values: list[float], skipped: bool, guard: NonFiniteGuard, step_time: float,
                   data_wait: float, out, batch, lr: float, step: int) -> tuple[dict, bool]:
    """The step's event from ``reduce_step``'s values and the ``lr`` its update used (plus slices on log steps);
    returns the step's counts for the run's totals, and whether any process was asked to stop."""
    cfg, accelerator = state.cfg, state.accelerator
    metrics = summarize(values[:-2], state.weights)
    level = "warning" if skipped or guard.stalled else "info"
    state.log.emit("train_step", level=level, **metrics, lr=lr, grad_norm=values[-2],
                   step_skipped=skipped, nonfinite_steps=guard.total, step_time_s=step_time, data_wait_s=data_wait,
                   samples_per_s=metrics["samples"] / max(step_time, 1e-9),
                   tokens_per_s=metrics["tokens"] / max(step_time, 1e-9), peak_mem_mb=peak_memory_mb())
    if step % cfg.log.log_steps == 0 and accelerator.is_main_process:
        emit_slices(state, out, batch)
    return {k: metrics[k] for k in TOTALS}, values[-1] > 0


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
    # Full parameters on every process (a no-op but under sharded engines): the processes may hold different
    # numbers of val batches, and generation runs on the main process alone.
    with engine.full_parameters(accelerator, state.model):
        state.model.eval()
        # Unwrapped: eval has no gradients to sync.
        model = accelerator.unwrap_model(state.model)
        stats = torch.zeros(n_stats(state.ids.num_codebooks), device=accelerator.device)
        first = None
        for batch in state.val_loader:
            if "input_ids" not in batch:
                continue
            out = model(batch)
            stats += out.stats
            first = first or (out, batch)
        values = accelerator.reduce(stats, "sum").tolist()
        state.log.emit("eval", **summarize(values, state.weights))
        if first and accelerator.is_main_process:
            emit_slices(state, *first)
            emit_audio(state, first, step)  # in eval mode too: generation sees no LoRA dropout
        state.model.train()
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
            generate_round(state, model, out_dir)
    except Exception as e:  # noqa: BLE001 - listening material never stops training
        state.log.report_error("eval_audio", e)


def generate_round(state: TrainState, model, out_dir: Path, baseline: bool = False) -> None:
    """Speak the fixed prompts into ``out_dir`` (``generate_audio`` events), then score them when scorers are set
    (``quality`` events; their time is the summary's ``score_s``, apart from step time). ``baseline``: the base
    model's round at step 0, scored only."""
    lc = state.cfg.log
    rows = write_generated(model, state.tokenizer, state.codec, state.ids, lc.generate_prompts, out_dir,
                           state.cfg.data.system_prompt, lc.generate_max_new_tokens, **state.generation)
    if not baseline:
        for row in rows:
            state.log.emit("generate_audio", level="warning" if row["error"] else "info", **row)
    if state.scorer is not None:
        emit_round(state.log, *score_round(state.scorer, rows, *state.reference, baseline=baseline))


def score_baseline(state: TrainState) -> None:
    """What the fine-tune must beat: the base model (adapter off) speaks and is scored once, at step 0 of a new
    run, when scorers are set and ``eval.baseline`` is on. Every process calls it (sharded engines gather the full
    parameters); the main process generates. Failures are reported, never raised."""
    if not (state.cfg.log.generate_every and state.cfg.eval.baseline and state.start["step"] == 0):
        return
    if not (state.cfg.eval.asr_model or state.cfg.eval.speaker_model):
        return
    accelerator = state.accelerator
    model = accelerator.unwrap_model(state.model)
    with engine.full_parameters(accelerator, state.model):
        if accelerator.is_main_process:
            model.eval()
            try:
                with torch.no_grad(), model.peft.disable_adapter():
                    generate_round(state, model, samples_dir(state.run_dir, 0) / "base", baseline=True)
            except Exception as e:  # noqa: BLE001 - scoring never stops training
                state.log.report_error("quality", e)
            model.train()


def save(state: TrainState, step: int, epoch: int, consumed: int) -> Path:
    progress = {"step": step, "epoch": epoch, "batches_in_epoch": consumed, "run_id": state.start["run_id"]}
    path = ckpt.save_checkpoint(state.accelerator, state.model, state.scheduler, state.run_dir, progress)
    state.log.emit("checkpoint", path=str(path), adapter=str(path / ckpt.ADAPTER))
    state.log.flush()
    return path


def peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


# ---------------------------------------------------------------- setup


def setup(cfg: RunConfig, changed: dict | None = None, started: float | None = None) -> TrainState:
    """The accelerator, the run-dir lock, the run dir and the event log first, so that whatever fails after them is
    an event; then model, data and optimizer (torchtune's ``setup`` -> ``_setup_*``), and the run_start event.
    ``changed``: what a resume changed in the run's config (``run_resume``); ``started``: the start's time.time(),
    from which a failed start's run_end counts its time."""
    started = time.time() if started is None else started
    from accelerate.utils import broadcast_object_list

    accelerator = _setup_accelerator(cfg)
    run_dir = Path(cfg.train.output_dir)
    existing = ckpt.run_id_of(run_dir)
    run_id = existing if cfg.resume and existing else uuid.uuid4().hex[:12]
    # Before anything in the dir is read for resuming, deleted or written: a second run stops here.
    lock = acquire_for_run(accelerator, run_dir, run_id, cfg.train.lock_stale_s)
    try:
        found = prepare_run_dir(cfg, run_dir, accelerator, existing)
        start = found.state if found else {"step": 0, "epoch": 0, "batches_in_epoch": 0, "run_id": run_id}
        start["run_id"] = broadcast_object_list([start["run_id"]])[0]
        # Read before this start logs anything: empty for a new run (prepare_run_dir cleared the dir).
        earlier = start_seconds(read_jsonl(run_dir / EVENTS_FILE)) if found else []
        log = _setup_log(cfg, accelerator, run_dir, start)
    except BaseException:
        if lock:
            lock.release()
        raise
    try:
        if lock and lock.taken_over:
            log.emit("run_lock_taken_over", level="warning", **lock.taken_over.as_event())
        for path, reason in found.skipped if found else ():
            log.emit("checkpoint_skipped", level="warning", path=str(path), reason=reason)
        return _setup_training(cfg, accelerator, run_dir, log, start, found.path if found else None, lock,
                               changed or {}, earlier)
    except BaseException as e:
        end_run(log, lock, "failed", f"{type(e).__name__}: {e}", time.time() - started, earlier, 0, start["step"])
        raise


def _setup_accelerator(cfg: RunConfig) -> Accelerator:
    t = cfg.train
    # gradient_accumulation_steps=1: the loop accumulates itself (``backward``), with the step's own loss scale.
    # The engine is the one the launcher asked for (DDP, FSDP2, DeepSpeed), or one line and exit 2 (engine.py).
    accelerator = engine.build_accelerator(t.allow_engine_fallback, gradient_accumulation_steps=1,
                                           mixed_precision=t.mixed_precision or None,
                                           log_with=cfg.log.log_with or None, project_dir=str(Path(t.output_dir)))
    engine.check_accumulation(accelerator, t.grad_accum)
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
            # wandb's local run folder goes into the run dir (unless WANDB_DIR says otherwise), not the cwd.
            wandb = {"dir": os.environ.get("WANDB_DIR") or str(run_dir)}
            accelerator.init_trackers(run_dir.name, config=config, init_kwargs={"wandb": wandb})
            sinks.append(TrackerSink(accelerator))
    log = EventLog(run_dir, start["run_id"], rank=accelerator.process_index, is_main=accelerator.is_main_process,
                   sinks=sinks)
    capture_library_logs(log, accelerator.is_main_process)
    log.bind(step=start["step"], epoch=start["epoch"], phase="train")
    return log


def _setup_training(cfg: RunConfig, accelerator: Accelerator, run_dir: Path, log: EventLog, start: dict,
                    resume_from: Path | None, lock: RunLock | None, changed: dict, earlier: list[float]
                    ) -> TrainState:
    """Model, data, optimizer and schedule, prepared by accelerate; then the run_start event."""
    from accelerate.utils import set_seed

    t = cfg.train
    if cfg.preset in TINY_PRESETS:
        with accelerator.main_process_first():
            apply_tiny_preset(cfg, run_dir / TINY_DIR)
    set_seed(t.seed)
    stack = _setup_model(cfg, accelerator)
    tokenizer, codec, base, ids = stack.tokenizer, stack.codec, stack.model, stack.ids
    generation = generation_options(cfg.log, codec) if accelerator.is_main_process else {}
    data = _setup_data(cfg, accelerator, log, codec, tokenizer, ids, stack.config.max_position_embeddings)
    weights = LossWeights.of(t)
    # Recompute activations only when the step is predicted not to fit (model.gradient_checkpointing: auto).
    memory_plan = plan_memory(cfg, stack.config, accelerator.device, longest=data.longest_tokens["train"] or None,
                              codec=codec)
    # Seeded again: the new LoRA weights must not depend on how much randomness loading and the encode step drew
    # (a cold codes cache draws more than a warm one, each process its own share).
    set_seed(t.seed)
    model = DualLossModel(add_lora(base, cfg.lora, memory_plan["gradient_checkpointing"]), ids, weights)
    trainable, total = count_parameters(model)
    if cfg.model.compile:
        family.backbone(model.lm).compile(dynamic=True)  # the backbone only: the heads run on data-dependent positions
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
             val_samples=len(data.val), resumed=bool(resume_from), checkpoints=stack.checkpoints,
             memory=memory_plan, engine=engine.describe(accelerator), eval_note=eval_note(cfg, data))
    if resume_from:
        ckpt.load_checkpoint(accelerator, resume_from, scheduler)
        log.emit("run_resume", checkpoint=str(resume_from), from_step=start["step"],
                 checkpoint_seq=ckpt.checkpoint_seq(run_dir, start["step"]), start_seq=log.first_seq,
                 changed=changed)
    scorer = reference = None
    if accelerator.is_main_process and cfg.log.generate_every:
        scorer = QualityScorer.from_config(cfg.eval, accelerator.device)
        reference = training_reference(cfg, data.val, codec.config.sample_rate) if scorer else None
    return TrainState(cfg, run_dir, accelerator, log, model, tokenizer, optimizer, scheduler, train_loader,
                      val_loader, total_steps, start, codec, ids, weights, generation, scorer, reference, lock, earlier)


def eval_note(cfg: RunConfig, data: PreparedData) -> str | None:
    """Why no eval will ever run, when the config asked for no validation data at all (a manifest of one's own
    with neither data.val_manifest nor data.val_fraction); None otherwise (a val split that screening emptied is
    data_summary's to say)."""
    if data.val or cfg.data.val_manifest or cfg.data.val_fraction > 0:
        return None
    return ("no validation data (data.val_manifest is empty and data.val_fraction is 0): no eval loss, eval audio "
            "or generations; hold some out with data.val_fraction=0.05 or pass data.val_manifest")


def _setup_model(cfg: RunConfig, accelerator: Accelerator) -> ModelStack:
    """Text tokenizer, codec, base model and the special ids, from the checkpoints the config names (converted
    first if in the authors' original layout); the config's codebook-dependent settings are checked against the
    model's own codebook count."""
    fam = model_family(cfg.model.base)
    family.check_settings(cfg.data, fam)
    return load_stack(cfg.model, pad_required=True, state=accelerator, check=partial(_check_model, cfg, fam))


def _check_model(cfg: RunConfig, fam: str, sources, config, tokenizer, codec) -> None:
    """Before the weights load: the parts fit together (the family's checks) and the config's codebook-dependent
    settings fit the model's codebook count."""
    if fam == family.V3:
        check_codec_codebooks(sources, config.num_codebooks, codec.config)
    else:
        check_model_parts(sources, config, tokenizer, codec.config)
    validate_for_model(cfg, config.num_codebooks)


def _setup_data(cfg: RunConfig, accelerator: Accelerator, log: EventLog, codec, tokenizer, ids: SpecialIds,
                max_positions: int) -> PreparedData:
    """Both splits against a complete codes cache (``prepare_data``, as ``higgs-accel prepare`` does), reported as
    events; strict data checks and an empty training set stop here."""
    data = prepare_data(cfg, accelerator, codec, tokenizer, ids, max_positions)
    data.check_strict(cfg.data.strict)  # before the skips are reported: the error lists them, once
    # Summed over the processes: each encoded its share.
    encodes = int(accelerator.reduce(torch.tensor(data.cache.encode_calls, device=accelerator.device), "sum"))
    rows = accelerator.gather(torch.tensor([data.encoding.row()], dtype=torch.float64, device=accelerator.device))
    encoding = across_processes(rows.cpu())
    report_data(log, "train", data.train, data.train_skips, encodes, data, encoding)
    report_data(log, "val", data.val, data.val_skips, encodes, data, encoding)
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
    t = cfg.train
    factor = partial(lr_factor, kind=t.scheduler, warmup=t.warmup_steps, total=total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    ckpt.keep_trainable_only(accelerator)
    return scheduler


def lr_factor(done: int, kind: str, warmup: int, total: int) -> float:
    """The multiplier of train.lr for the update of step ``done + 1`` (``done``: steps already taken). Warmup step k
    (from 1) uses k / warmup, so the first update is never at lr 0 and the last warmup step reaches the peak; after
    it, transformers' cosine / linear decay (or constant) over the remaining steps, from the peak at step
    warmup + 1."""
    if done < warmup:
        return (done + 1) / warmup
    progress = (done - warmup) / max(1, total - warmup)
    if kind == "cosine":
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
    if kind == "linear":
        return max(0.0, 1.0 - progress)
    return 1.0


def prepare_run_dir(cfg: RunConfig, run_dir: Path, accelerator, run_id: str | None) -> ckpt.Found | None:
    """Refuse to mix two runs in one dir; return the checkpoint to resume from, if any (``run_id``: that of the run
    already in the dir, whose checkpoints alone are resumed unless train.resume_any_run)."""
    found = None
    if cfg.resume:
        found = ckpt.find_checkpoint(run_dir, cfg.resume, run_id=run_id, any_run=cfg.train.resume_any_run)
        if (line := found.skip_line()) and accelerator.is_main_process:
            print(line, file=sys.stderr)
    if accelerator.is_main_process:
        if not found and (run_dir / EVENTS_FILE).exists():
            if not cfg.train.overwrite and ckpt.has_saved_work(run_dir):
                how = ("pass --resume latest to continue it, " if ckpt.newest_complete(run_dir)
                       else "it saved its final adapter and no checkpoint; ")
                raise ConfigError(f"'train.output_dir': {run_dir} already holds a run; {how}train.overwrite=true to "
                                  "replace it, or another --output-dir")
            for name in RUN_OUTPUTS:
                path = run_dir / name
                shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
        run_dir.mkdir(parents=True, exist_ok=True)
        write_run_config(run_dir, cfg)
    accelerator.wait_for_everyone()
    return found


def report_data(log: EventLog, split: str, kept: list, skips: list, codec_encodes: int, data: PreparedData,
                encoding: dict) -> None:
    """One ``data_skip`` per skip and the split's ``data_summary``; ``encoding``: the encode step's
    ``encode_speed`` and ``encode_batch_exact``, over all processes."""
    for s in skips:
        emit_skip(log, split, s)
    log.emit("data_summary", level="warning" if data.duplicates[split] else "info", split=split, kept=len(kept),
             skipped=len(skips), skipped_by_reason=dict(Counter(s.reason for s in skips)), codec_encodes=codec_encodes,
             longest_tokens=data.longest_tokens[split], duplicates=data.duplicates[split], **encoding)


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

