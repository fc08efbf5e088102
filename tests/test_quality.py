"""Scoring generated speech: text normalisation, WER/CER, speaker similarity, through real tiny transformers models."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from analysis.schema import declared_type
from higgs_accel.config import ConfigError, EvalConfig, load_config
from higgs_accel.quality import (
    QualityScorer,
    Utterance,
    cosine,
    emit_round,
    error_rates,
    load_asr,
    load_speaker,
    normalize_text,
    score_round,
    spell_number,
    summarize_round,
)
from higgs_accel.tiny import build_asr, build_speaker, build_whisper_asr, speech_like
from tests.test_events import documented_fields


@pytest.fixture(scope="module")
def scorer_dirs(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("scorers")
    build_asr(root / "asr", says="a")
    build_speaker(root / "speaker")
    return {"asr": str(root / "asr"), "speaker": str(root / "speaker")}


@pytest.fixture(scope="module")
def scorer(scorer_dirs) -> QualityScorer:
    """Loaded through the config, as a run loads them: the pipeline and AutoModelForAudioXVector from disk."""
    cfg = EvalConfig(asr_model=scorer_dirs["asr"], speaker_model=scorer_dirs["speaker"], batch_size=2)
    return QualityScorer.from_config(cfg)


def voice(f0: float, seconds: float = 1.0, rate: int = 24000, brightness: float = 1.0) -> np.ndarray:
    """A synthetic speaker: a harmonic tone at ``f0`` whose harmonics fall off by ``brightness``."""
    t = np.arange(int(seconds * rate)) / rate
    wave = sum(np.sin(2 * np.pi * h * f0 * t) / h**brightness for h in range(1, 8))
    return (0.2 * wave * (1 + 0.3 * np.sin(2 * np.pi * 3 * t))).astype(np.float32)


# ---------------------------------------------------------------- text


@pytest.mark.parametrize("digits, words", [
    ("0", "zero"), ("7", "seven"), ("13", "thirteen"), ("40", "forty"), ("42", "forty two"),
    ("100", "one hundred"), ("305", "three hundred five"), ("1999", "one thousand nine hundred ninety nine"),
    ("2000000", "two million"), ("1000001", "one million one"), ("007", "zero zero seven"),
    ("1234567890123", "one two three four five six seven eight nine zero one two three"),
])
def test_numbers_are_spelled_by_the_documented_rule(digits, words):
    assert spell_number(digits) == words


@pytest.mark.parametrize("text, expected", [
    ("Hello, World!", "hello world"),
    ("  The   QUICK\tfox.  ", "the quick fox"),
    ("Don't stop—it's well-known.", "dont stop its well known"),
    ("\u201cQuoted\u201d (text) [here]", "quoted text here"),
    ("I have 42 apples.", "i have forty two apples"),
    ("It costs $1,250.", "it costs one thousand two hundred fifty"),
    ("Pi is 3.14", "pi is three point one four"),
    ("Room 7B", "room seven b"),
    ("Straße", "strasse"),
    ("!!!", ""),
])
def test_normalisation_cases(text, expected):
    assert normalize_text(text) == expected


def test_without_spelling_numbers_digits_stay_tokens():
    assert normalize_text("I have 42 apples, 3.5 kg.", spell_numbers=False) == "i have 42 apples 3 5 kg"


def test_wer_and_cer_against_hand_counts():
    # "the cat sat" vs "the hat sat down": 1 substitution + 1 insertion over 3 reference words.
    wer, cer = error_rates(["the cat sat"], ["the hat sat down"])
    assert wer == pytest.approx(2 / 3)
    # characters: "the cat sat" (11) -> "the hat sat down": c->h, then " down" inserted (5): 6 edits.
    assert cer == pytest.approx(6 / 11)
    assert error_rates(["a b c"], ["a b c"]) == (0.0, 0.0)
    assert error_rates(["a b c"], [""]) == (1.0, 1.0)  # silence: every word deleted
    # pooled over utterances: 1 error in 1 word + 0 in 3 words = 1/4 (a mean of rates would say 1/2)
    assert error_rates(["yes", "a b c"], ["no", "a b c"])[0] == pytest.approx(1 / 4)


def test_cosine():
    assert cosine(np.array([1.0, 2.0]), np.array([2.0, 4.0])) == pytest.approx(1.0)
    assert cosine(np.array([1.0, 0.0]), np.array([0.0, 3.0])) == pytest.approx(0.0)
    assert cosine(np.array([1.0, 0.0]), np.array([-1.0, 0.0])) == pytest.approx(-1.0)


# ---------------------------------------------------------------- scorers


def test_the_asr_pipeline_transcribes_and_wer_follows_normalisation(scorer):
    wave = speech_like("hello there", np.random.default_rng(0))
    row = scorer.score(wave, 24000, "A!")
    assert row["transcript"] == "a"  # the tiny CTC model says "a" to anything
    assert (row["wer"], row["cer"]) == (0.0, 0.0)  # "A!" normalises to "a"
    row = scorer.score(wave, 24000, "a b")
    assert row["wer"] == pytest.approx(1 / 2) and row["cer"] == pytest.approx(2 / 3)
    assert row["seconds"] == pytest.approx(len(wave) / 24000)
    assert row["similarity"] is None and row["error"] is None  # no reference voice given


def test_a_batch_goes_through_the_pipeline_in_batches_and_keeps_order(scorer):
    rng = np.random.default_rng(1)
    texts = ["a", "b", "a a", "A.", "c d e"]
    utts = [Utterance(t, speech_like("some words here", rng, 16000), 16000, prompt=i, gen_time_s=0.5)
            for i, t in enumerate(texts)]
    rows = scorer.score_batch(utts)
    assert [r["prompt"] for r in rows] == [0, 1, 2, 3, 4]
    assert [r["wer"] for r in rows] == pytest.approx([0.0, 1.0, 0.5, 0.0, 1.0])
    assert all(r["rtf"] == pytest.approx(0.5 / r["seconds"]) for r in rows)


def test_a_whisper_model_transcribes_in_the_configured_language(tmp_path):
    build_whisper_asr(tmp_path / "whisper")
    for language in ("english", ""):
        scorer = QualityScorer.from_config(EvalConfig(asr_model=str(tmp_path / "whisper"), asr_language=language,
                                                      batch_size=2))
        assert scorer.asr.type == "seq2seq_whisper"
        rows = scorer.score_batch([Utterance(t, voice(100 + 20 * i), 24000) for i, t in enumerate(["a b", "c", "d"])])
        # the rigged tiny Whisper ends every transcript at once: nothing heard, every word deleted
        assert [(r["transcript"], r["wer"], r["error"]) for r in rows] == [("", 1.0, None)] * 3


def test_identical_audio_has_similarity_one_and_another_speaker_less(scorer):
    a, b = voice(110, brightness=1.0), voice(260, brightness=0.3)
    same = scorer.score(a, 24000, "a", reference_audio=a, reference_rate=24000)["similarity"]
    other = scorer.score(a, 24000, "a", reference_audio=b, reference_rate=24000)["similarity"]
    assert same == pytest.approx(1.0, abs=1e-6)
    assert other < same - 1e-4


def test_the_rate_is_converted_to_the_scorers_rate(scorer, tmp_path):
    """The same speech at 24 kHz in a file and at 16 kHz in memory: resampled to the scorer's 16 kHz, they match."""
    import torchaudio

    a24 = voice(150)
    a16 = torchaudio.functional.resample(__import__("torch").from_numpy(a24), 24000, 16000).numpy()
    sf.write(tmp_path / "ref.wav", a24, 24000, subtype="FLOAT")
    row = scorer.score(a16, 16000, "a", reference_audio=tmp_path / "ref.wav")
    assert row["similarity"] == pytest.approx(1.0, abs=1e-4)


def test_missing_audio_scores_as_silence(scorer, tmp_path):
    rows = scorer.score_batch([Utterance("a b", None, error="generation failed: no frame"),
                               Utterance("a b", np.zeros(0, np.float32), 24000),
                               Utterance("a b", tmp_path / "missing.wav")])
    for r in rows:
        assert (r["transcript"], r["wer"], r["cer"], r["similarity"]) == ("", 1.0, 1.0, None)
        assert r["seconds"] == 0.0 and r["error"]
    assert rows[0]["error"] == "generation failed: no frame"
    assert rows[2]["error"].startswith("cannot read the audio")


def test_only_the_configured_scorers_run(scorer_dirs):
    assert QualityScorer.from_config(EvalConfig()) is None  # no scorer: nothing to load, nothing changes
    asr_only = QualityScorer.from_config(EvalConfig(asr_model=scorer_dirs["asr"]))
    wave = voice(120)
    row = asr_only.score(wave, 24000, "a", reference_audio=wave, reference_rate=24000)
    assert row["wer"] == 0.0 and row["similarity"] is None
    voice_only = QualityScorer.from_config(EvalConfig(speaker_model=scorer_dirs["speaker"]))
    row = voice_only.score(wave, 24000, "a", reference_audio=wave, reference_rate=24000)
    assert row["wer"] is None and row["transcript"] is None and row["similarity"] == pytest.approx(1.0, abs=1e-6)


def test_a_missing_or_unloadable_scorer_is_one_config_error(tmp_path, scorer_dirs):
    with pytest.raises(ConfigError, match=r"^'eval.asr_model': model dir not found: .*nope$"):
        load_asr(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"^'eval.speaker_model': cannot load .* from '.*empty'") as e:
        load_speaker(str(tmp_path / "empty"))
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match=r"^'eval.asr_model': cannot load an automatic-speech-recognition model"):
        load_asr(str(tmp_path / "empty"))
    # transformers would load the CTC model as an x-vector model with a random head: refused
    with pytest.raises(ConfigError, match=r"^'eval.speaker_model': '.*asr' is no trained x-vector model: \d+ weights"):
        load_speaker(scorer_dirs["asr"])
    # validated with the config, before anything loads
    with pytest.raises(ConfigError, match=r"^'eval.speaker_model': model dir not found"):
        load_config(None, [("preset", "tiny", "test"), ("eval.speaker_model", str(tmp_path / "nope"), "test")])
    with pytest.raises(ConfigError, match=r"^'eval.asr_language' applies to a Whisper .* not to Wav2Vec2ForCTC$"):
        QualityScorer.from_config(EvalConfig(asr_model=scorer_dirs["asr"], asr_language="english"))
    with pytest.raises(ConfigError, match=r"'eval.batch_size' must be at least 1"):
        load_config(None, [("preset", "tiny", "test"), ("eval.batch_size", 0, "test")])


# ---------------------------------------------------------------- rounds and events


def _generated(tmp_path) -> tuple[list[dict], str]:
    """generate_audio rows as the loop emits them, with one failed generation, and a reference voice file."""
    rng = np.random.default_rng(2)
    rows = []
    for i, text in enumerate(["A.", "a b c", "Nothing came out."]):
        path = None
        if i < 2:
            path = str(tmp_path / f"gen-{i}.wav")
            sf.write(path, speech_like("words here", rng), 24000)
        rows.append({"prompt": i, "text": text, "path": path, "seconds": 0.0, "n_frames": 0, "new_tokens": 0,
                     "stopped": "eos", "sample_rate": 24000, "gen_time_s": 0.3 if path else None,
                     "error": None if path else "no audio frame generated"})
    sf.write(tmp_path / "ref.wav", voice(140), 24000)
    return rows, str(tmp_path / "ref.wav")


def test_a_round_gives_quality_rows_and_a_pooled_summary(scorer, tmp_path):
    generated, ref = _generated(tmp_path)
    rows, summary = score_round(scorer, generated, reference=ref, baseline=True)
    assert [r["wer"] for r in rows] == pytest.approx([0.0, 2 / 3, 1.0])
    assert all(r["baseline"] for r in rows)
    assert rows[0]["path"] == generated[0]["path"] and rows[2]["path"] is None
    assert rows[0]["similarity"] is not None and rows[2]["similarity"] is None
    # pooled: 0 + 2 + 3 word errors over 1 + 3 + 3 reference words
    assert summary["wer"] == pytest.approx(5 / 7)
    assert summary["similarity"] == pytest.approx((rows[0]["similarity"] + rows[1]["similarity"]) / 2)
    assert (summary["utterances"], summary["no_audio"], summary["baseline"]) == (3, 1, True)
    assert summary["reference"] == ref and summary["score_s"] > 0
    assert summary["asr_model"] and summary["speaker_model"]
    empty = summarize_round([], 0.0)
    assert (empty["wer"], empty["similarity"], empty["utterances"]) == (None, None, 0)


def test_a_reference_voice_is_embedded_once(scorer_dirs, tmp_path, monkeypatch):
    fresh = QualityScorer.from_config(EvalConfig(speaker_model=scorer_dirs["speaker"]))
    calls = []
    embed = fresh.embed
    monkeypatch.setattr(fresh, "embed", lambda wave: calls.append(len(wave)) or embed(wave))
    generated, ref = _generated(tmp_path)  # two generations with audio, one without
    rows, summary = score_round(fresh, generated, reference=ref)
    assert len(calls) == 3  # the reference file once, each generation once
    score_round(fresh, generated, reference=ref)
    assert len(calls) == 5  # the file's embedding is kept across rounds
    wave = voice(140)
    again, summary = score_round(fresh, generated, reference=wave, reference_rate=24000)
    assert len(calls) == 8 and summary["reference"] is None  # a wave: once per round
    # the same voice from a file and from memory gives the same similarities
    assert [r["similarity"] for r in again] == pytest.approx([r["similarity"] for r in rows], abs=1e-5)


def test_quality_events_in_the_log_match_docs_and_their_declared_types(scorer, tmp_path):
    import pyarrow.parquet as pq

    from higgs_accel.events import EventLog
    from higgs_accel.sinks import ParquetSink, compact
    from tests.conftest import events_of

    generated, ref = _generated(tmp_path)
    log = EventLog(tmp_path / "run", "r1", sinks=[ParquetSink(tmp_path / "run" / "events")])
    log.bind(step=0, epoch=0, phase="eval")
    emit_round(log, *score_round(scorer, generated, reference=ref, baseline=True))
    log.flush()
    compact(tmp_path / "run" / "events")
    common, documented = documented_fields()
    events = events_of(tmp_path / "run")
    assert [e["event"] for e in events] == ["quality"] * 3 + ["quality_summary"]
    assert [e["level"] for e in events] == ["info", "info", "warning", "info"]  # the failed generation warns
    for e in events:
        assert set(e) - common == set(documented[e["event"]]), e["event"]
    for name in ("quality", "quality_summary"):
        [part] = (tmp_path / "run" / "events" / name).glob("part-*.parquet")
        for field in pq.read_schema(part):
            assert field.type == declared_type(field.name), (name, field.name, field.type)


# ---------------------------------------------------------------- evaluate a finished run


def test_evaluate_speaks_a_held_out_manifest_and_scores_it(tmp_path, tiny, codes_cache, scorer_dirs, capsys):
    import json

    from tests.conftest import train_run

    run_dir = tmp_path / "run"
    train_run(run_dir, tiny, codes_cache, train__max_steps=1, train__eval_every=0, train__save_every=0,
              eval__asr_model=scorer_dirs["asr"])
    held_out = tmp_path / "held_out.jsonl"
    lines = Path(tiny["data.val_manifest"]).read_text().splitlines()[:2]
    rows = [json.loads(x) for x in lines]
    for r in rows:
        r["audio"] = str(Path(tiny["data.val_manifest"]).parent / r["audio"])
    rows[0]["text"], rows[1]["text"] = "The quick fox.", "A lazy dog!"
    rows[1].update(ref_audio=rows[0]["audio"], ref_text=rows[0]["text"])  # the second one clones a voice
    held_out.write_text("".join(json.dumps(r) + "\n" for r in rows))

    from higgs_accel.cli import main

    args = ["evaluate", "--run", str(run_dir), "--manifest", str(held_out), "--max-new-tokens", "20"]
    # the run's eval section (asr_model) is what evaluate starts from; flags on top (an empty one changes nothing)
    assert main([*args, "--speaker-model", scorer_dirs["speaker"], "--asr-language", ""]) == 0
    where = run_dir / "evaluate" / "held_out"
    out = [json.loads(x) for x in (where / "quality.jsonl").read_text().splitlines()]
    summary = json.loads((where / "summary.json").read_text())
    assert (summary["asr_model"], summary["speaker_model"]) == (scorer_dirs["asr"], scorer_dirs["speaker"])
    assert [(r["prompt"], r["line"], r["text"]) for r in out] == [(0, 1, rows[0]["text"]), (1, 2, rows[1]["text"])]
    for r in out:  # the tiny model speaks until the limit: 20 steps = 12 frames at 25/s
        assert r["error"] is None and r["seconds"] == pytest.approx(12 / 25) and r["rtf"] > 0
        assert r["transcript"] == "a"
        assert -1 <= r["similarity"] <= 1 and Path(r["path"]).is_file()
    assert [r["wer"] for r in out] == pytest.approx([1.0, 2 / 3])  # "a" for "the quick fox", "a lazy dog"
    assert summary["adapter"] == str(run_dir / "adapter") and summary["wer"] == pytest.approx(5 / 6)
    assert not summary["baseline"]
    # the reference of the cloned sample is its ref_audio, of the other its own recording
    import soundfile as sf

    ref0, _ = sf.read(where / "ref-0.wav")
    ref1, _ = sf.read(where / "ref-1.wav")
    np.testing.assert_array_equal(ref0, ref1)

    # the base model alone, the first sample only
    capsys.readouterr()
    assert main([*args, "--speaker-model", scorer_dirs["speaker"], "--baseline", "--limit", "1"]) == 0
    line = capsys.readouterr().err.strip().splitlines()[-1]
    base = json.loads((run_dir / "evaluate" / "held_out-base" / "summary.json").read_text())
    assert base["baseline"] and base["adapter"] is None and base["utterances"] == 1
    assert (base["asr_model"], base["speaker_model"]) == (scorer_dirs["asr"], scorer_dirs["speaker"])
    assert line == (f"the base model: 1 utterances (0 without audio), WER {base['wer']:.3f}, CER {base['cer']:.3f}, "
                    f"similarity {base['similarity']:.3f}, scored in {base['score_s']:.1f}s")
    assert (run_dir / "evaluate" / "held_out-base" / "gen-0.wav").is_file()
    # bad input: one line, status 2
    assert main([*args, "--limit", "-1"]) == 2
    assert capsys.readouterr().err.strip() == "higgs-accel: error: --limit must be at least 0, got -1"
    assert main(["evaluate", "--run", str(run_dir), "--manifest", str(tmp_path / "none.jsonl")]) == 2
    assert "--manifest: file not found" in capsys.readouterr().err
    assert main(["evaluate", "--run", str(tmp_path), "--manifest", str(held_out)]) == 2
    assert "is not a run dir (no config.yaml)" in capsys.readouterr().err
    (tmp_path / "empty.jsonl").write_text("\n")
    assert main(["evaluate", "--run", str(run_dir), "--manifest", str(tmp_path / "empty.jsonl")]) == 2
    assert "has no usable sample" in capsys.readouterr().err
    import yaml

    bare = tmp_path / "no-scorer"  # a run whose eval section names no scorer, and no flag naming one
    bare.mkdir()
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    (bare / "config.yaml").write_text(yaml.safe_dump({**config, "eval": {}, "preset": ""}))
    assert main(["evaluate", "--run", str(bare), "--manifest", str(held_out), "--baseline"]) == 2
    assert "evaluate needs a scorer" in capsys.readouterr().err
    # ... unless it is a --preset tiny run: the tiny scorers, said to be rigged
    (bare / "config.yaml").write_text(yaml.safe_dump({**config, "eval": {}, "preset": "tiny"}))
    assert main(["evaluate", "--run", str(bare), "--manifest", str(held_out), "--baseline", "--limit", "1",
                 "--max-new-tokens", "20"]) == 0
    assert "scoring with rigged tiny models" in capsys.readouterr().err
    tiny_scored = json.loads((bare / "evaluate" / "held_out-base" / "summary.json").read_text())
    assert (tiny_scored["asr_model"], tiny_scored["speaker_model"]) == (
        str(bare / "tiny" / "scorers" / "asr"), str(bare / "tiny" / "scorers" / "speaker"))
    # generate scores its speech with the run's scorers (eval.asr_model) and a flag's
    assert main(["generate", "--run", str(run_dir), "--text", "A lazy dog!", "--out", str(tmp_path / "g.wav"),
                 "--max-new-tokens", "20", "--speaker-model", scorer_dirs["speaker"], "--ref-audio", rows[0]["audio"],
                 "--ref-text", rows[0]["text"]]) == 0
    assert re.fullmatch(r"scored: WER 0\.667, CER [0-9.]+, similarity -?[0-9.]+, transcript 'a'",
                        capsys.readouterr().err.strip().splitlines()[-1])
    # a run without a finished adapter is scored from the adapter given (a checkpoint's, say)
    import shutil

    shutil.move(run_dir / "adapter", tmp_path / "other-adapter")
    assert main([*args, "--adapter", str(tmp_path / "other-adapter"), "--limit", "1"]) == 0
    assert json.loads((where / "summary.json").read_text())["adapter"] == str(tmp_path / "other-adapter")
    assert main([*args, "--limit", "1"]) == 2
    assert "has no finished adapter" in capsys.readouterr().err.strip().splitlines()[-1]




def test_training_scores_each_generation_round_from_the_base_model_on(tmp_path, tiny, codes_cache, scorer_dirs):
    """A run with scorers: the base model (adapter off) is scored at step 0, then every generation round; the
    scores are events of their own, and a run without scorers writes none (the other tests' runs)."""
    from tests.conftest import events_of, of, train_run

    run_dir = tmp_path / "run"
    train_run(run_dir, tiny, codes_cache, train__max_steps=2, train__eval_every=1, train__save_every=0,
              log__generate_every=1, log__generate_max_new_tokens=12, log__generate_prompts=["A lazy dog."],
              eval__asr_model=scorer_dirs["asr"], eval__speaker_model=scorer_dirs["speaker"])
    events = events_of(run_dir)
    rounds = of(events, "quality_summary")
    assert [(r["step"], r["baseline"]) for r in rounds] == [(0, True), (1, False), (2, False)]
    assert all(r["wer"] == pytest.approx(2 / 3) and r["score_s"] >= 0 for r in rounds)  # the tiny ASR says "a"
    rows = of(events, "quality")
    assert [(r["step"], r["prompt"], r["text"], r["transcript"]) for r in rows] == [
        (s, 0, "A lazy dog.", "a") for s in (0, 1, 2)]
    assert all(-1 <= r["similarity"] <= 1 and r["rtf"] > 0 for r in rows)
    # the base model's speech is kept apart and is not a generate_audio event of the fine-tune
    assert (run_dir / "samples" / "step-00000000" / "base" / "gen-0.wav").is_file()
    assert [e["step"] for e in of(events, "generate_audio")] == [1, 2]


def test_jiwer_is_needed_for_word_error_rates_only(scorer_dirs, monkeypatch):
    """Transcription alone (the dataset command) loads an ASR model without jiwer; scoring WER/CER refuses up front."""
    import sys

    monkeypatch.setitem(sys.modules, "jiwer", None)  # as if it were not installed
    assert load_asr(scorer_dirs["asr"]).feature_extractor is not None
    with pytest.raises(ConfigError, match=r"^'eval.asr_model': WER/CER need jiwer: pip install 'higgs-accel\[quality"):
        QualityScorer.from_config(EvalConfig(asr_model=scorer_dirs["asr"]))
    assert QualityScorer.from_config(EvalConfig(speaker_model=scorer_dirs["speaker"])).asr is None


def test_speaker_similarity_prints_no_torch_notice(scorer):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert scorer.embed(np.random.default_rng(0).standard_normal(16000).astype(np.float32)).shape == (8,)
