"""Checkpoints (accelerate state with trainable weights only, the scheduler as JSON, the PEFT adapter), verified on
resume; and the final adapter.

A checkpoint is written under a ``.partial`` name, gets its manifest (every file with size and SHA-256) last, and is
renamed when complete: an interrupted or failed save never looks like a checkpoint. ``--resume latest`` takes the
newest checkpoint whose files match its manifest and walks back past damaged ones, saying why.

Nothing in a checkpoint can run code: tensors come from safetensors or ``torch.load(weights_only=True)`` (accelerate's
default for the optimizer; ours for the RNG states), the scheduler is JSON, and a file outside the known layout (such
as accelerate's ``custom_checkpoint_N.pkl``, which accelerate unpickles in full) makes the checkpoint invalid.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from analysis.schema import EVENTS_FILE, read_jsonl, step_dir_name, umask_modes

from . import engine
from .config import ConfigError, error_line
from .run_dir import ADAPTER, CHECKPOINTS

STATE_FILE = "trainer_state.json"
SCHEDULER_FILE = "scheduler.json"
MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1
RNG_FILE = re.compile(r"random_states_(\d+)\.pkl")
# Every name a checkpoint may hold (besides the manifest): what accelerate's save_state writes for one model and
# one optimizer, our JSON files, and the adapter dir.
LAYOUT = re.compile(r"(model(_\d+)?\.safetensors|optimizer(_\d+)?\.bin|random_states_\d+\.pkl|scaler\.pt|"
                    r"(pytorch_model_fsdp|optimizer)_\d+/(\.metadata|__\d+_\d+\.distcp)|"
                    rf"{re.escape(STATE_FILE)}|{re.escape(SCHEDULER_FILE)}|{ADAPTER}/[\w.-]+)")
RNG_KEYS = ("random_state", "numpy_random_seed", "torch_manual_seed")


class CheckpointError(ConfigError):
    """A checkpoint that cannot be saved or resumed: one line for the operator, exit status 2."""


@dataclass
class Found:
    """The checkpoint to resume, and the newer ones passed over with the reason for each."""

    path: Path
    state: dict
    skipped: list[tuple[Path, str]] = field(default_factory=list)

    def skip_line(self) -> str:
        """One console line naming what was skipped and the fallback; empty when nothing was."""
        if not self.skipped:
            return ""
        why = "; ".join(f"{p.name}: {reason}" for p, reason in self.skipped)
        return f"resume: skipped {len(self.skipped)} damaged checkpoint(s) ({why}); resuming from {self.path.name}"


def keep_trainable_only(accelerator) -> None:
    """LoRA runs must not copy the frozen base model into every checkpoint: save only what trains."""

    def hook(models, weights, _output_dir):
        if not weights:  # FSDP and DeepSpeed save their (sharded) models themselves
            return
        for i, model in enumerate(models):
            trainable = {n for n, p in model.named_parameters() if p.requires_grad}
            weights[i] = {k: v for k, v in weights[i].items() if k in trainable}

    accelerator.register_save_state_pre_hook(hook)


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINTS / step_dir_name(step)


def _replace_dir(tmp: Path, final: Path) -> None:
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)


def _all_ok(accelerator, failed: bool) -> bool:
    """Every process learns whether any failed, so none waits at a barrier for one that gave up."""
    import torch

    flag = torch.tensor([float(failed)], device=accelerator.device)
    return accelerator.reduce(flag, "sum").item() == 0


def _save_error(what: Path, error: OSError | None, run_dir: Path) -> CheckpointError:
    cause = os.strerror(error.errno) if error is not None and error.errno else (error or "failed on another process")
    keep = newest_complete(run_dir)
    kept = f"the previous checkpoint {keep.name} is intact" if keep else "no earlier checkpoint exists"
    hint = "free space, then rerun with --resume latest" if error is not None and error.errno == errno.ENOSPC \
        else "fix the cause, then rerun with --resume latest"
    return CheckpointError(f"could not save {what} ({cause}); {kept}; {hint}")


def save_checkpoint(accelerator, module, scheduler, run_dir: Path, state: dict) -> Path:
    """Every process calls this (each saves its RNG state); the main process writes the rest, the manifest last.
    ``state`` must hold ``run_id`` and ``step``. A failed save (disk full) removes its partial dir on every process
    and raises CheckpointError; the checkpoints before it are untouched."""
    final = checkpoint_dir(run_dir, state["step"])
    tmp = final.with_name(final.name + ".partial")
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    error = None
    try:
        accelerator.save_state(str(tmp))
        # Every process: under sharded engines the adapter's weights are gathered first (engine.py).
        engine.save_adapter(accelerator, accelerator.unwrap_model(module).peft, tmp / ADAPTER)
        if accelerator.is_main_process:
            _write_json(tmp / SCHEDULER_FILE, scheduler.state_dict())
            _write_json(tmp / STATE_FILE, state)
    except OSError as e:
        error = e
    ok = _all_ok(accelerator, error is not None)
    if ok and accelerator.is_main_process:
        try:
            umask_modes(tmp)  # safetensors writes 0600: others sharing the run dir could not read it
            write_manifest(tmp, state)
            _replace_dir(tmp, final)
        except OSError as e:
            error = e
    ok = _all_ok(accelerator, error is not None) and ok
    if not ok:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        accelerator.wait_for_everyone()
        raise _save_error(final, error, run_dir)
    return final


def _write_json(path: Path, data) -> None:
    # allow_nan=False: a scheduler or state that is not plain data must fail here, not on resume.
    path.write_text(json.dumps(data, indent=2, allow_nan=False))


def nonfinite_tensors(accelerator, module) -> list[str]:
    """Names of trainable tensors holding NaN or inf, the same on every process (sharded ones checked shard by
    shard: every process must call it)."""
    named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    flags = engine.nonfinite_flags(accelerator, [p for _, p in named])
    return [n for (n, _), bad in zip(named, flags) if bad]


def save_adapter(accelerator, module, run_dir: Path) -> Path:
    """The final adapter in standard PEFT format (``PeftModel.from_pretrained(base, RUN_DIR/adapter)``); never one
    with non-finite weights."""
    final = Path(run_dir) / ADAPTER
    if bad := nonfinite_tensors(accelerator, accelerator.unwrap_model(module)):
        raise CheckpointError(f"adapter not saved: {len(bad)} trainable tensor(s) are not finite (first: {bad[0]}); "
                              "the last checkpoint holds the last good weights")
    error = None
    tmp = final.with_name(ADAPTER + ".partial")
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    try:
        engine.save_adapter(accelerator, accelerator.unwrap_model(module).peft, tmp)  # every process: a gather
        if accelerator.is_main_process:
            umask_modes(tmp)
            _replace_dir(tmp, final)
    except OSError as e:
        error = e
        shutil.rmtree(tmp, ignore_errors=True)
    if not _all_ok(accelerator, error is not None):
        raise _save_error(final, error, run_dir)
    return final


# ---------------------------------------------------------------- manifest and verification


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _files(ckpt: Path) -> list[str]:
    return sorted(str(p.relative_to(ckpt)) for p in ckpt.rglob("*") if p.is_file() and p.name != MANIFEST)


def write_manifest(ckpt: Path, state: dict) -> None:
    files = {name: {"size": (ckpt / name).stat().st_size, "sha256": _sha256(ckpt / name)} for name in _files(ckpt)}
    manifest = {"format": MANIFEST_FORMAT, "run_id": state["run_id"], "step": state["step"], "files": files}
    with open(ckpt / MANIFEST, "w") as f:
        f.write(json.dumps(manifest, indent=2))
        f.flush()
        os.fsync(f.fileno())


def verify(ckpt: Path) -> str | None:
    """Why ``ckpt`` cannot be resumed, or None when every file matches its manifest and the RNG states load."""
    try:
        manifest = json.loads((ckpt / MANIFEST).read_text())
        listed = manifest["files"]
        state = json.loads((ckpt / STATE_FILE).read_text())
    except FileNotFoundError as e:
        return f"no {Path(e.filename).name} (incomplete, or saved by a version without manifests)"
    except (ValueError, KeyError, TypeError) as e:
        return f"unreadable manifest or state ({type(e).__name__})"
    if not isinstance(listed, dict) or not isinstance(state, dict):
        return "unreadable manifest or state"
    if state.get("run_id") != manifest.get("run_id") or state.get("step") != manifest.get("step"):
        return f"{STATE_FILE} does not match {MANIFEST}"
    present = _files(ckpt)
    if foreign := [n for n in present if n not in listed or not LAYOUT.fullmatch(n)]:
        return f"holds files that are not part of a checkpoint: {', '.join(foreign)}"
    for name, meta in listed.items():
        path = ckpt / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != meta.get("size"):
            return f"{name} has {path.stat().st_size} bytes, its manifest says {meta.get('size')}"
        if _sha256(path) != meta.get("sha256"):
            return f"{name} does not match its SHA-256"
    for name in present:
        if RNG_FILE.fullmatch(name):
            try:
                load_rng(ckpt / name)
            except Exception as e:  # noqa: BLE001 - whatever the unpickler refuses, the checkpoint is unusable
                return f"RNG state {name} does not load ({type(e).__name__}): resume would not be exact"
    return None


def checkpoints(run_dir: Path) -> list[Path]:
    """The run's checkpoint dirs, newest first (partial saves excluded)."""
    found = [p for p in (Path(run_dir) / CHECKPOINTS).glob("step-*") if p.is_dir() and not p.name.endswith(".partial")]
    return sorted(found, reverse=True)


def newest_complete(run_dir: Path) -> Path | None:
    """The newest checkpoint with a manifest (not verified: cheap, for messages)."""
    return next((p for p in checkpoints(run_dir) if (p / MANIFEST).is_file()), None)


def has_saved_work(run_dir: Path) -> bool:
    """Whether the run in ``run_dir`` saved a step (a checkpoint or the final adapter). A plain rerun replaces a run
    dir only when this is false; otherwise --resume latest can continue it."""
    return newest_complete(run_dir) is not None or (Path(run_dir) / ADAPTER).is_dir()


def run_id_of(run_dir: Path) -> str | None:
    """The run id of the run whose log is in ``run_dir`` (its last event's), or None for a dir without one."""
    events = read_jsonl(Path(run_dir) / EVENTS_FILE)
    run_id = events[-1].get("run_id") if events else None
    return run_id if isinstance(run_id, str) else None


def checkpoint_seq(run_dir: Path, step: int) -> int | None:
    """The seq of the last ``checkpoint`` event of ``step`` in the log of ``run_dir`` (None: not logged, e.g. a kill
    between the save and its event): what a resume redoes at that step is what was logged after it."""
    seqs = [e["seq"] for e in read_jsonl(Path(run_dir) / EVENTS_FILE)
            if e.get("event") == "checkpoint" and e.get("step") == step]
    return seqs[-1] if seqs else None


def find_checkpoint(run_dir: Path, resume: str, run_id: str | None = None, any_run: bool = False) -> Found:
    """``latest`` -> the newest valid checkpoint of ``run_dir``, walking back past damaged ones; anything else is a
    checkpoint dir, which must be valid. ``run_id`` is the id of the run already in ``run_dir`` (None for a fresh
    dir): a checkpoint of another run is skipped (``latest``) or refused (a path) unless ``any_run``."""
    if resume != "latest":
        path = Path(resume)
        if not path.is_dir():
            raise CheckpointError(f"'resume': {resume} is not a checkpoint dir")
        if reason := verify(path) or _foreign(path, run_id, any_run):
            raise CheckpointError(f"'resume': {resume} cannot be resumed: {reason}")
        return Found(path, read_state(path))
    skipped = []
    for path in checkpoints(run_dir):
        if reason := verify(path) or _foreign(path, run_id, any_run):
            skipped.append((path, reason))
            continue
        return Found(path, read_state(path), skipped)
    where = Path(run_dir) / CHECKPOINTS
    if skipped:
        why = "; ".join(f"{p.name}: {reason}" for p, reason in skipped)
        raise CheckpointError(f"'resume': no usable checkpoint under {where} ({why}); resume one of another run with "
                              "train.resume_any_run=true, or start again with train.overwrite=true")
    raise CheckpointError(f"'resume': no complete checkpoint under {where}: the run saved no step, so there is "
                          "nothing to resume; rerun without --resume to start it again (train.save_every sets how "
                          "often steps are saved)")


def _foreign(path: Path, run_id: str | None, any_run: bool) -> str | None:
    theirs = read_state(path).get("run_id")
    if any_run or run_id is None or theirs == run_id:
        return None
    return f"saved by run {theirs}, not by this dir's run {run_id} (train.resume_any_run=true resumes it anyway)"


def read_state(path: Path) -> dict:
    return json.loads((Path(path) / STATE_FILE).read_text())


# ---------------------------------------------------------------- loading


def load_rng(path: Path) -> dict:
    """One process's RNG states, unpickled with ``weights_only=True`` (accelerate's numpy allow-list)."""
    from accelerate.utils import load

    states = load(path, map_location="cpu", weights_only=True)
    if not isinstance(states, dict) or (missing := [k for k in RNG_KEYS if k not in states]):
        raise ValueError(f"{path.name}: not an RNG state file (missing {missing or 'everything'})")
    return states


def restore_rng(ckpt: Path, process_index: int) -> None:
    """Set this process's RNGs from the checkpoint, raising instead of accelerate's quiet "Could not load random
    states": a resume that silently reseeds is no longer exact."""
    import numpy as np
    import torch

    path = Path(ckpt) / f"random_states_{process_index}.pkl"
    try:
        states = load_rng(path)
        random.setstate(states["random_state"])
        np.random.set_state(states["numpy_random_seed"])
        torch.set_rng_state(states["torch_manual_seed"])
        if torch.cuda.is_available() and "torch_cuda_manual_seed" in states:
            torch.cuda.set_rng_state_all(states["torch_cuda_manual_seed"])
    except Exception as e:  # noqa: BLE001 - any failure here means the resume would not be exact
        raise CheckpointError(f"'resume': {path} does not load ({error_line(e)}); resume would not be "
                              "exact") from None


def load_checkpoint(accelerator, path: Path, scheduler) -> None:
    """Weights, optimizer, scheduler and RNG states of a checkpoint ``find_checkpoint`` returned."""
    saved = sum(1 for p in Path(path).iterdir() if RNG_FILE.fullmatch(p.name))
    if saved != accelerator.num_processes:
        # Each process's RNG and data shard depend on the process count: another count cannot continue exactly.
        raise CheckpointError(f"'resume': {path} was saved by {saved} process(es), this run has "
                              f"{accelerator.num_processes}; resume with {saved}")
    # strict=False: the checkpoint holds the trainable weights only; the frozen base comes from model.base.
    accelerator.load_state(str(path), strict=False)
    scheduler.load_state_dict(json.loads((Path(path) / SCHEDULER_FILE).read_text()))
    restore_rng(path, accelerator.process_index)
