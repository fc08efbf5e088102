"""``higgs-accel prepare``: encode the training and validation audio into the codes cache before training, in
parallel across the processes of ``accelerate launch``; one summary line per split."""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

from ..config import TINY_PRESETS, load_config
from . import add_config_parser, config_overrides

# Its output is the summary lines; training captures the same library notices as events.
QUIET_LIBRARIES = True


def add_parser(subparsers):
    p = add_config_parser(subparsers, "prepare",
                          "encode all audio into the codes cache before training (same options as train)")
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    from accelerate import PartialState

    from ..codes import prepare_data
    from ..loading import load_stack
    from ..run_dir import TINY_DIR
    from ..sinks.console import summary_line
    from ..tiny import apply_tiny_preset

    cfg = load_config(args.config, config_overrides(args))
    state = PartialState()
    if cfg.preset in TINY_PRESETS:
        with state.main_process_first():
            apply_tiny_preset(cfg, Path(cfg.train.output_dir) / TINY_DIR)
    stack = load_stack(cfg.model, weights=False, pad_required=True, state=state)
    data = prepare_data(cfg, state, stack.codec, stack.tokenizer, stack.ids,
                        stack.config.max_position_embeddings)
    if state.is_main_process:
        for skip in [] if cfg.data.strict else data.train_skips + data.val_skips:  # strict: the error lists them
            print(f"skip {skip}", file=sys.stderr)
        for split, kept, skips in (("train", data.train, data.train_skips), ("val", data.val, data.val_skips)):
            if split == "train" or kept or skips:
                print(summary_line(split, len(kept), Counter(s.reason for s in skips), data.duplicates[split]),
                      file=sys.stderr)
        e = data.encoding
        if e.batch_exact is False:
            print("batched encoding stopped: on this device a batch did not give exactly what encoding a file alone "
                  "gives; from then on this process encoded files one at a time", file=sys.stderr)
        speed = f", {e.speed:.1f}x real time" if e.speed else ""
        print(f"codes cache: {data.cache.dir} ({data.encoded} encoded by this process now{speed})", file=sys.stderr)
    data.check_strict(cfg.data.strict)
    return 0
