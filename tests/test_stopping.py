"""Stop signals against real processes, and the divergence counter."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from higgs_accel.stopping import EXIT_CODES, NonFiniteGuard, StopSignals

REPO = Path(__file__).resolve().parents[1]
# A stand-in for the loop: steps until a stop is requested, then ends as the loop would.
LOOP = """
import sys, time
from higgs_accel.stopping import EXIT_CODES, StopSignals
stop = StopSignals(["SIGTERM", "SIGINT", "SIGUSR1"])
print("ready", flush=True)
while stop.signum is None:
    time.sleep(0.01)
print(stop.status, stop.name, flush=True)
while sys.argv[1] == "ignore":  # a loop still finishing its step when the second signal comes
    time.sleep(0.01)
stop.restore()
sys.exit(EXIT_CODES[stop.status])
"""


def run_until(sig: int, mode: str = "stop", times: int = 1) -> tuple[int, str]:
    p = subprocess.Popen([sys.executable, "-c", LOOP, mode], stdout=subprocess.PIPE, text=True, cwd=REPO,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert p.stdout.readline().strip() == "ready"
        p.send_signal(sig)
        out = p.stdout.readline().strip()  # handled: the next signal is a second one, not merged with the first
        if times == 2:
            p.send_signal(sig)
        return p.wait(timeout=30), out
    finally:
        p.kill()


@pytest.mark.slow
def test_a_signal_asks_for_a_stop_with_its_own_status_and_exit_code():
    assert run_until(signal.SIGTERM) == (75, "preempted SIGTERM")
    assert run_until(signal.SIGUSR1) == (75, "preempted SIGUSR1")
    assert run_until(signal.SIGINT) == (130, "interrupted SIGINT")


@pytest.mark.slow
def test_a_second_signal_exits_at_once():
    assert run_until(signal.SIGTERM, "ignore", times=2) == (-signal.SIGTERM, "preempted SIGTERM")


def test_restore_gives_back_the_previous_handlers():
    before = signal.getsignal(signal.SIGUSR1)
    stop = StopSignals(["SIGUSR1"])
    assert signal.getsignal(signal.SIGUSR1) != before
    stop.restore()
    assert signal.getsignal(signal.SIGUSR1) == before


def test_non_finite_steps_are_counted_and_stop_only_in_a_row():
    guard = NonFiniteGuard("stop", limit=2)
    assert [guard.bad(v) for v in (1.0, math.nan, 2.0, math.inf)] == [False, True, False, True]
    assert not guard.diverged and guard.total == 2
    assert guard.bad(math.nan) and guard.diverged
    skip = NonFiniteGuard("skip", limit=1)
    assert skip.bad(math.nan) and skip.bad(1.0, math.nan) and not skip.diverged and skip.total == 2
    assert EXIT_CODES["diverged"] == 3
