"""The tracker sink: numeric metrics to accelerate's trackers (tensorboard, wandb...)."""

from __future__ import annotations

from . import COMMON_FIELDS


class TrackerSink:
    """Feeds the numeric fields of train_step and eval events to ``accelerator.log`` (tensorboard, wandb...)."""

    FAMILIES = ("train_step", "eval")

    def __init__(self, accelerator):
        self.accelerator = accelerator

    def write(self, e: dict) -> None:
        if e["event"] in self.FAMILIES:
            prefix = "eval/" if e["event"] == "eval" else "train/"
            values = {prefix + k: v for k, v in e.items()
                      if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in COMMON_FIELDS | {"step"}}
            self.accelerator.log(values, step=e["step"])

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.accelerator.end_training()
