"""Why a run ends before its last step, and how it says so: stop signals (preemption, Ctrl-C) and divergence.

Both are decided at an optimizer-step boundary, the same step on every process, so a stopped run can save a
checkpoint that ``--resume latest`` continues exactly. docs/cluster.md has the operator's view.
"""

from __future__ import annotations

import math
import os
import signal
from dataclasses import dataclass
from pathlib import Path

from .run_dir import ADAPTER

# How a run ended -> the process exit status (0 and 2 are also the CLI's: finished, bad input).
EXIT_CODES = {"finished": 0, "diverged": 3, "preempted": 75, "interrupted": 130}
# 75 is EX_TEMPFAIL ("try again later"): a requeue wrapper resubmits with --resume latest on 75 only.


class StopSignals:
    """The first of ``names`` received asks the run to stop at the next optimizer step; a second exits at once
    (default action of that signal: no checkpoint, the log keeps every line written so far)."""

    def __init__(self, names: list[str]):
        self.signum: int | None = None
        self._previous = {}
        for name in names:
            sig = signal.Signals[name]
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, _frame) -> None:
        if self.signum is not None:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.signum = signum

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""

    @property
    def status(self) -> str:
        """``interrupted`` for Ctrl-C, ``preempted`` for anything a scheduler sends."""
        return "interrupted" if self.signum == signal.SIGINT else "preempted"

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


@dataclass
class NonFiniteGuard:
    """``train.on_nonfinite`` / ``train.max_nonfinite_steps``: a step whose loss or gradient norm is not finite is
    never applied; ``stop`` ends the run after ``limit`` such steps in a row, ``skip`` trains on."""

    policy: str
    limit: int
    total: int = 0
    in_a_row: int = 0
    zero_in_a_row: int = 0  # steps in a row whose gradient norm is exactly 0: finite, but nothing learns

    def bad(self, *values: float) -> bool:
        """Record one optimizer step; True when it must be skipped. The loop passes the clipped-gradient norm before
        ``optimizer.step``: a non-finite loss makes it non-finite too, and after the gradient all-reduce it is the
        same on every process, so all skip (and stop) together."""
        self.zero_in_a_row = self.zero_in_a_row + 1 if values and all(v == 0 for v in values) else 0
        if all(math.isfinite(v) for v in values):
            self.in_a_row = 0
            return False
        self.total += 1
        self.in_a_row += 1
        return True

    @property
    def diverged(self) -> bool:
        return self.policy == "stop" and self.in_a_row >= self.limit

    @property
    def stalled(self) -> bool:
        """``limit`` or more steps in a row with a gradient norm of exactly 0 (after a spike, a dead adapter)."""
        return self.zero_in_a_row >= self.limit

    def diverged_line(self, step: int, last_good: Path | None) -> str:
        kept = f"last good checkpoint {last_good.name}" if last_good else "no checkpoint was saved before"
        return (f"diverged: {self.in_a_row} non-finite steps in a row (steps {step - self.in_a_row + 1}-{step}); "
                f"{kept}; no adapter saved")


def stopped_line(signals: StopSignals, step: int, checkpoint: Path, run_dir: Path) -> str:
    """The message of a stopped run: where its work is (the checkpoint holds the step's adapter, usable as it is)
    and how to continue it."""
    return (f"stopped by {signals.name} at step {step}: checkpoint {checkpoint.name} saved, its adapter in "
            f"{checkpoint / ADAPTER}; to continue, run the same command with --resume latest, or just "
            f"`higgs-accel train --resume latest --output-dir {run_dir}`")


@dataclass
class RunEnded:
    """What ``loop.train`` returns: the run dir and how the run ended (a ``run_end`` status)."""

    run_dir: Path
    status: str

    @property
    def exit_code(self) -> int:
        return EXIT_CODES[self.status]
