"""Real-corpus quirks: no file, transcript or cache quirk crashes a run, cuts an epoch short or wastes an encode."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from transformers import AutoTokenizer, HiggsAudioV2Config, HiggsAudioV2TokenizerModel

from higgs_accel.chat import SpecialIds, build_example
from higgs_accel.cli import main
from higgs_accel.codes import CodeCache, codec_identity, resolve
from higgs_accel.config import ConfigError, DataConfig, ModelConfig, load_config
from higgs_accel.data import (
    EpochSampler,
    HiggsDataset,
    LengthGroupedBatches,
    collate,
    load_splits,
    read_source,
    screen,
    sequence_lengths,
    token_limit,
)
from higgs_accel.loading import load_codec
from higgs_accel.sinks.console import summary_line
from higgs_accel.tiny import apply_tiny_preset, speech_like
from tests.conftest import of, train_run

MAX_TOKENS = 400
SPECIAL = {  # one of each kind: audio placeholder, delay token, turn structure, audio BOS, scene markers
    "text": ["<|AUDIO_OUT|>", "<|reserved_special_token_6|>", "<|eot_id|>"],
    "ref_text": ["<|audio_out_bos|>"], "scene": ["<|scene_desc_end|>"], "system": ["<|start_header_id|>"],
}


def _write(path: Path, wave: np.ndarray, sr: int = 24000) -> str:
    sf.write(path, wave, sr)
    return path.name


def build_quirks(root: Path) -> tuple[Path, dict[int, str], int]:
    """A manifest with a BOM, good lines (one repeated, one cloning a voice) and one line per quirk; returns the
    manifest, {line: reason} of the quirks, and the number of good lines."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(5)
    words = ["quick brown fox jumps", "old green hills sing", "seven bright stars hum", "small birds every morning"]
    names = [_write(root / f"g{i}.wav", speech_like(w, rng)) for i, w in enumerate(words)]
    click1 = _write(root / "click1ms.wav", 0.5 * np.ones(24, dtype=np.float32))
    click3 = _write(root / "click3ms.wav", 0.5 * np.ones(72, dtype=np.float32))
    (root / "junk.wav").write_bytes(b"not audio at all" * 20)
    good = [{"audio": names[0], "text": words[0], "speaker": 1089},
            {"audio": names[1], "text": words[1], "speaker": "anna"},
            {"audio": names[2], "text": words[2], "ref_audio": names[3], "ref_text": words[3], "scene": "A hall."},
            {"audio": names[0], "text": words[0], "speaker": 1089}]  # the first line again: a duplicate
    lines, planted = [json.dumps(r) for r in good], {}

    def bad(row, reason: str):
        lines.append(row if isinstance(row, str) else json.dumps(row))
        planted[len(lines)] = reason

    bad({"audio": click1, "text": "a click"}, "empty_audio")
    bad({"audio": click3, "text": "a longer click"}, "empty_audio")
    bad({"audio": "junk.wav", "text": "junk"}, "unreadable_audio")
    for field, tokens in SPECIAL.items():
        for token in tokens:
            row = {"audio": names[1], "text": "fine words", "ref_audio": names[3], "ref_text": "fine words too",
                   "scene": "A hall.", "system": "Speak."}
            row[field] = f"say {token} now"
            bad(row, "special_token")
    bad({"audio": names[1], "text": " ".join(words * 40)}, "too_long")
    bad({"audio": names[1], "text": ""}, "empty_text")
    bad({"audio": names[1], "text": " \t "}, "empty_text")
    bad({"audio": names[1], "text": 12345}, "bad_field")
    bad({"audio": names[1], "text": ["a", "list"]}, "bad_field")
    bad({"audio": names[1], "text": "fine", "ref_audio": names[3], "ref_text": 7}, "bad_field")
    bad({"audio": names[1], "text": "fine", "ref_audio": names[3], "ref_text": "  "}, "empty_text")
    bad({"audio": names[1], "text": "fine", "ref_audio": names[3]}, "missing_field")
    bad({"audio": names[1], "text": "fine", "ref_audio": 3, "ref_text": "x"}, "bad_field")
    bad({"audio": names[1], "text": "fine", "speaker": ["x"]}, "bad_field")
    bad({"audio": names[1], "text": "fine", "scene": {"a": 1}}, "bad_field")
    bad({"audio": names[1], "text": "fine", "system": False}, "bad_field")
    bad({"audio": "", "text": "fine"}, "missing_field")
    bad({"audio": 5, "text": "fine"}, "bad_field")
    bad({"text": "fine"}, "missing_field")
    bad('{"audio": "g1.wav", "text": "a lone \\ud800 surrogate"}', "not_utf8")
    bad('{"audio": "g1.wav", "text": "unterminated', "invalid_json")
    bad("[1, 2]", "invalid_json")
    manifest = root / "train.jsonl"
    manifest.write_bytes("\ufeff".encode() + "\n".join(lines).encode() + b"\n")  # a BOM, as Windows tools write
    return manifest, planted, len(good)


@pytest.fixture(scope="module")
def quirks(tmp_path_factory):
    return build_quirks(tmp_path_factory.mktemp("quirks"))


@pytest.fixture(scope="module")
def parts(tiny):
    tok = AutoTokenizer.from_pretrained(tiny["model.base"])
    config = HiggsAudioV2Config.from_pretrained(tiny["model.base"])
    codec = load_codec(ModelConfig(audio_tokenizer=tiny["model.audio_tokenizer"]))
    return tok, SpecialIds.from_parts(tok, config), config, codec


def _checked(manifest, parts, cache_dir, **data):
    """What the data path makes of a manifest: parse, resolve against the cache, screen."""
    tok, ids, config, codec = parts
    cfg = DataConfig(train_manifest=str(manifest), max_tokens=MAX_TOKENS, **data)
    samples, skips = read_source(cfg.train_manifest, cfg)
    kept, more = resolve(samples, CodeCache(cache_dir, codec), cfg.min_seconds, cfg.max_seconds)
    screened = screen(kept, tok, ids, cfg, token_limit(cfg, config.max_position_embeddings))
    return cfg, screened, skips + more + screened.skips


def test_every_quirk_gives_its_documented_reason_naming_the_line(quirks, parts, tmp_path):
    manifest, planted, n_good = quirks
    _, screened, skips = _checked(manifest, parts, tmp_path / "codes")
    assert {s.line: s.reason for s in skips} == planted and len(skips) == len(planted)
    assert all(s.source == str(manifest) for s in skips)
    assert [s.line for s in screened.kept] == list(range(1, n_good + 1))  # the BOM line is kept
    assert screened.duplicates == 1 and 0 < screened.longest_tokens <= MAX_TOKENS
    assert summary_line("train", 4, {}, screened.duplicates).endswith(
        "; warning: 1 line(s) repeat an earlier line's audio and text (data.drop_duplicates)")
    assert screened.kept[0].speaker == "1089"
    detail = {s.line: s.detail for s in skips}
    by_reason = {}
    for line, reason in planted.items():
        by_reason.setdefault(reason, []).append(detail[line])
    assert all("shorter than one codec frame" in d and "click" in d for d in by_reason["empty_audio"])
    (unreadable,) = by_reason["unreadable_audio"]
    assert "junk.wav" in unreadable and "BytesIO" not in unreadable and "0x" not in unreadable
    tokens = [t for ts in SPECIAL.values() for t in ts]
    assert [d.split("special token ")[-1] for d in by_reason["special_token"]] == tokens
    assert [d.split("'")[1] for d in by_reason["special_token"]] == [f for f, ts in SPECIAL.items() for _ in ts]
    (too_long,) = by_reason["too_long"]
    assert int(too_long.split()[0]) > MAX_TOKENS and f"limit of {MAX_TOKENS}" in too_long
    assert "'text' must be a string, got int 12345" in by_reason["bad_field"]
    assert "'text' must be a string, got list" in by_reason["bad_field"][1]
    assert by_reason["empty_text"][:2] == ["'text' is empty", "'text' is only whitespace"]
    # The string that never ends, where it starts (not the line's newline, which the parser sees only in the file).
    assert by_reason["invalid_json"][0] == "Unterminated string starting at column 29"
    assert by_reason["not_utf8"] == ["'text' holds '\\ud800', which is not valid UTF-8"]

    _, dropped, skips = _checked(manifest, parts, tmp_path / "codes", drop_duplicates=True)
    assert dropped.duplicates == 1 and [s.line for s in dropped.kept] == list(range(1, n_good))
    assert [(s.line, s.reason, s.detail) for s in skips if s.reason == "duplicate"] == [
        (n_good, "duplicate", f"same audio and text as {manifest}:1")]


def test_the_good_lines_train_and_no_quirk_stops_or_shortens_the_run(quirks, tiny, tmp_path):
    """One epoch over the quirk corpus: the run finishes, every planted quirk is a data_skip with its reason (before
    training, or when its batch comes for checks that need the tokenizer), and exactly the good lines train."""
    manifest, planted, n_good = quirks
    events = train_run(tmp_path / "run", tiny, tmp_path / "codes", data__train_manifest=str(manifest),
                       data__val_manifest="", data__max_tokens=MAX_TOKENS, train__epochs=1, train__max_steps=0,
                       train__batch_size=2, train__eval_every=0, train__save_every=0, data__codes_cache=str(
                           tmp_path / "codes"))
    assert of(events, "run_end")[0]["status"] == "finished"
    assert {e["line"]: e["reason"] for e in of(events, "data_skip")} == planted
    # Batches of only skipped samples take no step, so the run may go on into epoch 1 to reach its step count.
    assert sum(e["samples"] for e in of(events, "train_step") if e["epoch"] == 0) == n_good


def test_sequence_lengths_are_the_built_lengths(quirks, parts, tmp_path):
    tok, ids, _, codec = parts
    manifest, _, _ = quirks
    cfg, screened, _ = _checked(manifest, parts, tmp_path / "codes")
    cache = CodeCache(tmp_path / "codes", codec)
    built = [len(build_example(s, cache.load(s.codes), cache.load(s.ref_codes) if s.ref_audio else None, tok, ids,
                               cfg.system_prompt, False, True)["input_ids"]) for s in screened.kept]
    assert any(s.ref_audio for s in screened.kept)
    assert sequence_lengths(screened.kept, tok, ids, cfg.system_prompt) == built


def test_an_epoch_with_a_bad_sample_yields_every_good_sample(quirks, parts, tmp_path, monkeypatch):
    """A sample whose build raises (StopIteration included, which a DataLoader takes for the end of the epoch) and
    one with a special token that got past screening are skips; every other sample is yielded, in either batching."""
    from higgs_accel import data as data_module

    tok, ids, _, codec = parts
    manifest, _, _ = quirks
    cfg, screened, _ = _checked(manifest, parts, tmp_path / "codes")
    good = screened.kept
    raising = data_module.Sample(**{**vars(good[1]), "line": 901})
    sneaked = data_module.Sample(**{**vars(good[0]), "line": 902, "text": "a <|AUDIO_OUT|> b"})
    samples = [good[0], raising, good[1], sneaked, good[2], good[3]]
    real = data_module.build_example

    def build(sample, *args):
        if sample.line == 901:
            raise StopIteration
        return real(sample, *args)

    monkeypatch.setattr(data_module, "build_example", build)
    ds = HiggsDataset(samples, CodeCache(tmp_path / "codes", codec), tok, ids, cfg)
    order = EpochSampler(len(ds), seed=3)
    loaders = [torch.utils.data.DataLoader(ds, batch_size=2, sampler=order, collate_fn=lambda b: collate(
                   b, ids.pad, ids.stream_eos)),
               torch.utils.data.DataLoader(ds, batch_sampler=LengthGroupedBatches(order, ds.lengths(), 2),
                                           collate_fn=lambda b: collate(b, ids.pad, ids.stream_eos))]
    for loader in loaders:
        batches = list(loader)
        assert sum(len(b["input_ids"]) for b in batches if "input_ids" in b) == len(good)
        skipped = {s.line: s.reason for b in batches for s in b["skipped"]}
        assert skipped == {901: "build_failed", 902: "special_token"}


def test_batches_never_exceed_max_tokens_per_batch(quirks, parts, tmp_path):
    tok, ids, _, codec = parts
    manifest, _, _ = quirks
    cfg, screened, _ = _checked(manifest, parts, tmp_path / "codes", max_tokens_per_batch=150)
    lengths = sequence_lengths(screened.kept, tok, ids, cfg.system_prompt)
    assert screened.kept and max(lengths) <= 150 < MAX_TOKENS
    batches = list(LengthGroupedBatches(EpochSampler(len(lengths), 1), lengths, 4, max_tokens=150))
    assert all(len(b) * max(lengths[i] for i in b) <= 150 for b in batches)


def test_same_codec_from_two_paths_encodes_once(tiny, tmp_path, monkeypatch):
    """Copies of one codec in two dirs, one loaded by a relative path: one cache dir, audio encoded once."""
    shutil.copytree(tiny["model.audio_tokenizer"], tmp_path / "a" / "codec")
    shutil.copytree(tiny["model.audio_tokenizer"], tmp_path / "b" / "codec")
    sf.write(tmp_path / "x.wav", speech_like("quiet rivers", np.random.default_rng(0)), 24000)
    (tmp_path / "m.jsonl").write_text(json.dumps({"audio": "x.wav", "text": "quiet rivers"}) + "\n")
    monkeypatch.chdir(tmp_path / "b")
    calls = []
    real = HiggsAudioV2TokenizerModel.encode
    monkeypatch.setattr(HiggsAudioV2TokenizerModel, "encode", lambda *a, **k: calls.append(1) or real(*a, **k))
    dirs = set()
    for ref in (str(tmp_path / "a" / "codec"), "codec"):
        codec = load_codec(ModelConfig(audio_tokenizer=ref))
        assert codec.config._name_or_path == ref  # the path is in the config, and must not be in the key
        samples, _ = read_source(str(tmp_path / "m.jsonl"), DataConfig())
        cache = CodeCache(tmp_path / "codes", codec)
        kept, _ = resolve(samples, cache, 0, 30)
        dirs.add(cache.dir)
        assert len(kept) == 1
    assert len(dirs) == 1 and len(calls) == 1
    same = load_codec(ModelConfig(audio_tokenizer="codec"))
    same.config.transformers_version = "0.0.1"  # how it was saved is not what it computes
    assert codec_identity(same) == codec_identity(codec)
    same.config.acoustic_model_config.downsampling_ratios = [8, 5, 4, 3, 2]
    assert codec_identity(same) != codec_identity(codec)


def _overrides(tiny, tmp_path, manifest, **more) -> list[str]:
    pairs = {"model.base": tiny["model.base"], "model.audio_tokenizer": tiny["model.audio_tokenizer"],
             "data.train_manifest": str(manifest), "data.codes_cache": str(tmp_path / "codes"),
             "train.output_dir": str(tmp_path / "run"), **more}
    return [f"{k}={v}" for k, v in pairs.items()]


def test_prepare_skips_clicks_and_codec_failures_naming_the_file(tiny, tmp_path, capsys, monkeypatch):
    rng = np.random.default_rng(1)
    rows = [{"audio": _write(tmp_path / "ok.wav", speech_like("old green hills", rng)), "text": "old green hills"},
            {"audio": _write(tmp_path / "c1.wav", 0.5 * np.ones(24, dtype=np.float32)), "text": "click"},
            {"audio": _write(tmp_path / "c3.wav", 0.5 * np.ones(72, dtype=np.float32)), "text": "click"},
            {"audio": _write(tmp_path / "boom.wav", speech_like("seven bright stars", rng)), "text": "boom"}]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    real = HiggsAudioV2TokenizerModel.encode

    def encode(self, wave, *a, **k):
        if wave.shape[-1] == sf.info(str(tmp_path / "boom.wav")).frames:
            raise RuntimeError("Kernel size can't be greater than actual input size\nmore lines")
        return real(self, wave, *a, **k)

    monkeypatch.setattr(HiggsAudioV2TokenizerModel, "encode", encode)
    assert main(["prepare", *_overrides(tiny, tmp_path, tmp_path / "m.jsonl")]) == 0
    printed = capsys.readouterr().err
    assert "(1 encoded by this process now" in printed
    skips = [line for line in printed.splitlines() if line.startswith("skip ")]
    expected = [(2, "empty_audio"), (3, "empty_audio"), (4, "encode_failed")]
    assert [f"m.jsonl:{n}: {reason}: " in s for (n, reason), s in zip(expected, skips)] == [True] * 3
    assert len(skips) == 3
    assert skips[2].endswith(f"{tmp_path / 'boom.wav'}: RuntimeError: Kernel size can't be greater than actual "
                             "input size")
    assert "data train: 1 kept, 3 skipped (empty_audio: 2, encode_failed: 1)" in printed

    assert main(["prepare", *_overrides(tiny, tmp_path, tmp_path / "m.jsonl", **{"data.strict": "true"})]) == 2
    printed = capsys.readouterr().err
    assert "skip " not in printed and printed.count("c1.wav") == 1  # listed once: in the error line
    assert "3 bad sample(s)" in printed


def test_tiny_preset_with_own_manifest_holds_out_its_val_fraction(tiny, tmp_path):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps({"audio": f"{i}.wav", "text": f"line {i}"}) + "\n" for i in range(20)))
    cfg = load_config(None, [("preset", "tiny", "test"), ("data.train_manifest", str(manifest), "test"),
                             ("data.val_fraction", 0.25, "test")])
    apply_tiny_preset(cfg, Path(tiny["model.base"]).parent)
    assert cfg.data.val_manifest == "" and cfg.model.base == tiny["model.base"]
    train, val, _, _ = load_splits(cfg.data, cfg.train.seed)
    assert len(val) == 5 and {s.source for s in train + val} == {str(manifest)}

    preset_only = load_config(None, [("preset", "tiny", "test")])
    apply_tiny_preset(preset_only, Path(tiny["model.base"]).parent)
    assert preset_only.data.val_manifest == tiny["data.val_manifest"]


def test_audiofolder_csv_with_a_bom_reads_and_one_not_utf8_is_one_clear_error(tmp_path):
    (tmp_path / "metadata.csv").write_bytes(b"\xef\xbb\xbffile_name,text\na.wav,fine\n")
    (sample,), skips = read_source(str(tmp_path), DataConfig())
    assert not skips and sample.audio.path == tmp_path / "a.wav" and sample.line == 2
    (tmp_path / "metadata.csv").write_bytes(b"\xef\xbb\xbffile_name,text\na.wav,fine\nb.wav,caf\xe9\n")
    with pytest.raises(ConfigError, match=r"metadata.csv: not valid UTF-8"):
        read_source(str(tmp_path), DataConfig())
