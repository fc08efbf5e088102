"""Typed run configuration: dataclasses, loaded from YAML, overridden by ``key=value``, validated up front."""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import os
import signal
import tempfile
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml


class ConfigError(ValueError):
    """A bad configuration value; the message names the key (and file) at fault."""


def first_line(e: BaseException) -> str:
    """The first line of an exception's message ("" when it has none): what a one-line error quotes of it."""
    text = str(e).strip()
    return text.splitlines()[0] if text else ""


def error_line(e: BaseException) -> str:
    """``Type: first line`` of an exception, or its type alone when it has no message."""
    return f"{type(e).__name__}: {line}" if (line := first_line(e)) else type(e).__name__


def _opt(default, doc: str, **kw):
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"doc": doc, **kw})
    return field(default=default, metadata={"doc": doc, **kw})


@dataclass
class ModelConfig:
    base: str = _opt("", "HiggsAudioV2ForConditionalGeneration: hub id or local dir (set by --preset tiny)")
    audio_tokenizer: str = _opt("", "HiggsAudioV2TokenizerModel codec: hub id or local dir")
    text_tokenizer: str = _opt("", "text tokenizer: hub id or local dir (default: model.base)")
    dtype: str = _opt("fp32", "weights dtype of the base model", choices=("fp32", "bf16"))
    gradient_checkpointing: str = _opt("false", "recompute activations in backward to save memory; auto: only when "
                                       "higgs_accel.memory predicts the step does not fit the GPU (off on CPU)",
                                       choices=("false", "true", "auto"))
    attn_implementation: str = _opt("sdpa", "attention kernel", choices=("eager", "sdpa", "flash_attention_2"))
    compile: bool = _opt(False, "torch.compile the transformer backbone (dynamic shapes)")


@dataclass
class LoraConfig:
    r: int = _opt(16, "LoRA rank")
    alpha: int = _opt(32, "LoRA alpha (scale = alpha / r)")
    dropout: float = _opt(0.0, "dropout on the LoRA input (0 as torchtune's LoRA recipes; above 0, one mask per "
                               "input shared by the projections that read it: q/k/v, gate/up)")
    target_modules: list[str] = _opt(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        "module-name suffixes to adapt; the MLP names match both the text `mlp` and the DualFFN `audio_mlp`",
    )
    modules_to_save: list[str] = _opt([], "modules trained in full and saved with the adapter, e.g. audio_lm_head")


@dataclass
class DataConfig:
    train_manifest: str = _opt("", "training data: a JSONL manifest, a `datasets` save_to_disk dir or an audiofolder")
    val_manifest: str = _opt("", "validation data, same kinds (empty: hold out val_fraction of the training data)")
    val_fraction: float = _opt(0.0, "fraction of the training manifest held out for validation, split by seed")
    system_prompt: str = _opt("Generate audio following instruction.", "system turn of every sample")
    train_on_prompt: bool = _opt(False, "also put text targets on the system and user turns")
    train_audio_eos: bool = _opt(True, "make each codebook's stream-EOS code a target, so the model learns to stop")
    train_audio_out_bos: bool = _opt(True, "make <|audio_out_bos|> of the trained assistant turn a text target, as "
                                     "the authors' training does (transformers' processor masks it)")
    min_seconds: float = _opt(0.0, "skip audio shorter than this")
    max_seconds: float = _opt(30.0, "skip audio longer than this")
    max_tokens: int = _opt(0, "skip a sample whose sequence (text + reference + target audio frames) is longer, as "
                           "too_long (0: the model's max_position_embeddings)")
    drop_duplicates: bool = _opt(False, "leave out lines repeating an earlier line's audio and text (always counted)")
    strict: bool = _opt(False, "fail before training, listing every bad sample, instead of skipping them")
    group_by_length: bool = _opt(True, "batch samples of similar length together (less padding)")
    max_tokens_per_batch: int = _opt(0, "cap padded positions per batch instead of a fixed batch size (0: off)")
    num_workers: int = _opt(0, "DataLoader worker processes (also decode audio for the codec while it encodes)")
    encode_batch_seconds: float | None = _opt(None, "most seconds of audio the codec encodes in one batch; only "
                                              "4 or more files of exactly equal length share one, and only while "
                                              "batches prove exact (null: 60 on an accelerator, 0 on the CPU, where "
                                              "batching is neither faster nor exact; 0: one file at a time)")
    codes_cache: str = _opt("", "dir of cached codec codes (default: $HIGGS_ACCEL_CACHE or ~/.cache/higgs_accel)")
    audio_field: str = _opt("audio", "manifest field with the audio path (relative to the manifest) or column")
    text_field: str = _opt("text", "field with the transcript")
    speaker_field: str = _opt("speaker", "field with the speaker id (optional)")
    ref_audio_field: str = _opt("ref_audio", "field with voice-cloning reference audio (optional)")
    ref_text_field: str = _opt("ref_text", "field with the reference audio's transcript")
    scene_field: str = _opt("scene", "field with a scene description added to the system turn (optional)")
    system_field: str = _opt("system", "field with a per-sample system prompt (optional)")


@dataclass
class TrainConfig:
    output_dir: str = _opt("runs/run", "run directory: events, checkpoints, adapter, report")
    overwrite: bool = _opt(False, "replace a finished or crashed run already in output_dir")
    seed: int = _opt(42, "seed for weights of new LoRA layers, data order and dropout")
    max_steps: int = _opt(0, "optimizer steps to run (0: run `epochs` epochs)")
    epochs: int = _opt(1, "epochs to run when max_steps is 0")
    batch_size: int = _opt(4, "samples per micro-batch per process")
    grad_accum: int = _opt(1, "micro-batches per optimizer step")
    lr: float = _opt(2e-4, "peak learning rate")
    weight_decay: float = _opt(0.0, "AdamW weight decay")
    warmup_steps: int = _opt(0, "linear warmup steps: step k of them uses lr * k / warmup_steps (the first update "
                             "is never at lr 0)")
    scheduler: str = _opt("cosine", "learning-rate decay after warmup", choices=("cosine", "linear", "constant"))
    max_grad_norm: float = _opt(1.0, "gradient clipping norm (0: no clipping)")
    allow_engine_fallback: bool = _opt(False, "train with the engine accelerate runs even when it is not the one the "
                                       "launcher asked for (FSDP or DeepSpeed dropped to DDP); off: stop with an error")
    mixed_precision: str = _opt("", "autocast precision; empty: what `accelerate launch` / its config file says",
                                choices=("", "no", "bf16", "fp16"))
    text_weight: float = _opt(1.0, "weight of the text loss in the total loss")
    audio_weight: float = _opt(1.0, "weight of the audio loss in the total loss")
    audio_reduction: str = _opt("sum", "how the per-codebook losses combine (sum: transformers)",
                                choices=("sum", "mean"))
    eval_every: int = _opt(200, "evaluate every N optimizer steps (0: only at the end)")
    save_every: int = _opt(500, "checkpoint every N optimizer steps, so a crash loses at most that many (0: never; a "
                           "stop signal still saves)")
    allow_config_change: bool = _opt(False, "let --resume change keys that decide what the run computes "
                                     "(RESUME_FIXED: batch size, grad_accum, seed, data.*, model weights and dtype, "
                                     "LoRA shape); off: such a change is refused, since the resumed run would no "
                                     "longer continue the one it resumes")
    resume_any_run: bool = _opt(False, "let --resume continue a checkpoint written by another run (another run id), "
                                "e.g. one copied in from elsewhere; without it such a checkpoint is refused")
    on_nonfinite: str = _opt("stop", "a step with a non-finite loss or gradient norm is never applied; stop: end the "
                             "run as `diverged` after train.max_nonfinite_steps such steps in a row; skip: count them "
                             "and train on", choices=("stop", "skip"))
    max_nonfinite_steps: int = _opt(3, "consecutive non-finite steps that end the run (with on_nonfinite=stop)")
    stop_signals: list[str] = _opt(["SIGTERM", "SIGINT", "SIGUSR1"], "signals that stop the run at the next "
                                   "optimizer step with a checkpoint (a second one exits at once)")
    lock_stale_s: float = _opt(300.0, "where the file system has no working flock: a run-dir lock whose heartbeat is "
                               "older than this is taken as left by a dead process on another host")


@dataclass
class LogConfig:
    log_steps: int = _opt(10, "console line and prediction slices every N optimizer steps")
    level: str = _opt("info", "console level", choices=("debug", "info", "warning"))
    slice_samples: int = _opt(2, "samples per prediction-vs-label slice")
    slice_k: int = _opt(5, "first and last K tokens of each slice")
    slice_codebooks: list[int] = _opt([0, 1, 2, 3, 4, 5, 6, 7], "codebooks shown in audio slices")
    parquet_flush_events: int = _opt(500, "write a Parquet part at least every N events")
    parquet_flush_seconds: float = _opt(30.0, "... or at least every N seconds")
    log_with: list[str] = _opt([], "accelerate trackers fed from the same events: scalars to each; eval and "
                               "generated audio and prediction slices too to tensorboard and wandb (docs/trackers.md)")
    eval_audio_samples: int = _opt(2, "eval samples decoded to WAV (teacher-forced prediction + label) at each eval; "
                                    "taken from the first eval batch, so at most train.batch_size")
    generate_every: int = _opt(0, "speak log.generate_prompts to WAV every N evals and at the last one (0: never)")
    generate_prompts: list[str] = _opt(["The quick brown fox jumps over the lazy dog."], "texts spoken at generate "
                                       "evals (a YAML list; on the command line commas split prompts)")
    generate_max_new_tokens: int = _opt(300, "generation steps per prompt: the codec's frame rate per second "
                                  "of audio, plus the model's codebook count for the delay pattern")
    generate_ref_audio: str = _opt("", "reference audio file: speak the prompts in its voice (empty: no cloning)")
    generate_ref_text: str = _opt("", "transcript of log.generate_ref_audio")
    # Generation starts from the checkpoint's generation_config.json; each key below left null keeps its value.
    generate_do_sample: bool | None = _opt(None, "true: sample (seeded: a resumed run sounds the same); false: greedy "
                                          "argmax, without repetition-aware resampling unless "
                                          "log.generate_ras_win_len is set; null: the checkpoint's choice")
    generate_temperature: float | None = _opt(None, "sampling temperature (null: the checkpoint's)")
    generate_top_k: int | None = _opt(None, "sample from the K most likely codes only (0: no limit; null: the "
                                      "checkpoint's, else transformers' 50)")
    generate_top_p: float | None = _opt(None, "sample from the smallest set of codes with this probability mass "
                                        "(1: no limit; null: the checkpoint's)")
    generate_ras_win_len: int | None = _opt(None, "repetition-aware sampling: a code seen "
                                            "log.generate_ras_win_max_num_repeat times in the last N frames of its "
                                            "codebook is redrawn from the untempered distribution (0: off; null: the "
                                            "checkpoint's)")
    generate_ras_win_max_num_repeat: int | None = _opt(None, "repeats within the window that trigger the redraw "
                                                       "(null: the checkpoint's, else 2)")


@dataclass
class EvalConfig:
    asr_model: str = _opt("", "ASR model that transcribes generated speech for WER/CER: anything transformers' "
                          "automatic-speech-recognition pipeline loads (e.g. openai/whisper-large-v3), hub id or "
                          "local dir (empty: no WER/CER)")
    speaker_model: str = _opt("", "speaker-verification x-vector model (AutoModelForAudioXVector, e.g. "
                              "microsoft/wavlm-base-plus-sv) for speaker similarity, hub id or local dir (empty: none)")
    asr_language: str = _opt("", "language a Whisper ASR model transcribes in, e.g. english (empty: it detects it)")
    spell_numbers: bool = _opt(True, "before WER/CER, spell digits out as English words (false: keep them as tokens, "
                               "for other languages); docs/quality.md")
    batch_size: int = _opt(8, "utterances per ASR pipeline batch")
    baseline: bool = _opt(True, "also score the base model (adapter off) once at step 0, on the same prompts")


@dataclass
class RunConfig:
    preset: str = _opt("", "embedded default to run without downloads: tiny (Higgs Audio v2) or tiny-v3 (Higgs TTS 3)",
                       choices=("", "tiny", "tiny-v3"))
    resume: str = _opt("", "continue from a checkpoint: 'latest' or a checkpoint dir")
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    log: LogConfig = field(default_factory=LogConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


SECTIONS = ("model", "lora", "data", "train", "log", "eval")

# What `--preset tiny` changes; the model, codec and data paths are filled in when the assets are built.
TINY_PRESET = {
    "train.max_steps": 100,
    "train.batch_size": 4,
    "train.lr": 5e-3,
    "train.warmup_steps": 5,
    "train.eval_every": 25,
    "train.save_every": 50,
    "lora.r": 16,
    "lora.alpha": 32,
    "lora.dropout": 0.0,
    # The tiny model's heads are random: a LoRA on the backbone alone cannot move them far in 100 steps.
    "lora.modules_to_save": ["audio_lm_head", "text_lm_head"],
    "log.log_steps": 20,
}
# `--preset tiny-v3`: the same run on a tiny Higgs TTS 3, whose fused audio embedding (and the head tied to it) is
# random: trained in full beside the LoRA. Its audio layout has no text targets.
TINY_PRESETS = {"tiny": TINY_PRESET,
                "tiny-v3": {**TINY_PRESET, "lora.modules_to_save": ["audio_embedding"]}}


def all_keys() -> dict[str, tuple[dataclasses.Field, object]]:
    """Every dotted key (``train.lr``) with its dataclass field and the type hint of that field."""
    keys = {}
    hints = typing.get_type_hints(RunConfig)
    for f in dataclasses.fields(RunConfig):
        if f.name in SECTIONS:
            section = f.default_factory
            sub_hints = typing.get_type_hints(section)
            for sub in dataclasses.fields(section):
                keys[f"{f.name}.{sub.name}"] = (sub, sub_hints[sub.name])
        else:
            keys[f.name] = (f, hints[f.name])
    return keys


def optional_of(tp):
    """``X`` of a ``X | None`` hint (a key whose null means "not set here"), else None."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (types.UnionType, typing.Union) and type(None) in args:
        return next(a for a in args if a is not type(None))
    return None


def _coerce(key: str, value, where: str):
    f, tp = all_keys()[key]
    if (inner := optional_of(tp)) is not None:
        if value is None or (isinstance(value, str) and value.strip().lower() in ("", "null", "none")):
            return None
        tp = inner
    origin = typing.get_origin(tp)
    bad = ConfigError(f"{where}: '{key}' must be {_type_name(tp)}, got {value!r}")
    if origin is list:
        (item,) = typing.get_args(tp)
        if isinstance(value, str):
            value = [v for v in value.split(",") if v] if value else []
        if not isinstance(value, list):
            raise bad
        try:
            return [_scalar(item, v) for v in value]
        except (TypeError, ValueError):
            raise bad from None
    try:
        value = _scalar(tp, value)
    except (TypeError, ValueError):
        raise bad from None
    choices = f.metadata.get("choices")
    if choices and value not in choices:
        raise ConfigError(f"{where}: '{key}' must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return value


def _scalar(tp, value):
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise TypeError
    if tp is int:
        if isinstance(value, bool):
            raise TypeError
        if isinstance(value, float) and not value.is_integer():
            raise TypeError
        return int(value)
    if tp is float:
        if isinstance(value, bool):
            raise TypeError
        return float(value)
    if tp is str:
        if isinstance(value, (dict, list)):
            raise TypeError
        if isinstance(value, bool):  # YAML's true/false for a key that also takes other words (auto)
            return str(value).lower()
        return "" if value is None else str(value)
    raise TypeError


def _type_name(tp) -> str:
    if (inner := optional_of(tp)) is not None:
        return f"{_type_name(inner)} or null"
    if typing.get_origin(tp) is list:
        return f"a list of {typing.get_args(tp)[0].__name__}"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(tp, str(tp))


def type_name(key: str) -> str:
    return _type_name(all_keys()[key][1])


# What other trainers call our keys: a mistyped ``learning_rate`` should lead to ``train.lr``.
SYNONYMS = {
    "learning_rate": "train.lr", "lr_scheduler": "train.scheduler", "lr_scheduler_type": "train.scheduler",
    "gradient_accumulation_steps": "train.grad_accum", "num_train_epochs": "train.epochs",
    "num_epochs": "train.epochs", "per_device_train_batch_size": "train.batch_size", "warmup": "train.warmup_steps",
    "save_steps": "train.save_every", "eval_steps": "train.eval_every", "logging_steps": "log.log_steps",
    "rank": "lora.r", "lora_r": "lora.r", "lora_alpha": "lora.alpha", "lora_dropout": "lora.dropout",
    "output": "train.output_dir", "out_dir": "train.output_dir", "clip_grad_norm": "train.max_grad_norm",
}


def suggest_key(key: str) -> str | None:
    """The real key closest to ``key``: first by its last part (a leaf name or a synonym, preferring its own
    section), then by the whole dotted key."""
    keys = all_keys()
    section, _, leaf = key.rpartition(".")
    by_leaf: dict[str, list[str]] = {}
    for k in keys:
        by_leaf.setdefault(k.rpartition(".")[2], []).append(k)
    for name, k in SYNONYMS.items():
        by_leaf.setdefault(name, []).append(k)
    for name in difflib.get_close_matches(leaf, by_leaf, n=3, cutoff=0.75):
        found = by_leaf[name]
        return next((k for k in found if k.startswith(section + ".")), found[0])
    close = difflib.get_close_matches(key, keys, n=1, cutoff=0.75)
    return close[0] if close else None


def unknown_key(key: str, where: str, prefix: str = "") -> ConfigError:
    """The error for a key no section has, with the closest real key; ``prefix`` is how the user wrote keys."""
    close = suggest_key(key)
    hint = f" (did you mean '{prefix}{close}'?)" if close else ""
    return ConfigError(f"{where}: unknown key '{prefix}{key}'{hint}")


def _flatten(tree: dict, where: str, prefix: str = "") -> dict:
    flat = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and key in SECTIONS:
            flat.update(_flatten(v, where, f"{key}."))
        elif key in SECTIONS:
            raise ConfigError(f"{where}: '{key}' must be a mapping of its keys")
        elif isinstance(v, dict):
            close = difflib.get_close_matches(key, SECTIONS, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"{where}: unknown section '{key}'{hint}; sections are {', '.join(SECTIONS)}")
        else:
            flat[key] = v
    return flat


def parse_override(text: str) -> tuple[str, object]:
    if "=" not in text:
        raise ConfigError(f"command line: override '{text}' must look like key=value, e.g. train.lr=1e-4")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def load_config(path: str | None = None, overrides: list[tuple[str, object, str]] = (),
                base: RunConfig | None = None) -> RunConfig:
    """Build a RunConfig from an optional YAML file and ``(key, value, where)`` overrides, in order, on top of
    ``base`` (a resumed run's saved config: then no preset fills anything, the saved values already hold it) or the
    defaults."""
    values: dict[str, tuple[object, str]] = {}
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {path}")
        raw = p.read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            line = raw[:e.start].count(b"\n") + 1
            raise ConfigError(f"{path}:{line}: not UTF-8 text (byte 0x{raw[e.start]:02x}); save the file as UTF-8"
                              ) from None
        try:
            tree = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            line = f":{mark.line + 1}" if mark else ""
            raise ConfigError(f"{path}{line}: not valid YAML ({getattr(e, 'problem', e)})") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections ({', '.join(SECTIONS)})")
        for k, v in _flatten(tree, path).items():
            values[k] = (v, path)
    for key, value, where in overrides:
        values[key] = (value, where)
    preset = values.get("preset", ("", ""))[0]
    if preset in TINY_PRESETS and base is None:
        for k, v in TINY_PRESETS[preset].items():
            values.setdefault(k, (v, f"preset {preset}"))

    keys = all_keys()
    cfg = copy.deepcopy(base) if base is not None else RunConfig()
    for key, (value, where) in values.items():
        if key not in keys:
            raise unknown_key(key, where)
        value = _coerce(key, value, where)
        target = getattr(cfg, key.split(".")[0]) if "." in key else cfg
        setattr(target, key.split(".")[-1], value)
    validate(cfg)
    return cfg


# What --resume may not change unless train.allow_config_change: keys that decide what the resumed steps compute
# (batch composition, data, the model and the adapter's shape). A key ending in "." covers its whole section; the
# keys in RESUME_FREE are exempt (where things are found, and memory or speed knobs that compute the same).
RESUME_FIXED = ("train.batch_size", "train.grad_accum", "train.seed", "data.", "model.", "lora.r", "lora.alpha",
                "lora.target_modules", "lora.modules_to_save")
RESUME_FREE = ("data.codes_cache", "data.num_workers", "data.encode_batch_seconds", "model.gradient_checkpointing",
               "model.compile")
# Never a change: which checkpoint to resume is the resume itself, and a run dir may have moved.
RESUME_IGNORED = ("resume", "train.output_dir")


def resume_changes(saved: RunConfig, cfg: RunConfig, where: str) -> dict[str, list]:
    """``{key: [saved value, new value]}`` for each key ``cfg`` changes from the run's ``saved`` config; one line
    naming the first key --resume may not change (``RESUME_FIXED``), unless train.allow_config_change.
    ``where``: the saved config's file, for the message."""
    from analysis.schema import flatten

    old, new = flatten(saved.to_dict()), flatten(cfg.to_dict())
    changed = {k: [old.get(k), v] for k, v in new.items() if old.get(k) != v and k not in RESUME_IGNORED}
    fixed = [k for k in changed if k.startswith(RESUME_FIXED) and k not in RESUME_FREE]
    if fixed and not cfg.train.allow_config_change:
        key = fixed[0]
        raise ConfigError(f"'{key}': --resume cannot change it ({changed[key][0]!r} in {where}, now "
                          f"{changed[key][1]!r}): the resumed steps would not continue the run; drop the override, "
                          "or pass train.allow_config_change=true to change it anyway")
    return changed


def validate(cfg: RunConfig) -> None:
    """Checks across keys, each naming the key at fault; all of them before anything loads."""
    t = cfg.train
    for key, (_, tp) in all_keys().items():
        v = getattr(getattr(cfg, key.split(".")[0]) if "." in key else cfg, key.split(".")[-1])
        if optional_of(tp) is float and v is not None:
            tp = float
        if tp is float and not math.isfinite(v):
            raise ConfigError(f"'{key}' must be a finite number, got {v}")
    _check_ranges(cfg)
    _check_resume(cfg.resume)
    _check_signals(t.stop_signals)
    _check_trackers(cfg.log.log_with)
    check_output_dir(t.output_dir)


def _check_trackers(names: list[str]) -> None:
    """Each of ``log.log_with`` is a tracker accelerate knows and is installed, before the model loads."""
    if not names:
        return
    import accelerate.utils.imports as available
    from accelerate.utils import LoggerType

    known = [t.value for t in LoggerType]
    for name in names:
        if name not in known:
            raise ConfigError(f"'log.log_with': unknown tracker {name!r}; accelerate has {', '.join(known)}")
        if name != "all" and not getattr(available, f"is_{name}_available")():
            extra = f"'higgs-accel[{name}]'" if name in ("tensorboard", "wandb") else name
            raise ConfigError(f"'log.log_with': {name} is not installed (pip install {extra})")


def _check_ranges(cfg: RunConfig) -> None:
    t = cfg.train
    positive = {"train.max_nonfinite_steps": t.max_nonfinite_steps, "lora.alpha": cfg.lora.alpha,
                "train.batch_size": t.batch_size, "train.grad_accum": t.grad_accum, "lora.r": cfg.lora.r,
                "log.log_steps": cfg.log.log_steps, "log.slice_k": cfg.log.slice_k,
                "log.parquet_flush_events": cfg.log.parquet_flush_events, "eval.batch_size": cfg.eval.batch_size}
    for key, v in positive.items():
        if v < 1:
            raise ConfigError(f"'{key}' must be at least 1, got {v}")
    for key, v in {"train.max_steps": t.max_steps, "train.warmup_steps": t.warmup_steps,
                   "train.eval_every": t.eval_every, "train.save_every": t.save_every,
                   "data.num_workers": cfg.data.num_workers, "train.weight_decay": t.weight_decay,
                   "train.max_grad_norm": t.max_grad_norm, "train.text_weight": t.text_weight,
                   "train.audio_weight": t.audio_weight, "data.min_seconds": cfg.data.min_seconds,
                   "train.lock_stale_s": t.lock_stale_s, "log.slice_samples": cfg.log.slice_samples,
                   "data.max_tokens_per_batch": cfg.data.max_tokens_per_batch, "data.max_tokens": cfg.data.max_tokens,
                   "data.encode_batch_seconds": cfg.data.encode_batch_seconds,
                   "log.eval_audio_samples": cfg.log.eval_audio_samples,
                   "log.generate_every": cfg.log.generate_every}.items():
        if v is not None and v < 0:
            raise ConfigError(f"'{key}' must not be negative, got {v}")
    if t.lr <= 0:
        raise ConfigError(f"'train.lr' must be greater than 0, got {t.lr}")
    if t.text_weight == 0 and t.audio_weight == 0:
        raise ConfigError("'train.text_weight' and 'train.audio_weight' are both 0: nothing would train")
    if not 0.0 <= cfg.lora.dropout < 1.0:
        raise ConfigError(f"'lora.dropout' must be in [0, 1), got {cfg.lora.dropout}")
    d = cfg.data
    if d.max_seconds <= 0:
        raise ConfigError(f"'data.max_seconds' must be greater than 0, got {d.max_seconds}")
    if d.min_seconds > d.max_seconds:
        raise ConfigError(f"'data.min_seconds' ({d.min_seconds}) must not be above 'data.max_seconds' "
                          f"({d.max_seconds}): every sample would be skipped")
    if cfg.log.parquet_flush_seconds <= 0:
        raise ConfigError(f"'log.parquet_flush_seconds' must be greater than 0, got {cfg.log.parquet_flush_seconds}")
    if t.max_steps == 0 and t.epochs < 1:
        raise ConfigError("'train.epochs' must be at least 1 when train.max_steps is 0")
    if not 0.0 <= cfg.data.val_fraction < 1.0:
        raise ConfigError(f"'data.val_fraction' must be in [0, 1), got {cfg.data.val_fraction}")
    if bad := [c for c in cfg.log.slice_codebooks if c < 0]:
        raise ConfigError(f"'log.slice_codebooks' holds negative codebooks: {bad}")
    check_sampling({key: getattr(cfg.log, f"generate_{key}") for key in SAMPLING_KEYS},
                   lambda key: f"'log.generate_{key}'")
    if cfg.log.generate_ref_audio and not Path(cfg.log.generate_ref_audio).is_file():
        raise ConfigError(f"'log.generate_ref_audio': file not found: {cfg.log.generate_ref_audio}")
    if cfg.log.generate_max_new_tokens < 2:
        raise ConfigError("'log.generate_max_new_tokens' must be at least 2 (stream BOS + one codebook)")
    if not cfg.lora.target_modules:
        raise ConfigError("'lora.target_modules' must name at least one module")
    if not cfg.preset:
        for key, v in {"model.base": cfg.model.base, "model.audio_tokenizer": cfg.model.audio_tokenizer,
                       "data.train_manifest": cfg.data.train_manifest}.items():
            if not v:
                raise ConfigError(f"'{key}' is required (or use --preset tiny)")
    # Whatever is set is checked, with a preset too (it fills only what is left empty).
    for key in ("data.train_manifest", "data.val_manifest"):
        path = getattr(cfg.data, key.split(".")[1])
        if path and not Path(path).exists():
            raise ConfigError(f"'{key}': file not found: {path}")
    for key in ("model.base", "model.audio_tokenizer", "eval.asr_model", "eval.speaker_model"):
        section, name = key.split(".")
        if ref := getattr(getattr(cfg, section), name):
            check_model_ref(f"'{key}'", ref)


# The generation-config keys a caller may set (None: keep the checkpoint's), as log.generate_<key> and as generate's
# flags. ras_win_len / ras_win_max_num_repeat are the repetition-aware sampling of transformers' HiggsAudioV2
# ``_sample``: a code already seen ras_win_max_num_repeat times in the last ras_win_len frames of its codebook is
# redrawn from the untempered distribution (this happens in greedy decoding too).
SAMPLING_KEYS = ("do_sample", "temperature", "top_k", "top_p", "ras_win_len", "ras_win_max_num_repeat")


def check_sampling(values: dict, name) -> None:
    """The set values (not None) of ``SAMPLING_KEYS`` in ``values`` must be in range; ``name(key)`` is the config
    key or flag a message names."""
    def bad(key: str, ok, rule: str) -> None:
        if values.get(key) is not None and not ok(values[key]):
            raise ConfigError(f"{name(key)} must {rule}, got {values[key]}")

    bad("temperature", lambda v: v > 0, "be greater than 0")
    bad("top_k", lambda v: v >= 0, "not be negative")
    bad("top_p", lambda v: 0 < v <= 1, "be in (0, 1]")
    bad("ras_win_len", lambda v: v >= 0, "not be negative")
    bad("ras_win_max_num_repeat", lambda v: v >= 1, "be at least 1")


def with_set(section, **values):
    """``section`` (a config dataclass) with the ``values`` that are set (command-line flags left out are None or
    empty) on top."""
    return dataclasses.replace(section, **{k: v for k, v in values.items() if v not in (None, "")})


def validate_for_model(cfg: RunConfig, num_codebooks: int) -> None:
    """The checks that need the model's codebook count (its config's ``num_codebooks``), once that is read."""
    if bad := [c for c in cfg.log.slice_codebooks if c >= num_codebooks]:
        raise ConfigError(f"'log.slice_codebooks' holds codebooks outside 0..{num_codebooks - 1}: {bad}")
    if cfg.log.generate_max_new_tokens < num_codebooks + 1:
        raise ConfigError(f"'log.generate_max_new_tokens' must be at least {num_codebooks + 1} (stream BOS + "
                          f"{num_codebooks} delayed codebooks)")


def _check_resume(resume: str) -> None:
    """``resume`` is ``latest`` or an existing dir (whether it is a valid checkpoint is checked when resuming)."""
    if resume and resume != "latest" and not Path(resume).is_dir():
        hint = " (did you mean 'latest'?)" if difflib.get_close_matches(resume.lower(), ["latest"], cutoff=0.6) else ""
        raise ConfigError(f"'resume': {resume} is not a checkpoint dir{hint}; pass 'latest' or "
                          "RUN_DIR/checkpoints/step-N")


# Tokens the prompt layout needs from the text tokenizer, and the model-config id each one must equal.
LAYOUT_TOKENS = {"<|AUDIO_OUT|>": "audio_token_id", "<|audio_out_bos|>": "audio_bos_token_id",
                 "<|audio_eos|>": None, "<|reserved_special_token_6|>": "audio_delay_token_id"}


def check_model_parts(sources: ModelConfig, config, tokenizer, codec_config) -> None:
    """Refuse a model stack that cannot train, with one line naming the file and field, before any step: a
    ``codebook_size`` not above the stream BOS/EOS ids (their embedding rows would not exist: an IndexError at step
    0), a special token the text tokenizer lacks or that the model config numbers differently, and a codec whose
    codebook count is not the model's. ``sources``: the resolved dirs (``loading.resolve_checkpoints``)."""
    model_file = f"'model.base': {Path(sources.base) / 'config.json'}"
    top = max(config.audio_stream_bos_id, config.audio_stream_eos_id)
    if config.codebook_size <= top:
        raise ConfigError(f"{model_file}: codebook_size {config.codebook_size} must be above the stream BOS/EOS ids "
                          f"(audio_stream_bos_id {config.audio_stream_bos_id}, audio_stream_eos_id "
                          f"{config.audio_stream_eos_id}): at least {top + 1} (released checkpoints: the codec's "
                          "codes + 2)")
    vocab = tokenizer.get_vocab()
    tokenizer_name = f"'model.text_tokenizer': {sources.text_tokenizer or sources.base}"
    for token, field_name in LAYOUT_TOKENS.items():
        if token not in vocab:
            raise ConfigError(f"{tokenizer_name}: the text tokenizer has no token {token} (the prompt layout needs it)")
        if field_name and getattr(config, field_name, None) != vocab[token]:
            raise ConfigError(f"{model_file}: {field_name} {getattr(config, field_name, None)} is not the text "
                              f"tokenizer's id of {token} ({vocab[token]})")
    for field_name in ("pad_token_id", "bos_token_id", "eos_token_id"):
        values = getattr(config, field_name, None)
        for v in values if isinstance(values, list) else [values]:
            if v is not None and not 0 <= v < len(tokenizer):
                raise ConfigError(f"{model_file}: {field_name} {v} is not a token of the text tokenizer "
                                  f"({len(tokenizer)} tokens)")
    check_codec_codebooks(sources, config.num_codebooks, codec_config)


def check_codec_codebooks(sources: ModelConfig, num_codebooks: int, codec_config) -> None:
    """The codec must have the model's codebook count (``num_codebooks`` of the model's config.json)."""
    if codec_config is not None and codec_config.num_quantizers != num_codebooks:
        codec_file = Path(sources.audio_tokenizer) / "config.json"
        raise ConfigError(f"'model.audio_tokenizer': {codec_file}: the codec has {codec_config.num_quantizers} "
                          f"codebooks (target_bandwidths {codec_config.target_bandwidths}), the model "
                          f"{num_codebooks} (num_codebooks in {Path(sources.base) / 'config.json'})")


def _check_signals(names: list[str]) -> None:
    for name in names:
        sig = getattr(signal, name, None) if name.startswith("SIG") else None
        if not isinstance(sig, signal.Signals) or sig in (signal.SIGKILL, signal.SIGSTOP):
            raise ConfigError(f"'train.stop_signals': {name!r} is not a signal that can be caught "
                              "(e.g. SIGTERM, SIGINT, SIGUSR1)")


def check_output_dir(output_dir: str) -> None:
    """The run dir, or the nearest existing dir above it, must take new files: probed with an unnamed temporary
    file, so read-only mounts, permissions and quotas all count and nothing is left behind."""
    p = Path(output_dir).expanduser().absolute()
    while not p.exists():
        p = p.parent
    if not p.is_dir():
        raise ConfigError(f"'train.output_dir': {p} is not a directory")
    try:
        with tempfile.TemporaryFile(dir=p):
            pass
    except OSError as e:
        raise ConfigError(f"'train.output_dir': cannot write in {p} ({os.strerror(e.errno) if e.errno else e})"
                          ) from None


def check_model_ref(name: str, ref: str) -> None:
    """A local path must be a dir; anything else must at least look like a hub id (owner/name). ``name`` is the
    key or flag the message names."""
    p = Path(ref).expanduser()
    looks_local = ref.startswith((".", "/", "~")) or p.exists() or ref.count("/") != 1
    if looks_local and not p.is_dir():
        raise ConfigError(f"{name}: model dir not found: {ref}")
