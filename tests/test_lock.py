"""The run-dir lock against real processes: a live holder refuses, a kill -9'd one is taken over."""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from higgs_accel import lock
from higgs_accel.config import ConfigError

REPO = Path(__file__).resolve().parents[1]
HOLD = ("import sys, time; from higgs_accel.lock import acquire; acquire(sys.argv[1], 'r1'); "
        "print('locked', flush=True); time.sleep(120)")


def hold(run_dir: Path) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], stdout=subprocess.PIPE, text=True, cwd=REPO,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert p.stdout.readline().strip() == "locked"
    return p


@pytest.mark.slow
def test_a_live_holder_is_named_and_a_killed_one_is_taken_over(tmp_path):
    holder = hold(tmp_path)
    try:
        with pytest.raises(ConfigError) as e:
            lock.acquire(tmp_path, "r2")
        msg = str(e.value)
        assert f"is in use by another run (host {socket.gethostname()}, pid {holder.pid}, started " in msg
        assert "\n" not in msg
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with lock.acquire(tmp_path, "r2") as mine:
        assert mine.taken_over.holder.pid == holder.pid and mine.taken_over.holder.run_id == "r1"
        assert mine.taken_over.as_event()["holder_pid"] == holder.pid
        assert json.loads((tmp_path / lock.LOCK_FILE).read_text())["run_id"] == "r2"
    # A clean release leaves nothing to take over, and the same process may lock again.
    with lock.acquire(tmp_path, "r3") as again:
        assert again.taken_over is None
        with pytest.raises(ConfigError, match="already locked by this process"):
            lock.acquire(tmp_path, "r4")


def _foreign_record(run_dir: Path, age_s: float) -> None:
    path = run_dir / lock.LOCK_FILE
    path.write_text(json.dumps({"host": "node-17", "pid": 4242, "started": "2026-11-30T01:00:00+00:00",
                                "run_id": "x"}) + "\n")
    os.utime(path, (time.time() - age_s, time.time() - age_s))


def test_another_hosts_lock_counts_until_its_heartbeat_is_stale(tmp_path):
    _foreign_record(tmp_path, age_s=10)
    with pytest.raises(ConfigError, match="host node-17, pid 4242, .*heartbeat is 10 s old, taken over after"):
        lock.acquire(tmp_path, stale_s=300)
    _foreign_record(tmp_path, age_s=400)
    with lock.acquire(tmp_path, stale_s=300) as mine:
        assert mine.taken_over.holder.host == "node-17" and mine.taken_over.heartbeat_age_s >= 399


def test_the_heartbeat_moves(tmp_path):
    with lock.acquire(tmp_path, stale_s=300, heartbeat_s=0.05):
        path = tmp_path / lock.LOCK_FILE
        os.utime(path, (0, 0))
        for _ in range(100):
            if path.stat().st_mtime > 0:
                break
            time.sleep(0.05)
        assert path.stat().st_mtime > time.time() - 60


@pytest.mark.slow
def test_without_file_system_locks_the_pid_decides(tmp_path, monkeypatch):
    def no_locks(*_):
        raise OSError(errno.ENOLCK, "No locks available")

    holder = hold(tmp_path)
    try:
        monkeypatch.setattr(lock.fcntl, "lockf", no_locks)
        with pytest.raises(ConfigError, match=f"pid {holder.pid}"):
            lock.acquire(tmp_path)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    mine = lock.acquire(tmp_path)
    try:
        assert mine.taken_over.reason == f"pid {holder.pid} is gone"
    finally:
        monkeypatch.undo()
        mine.release()
