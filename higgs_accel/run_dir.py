"""A run dir: the name of everything in it, its config, and where its model, codec and adapter come from.

    RUN_DIR/config.yaml                     CONFIG_FILE: the run's RunConfig, written at its start
    RUN_DIR/events.jsonl, RUN_DIR/events/   EVENTS_FILE, EVENTS_DIR: the event log and its Parquet tables
    RUN_DIR/samples/step-<8 digits>/        SAMPLES_DIR: eval and generated audio
    RUN_DIR/checkpoints/step-<8 digits>/    CHECKPOINTS: resumable checkpoints (``checkpoint``)
    RUN_DIR/adapter/                        ADAPTER: the final PEFT adapter
    RUN_DIR/report/                         REPORT_DIR: ``higgs-accel report``'s report.md and figures
    RUN_DIR/tiny/                           TINY_DIR: ``--preset tiny``'s model, codec and data
    RUN_DIR/evaluate/<manifest>[-base]/     EVALUATE_DIR: ``higgs-accel evaluate``'s output
    RUN_DIR/run.lock                        LOCK_FILE: the run-dir lock (``lock``)

The event-log names (and the report's) are defined in ``analysis.schema``, which the torch-free reader shares; they
are imported here so the trainer has one place to look.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import yaml

from analysis.schema import EVENTS_DIR, EVENTS_FILE, REPORT_DIR, SAMPLES_DIR, write_text_atomic

from .config import SECTIONS, TINY_PRESETS, ConfigError, DataConfig, ModelConfig, RunConfig, load_config, resume_changes

CONFIG_FILE = "config.yaml"
CHECKPOINTS = "checkpoints"
ADAPTER = "adapter"
TINY_DIR = "tiny"
EVALUATE_DIR = "evaluate"
LOCK_FILE = "run.lock"

# What a new run clears from a dir it may overwrite (the lock and config.yaml are rewritten, the tiny assets reused).
RUN_OUTPUTS = (EVENTS_FILE, EVENTS_DIR, CHECKPOINTS, ADAPTER, REPORT_DIR, SAMPLES_DIR)


def write_run_config(run_dir: str | Path, cfg: RunConfig) -> None:
    # Atomic: the other processes of a resumed run may be reading it (``resumed_config``) while the main one writes.
    write_text_atomic(yaml.safe_dump(cfg.to_dict(), sort_keys=False), Path(run_dir) / CONFIG_FILE)


def resumed_config(cfg: RunConfig, path: str | None, overrides: list[tuple[str, object, str]]
                   ) -> tuple[RunConfig, dict[str, list]]:
    """The config a ``--resume`` trains with: the saved config.yaml of the run it continues (``train.output_dir``
    for ``latest``, else the run dir holding the checkpoint), with the command's config file and ``overrides`` on
    top, and what they changed (``{key: [saved, new]}``, checked by ``resume_changes``). ``cfg``: the command's
    config on its own, which names the run dir. A checkpoint outside any run dir resumes with ``cfg`` as it is."""
    run = Path(cfg.train.output_dir) if cfg.resume == "latest" else Path(cfg.resume).parent.parent
    saved_file = run / CONFIG_FILE
    if not saved_file.is_file():
        if cfg.resume == "latest":
            raise ConfigError(f"'resume': nothing to resume in {run} (no {CONFIG_FILE}: no run was started there); "
                              "run the command without --resume to start one")
        return cfg, {}
    saved = read_run_config(run)
    resumed = load_config(path, overrides, base=saved)
    return resumed, resume_changes(saved, resumed, str(saved_file))


def read_run_config(run_dir: str | Path) -> RunConfig:
    """The RunConfig a run wrote into its config.yaml. Keys it lacks (an older run) or holds as null keep their
    defaults; keys this version does not know (a newer run) are left out."""
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise ConfigError(f"--run: {run_dir} is not a run dir (no {CONFIG_FILE})")
    tree = yaml.safe_load(path.read_text()) or {}
    cfg = RunConfig()
    for f in dataclasses.fields(cfg):
        value = tree.get(f.name)
        if f.name not in SECTIONS:
            if value is not None:
                setattr(cfg, f.name, value)
            continue
        section = getattr(cfg, f.name)
        known = {x.name for x in dataclasses.fields(section)}
        for key, v in (value or {}).items():
            if key in known and v is not None:
                setattr(section, key, v)
    return cfg


@dataclass
class Sources:
    """Where a model stack comes from: the checkpoints (``model``: base, codec, text tokenizer, dtype, attention),
    the adapter on top (None: the base model alone) and the system prompt its samples were trained with."""

    model: ModelConfig
    adapter: str | None
    system_prompt: str


def run_sources(run_dir: str | Path, need_adapter: bool = True) -> Sources:
    """A run's sources: its config's model section, its finished adapter (required unless ``need_adapter`` is off,
    when another adapter or none is used; then None when absent) and its system prompt. A ``--preset tiny`` run
    builds its assets under RUN_DIR/tiny and leaves their paths out of config.yaml: they are found (or rebuilt)
    there."""
    from .tiny import ensure_tiny_assets

    run = Path(run_dir)
    cfg = read_run_config(run)
    model = cfg.model
    if cfg.preset in TINY_PRESETS and not (model.base and model.audio_tokenizer):
        tiny = ensure_tiny_assets(run / TINY_DIR, preset=cfg.preset)
        model.base = model.base or tiny["model.base"]
        model.audio_tokenizer = model.audio_tokenizer or tiny["model.audio_tokenizer"]
    model.text_tokenizer = model.text_tokenizer or model.base
    finished = (run / ADAPTER / "adapter_config.json").is_file()
    if need_adapter and not finished:
        raise ConfigError(f"--run: {run_dir} has no finished adapter ({run / ADAPTER}); pass --adapter "
                          f"RUN_DIR/{CHECKPOINTS}/step-N/{ADAPTER} for a checkpoint")
    return Sources(model, str(run / ADAPTER) if finished else None, cfg.data.system_prompt)


def resolve_sources(run: str | None = None, base: str | None = None, audio_tokenizer: str | None = None,
                    adapter: str | None = None) -> Sources:
    """The sources of ``--run`` (its finished adapter required), with what ``--base`` / ``--audio-tokenizer`` /
    ``--adapter`` set on top: explicit flags win, and a base given explicitly brings its own text tokenizer."""
    src = run_sources(run) if run else Sources(ModelConfig(), None, DataConfig().system_prompt)
    model = dataclasses.replace(src.model, base=base or src.model.base,
                                audio_tokenizer=audio_tokenizer or src.model.audio_tokenizer)
    if base or not model.text_tokenizer:
        model.text_tokenizer = model.base
    if not model.base:
        raise ConfigError("--base (or --run) is required")
    return Sources(model, adapter or src.adapter, src.system_prompt)
