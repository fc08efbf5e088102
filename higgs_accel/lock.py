"""One run per run dir: an exclusive lock on ``RUN_DIR/run.lock`` for the run's whole lifetime.

How a holder is told apart from a lock left behind (docs/cluster.md has the operator's view):

- The lock is a POSIX record lock (``fcntl.lockf``) on the file. The kernel (or the NFS lock manager) drops it when
  the holding process dies, kill -9 included. POSIX locks are per process and not inherited across ``fork``, so a
  DataLoader worker that outlives a killed trainer does not keep the dir locked.
- The file holds the holder's record (host, pid, start time, run id) as one JSON line; its modification time is a
  heartbeat, refreshed every ``heartbeat_s`` by a daemon thread. A clean release empties the record, so a record
  found under a free lock was left by a process that died holding it: that lock is *taken over* and the record is
  returned so the loop can say so in an event.
- A record from another host whose heartbeat is fresher than ``stale_s`` is always refused, even when the lock call
  succeeds: some cluster file systems keep locks per node (NFS ``local_lock``, Lustre ``localflock``), so a free lock
  proves nothing across hosts. After a node loss the dir is taken over once the heartbeat is ``stale_s`` old.
- Where the file system refuses locks altogether (ENOLCK and the like), the record decides alone: on the same host
  a holder whose pid is gone is dead, on another host a stale heartbeat is. Two starts within the same instant can
  then race; the docs say to use a file system with locks for shared run dirs.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import threading
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

from .config import ConfigError
from .run_dir import LOCK_FILE

# errnos meaning "this file system does not do locks", as opposed to "someone holds it" (EACCES / EAGAIN).
NO_LOCKS = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}
_held: dict[Path, RunLock] = {}  # POSIX locks do not exclude the process itself: guard against a second acquire


@dataclass
class Holder:
    host: str
    pid: int
    started: str  # ISO 8601, UTC
    run_id: str = ""

    def describe(self) -> str:
        return f"host {self.host}, pid {self.pid}, started {self.started}"


@dataclass
class TakenOver:
    """A lock left by a dead process: who held it, how its death was decided, its last heartbeat."""

    holder: Holder
    reason: str
    heartbeat_age_s: float

    def as_event(self) -> dict:
        return {**{f"holder_{k}": v for k, v in asdict(self.holder).items()}, "reason": self.reason,
                "heartbeat_age_s": round(self.heartbeat_age_s, 1)}


class RunLock:
    """Held until ``release()`` (or process death). ``taken_over`` is set when a dead holder's lock was taken."""

    def __init__(self, path: Path, fd: int, holder: Holder, taken_over: TakenOver | None, heartbeat_s: float):
        self.path, self.fd, self.holder, self.taken_over = path, fd, holder, taken_over
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, args=(heartbeat_s,), daemon=True, name="run-lock")
        self._thread.start()

    def _beat(self, every: float) -> None:
        while not self._stop.wait(every):
            try:
                os.utime(self.fd)
            except OSError:  # a heartbeat that cannot be written only makes the lock look stale sooner
                pass

    def release(self) -> None:
        if self.fd < 0:
            return
        self._stop.set()
        self._thread.join()
        os.ftruncate(self.fd, 0)  # an empty record: released cleanly, nothing to take over
        fcntl.lockf(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
        self.fd = -1
        _held.pop(self.path, None)

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def acquire(run_dir: Path, run_id: str = "", stale_s: float = 300.0, heartbeat_s: float | None = None) -> RunLock:
    """Lock ``run_dir`` (created if missing) for this process, or raise ConfigError naming the live holder."""
    run_dir = Path(run_dir).absolute()
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_FILE
    if path in _held:
        raise ConfigError(f"'train.output_dir': {run_dir} is already locked by this process "
                          f"({_held[path].holder.describe()})")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        lock = _acquire(fd, path, run_dir, run_id, stale_s, heartbeat_s or max(1.0, stale_s / 10))
    except BaseException:
        os.close(fd)
        raise
    _held[path] = lock
    return lock


def _acquire(fd: int, path: Path, run_dir: Path, run_id: str, stale_s: float, heartbeat_s: float) -> RunLock:
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        locked = True
    except OSError as e:
        if e.errno not in NO_LOCKS:
            raise _in_use(run_dir, read_holder(fd)) from None
        locked = False
    previous, age, here = read_holder(fd), heartbeat_age(fd), socket.gethostname()
    taken = None
    if previous is not None:
        if previous.host != here:
            if age < stale_s:
                raise _in_use(run_dir, previous, f"; its heartbeat is {age:.0f} s old, taken over after "
                                                 f"train.lock_stale_s={stale_s:g}")
            reason = f"heartbeat {age:.0f} s old (train.lock_stale_s={stale_s:g})"
        elif locked:
            reason = "lock free: the holding process is gone"
        elif _alive(previous.pid):
            raise _in_use(run_dir, previous)
        else:
            reason = f"pid {previous.pid} is gone"
        taken = TakenOver(previous, reason, age)
    me = Holder(here, os.getpid(), datetime.now(timezone.utc).isoformat(timespec="seconds"), run_id)
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(asdict(me)) + "\n").encode(), 0)
    os.fsync(fd)
    return RunLock(path, fd, me, taken, heartbeat_s)


def read_holder(fd: int) -> Holder | None:
    """The record in the lock file; None when empty (released cleanly). A damaged record still names what it can."""
    raw = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip()
    if not raw:
        return None
    try:
        d = json.loads(raw)
        return Holder(str(d["host"]), int(d["pid"]), str(d["started"]), str(d.get("run_id", "")))
    except (ValueError, KeyError, TypeError):
        return Holder("unknown", -1, f"unknown (unreadable lock record {raw[:60]!r})")


def heartbeat_age(fd: int) -> float:
    return max(0.0, time.time() - os.fstat(fd).st_mtime)


def _alive(pid: int) -> bool:
    if pid <= 0:
        return True  # an unreadable record: assume alive, never take over blindly
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _in_use(run_dir: Path, holder: Holder | None, extra: str = "") -> ConfigError:
    who = holder.describe() if holder else "a process that has not written its record yet"
    return ConfigError(f"'train.output_dir': {run_dir} is in use by another run ({who}{extra}); wait for it to end, "
                       "stop it, or pick another --output-dir")


def acquire_for_run(accelerator, run_dir: Path, run_id: str, stale_s: float) -> RunLock | None:
    """The main process takes the lock (the others hold none: they live and die with it under one launcher); when
    it cannot, every process raises the same one-line ConfigError, so all exit 2 with the same line."""
    lock, error = None, None
    if accelerator.is_main_process:
        try:
            lock = acquire(run_dir, run_id, stale_s)
        except ConfigError as e:
            error = str(e)
        except OSError as e:  # an output dir that cannot take the lock file
            error = f"'train.output_dir': cannot lock {run_dir} ({e.strerror or e})"
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        error = broadcast_object_list([error])[0]
    if error:
        raise ConfigError(error)
    return lock
