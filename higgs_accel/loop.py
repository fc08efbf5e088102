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

import torch
import yaml

from . import checkpoint as ckpt
from .chat import SpecialIds
from .codes import CodeCache, default_cache_dir, encode_missing, resolve
from .config import ConfigError, RunConfig
from .data import EpochSampler, HiggsDataset, LengthGroupedBatches, collate, load_splits
from .events import EVENTS_FILE, PARQUET_DIR, EventLog, capture_library_logs
from .losses import N_STATS, summarize
from .model import DualLossModel, add_lora, count_parameters, load_base_model, load_codec, load_text_tokenizer
from .samples import generation_options, samples_dir, write_eval_audio, write_generated
from .sinks import ConsoleSink, ParquetSink, TrackerSink
from .slices import build_slices
from .tiny import apply_tiny_preset

# Counts of each train_step summed into run_end: what this process session trained on (since its start or resume).
TOTALS = ("samples", "tokens", "audio_frames", "text_targets", "audio_targets")


@dataclass
class Run:
    cfg: RunConfig
    run_dir: Path
    accelerator: object
    log: EventLog
    model: torch.nn.Module
    tokenizer: object
    optimizer: torch.optim.Optimizer
    scheduler: object
    train_loader: object
    val_loader: object
    total_steps: int
    start: dict
    codec: object
    ids: SpecialIds
    generation: dict


def train(cfg: RunConfig) -> Path:
    """Run (or resume) one fine-tuning run; return its run dir. Every event goes through ``run.log.emit``."""
    run = setup(cfg)
    acc, log, t = run.accelerator, run.log, cfg.train
    step, epoch, consumed = run.start["step"], run.start["epoch"], run.start["batches_in_epoch"]
    params = [p for p in run.model.parameters() if p.requires_grad]
    stats = torch.zeros(N_STATS, device=acc.device)
    started, tick, data_wait = time.time(), time.perf_counter(), 0.0
    status, error, totals, last = "crashed", None, Counter(dict.fromkeys(TOTALS, 0)), None
    try:
        run.model.train()
        while step < run.total_steps:
            # Set on the prepared loader: with 2+ processes the set_epoch of accelerate's skip loader (used on
            # resume) does not reach our sampler, and the skip loader takes its epoch from this one.
            run.train_loader.set_epoch(epoch)
            batches = acc.skip_first_batches(run.train_loader, consumed) if consumed else run.train_loader
            for batch, waited in timed(batches):
                consumed += 1
                data_wait += waited
                for skip in batch["skipped"]:
                    emit_skip(log, "train", skip)
                weight = 1.0
                if "input_ids" not in batch:  # every sample of this batch vanished from the cache mid-run
                    if acc.num_processes == 1 or last is None:
                        continue
                    # Redo the last batch at weight 0: every process must run the same forwards and backwards,
                    # or DDP's gradient all-reduce waits forever for the one that skipped.
                    batch, weight = last, 0.0
                last = batch
                with acc.accumulate(run.model):
                    out = run.model(batch)
                    acc.backward(out.loss * weight)
                    stats += out.stats * weight
                    if acc.sync_gradients:
                        grad_norm = acc.clip_grad_norm_(params, t.max_grad_norm or math.inf)
                    run.optimizer.step()
                    run.optimizer.zero_grad(set_to_none=True)
                if not acc.sync_gradients:
                    continue
                run.scheduler.step()
                step += 1
                log.bind(step=step, epoch=epoch, phase="train")
                now = time.perf_counter()
                totals.update(log_train_step(run, stats, grad_norm, now - tick, data_wait, out, batch, step))
                stats.zero_()
                data_wait = 0.0
                if t.eval_every and step % t.eval_every == 0 and step < run.total_steps:
                    evaluate(run, step)
                if t.save_every and step % t.save_every == 0:
                    save(run, step, epoch, consumed)
                tick = time.perf_counter()
                if step >= run.total_steps:
                    break
            else:
                epoch, consumed = epoch + 1, 0
        evaluate(run, step)
        adapter = ckpt.save_adapter(acc, run.model, run.run_dir)
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
                 elapsed_s=time.time() - started, total_steps=run.total_steps, completed_steps=step, **totals)
        log.close()
    return run.run_dir


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


def log_train_step(run: Run, stats, grad_norm, step_time: float, data_wait: float, out, batch, step: int) -> dict:
    """One device-to-host read for all metrics of the step, then one event (plus slices on log steps); returns the
    step's counts for the run's totals."""
    cfg, acc = run.cfg, run.accelerator
    summed = acc.reduce(torch.cat([stats, grad_norm.detach().float().reshape(1) / acc.num_processes]), "sum")
    values = summed.tolist()
    metrics = summarize(values[:-1], cfg.train.text_weight, cfg.train.audio_weight, cfg.train.audio_reduction)
    run.log.emit("train_step", **metrics, lr=run.scheduler.get_last_lr()[0], grad_norm=values[-1],
                 step_time_s=step_time, data_wait_s=data_wait, samples_per_s=metrics["samples"] / max(step_time, 1e-9),
                 tokens_per_s=metrics["tokens"] / max(step_time, 1e-9), peak_mem_mb=peak_memory_mb())
    if step % cfg.log.log_steps == 0 and acc.is_main_process:
        emit_slices(run, out, batch)
    return {k: metrics[k] for k in TOTALS}


def emit_slices(run: Run, out, batch) -> None:
    lc = run.cfg.log
    try:
        rows = build_slices(out, batch, run.tokenizer, lc.slice_samples, lc.slice_k, lc.slice_codebooks)
    except Exception as e:  # noqa: BLE001 - a slice that cannot be built never stops training
        run.log.report_error("pred_slice", e)
        return
    for row in rows:
        run.log.emit("pred_slice", **row)


@torch.no_grad()
def evaluate(run: Run, step: int) -> None:
    if run.val_loader is None:
        return
    acc = run.accelerator
    run.log.bind(phase="eval")
    run.model.eval()
    # Unwrapped: eval has no gradients to sync, and the processes may hold different numbers of val batches.
    model = acc.unwrap_model(run.model)
    stats = torch.zeros(N_STATS, device=acc.device)
    first = None
    for batch in run.val_loader:
        if "input_ids" not in batch:
            continue
        out = model(batch)
        stats += out.stats
        first = first or (out, batch)
    run.model.train()
    values = acc.reduce(stats, "sum").tolist()
    t = run.cfg.train
    run.log.emit("eval", **summarize(values, t.text_weight, t.audio_weight, t.audio_reduction))
    if first and acc.is_main_process:
        emit_slices(run, *first)
        emit_audio(run, first, step)
    run.log.flush()
    run.log.bind(phase="train")


def emit_audio(run: Run, first, step: int) -> None:
    """Eval audio to listen to: teacher-forced predictions next to labels, and every ``generate_every`` evals
    (and at the end) free-running speech for the fixed prompts. Failures are reported, never raised."""
    lc, out_dir, eval_every = run.cfg.log, samples_dir(run.run_dir, step), run.cfg.train.eval_every
    # Counted from the step, not from evals seen by this process, so a resumed run generates at the same steps.
    nth_eval = step // eval_every if eval_every else 1
    try:
        if lc.eval_audio_samples:
            for row in write_eval_audio(*first, run.codec, run.ids, out_dir, lc.eval_audio_samples):
                run.log.emit("eval_audio", level="warning" if row["reason"] else "info", **row)
        if lc.generate_every and (nth_eval % lc.generate_every == 0 or step >= run.total_steps):
            model = run.accelerator.unwrap_model(run.model)
            for row in write_generated(model, run.tokenizer, run.codec, run.ids, lc.generate_prompts, out_dir,
                                       run.cfg.data.system_prompt, lc.generate_max_new_tokens, **run.generation):
                run.log.emit("generate_audio", level="warning" if row["error"] else "info", **row)
    except Exception as e:  # noqa: BLE001 - listening material never stops training
        run.log.report_error("eval_audio", e)


def save(run: Run, step: int, epoch: int, consumed: int) -> None:
    state = {"step": step, "epoch": epoch, "batches_in_epoch": consumed, "run_id": run.start["run_id"]}
    path = ckpt.save_checkpoint(run.accelerator, run.model, run.scheduler, run.run_dir, state)
    run.log.emit("checkpoint", path=str(path), adapter=str(path / ckpt.ADAPTER))
    run.log.flush()


def peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


# ---------------------------------------------------------------- setup


def setup(cfg: RunConfig) -> Run:
    """The accelerator, the run dir and the event log first, so that whatever fails after them is an event."""
    from accelerate import Accelerator
    from accelerate.utils import broadcast_object_list

    t = cfg.train
    run_dir = Path(t.output_dir)
    acc = Accelerator(gradient_accumulation_steps=t.grad_accum, mixed_precision=t.mixed_precision or None,
                      log_with=cfg.log.log_with or None, project_dir=str(run_dir))
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != acc.num_processes:
        raise ConfigError(f"launched as {launched} processes but accelerate sees {acc.num_processes}: each would "
                          "train alone and write the same run dir. Without GPUs use `ACCELERATE_USE_CPU=1 accelerate "
                          "launch --multi_gpu --num_processes N --num_machines 1 ...`")
    resume_from = prepare_run_dir(cfg, run_dir, acc)
    start = {"step": 0, "epoch": 0, "batches_in_epoch": 0, "run_id": uuid.uuid4().hex[:12]}
    if resume_from:
        start = ckpt.read_state(resume_from)
    start["run_id"] = broadcast_object_list([start["run_id"]])[0]

    sinks = []
    if acc.is_main_process:
        sinks = [ParquetSink(run_dir / PARQUET_DIR, cfg.log.parquet_flush_events, cfg.log.parquet_flush_seconds),
                 ConsoleSink(0, cfg.log.log_steps, cfg.log.level)]
        if cfg.log.log_with:
            acc.init_trackers(run_dir.name, config=_flat(cfg.to_dict()))
            sinks.append(TrackerSink(acc))
    log = EventLog(run_dir, start["run_id"], rank=acc.process_index, is_main=acc.is_main_process, sinks=sinks)
    capture_library_logs(log, acc.is_main_process)
    log.bind(step=start["step"], epoch=start["epoch"], phase="train")
    try:
        return build(cfg, acc, run_dir, log, start, resume_from)
    except BaseException as e:
        log.emit("run_end", level="error", status="failed", error=f"{type(e).__name__}: {e}", elapsed_s=0.0,
                 total_steps=0, completed_steps=start["step"])
        log.close()
        raise


def build(cfg: RunConfig, acc, run_dir: Path, log: EventLog, start: dict, resume_from: Path | None) -> Run:
    """Model, data, optimizer and schedule, prepared by accelerate; then the run_start event."""
    from accelerate.data_loader import prepare_data_loader
    from accelerate.utils import set_seed
    from transformers import get_scheduler

    t = cfg.train
    if cfg.preset == "tiny":
        with acc.main_process_first():
            apply_tiny_preset(cfg, run_dir / "tiny")
    set_seed(t.seed)
    tokenizer, codec = load_text_tokenizer(cfg.model), load_codec(cfg.model)
    generation = generation_options(cfg.log, codec) if acc.is_main_process else {}
    base = load_base_model(cfg.model)
    ids = SpecialIds.from_parts(tokenizer, base.config)
    cache = CodeCache(cfg.data.codes_cache or default_cache_dir(), codec.to(acc.device))
    train_samples, val_samples, train_parse_skips, val_parse_skips = load_splits(cfg.data, t.seed)
    # Each process encodes its share of what the cache lacks; then all read the same complete cache.
    encode_missing((train_samples + val_samples)[acc.process_index::acc.num_processes], cache,
                   progress=acc.is_main_process)
    acc.wait_for_everyone()
    train_samples, train_skips = resolve(train_samples, cache, cfg.data.min_seconds, cfg.data.max_seconds)
    val_samples, val_skips = resolve(val_samples, cache, cfg.data.min_seconds, cfg.data.max_seconds)
    encodes = int(acc.reduce(torch.tensor(cache.encode_calls, device=acc.device), "sum"))
    train_skips, val_skips = train_parse_skips + train_skips, val_parse_skips + val_skips
    report_data(log, "train", train_samples, train_skips, encodes)
    report_data(log, "val", val_samples, val_skips, encodes)
    problems = train_skips + val_skips
    if cfg.data.strict and problems:
        raise ConfigError(f"'data.strict': {len(problems)} bad sample(s):\n" + "\n".join(f"  {p}" for p in problems))
    if not train_samples:
        raise ConfigError(f"'data.train_manifest': no usable sample in {cfg.data.train_manifest}")
    model = DualLossModel(add_lora(base, cfg.lora, cfg.model.gradient_checkpointing), ids,
                          t.text_weight, t.audio_weight, t.audio_reduction)
    trainable, total = count_parameters(model)
    if cfg.model.compile:
        model.lm.model.compile(dynamic=True)  # the backbone only: the heads run on data-dependent positions

    # Loaders draw their worker seeds from their own generator, never from the global RNG: otherwise each new
    # iterator (an eval, a resumed epoch) would shift the dropout masks and break exact resume.
    loader = partial(torch.utils.data.DataLoader, num_workers=cfg.data.num_workers,
                     collate_fn=partial(collate, pad_id=ids.pad, stream_eos=ids.stream_eos),
                     generator=torch.Generator().manual_seed(t.seed), pin_memory=torch.cuda.is_available(),
                     persistent_workers=cfg.data.num_workers > 0)
    train_ds = HiggsDataset(train_samples, cache, tokenizer, ids, cfg.data)
    order = EpochSampler(len(train_ds), t.seed)
    if cfg.data.group_by_length or cfg.data.max_tokens_per_batch:
        batches = LengthGroupedBatches(order, train_ds.lengths(), t.batch_size, cfg.data.max_tokens_per_batch)
        train_loader = loader(train_ds, batch_sampler=batches)
    else:
        train_loader = loader(train_ds, sampler=order, batch_size=t.batch_size)
    val_loader = None
    if val_samples:
        val_loader = loader(HiggsDataset(val_samples, cache, tokenizer, ids, cfg.data), batch_size=t.batch_size)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=t.lr,
                                  weight_decay=t.weight_decay, fused=torch.cuda.is_available() or None)
    model, optimizer, train_loader = acc.prepare(model, optimizer, train_loader)
    if val_loader is not None:
        # Sharded without even_batches: padding the last round with repeats would count those samples twice.
        val_loader = prepare_data_loader(val_loader, acc.device, acc.num_processes, acc.process_index,
                                         put_on_device=True, even_batches=False)
    steps_per_epoch = math.ceil(len(train_loader) / t.grad_accum)
    total_steps = t.max_steps or t.epochs * steps_per_epoch
    name = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[t.scheduler]
    scheduler = get_scheduler(name, optimizer, num_warmup_steps=t.warmup_steps, num_training_steps=total_steps)
    ckpt.keep_trainable_only(acc)
    for sink in log.sinks:
        if isinstance(sink, ConsoleSink):
            sink.total = total_steps

    log.emit("run_start", config=cfg.to_dict(), run_dir=str(run_dir), versions=versions(), git_commit=git_commit(),
             device=str(acc.device), hardware=hardware(), world_size=acc.num_processes,
             mixed_precision=acc.mixed_precision, trainable_params=trainable, total_params=total,
             total_steps=total_steps, steps_per_epoch=steps_per_epoch, train_samples=len(train_samples),
             val_samples=len(val_samples), resumed=bool(resume_from))
    if resume_from:
        ckpt.load_checkpoint(acc, resume_from, scheduler)
        log.emit("run_resume", checkpoint=str(resume_from), from_step=start["step"])
    return Run(cfg, run_dir, acc, log, model, tokenizer, optimizer, scheduler, train_loader, val_loader,
               total_steps, start, codec, ids, generation)


def prepare_run_dir(cfg: RunConfig, run_dir: Path, acc) -> Path | None:
    """Refuse to mix two runs in one dir; return the checkpoint to resume from, if any."""
    resume_from = ckpt.find_checkpoint(run_dir, cfg.resume).path if cfg.resume else None
    if acc.is_main_process:
        if not resume_from and (run_dir / EVENTS_FILE).exists():
            if not cfg.train.overwrite and got_to_training(run_dir):
                raise ConfigError(f"'train.output_dir': {run_dir} already holds a run; pass --resume latest to "
                                  f"continue it, train.overwrite=true to replace it, or another --output-dir")
            for name in (EVENTS_FILE, PARQUET_DIR, ckpt.CHECKPOINTS, ckpt.ADAPTER, "report", "samples"):
                path = run_dir / name
                shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    acc.wait_for_everyone()
    return resume_from


def got_to_training(run_dir: Path) -> bool:
    """Whether the run in ``run_dir`` reached an optimizer step. One that failed while starting (a bad model dir,
    strict data checks) did not, and is replaced without asking: there is nothing in it to lose."""
    if (run_dir / ckpt.CHECKPOINTS).is_dir() or (run_dir / ckpt.ADAPTER).is_dir():
        return True
    with open(run_dir / EVENTS_FILE, encoding="utf-8", errors="replace") as f:
        return any('"train_step"' in line for line in f)


def report_data(log: EventLog, split: str, kept: list, skips: list, codec_encodes: int) -> None:
    for s in skips:
        emit_skip(log, split, s)
    log.emit("data_summary", split=split, kept=len(kept), skipped=len(skips),
             skipped_by_reason=dict(Counter(s.reason for s in skips)), codec_encodes=codec_encodes)


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


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out
