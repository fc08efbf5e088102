"""The subcommands of ``higgs-accel``, one module each. A module holds the command's argparse and a ``run(args)``
that calls the library and says what happened on stderr:

    add_parser(subparsers) -> argparse.ArgumentParser   adds the subcommand, with set_defaults(func=run)
    run(args) -> int                                      the exit status
    QUIET_LIBRARIES = True                                (optional) a one-shot command whose output is its result:
                                                          loading bars and library notices are silenced

Below: what several commands share on the command line (the config-key options of train and prepare, the output
dir and device flags).
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from ..config import SECTIONS, TINY_PRESETS, ConfigError, all_keys, parse_override, type_name

CONFIG_EPILOG = """\
Values apply in this order: --config YAML, then key=value overrides, then --section.key flags.
Examples:
  higgs-accel train --preset tiny --output-dir runs/demo
  higgs-accel train --config run.yaml train.lr=1e-4 lora.r=32
  accelerate launch --config_file accelerate_config.yaml -m higgs_accel train --config run.yaml
  torchrun --nproc_per_node 8 -m higgs_accel train --config run.yaml   (engines: docs/distributed.md)
"""

# The original Higgs Audio trainer's flags, so its command lines (`torchrun ... trainer.py --train_manifest ...`)
# keep working; each sets the matching config key.
ORIGINAL_FLAGS = {"--train_manifest": "data.train_manifest", "--output_dir": "train.output_dir",
                  "--log_steps": "log.log_steps"}


def add_config_parser(subparsers, name: str, help: str) -> argparse.ArgumentParser:
    """A subcommand that takes a run config (train, prepare): --config, key=value overrides, and every config key
    as a --section.key option."""
    p = subparsers.add_parser(name, help=help, epilog=CONFIG_EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter,
                              description=f"{help[0].upper()}{help[1:]}. Every config key is an option.")
    p.add_argument("--config", help="YAML file with sections model, lora, data, train, log")
    p.add_argument("--preset", choices=list(TINY_PRESETS),
                   help="embedded tiny model, codec and data (no download): tiny (Higgs Audio v2), tiny-v3 "
                        "(Higgs TTS 3)")
    p.add_argument("--output-dir", help="same as --train.output_dir")
    p.add_argument("--resume", help="'latest' or a checkpoint dir")
    p.add_argument("--log-level", choices=["debug", "info", "warning"], help="same as --log.level")
    p.add_argument("--no-report", action="store_true", help="skip writing RUN_DIR/report at the end")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.lr=1e-4")
    for flag, key in ORIGINAL_FLAGS.items():
        p.add_argument(flag, dest=key, default=argparse.SUPPRESS, metavar=_metavar(key),
                       help=f"same as --{key} (the original Higgs Audio trainer's flag)")
    keys = all_keys()
    for section in SECTIONS:
        group = p.add_argument_group(f"{section} options")
        for key, (f, _) in keys.items():
            if key.startswith(section + "."):
                default = f.default_factory() if f.default is dataclasses.MISSING else f.default
                choices = f.metadata.get("choices")
                extra = f" (one of: {', '.join(map(str, choices))})" if choices else ""
                group.add_argument(f"--{key}", dest=key, default=argparse.SUPPRESS, metavar=_metavar(key),
                                   help=f"{f.metadata['doc']}{extra}; default: {default!r}")
    return p


def _metavar(key: str) -> str:
    name = type_name(key).removesuffix(" or null")
    if name.startswith("a list"):
        return "A,B,..."
    return {"true or false": "BOOL", "an integer": "INT", "a number": "FLOAT"}.get(name, "STR")


def config_overrides(args: argparse.Namespace) -> list[tuple[str, object, str]]:
    """``load_config``'s overrides from the command line of a config subcommand: key=value, then the shortcuts
    (--preset, --output-dir, ...), then --section.key flags."""
    out = []
    for text in args.overrides:
        key, value = parse_override(text)
        out.append((key, value, "command line"))
    shortcuts = {"preset": args.preset, "train.output_dir": args.output_dir, "resume": args.resume,
                 "log.level": args.log_level}
    out += [(k, v, "command line") for k, v in shortcuts.items() if v is not None]
    out += [(k, v, f"--{k}") for k, v in vars(args).items() if "." in k and k in all_keys()]
    return out


def check_out_dir(out: str, overwrite: bool) -> Path:
    """``--out``: a dir that is new, empty, or (with ``--overwrite``) written into."""
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"--out: {out} is a file")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise ConfigError(f"--out: {out} is not empty (pass --overwrite to write into it)")
    return path


def device_of(flag: str | None):
    """``--device``, else cuda if available, else cpu."""
    import torch

    return torch.device(flag or ("cuda" if torch.cuda.is_available() else "cpu"))
