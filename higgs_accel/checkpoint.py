"""Checkpoints (accelerate state with trainable weights only, plus the PEFT adapter) and the final adapter.

A checkpoint is written under a ``.partial`` name and renamed when complete, so an interrupted save never
looks like a checkpoint to ``--resume latest``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from analysis.schema import step_dir_name

from .config import ConfigError

CHECKPOINTS = "checkpoints"
ADAPTER = "adapter"
STATE_FILE = "trainer_state.json"


def keep_trainable_only(accelerator) -> None:
    """LoRA runs must not copy the frozen base model into every checkpoint: save only what trains."""

    def hook(models, weights, _output_dir):
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


def save_checkpoint(accelerator, module, run_dir: Path, state: dict) -> Path:
    """Every process calls this (each saves its RNG state); the main process writes the rest."""
    final = checkpoint_dir(run_dir, state["step"])
    tmp = final.with_name(final.name + ".partial")
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    if accelerator.is_main_process:
        accelerator.unwrap_model(module).peft.save_pretrained(tmp / ADAPTER)
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=2))
        _replace_dir(tmp, final)
    accelerator.wait_for_everyone()
    return final


def save_adapter(accelerator, module, run_dir: Path) -> Path:
    """The final adapter in standard PEFT format (``PeftModel.from_pretrained(base, RUN_DIR/adapter)``)."""
    final = Path(run_dir) / ADAPTER
    if accelerator.is_main_process:
        tmp = final.with_name(ADAPTER + ".partial")
        if tmp.exists():
            shutil.rmtree(tmp)
        accelerator.unwrap_model(module).peft.save_pretrained(tmp)
        _replace_dir(tmp, final)
    accelerator.wait_for_everyone()
    return final


def find_checkpoint(run_dir: Path, resume: str) -> Path:
    """``latest`` -> the newest complete checkpoint of the run; anything else is a checkpoint dir."""
    if resume == "latest":
        done = sorted(p for p in (Path(run_dir) / CHECKPOINTS).glob("step-*")
                      if p.is_dir() and not p.name.endswith(".partial") and (p / STATE_FILE).is_file())
        if not done:
            raise ConfigError(f"'resume': no complete checkpoint under {Path(run_dir) / CHECKPOINTS}")
        return done[-1]
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise ConfigError(f"'resume': {resume} is not a checkpoint dir (no {STATE_FILE})")
    return path


def read_state(path: Path) -> dict:
    return json.loads((Path(path) / STATE_FILE).read_text())


def load_checkpoint(accelerator, path: Path) -> None:
    # strict=False: the checkpoint holds the trainable weights only; the frozen base comes from model.base.
    accelerator.load_state(str(path), strict=False)
