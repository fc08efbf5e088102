"""``log.log_with``: a tiny run with TensorBoard and wandb (offline), read back through each tracker's own files."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from higgs_accel.config import ConfigError
from higgs_accel.sinks.tracker import SLICE_COLUMNS
from tests.conftest import events_of, make_config, of, train_run

MAX_STEPS, EVAL_EVERY, LOG_STEPS = 4, 2, 2


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory, tiny, codes_cache):
    """One short run logging to TensorBoard and to an offline wandb run under a tmp dir; its run dir, wandb dir and
    events."""
    root = tmp_path_factory.mktemp("trackers")
    run_dir, wandb_dir = root / "demo", root / "wandb-home"
    wandb_dir.mkdir()
    with pytest.MonkeyPatch.context() as mp:
        for k, v in {"WANDB_MODE": "offline", "WANDB_DIR": str(wandb_dir), "WANDB_SILENT": "true",
                     "WANDB_DISABLE_GIT": "true", "WANDB_DISABLE_CODE": "true"}.items():
            mp.setenv(k, v)
        events = train_run(run_dir, tiny, codes_cache, log__log_with="tensorboard,wandb", train__max_steps=MAX_STEPS,
                           train__eval_every=EVAL_EVERY, log__log_steps=LOG_STEPS, log__eval_audio_samples=1,
                           log__generate_every=1, log__generate_max_new_tokens=16)
    assert events[-1]["event"] == "run_end" and events[-1]["status"] == "finished"
    assert not [e for e in events if e["event"] == "log_error"]
    return run_dir, wandb_dir, events


def audio_steps(events) -> dict[str, list[int]]:
    """Expected audio tags -> the steps of their events, as the sink names them."""
    tags: dict[str, list[int]] = {}
    for e in of(events, "eval_audio"):
        for kind in ("pred", "label"):
            tags.setdefault(f"eval_audio/sample-{e['sample']}/{kind}", []).append(e["step"])
    for e in of(events, "generate_audio"):
        tags.setdefault(f"generate/prompt-{e['prompt']}", []).append(e["step"])
    return tags


def test_tensorboard_gets_scalars_audio_and_slices_at_their_steps(tracked_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, _, events = tracked_run
    # accelerate's TensorBoard tracker writes under project_dir (train.output_dir) / run name (the run dir's name).
    acc = EventAccumulator(str(run_dir / run_dir.name), size_guidance={"audio": 0, "tensors": 0, "scalars": 0})
    acc.Reload()
    tags = acc.Tags()

    loss = {s.step: s.value for s in acc.Scalars("train/loss")}
    assert loss == pytest.approx({e["step"]: e["loss"] for e in of(events, "train_step")})
    assert [s.step for s in acc.Scalars("eval/loss")] == [e["step"] for e in of(events, "eval")]

    expected = audio_steps(events)
    assert expected and set(expected) <= set(tags["audio"])
    evals = of(events, "eval_audio")
    assert [e["step"] for e in evals] == list(range(EVAL_EVERY, MAX_STEPS + 1, EVAL_EVERY))
    for tag, steps in expected.items():
        heard = acc.Audio(tag)
        assert [a.step for a in heard] == steps
        # The panel plays the very file the event names (16-bit PCM in both).
        e = evals[-1]
        if tag.startswith("eval_audio"):
            wav, rate = sf.read(e[f"{tag.rsplit('/', 1)[1]}_path"], dtype="int16")
            played, played_rate = sf.read(io.BytesIO(heard[-1].encoded_audio_string), dtype="int16")
            assert played_rate == rate == heard[-1].sample_rate
            assert np.abs(played.astype(int) - wav.astype(int)).max() <= 1

    # Slices: one markdown table per (phase, step), one row per pred_slice event, at that step.
    texts = {tag: {t.step: t.tensor_proto.string_val[0].decode() for t in acc.Tensors(tag)}
             for tag in tags["tensors"] if tag.startswith("slices/")}
    slices = of(events, "pred_slice")
    for phase in ("train", "eval"):
        mine = [e for e in slices if e["phase"] == phase]
        table = texts[f"slices/{phase}/text_summary"]
        assert sorted(table) == sorted({e["step"] for e in mine})
        step = mine[-1]["step"]
        at_step = [e for e in mine if e["step"] == step]
        rows = table[step].splitlines()[2:]
        assert len(rows) == len(at_step)
        for row, e in zip(rows, at_step):
            what = "text" if e["modality"] == "text" else f"codebook {e['codebook']}"
            assert row.startswith(f"| {e['sample']} | {e['sample_key']} | {what} | {e['n_match']}/{e['n_targets']} |")
            # Audio rows: each code shown, a wrong one next to its label.
            if e["modality"] == "audio":
                shown = [str(p) if p == lab else f"{p}≠{lab}" for p, lab in zip(e["last_pred"], e["last_label"])]
                assert row.endswith(f"| {' '.join(shown)} |")


def _media(run_files: Path, kind: str) -> dict[str, list[int]]:
    """wandb's offline media files, ``media/<kind>/<key>_<step>_<digest>.<ext>``: key -> steps."""
    found: dict[str, list[int]] = {}
    root = run_files / "media" / kind
    for p in sorted(root.rglob("*.*")):
        m = re.fullmatch(r"(.+)_(\d+)_[0-9a-f]+(\..+)", str(p.relative_to(root)))
        found.setdefault(m.group(1), []).append(int(m.group(2)))
    return {k: sorted(v) for k, v in found.items()}


def test_wandb_offline_gets_audio_and_slice_tables_at_their_steps(tracked_run):
    run_dir, wandb_dir, events = tracked_run
    [run_files] = list(wandb_dir.glob("wandb/offline-run-*/files"))
    assert _media(run_files, "audio") == audio_steps(events)
    slices = of(events, "pred_slice")
    assert _media(run_files, "table") == {f"slices/{phase}": sorted({e["step"] for e in slices if e["phase"] == phase})
                                          for phase in ("train", "eval")}
    last_eval = max(e["step"] for e in slices if e["phase"] == "eval")
    [table_file] = (run_files / "media" / "table" / "slices").glob(f"eval_{last_eval}_*.table.json")
    table = json.loads(table_file.read_text())
    assert table["columns"] == list(SLICE_COLUMNS)
    assert len(table["data"]) == sum(e["phase"] == "eval" and e["step"] == last_eval for e in slices)


def test_an_unknown_or_missing_tracker_is_a_config_error_before_anything_loads(tmp_path, tiny, codes_cache,
                                                                               monkeypatch):
    import accelerate.utils.imports

    with pytest.raises(ConfigError, match=r"^'log.log_with': unknown tracker 'tensorbord'; accelerate has .*wandb"):
        make_config(tmp_path / "r", tiny, codes_cache, log__log_with="tensorbord")
    monkeypatch.setattr(accelerate.utils.imports, "is_wandb_available", lambda: False)
    with pytest.raises(ConfigError, match=r"wandb is not installed \(pip install 'higgs-accel\[wandb\]'\)"):
        make_config(tmp_path / "r", tiny, codes_cache, log__log_with="tensorboard,wandb")


class Tracker:
    """What accelerate's ``trackers`` hold: a name and the backend object (``unwrap``ped)."""

    def __init__(self, name, tracker):
        self.name, self.tracker = name, tracker


class BrokenWriter:
    """A SummaryWriter whose disk is full."""

    def add_audio(self, *args, **kwargs):
        raise OSError("No space left on device")

    add_text = add_audio

    def flush(self):
        pass


class RecordingRun:
    def __init__(self):
        self.logged = []

    def log(self, values, step):
        self.logged.append((step, values))


class Accelerator:
    def __init__(self, trackers):
        self.trackers, self.logged = trackers, []

    def log(self, values, step):
        self.logged.append((step, values))

    def end_training(self):
        pass


def test_a_failing_media_tracker_is_reported_once_and_the_others_still_get_everything(tmp_path):
    import wandb

    from higgs_accel.events import EventLog
    from higgs_accel.sinks import TrackerSink

    wav = tmp_path / "gen-0.wav"
    sf.write(wav, np.zeros(800, dtype=np.float32), 16000)
    run = RecordingRun()
    acc = Accelerator([Tracker("tensorboard", BrokenWriter()), Tracker("wandb", run)])
    log = EventLog(tmp_path, "r1", sinks=[TrackerSink(acc)])
    slice_fields = dict(modality="audio", sample=0, sample_key="ab", codebook=0, n_match=1, n_targets=2,
                        first_pred=[1, 2], first_label=[1, 3], last_pred=[2], last_label=[3])
    for step in (1, 2):
        log.bind(step=step)
        log.emit("pred_slice", **slice_fields)
        log.emit("train_step", loss=1.0)
        log.emit("generate_audio", prompt=0, text="hi", path=str(wav), error=None)
    log.close()
    errors = [(e["sink"], e["error_type"]) for e in of(events_of(tmp_path), "log_error")]
    assert errors == [("TrackerSink", "OSError")]
    assert [step for step, _ in acc.logged] == [1, 2]
    assert [(step, sorted(v)) for step, v in run.logged] == [(1, ["slices/train"]), (1, ["generate/prompt-0"]),
                                                            (2, ["slices/train"]), (2, ["generate/prompt-0"])]
    table, audio = run.logged[2][1]["slices/train"], run.logged[3][1]["generate/prompt-0"]
    assert isinstance(table, wandb.Table) and table.data == [["0", "ab", "codebook 0", "1/2", "1 2≠3", "2≠3"]]
    assert isinstance(audio, wandb.Audio) and audio._caption == "step 2: hi"
