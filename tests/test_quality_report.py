"""Scored generations in reports and diffs: WER and similarity over steps with the baseline at step 0, the worst
utterances of the last round, and the quality.* gates of ``analysis diff --fail-if-worse``; synthetic event logs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

import analysis
from analysis.__main__ import main
from analysis.quality import worst
from analysis.report import write_report
from tests.test_report_shapes import Log, metrics

PROMPTS = ("The quick brown fox.", "Seven bright stars.", "Small birds sing.")


def quality_rounds(step: int, wer: float, similarity: float) -> list[tuple[str, dict]]:
    """One scored round: prompt p has WER ``wer * (p + 1) / 2`` and similarity ``similarity - p / 10``, except that
    prompt 2 has no audio (an error, WER 1, no similarity)."""
    rows = []
    for p, text in enumerate(PROMPTS):
        audio = p != 2
        path = f"samples/step-{step:08d}/gen-{p}.wav" if audio else None
        rows.append(("quality", dict(prompt=p, text=text, path=path,
                                     transcript=f"heard {p}" if audio else "", wer=wer * (p + 1) / 2 if audio else 1.0,
                                     cer=wer / 2 if audio else 1.0,
                                     similarity=similarity - p / 10 if audio else None,
                                     seconds=0.5 if audio else 0.0, rtf=2.0 if audio else None,
                                     error=None if audio else "no audio")))
    rows.append(("quality_summary", dict(utterances=3, no_audio=1, wer=wer, cer=wer / 2, similarity=similarity,
                                         rtf=2.0, asr_model="asr-dir", speaker_model="spk-dir", reference=None,
                                         score_s=0.1)))
    return rows


def quality_run(path: Path, rounds: dict[int, tuple[float, float]], baseline: tuple[float, float] | None = None,
                steps: int = 6) -> Path:
    """A finished run of ``steps`` steps with evals at 3 and 6 and scored rounds at the steps of ``rounds``
    (step -> (wer, similarity)), the base model's round at step 0 when ``baseline`` is given; WAV files for
    every generated utterance."""
    log = Log(path)
    log.add("run_start", 0, config={"train": {"max_steps": steps, "output_dir": str(path)}}, run_dir=str(path),
            total_steps=steps, steps_per_epoch=steps, world_size=1)
    scored = ([(0, baseline, True)] if baseline else []) + [(s, v, False) for s, v in rounds.items()]
    for step in range(0, steps + 1):
        if step:
            log.add("train_step", step, **metrics(step))
        if step in (3, 6):
            log.add("eval", step, "eval", **metrics(step))
        for at, (wer, sim), base in scored:
            if at == step:
                for name, fields in quality_rounds(step, wer, sim):
                    log.add(name, step, "eval", baseline=base, **fields)
    log.add("run_end", steps, status="finished", error=None, elapsed_s=1.0, total_steps=steps,
            completed_steps=steps)
    log.write()
    for at, _, _ in scored:
        folder = path / "samples" / f"step-{at:08d}"
        folder.mkdir(parents=True, exist_ok=True)
        for p in range(2):
            sf.write(folder / f"gen-{p}.wav", 0.1 * np.sin(np.arange(12000) / (5 + p)), 24000)
    return path


def md_rows(md: str, header: str) -> list[list[str]]:
    table = md.split(header, 1)[1].split("\n\n", 1)[0]
    return [[c.strip() for c in line.strip("|").split("|")] for line in table.splitlines()[2:]]


@pytest.mark.parametrize("rounds,baseline", [({}, (0.9, 0.2)), ({6: (0.3, 0.7)}, None),
                                             ({2: (0.6, 0.5), 4: (0.4, 0.6), 6: (0.3, 0.7)}, (0.9, 0.2))])
def test_report_plots_and_lists_scored_rounds_of_any_count(tmp_path, rounds, baseline):
    run_dir = quality_run(tmp_path / "run", rounds, baseline)
    run = analysis.load_run(run_dir)
    curve = run.quality_curve()
    expected = ([0] if baseline else []) + list(rounds)
    assert curve.index.tolist() == expected
    assert curve["baseline"].tolist() == [True] * bool(baseline) + [False] * len(rounds)
    assert run.metrics("quality").index.tolist() == list(rounds)  # the gates' rows: no baseline
    md, page = (p.read_text() for p in write_report(run_dir))
    assert (tmp_path / "run" / "report" / "quality.png").is_file()
    assert md.count("quality.png") == 1
    table = md_rows(md, "| step | model | WER | CER | similarity |")
    assert [int(r[0]) for r in table] == expected
    want = ([(baseline, "base")] if baseline else []) + [(v, "fine-tuned") for v in rounds.values()]
    assert [(r[1], float(r[2]), float(r[4])) for r in table] == [(m, w, s) for (w, s), m in want]
    first, last = want[0][0], want[-1][0]
    summary = md.split("\n## ", 1)[0]
    if len(want) > 1:
        assert f"WER of generations {first[0]:.4g} at step {expected[0]} → {last[0]:.4g} at step {expected[-1]}" \
            in summary
    # the worst utterances: the last fine-tuned round (else the baseline's), highest WER first
    which = f"the last round (step {expected[-1]})" if rounds else "the base model's round"
    assert f"### Worst utterances of {which}" in md
    worst_rows = md_rows(md, "| prompt | generated | mel | text asked for | transcript | WER | CER | similarity |")
    assert [r[0] for r in worst_rows] == ["2", "1", "0"]  # no audio (WER 1), then the round's WER, then half of it
    assert worst_rows[0][1] == "no audio" and worst_rows[1][1] == "[gen-1.wav](../samples/" \
        f"step-{expected[-1]:08d}/gen-1.wav)"
    assert [r[3] for r in worst_rows] == [PROMPTS[2], PROMPTS[1], PROMPTS[0]]
    assert [r[4] for r in worst_rows] == ["(nothing)", "heard 1", "heard 0"]
    assert page.count('alt="mel spectrogram"') == 2 and page.count("<audio") == 2  # the two with audio


def test_a_run_without_quality_events_has_no_quality_section(tmp_path):
    run_dir = quality_run(tmp_path / "run", {})
    md = write_report(run_dir)[0].read_text()
    assert "Speech quality" not in md and "quality.png" not in md and "WER" not in md
    assert analysis.load_run(run_dir).quality_round() == (None, False, [])


def test_worst_orders_by_wer_then_by_similarity_missing_values_last():
    rows = [dict(prompt=0, wer=0.5, similarity=0.9), dict(prompt=1, wer=0.5, similarity=0.2),
            dict(prompt=2, wer=None, similarity=0.1), dict(prompt=3, wer=1.0, similarity=None),
            dict(prompt=4, wer=0.5, similarity=None), dict(prompt=5, wer=float("nan"), similarity=None)]
    assert [r["prompt"] for r in worst(rows, 10)] == [3, 1, 0, 4, 2, 5]
    assert [r["prompt"] for r in worst(rows, 2)] == [3, 1]


def test_quality_gates_lower_wer_and_cer_higher_similarity(tmp_path, capsys):
    a = quality_run(tmp_path / "a", {3: (0.5, 0.5), 6: (0.3, 0.7)}, baseline=(0.9, 0.2))
    # B: worse WER/CER at the end and better similarity; its baseline is far better than A's final, and
    # its earlier round is too: only the last fine-tuned round counts
    b = quality_run(tmp_path / "b", {3: (0.1, 0.1), 6: (0.4, 0.75)}, baseline=(0.0, 0.99))
    gate = ["diff", str(a), str(b), "--fail-if-worse"]
    assert main([*gate, "quality.wer:0.05"]) == 1
    assert "quality.wer:0.05 failed: B is worse by 0.1" in capsys.readouterr().err
    assert main([*gate, "quality.wer:0.15"]) == 0
    assert main([*gate, "quality.cer:0.04"]) == 1  # 0.2 against 0.15
    assert main([*gate, "quality.cer:0.06"]) == 0
    assert main([*gate, "quality.similarity:0"]) == 0  # higher is better: 0.75 against 0.7
    assert main(["diff", str(b), str(a), "--fail-if-worse", "quality.similarity:0.04"]) == 1
    capsys.readouterr()
    assert main(["diff", str(a), str(b), "--json", "--fail-if-worse", "quality.wer:1"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["metrics"]["quality"]["final"]["wer"]["better"] == "A"
    assert result["metrics"]["quality"]["final"]["similarity"]["better"] == "B"
    assert result["gates"][0]["a"] == 0.3 and result["gates"][0]["b"] == 0.4


def test_a_quality_gate_on_a_run_without_quality_events_is_bad_input(tmp_path, capsys):
    scored = quality_run(tmp_path / "scored", {6: (0.3, 0.7)})
    plain = quality_run(tmp_path / "plain", {})
    only_base = quality_run(tmp_path / "base", {}, baseline=(0.5, 0.5))
    for a, b, name in ((scored, plain, "B"), (plain, scored, "A"), (scored, only_base, "B")):
        assert main(["diff", str(a), str(b), "--fail-if-worse", "quality.wer:0.1"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("analysis: error: --fail-if-worse 'quality.wer:0.1': run "
                                                       f"{name} ({b if name == 'B' else a}) has no scored "
                                                       "generation rounds (quality_summary events;")
    # a round without a speaker model has no similarity to gate on
    events = [json.loads(x) for x in (scored / "events.jsonl").read_text().splitlines()]
    for e in events:
        e.pop("similarity", None)
    no_speaker = tmp_path / "no_speaker"
    no_speaker.mkdir()
    (no_speaker / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    assert main(["diff", str(scored), str(no_speaker), "--fail-if-worse", "quality.similarity:0.1"]) == 2
    assert "has no similarity in its scored rounds" in capsys.readouterr().err
    assert main(["diff", str(scored), str(scored), "--fail-if-worse", "quality.rtf:0.1"]) == 2
    assert "rtf has no better direction" in capsys.readouterr().err
