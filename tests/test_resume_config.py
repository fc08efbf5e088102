"""A resume continues the run it resumes (issue 27.1), the lr a step logs is the one its update used (27.5), a stop
in the last step finishes (23.5), a resumed run's time is every start's (23.6), impossible model configs are refused
before training (23.4), and the smaller points of 27.11."""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import pytest
import torch

from analysis.report import summary
from analysis.run import load_run
from higgs_accel import checkpoint as ckpt
from higgs_accel.lock import LOCK_FILE
from higgs_accel.loop import lr_factor
from tests.conftest import events_of, of
from tests.test_run_control import assert_documented, cli_train, on_training_forward, once

# Not the tiny preset's lr (5e-3) nor its max_steps (100): a resume that forgot them would show.
RUN = ("train.max_steps=6", "train.lr=1e-3", "train.save_every=2", "train.eval_every=0", "log.eval_audio_samples=0")


def sigterm_at(monkeypatch, forward: int) -> None:
    on_training_forward(monkeypatch, forward, once(lambda _: os.kill(os.getpid(), signal.SIGTERM)))


@pytest.fixture(scope="module")
def stopped(tmp_path_factory, tiny, codes_cache):
    """A run of 6 steps stopped by SIGTERM in step 3 (exit 75), its dir copied for each test that resumes it."""
    run_dir = tmp_path_factory.mktemp("stopped") / "run"
    mp = pytest.MonkeyPatch()
    sigterm_at(mp, 3)
    try:
        assert cli_train(run_dir, tiny, codes_cache, *RUN) == 75
    finally:
        mp.undo()
    return run_dir


def copy_of(stopped: Path, tmp_path: Path) -> Path:
    run_dir = tmp_path / "run"
    shutil.copytree(stopped, run_dir)
    return run_dir


def test_a_stop_leaves_the_steps_adapter_and_says_how_to_continue(stopped):
    end = of(events_of(stopped), "run_end")[-1]
    assert end["status"] == "preempted" and end["step"] == 3
    assert "run the same command with --resume latest, or just `higgs-accel train --resume latest --output-dir " \
        f"{stopped}`" in end["message"]
    adapter = ckpt.checkpoint_dir(stopped, 3) / ckpt.ADAPTER
    assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()
    assert not (stopped / ckpt.ADAPTER).exists()


def test_resume_without_overrides_continues_with_the_saved_settings(stopped, tmp_path, tiny, codes_cache, capsys):
    run_dir = copy_of(stopped, tmp_path)
    capsys.readouterr()
    # What the stop message says: no --config, no overrides but the tiny assets' paths (the same as saved).
    assert cli_train(run_dir, tiny, codes_cache, "--resume", "latest") == 0
    assert "resume:" not in capsys.readouterr().out  # nothing changed
    events = events_of(run_dir)
    [resume] = of(events, "run_resume")
    assert resume["changed"] == {} and resume["from_step"] == 3
    assert_documented(resume)
    start = of(events, "run_start")[-1]
    assert start["config"]["train"]["lr"] == 1e-3 and start["total_steps"] == 6
    assert [e["step"] for e in of(events, "train_step")] == [1, 2, 3, 4, 5, 6]
    end = of(events, "run_end")[-1]
    assert end["status"] == "finished" and end["step"] == 6 and (run_dir / ckpt.ADAPTER).is_dir()
    # the run's time is every start's: the stopped one and this one
    first = of(events, "run_end")[0]
    assert end["start_elapsed_s"] == [first["elapsed_s"], end["elapsed_s"]]
    assert end["total_elapsed_s"] == pytest.approx(first["elapsed_s"] + end["elapsed_s"])
    assert_documented(end)
    run = load_run(run_dir)
    line = summary(run, [])[0]
    assert f"in {end['total_elapsed_s']:.1f} s over 2 starts ({first['elapsed_s']:.1f} s + " in line, line


def test_an_override_with_resume_is_printed_and_recorded(stopped, tmp_path, tiny, codes_cache, capsys):
    run_dir = copy_of(stopped, tmp_path)
    capsys.readouterr()
    assert cli_train(run_dir, tiny, codes_cache, "--resume", "latest", "train.lr=5e-4") == 0
    out = capsys.readouterr().out
    assert [line for line in out.splitlines() if line.startswith("resume:")] == [
        "resume: train.lr changed from 0.001 to 0.0005"]
    events = events_of(run_dir)
    assert of(events, "run_resume")[0]["changed"] == {"train.lr": [1e-3, 5e-4]}
    assert of(events, "run_start")[-1]["config"]["train"]["lr"] == 5e-4
    assert of(events, "run_end")[-1]["status"] == "finished"


def test_a_key_that_breaks_exactness_is_refused_unless_allowed(stopped, tmp_path, tiny, codes_cache, capsys):
    run_dir = copy_of(stopped, tmp_path)
    before = (run_dir / "events.jsonl").read_text()
    capsys.readouterr()
    assert cli_train(run_dir, tiny, codes_cache, "--resume", "latest", "train.batch_size=2") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "'train.batch_size': --resume cannot change it (4 in " in err
    assert "train.allow_config_change=true" in err
    assert (run_dir / "events.jsonl").read_text() == before  # refused before anything was written
    assert cli_train(run_dir, tiny, codes_cache, "--resume", "latest", "train.batch_size=2",
                     "train.allow_config_change=true") == 0
    changed = of(events_of(run_dir), "run_resume")[0]["changed"]
    assert changed == {"train.batch_size": [4, 2], "train.allow_config_change": [False, True]}


def test_resume_typos_and_an_unused_dir_are_one_line_and_leave_nothing(tmp_path, tiny, codes_cache, capsys):
    run_dir = tmp_path / "fresh"
    assert cli_train(run_dir, tiny, codes_cache, "--resume", "lastest") == 2
    assert "(did you mean 'latest'?)" in capsys.readouterr().err
    assert cli_train(run_dir, tiny, codes_cache, "--resume", "latest") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"nothing to resume in {run_dir}" in err
    assert not (run_dir / LOCK_FILE).exists() and not run_dir.exists()


def test_the_logged_lr_is_the_one_the_update_used_and_warmup_starts_above_zero(tmp_path, monkeypatch, tiny,
                                                                              codes_cache):
    applied, moved = [], []
    step = torch.optim.AdamW.step

    def recording(self, *args, **kwargs):
        params = [p for g in self.param_groups for p in g["params"]]
        before = [p.detach().clone() for p in params]
        result = step(self, *args, **kwargs)
        applied.append(self.param_groups[0]["lr"])
        moved.append(any(not torch.equal(b, p) for b, p in zip(before, params)))
        return result

    monkeypatch.setattr(torch.optim.AdamW, "step", recording)
    run_dir = tmp_path / "run"
    assert cli_train(run_dir, tiny, codes_cache, "train.max_steps=5", "train.lr=1e-3", "train.warmup_steps=2",
                     "train.save_every=0", "train.eval_every=0", "log.eval_audio_samples=0") == 0
    logged = [e["lr"] for e in of(events_of(run_dir), "train_step")]
    assert logged == applied
    assert logged[:3] == pytest.approx([5e-4, 1e-3, 1e-3])  # warmup k/W, then the peak where the decay starts
    assert logged[0] > 0 and moved[0]  # step 1 changes the weights
    assert [lr_factor(d, "linear", 2, 5) for d in range(5)] == pytest.approx([0.5, 1.0, 1.0, 2 / 3, 1 / 3])
    assert lr_factor(0, "cosine", 0, 5) == 1.0


def test_a_stop_in_the_last_step_finishes_the_run(tmp_path, monkeypatch, tiny, codes_cache):
    run_dir = tmp_path / "run"
    sigterm_at(monkeypatch, 3)
    assert cli_train(run_dir, tiny, codes_cache, "train.max_steps=3", "train.save_every=0", "train.eval_every=0",
                     "log.eval_audio_samples=0") == 0
    end = of(events_of(run_dir), "run_end")[-1]
    assert end["status"] == "finished" and end["step"] == 3
    assert (run_dir / ckpt.ADAPTER / "adapter_model.safetensors").is_file()


def test_files_the_trainer_writes_follow_the_umask(tmp_path, tiny, codes_cache):
    old = os.umask(0o022)
    try:
        run_dir = tmp_path / "run"
        assert cli_train(run_dir, tiny, codes_cache, "train.max_steps=1", "train.save_every=1", "train.eval_every=0",
                         "log.eval_audio_samples=0") == 0
    finally:
        os.umask(old)
    written = [p for d in (run_dir / ckpt.ADAPTER, ckpt.checkpoint_dir(run_dir, 1)) for p in d.rglob("*")
               if p.is_file()]
    assert any(p.suffix == ".safetensors" for p in written)
    assert {oct(p.stat().st_mode & 0o777) for p in written} == {oct(0o644)}


# ---------------------------------------------------------------- impossible model configs


def variant(part: str, src: str, dst: Path, **changes) -> str:
    """A copy of the tiny model or codec at ``src`` rebuilt from its config with ``changes``: weights of the shapes
    that config gives, as a checkpoint made with it would hold."""
    from transformers import (
        HiggsAudioV2Config,
        HiggsAudioV2ForConditionalGeneration,
        HiggsAudioV2TokenizerConfig,
        HiggsAudioV2TokenizerModel,
    )

    shutil.copytree(src, dst)
    if part == "model.base":
        config = HiggsAudioV2Config.from_pretrained(src, **changes)
        model = HiggsAudioV2ForConditionalGeneration(config, use_text_head=True)
    else:
        config = HiggsAudioV2TokenizerConfig.from_pretrained(src, **changes)
        model = HiggsAudioV2TokenizerModel(config)
    model.save_pretrained(dst)
    assert all(json.loads((dst / "config.json").read_text())[k] == v for k, v in changes.items())
    return str(dst)


@pytest.mark.parametrize("part, changes, message", [
    ("model.base", {"codebook_size": 1024},
     "codebook_size 1024 must be above the stream BOS/EOS ids (audio_stream_bos_id 1024, audio_stream_eos_id 1025)"),
    ("model.base", {"audio_delay_token_id": 99999},
     "audio_delay_token_id 99999 is not the text tokenizer's id of <|reserved_special_token_6|>"),
    ("model.audio_tokenizer", {"target_bandwidths": [0.5, 1.0]}, "the codec has 4 codebooks"),
])
def test_an_impossible_model_config_is_refused_before_training(tmp_path, tiny, codes_cache, capsys, monkeypatch, part,
                                                               changes, message):
    """... and before the model's weights load (the long part at the released size)."""
    from higgs_accel import loading

    path = variant(part, tiny[part], tmp_path / "variant", **changes)
    monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("the weights loaded before the check"))
    run_dir = tmp_path / "run"
    assert cli_train(run_dir, {**tiny, part: path}, codes_cache, "train.max_steps=1") == 2
    err = capsys.readouterr().err
    line = f"higgs-accel: error: '{part}': {Path(path) / 'config.json'}: {message}"
    assert [x for x in err.splitlines() if "error" in x.lower()] == [x for x in err.splitlines() if x.startswith(line)]
    assert err.count(line) == 1
    end = of(events_of(run_dir), "run_end")[-1]
    assert end["status"] == "failed" and not of(events_of(run_dir), "train_step")


def test_an_error_after_the_start_is_printed_once_with_its_real_time(tmp_path, tiny, codes_cache, capsys):
    """data.strict's list of problems: once (the command's line), not again in the console's run_end line; the
    failed start's run_end counts its time from the launch."""
    manifest = tmp_path / "train.jsonl"
    source = Path(tiny["data.train_manifest"])
    lines = source.read_text().splitlines()
    lines = [json.dumps({**json.loads(x), "audio": str(source.parent / json.loads(x)["audio"])}) for x in lines]
    manifest.write_text("\n".join([*lines, json.dumps({"audio": "missing.wav", "text": "Gone."})]) + "\n")
    run_dir = tmp_path / "run"
    capsys.readouterr()
    assert cli_train(run_dir, {**tiny, "data.train_manifest": str(manifest)}, codes_cache, "data.strict=true",
                     "train.max_steps=1") == 2
    captured = capsys.readouterr()
    printed = captured.out + captured.err
    assert printed.count("missing.wav") == 1 and "higgs-accel: error: 'data.strict': 1 bad sample(s):" in printed
    end = of(events_of(run_dir), "run_end")[-1]
    assert end["status"] == "failed" and "missing.wav" in end["error"] and end["elapsed_s"] > 0
    assert end["start_elapsed_s"] == [end["elapsed_s"]]


def test_no_validation_data_is_said_in_run_start_and_on_the_console(tmp_path, tiny, codes_cache, capsys):
    run_dir = tmp_path / "run"
    capsys.readouterr()
    assert cli_train(run_dir, {**tiny, "data.val_manifest": ""}, codes_cache, "train.max_steps=1",
                     "data.val_fraction=0") == 0
    start = of(events_of(run_dir), "run_start")[0]
    note = start["eval_note"]
    assert "no validation data" in note and "data.val_fraction=0.05" in note
    assert not of(events_of(run_dir), "eval")
    assert capsys.readouterr().err.count("no validation data") == 1  # said once, as a warning
    # the codec the trainer moves to the device is in the memory plan (the tiny one: a few MB in fp32)
    assert 0 < start["memory"]["codec_gib"] < 0.01
