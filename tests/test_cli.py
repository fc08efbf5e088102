"""The command line as a user meets it: help, bad input (exit 2, one line, no traceback), launches."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from higgs_accel.cli import parse_args
from higgs_accel.commands import config_overrides
from higgs_accel.config import ConfigError, all_keys, load_config, parse_override

REPO = Path(__file__).resolve().parents[1]


def cli(*args, env=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "higgs_accel", *args], capture_output=True, text=True,
                          cwd=REPO, env={**os.environ, **(env or {})}, timeout=timeout)


def test_help_documents_every_option():
    out = cli("train", "--help").stdout
    for key in all_keys():
        if "." in key:
            assert f"--{key}" in out, key
    assert "--preset" in out and "--resume" in out and "--config" in out


@pytest.mark.parametrize("args, message", [
    (["train.lrr=1"], "unknown key 'train.lrr' (did you mean 'train.lr'?)"),
    (["train.batch_size=two"], "'train.batch_size' must be an integer"),
    (["--train.scheduler", "cosin"], "'train.scheduler' must be one of"),
    (["lora.r=0"], "'lora.r' must be at least 1"),
    (["--config", "nope.yaml"], "config file not found: nope.yaml"),
    (["--train.lrr", "1"], "unknown key '--train.lrr' (did you mean '--train.lr'?)"),
    (["--bogus"], "unrecognized arguments: --bogus"),
    (["--preset", "huge"], "argument --preset: invalid choice: 'huge'"),
])
def test_bad_values_exit_2_with_one_line(args, message, tmp_path):
    r = cli("train", "--preset", "tiny", "--output-dir", str(tmp_path / "run"), *args)
    assert r.returncode == 2
    assert message in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "run" / "events.jsonl").exists()


def test_missing_model_dir_and_manifest_are_named(tmp_path, tiny):
    manifest = tiny["data.train_manifest"]
    r = cli("train", f"model.base={tmp_path}/missing", f"model.audio_tokenizer={tiny['model.audio_tokenizer']}",
            f"data.train_manifest={manifest}", "--output-dir", str(tmp_path / "run"))
    assert r.returncode == 2 and f"'model.base': model dir not found: {tmp_path}/missing" in r.stderr
    r = cli("train", f"model.base={tiny['model.base']}", f"model.audio_tokenizer={tiny['model.audio_tokenizer']}",
            "data.train_manifest=none.jsonl", "--output-dir", str(tmp_path / "run"))
    assert r.returncode == 2 and "'data.train_manifest': file not found: none.jsonl" in r.stderr
    assert "Traceback" not in r.stderr


def test_yaml_errors_name_the_file_and_key(tmp_path):
    bad = tmp_path / "run.yaml"
    bad.write_text("train:\n  lr: [1, 2]\n")
    with pytest.raises(ConfigError, match=f"{bad}: 'train.lr' must be a number"):
        load_config(str(bad), [("preset", "tiny", "cli")])
    bad.write_text("trian:\n  lr: 1\n")
    with pytest.raises(ConfigError, match="unknown section 'trian' \\(did you mean 'train'\\?\\)"):
        load_config(str(bad), [])
    bad.write_text("train: {lr: 1\n")
    with pytest.raises(ConfigError, match=f"{bad}:\\d+: not valid YAML"):
        load_config(str(bad), [])


def test_yaml_then_overrides_then_flags(tmp_path):
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text("preset: tiny\ntrain:\n  lr: 0.1\n  batch_size: 2\nlora:\n  target_modules: [q_proj]\n")
    args = parse_args(["train", "--config", str(cfg_file), "train.lr=0.2", "--train.batch_size", "3",
                       "lora.target_modules=q_proj,v_proj"])
    cfg = load_config(args.config, config_overrides(args))
    assert cfg.train.lr == 0.2 and cfg.train.batch_size == 3 and cfg.lora.target_modules == ["q_proj", "v_proj"]


def launch_two(*args: str) -> None:
    """``accelerate launch`` of ``higgs-accel train --preset tiny ARGS`` on 2 CPU processes (gloo)."""
    r = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                        "--num_machines", "1", "-m", "higgs_accel", "train", "--preset", "tiny", *args],
                       capture_output=True, text=True, cwd=REPO, env={**os.environ, "ACCELERATE_USE_CPU": "1"},
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]


@pytest.mark.slow
def test_tiny_preset_end_to_end_with_two_processes(tmp_path):
    """`accelerate launch` with 2 CPU processes (gloo): one writer, world size 2, metrics over both; a resume from
    the step-2 checkpoint (across an epoch boundary: 2 steps an epoch) repeats steps 3 and 4 exactly."""
    run_dir = tmp_path / "run"
    launch_two("--output-dir", str(run_dir), "train.max_steps=4", "train.eval_every=2", "train.save_every=2")
    events = [json.loads(x) for x in (run_dir / "events.jsonl").read_text().splitlines()]
    assert [e["world_size"] for e in events if e["event"] == "run_start"] == [2]
    steps = [e for e in events if e["event"] == "train_step"]
    assert [e["step"] for e in steps] == [1, 2, 3, 4]
    assert all(e["samples"] == 8 for e in steps)  # 4 per process, summed over both
    val = [e for e in events if e["event"] == "run_start"][0]["val_samples"]
    assert [e["samples"] for e in events if e["event"] == "eval"] == [val, val]  # each val sample counted once
    assert {e["rank"] for e in events} == {0}
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-00000002", "step-00000004"]
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    assert (run_dir / "report").is_dir()
    resumed = tmp_path / "resumed"
    launch_two("--output-dir", str(resumed), "--no-report", "train.max_steps=4", "train.eval_every=2",
               "--resume", str(run_dir / "checkpoints" / "step-00000002"))
    again = [json.loads(x) for x in (resumed / "events.jsonl").read_text().splitlines()]
    assert [(e["step"], e["loss"]) for e in again if e["event"] == "train_step"] == [
        (e["step"], e["loss"]) for e in steps[2:]]


@pytest.mark.slow
def test_config_file_trap_is_refused(tmp_path):
    """A MULTI_GPU config run without GPUs would start lone processes: refuse it with a clear line."""
    r = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                        str(REPO / "accelerate_config.yaml"), "--num_processes", "2", "-m", "higgs_accel", "train",
                        "--preset", "tiny", "--output-dir", str(tmp_path / "run")],
                       capture_output=True, text=True, cwd=REPO, timeout=300)
    assert r.returncode != 0
    assert "launched as 2 processes but accelerate sees 1" in r.stderr
    assert not (tmp_path / "run" / "events.jsonl").exists()


@pytest.mark.parametrize("override, message", [
    ("train.lr=.inf", "'train.lr' must be a finite number, got inf"),
    ("train.lr=.nan", "'train.lr' must be a finite number, got nan"),
    ("train.lr=0", "'train.lr' must be greater than 0"),
    ("train.weight_decay=-5", "'train.weight_decay' must not be negative, got -5.0"),
    ("lora.dropout=2", "'lora.dropout' must be in [0, 1), got 2.0"),
    ("lora.dropout=1", "'lora.dropout' must be in [0, 1), got 1.0"),
    ("data.min_seconds=5", "'data.min_seconds' (5.0) must not be above 'data.max_seconds' (1.0)"),
    ("train.max_nonfinite_steps=0", "'train.max_nonfinite_steps' must be at least 1"),
    ("train.stop_signals=SIGTERM,SIGKILL", "'train.stop_signals': 'SIGKILL' is not a signal that can be caught"),
    ("train.stop_signals=TERM", "'train.stop_signals': 'TERM' is not a signal"),
    ("train.on_nonfinite=ignore", "'train.on_nonfinite' must be one of 'stop', 'skip'"),
    ("train.lerning_rate=1", "unknown key 'train.lerning_rate' (did you mean 'train.lr'?)"),
    ("train.learning_rate=1", "(did you mean 'train.lr'?)"),
    ("lora.lr=1", "(did you mean 'train.lr'?)"),
    ("train.gradient_accumulation_steps=2", "(did you mean 'train.grad_accum'?)"),
])
def test_out_of_range_values_and_typos_fail_before_anything_loads(override, message):
    pairs = [("preset", "tiny", "test"), ("data.max_seconds", 1.0, "test")]
    with pytest.raises(ConfigError) as e:
        load_config(None, [*pairs, (*parse_override(override), "command line")])
    assert message in str(e.value) and "\n" not in str(e.value)
    if "did you mean" in message:
        assert "overwrite" not in str(e.value)


def test_non_utf8_yaml_names_file_and_line(tmp_path):
    bad = tmp_path / "run.yaml"
    bad.write_bytes(b"train:\n  lr: 0.1\n  output_dir: caf\xe9\n")
    r = cli("train", "--config", str(bad))
    assert r.returncode == 2 and f"{bad}:3: not UTF-8 text (byte 0xe9)" in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_unwritable_output_dir_is_refused_before_loading(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match=f"'train.output_dir': {tmp_path}/file is not a directory"):
        load_config(None, [("preset", "tiny", "t"), ("train.output_dir", str(tmp_path / "file" / "run"), "t")])
    # /proc takes no new files even for root, like a read-only mount.
    with pytest.raises(ConfigError, match="'train.output_dir': cannot write in /proc"):
        load_config(None, [("preset", "tiny", "t"), ("train.output_dir", "/proc/higgs-run", "t")])
    if os.geteuid() != 0:  # root writes through permission bits
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        with pytest.raises(ConfigError, match="cannot write in"):
            load_config(None, [("preset", "tiny", "t"), ("train.output_dir", str(ro / "run"), "t")])


def run_main(capsys, *argv) -> tuple[int, str, str]:
    """``higgs-accel ARGV`` in this process: (exit status, stdout, stderr)."""
    from higgs_accel.cli import main

    try:
        code = main(list(argv))
    except SystemExit as e:  # argparse's --help, --version and usage errors
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("argv", [["report", "--help"], ["diff", "--help"]])
def test_report_and_diff_help_are_the_analysis_options(argv, capsys):
    code, out, _ = run_main(capsys, *argv)
    assert code == 0 and f"usage: higgs-accel {argv[0]}" in out and "--audio-mb" in out
    assert ("--fail-if-worse" in out) == (argv[0] == "diff")


def test_version_is_the_installed_distributions(capsys):
    from importlib.metadata import version

    code, out, _ = run_main(capsys, "--version")
    assert code == 0 and out.strip() == f"higgs-accel {version('higgs-accel')}"


@pytest.mark.parametrize("argv, message", [
    (["logs", "rebuild", "{missing}"], "RUN_DIR: no such dir: {missing}"),
    (["logs", "rebuild", "{empty}"], "RUN_DIR: {empty} is not a run dir (no events.jsonl)"),
    (["report", "{empty}"], "RUN_DIR: {empty} is not a run dir (no events.jsonl)"),
    (["diff", "{empty}", "{missing}"], "RUN_A: {empty} is not a run dir (no events.jsonl)"),
])
def test_a_dir_without_an_event_log_is_one_line_and_nothing_is_written(argv, message, tmp_path, capsys):
    paths = {"missing": str(tmp_path / "nope"), "empty": str(tmp_path / "empty")}
    (tmp_path / "empty").mkdir()
    code, out, err = run_main(capsys, *(a.format(**paths) for a in argv))
    assert code == 2 and out == "" and err == f"higgs-accel: error: {message.format(**paths)}\n"
    assert list((tmp_path / "empty").iterdir()) == []  # no events/, no report/
