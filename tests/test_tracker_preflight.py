"""A tracker that cannot start is found before anything loads: one line, not a traceback after the model."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

CHECK = """
from higgs_accel.config import ConfigError
from higgs_accel.sinks.tracker import check_trackers_start
try:
    check_trackers_start(["wandb"])
except ConfigError as e:
    print(e)
"""


def check_in(tmp_path, **env) -> str:
    """What ``check_trackers_start(["wandb"])`` says in a fresh process (wandb keeps its settings per process), with
    a HOME of its own (no netrc, no wandb settings), no terminal, and ``env`` as the only wandb variables."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    done = subprocess.run([sys.executable, "-c", CHECK], env={**clean, "HOME": str(tmp_path), **env}, cwd=tmp_path,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_wandb_without_a_login_is_refused_up_front(tmp_path):
    said = check_in(tmp_path)
    assert said.startswith("'log.log_with': wandb is not logged in") and "WANDB_MODE=offline" in said


@pytest.mark.parametrize("env", [{"WANDB_MODE": "offline"}, {"WANDB_MODE": "disabled"}, {"WANDB_API_KEY": "k" * 40}])
def test_wandb_offline_or_with_a_key_may_start(env, tmp_path):
    assert check_in(tmp_path, **env) == ""


def test_wandb_with_a_netrc_login_may_start(tmp_path):
    from urllib.parse import urlparse

    code = "from wandb.sdk import wandb_setup; print(wandb_setup.singleton().settings.base_url)"
    url = subprocess.run([sys.executable, "-c", code], env={**os.environ, "HOME": str(tmp_path)},
                         capture_output=True, text=True, timeout=120).stdout.strip()
    netrc = tmp_path / ".netrc"
    netrc.write_text(f"machine {urlparse(url).hostname}\n  login user\n  password {'p' * 40}\n")
    netrc.chmod(0o600)
    assert check_in(tmp_path) == ""


def test_a_malformed_key_is_one_line(tmp_path):
    assert check_in(tmp_path, WANDB_API_KEY="short").startswith("'log.log_with': wandb cannot log in (")



def test_train_with_wandb_and_no_login_stops_before_anything_loads(tmp_path):
    """The command a newcomer types: one line, exit 2, and no run dir (nothing was built or loaded)."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    out = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "higgs_accel", "train", "--preset", "tiny", "--output-dir", str(out),
                           "log.log_with=wandb"], env={**clean, "HOME": str(tmp_path)}, cwd=tmp_path,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.count("\n") == 1 and "wandb is not logged in" in done.stderr
    assert not out.exists()
