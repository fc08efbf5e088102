"""The data path against transformers' own HiggsAudioV2Processor, and the label rules."""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf
import torch
from transformers import AutoTokenizer, DacFeatureExtractor, HiggsAudioV2Config, HiggsAudioV2Processor

from higgs_accel.chat import IGNORE, TARGET, SpecialIds, build_example, sample_prompt
from higgs_accel.codes import CodeCache
from higgs_accel.config import DataConfig, ModelConfig
from higgs_accel.data import FileAudio, Sample, collate, load_audio, load_splits, read_manifest
from higgs_accel.loading import load_codec

SYSTEM = "Generate audio following instruction."


@pytest.fixture(scope="module")
def parts(tiny, codes_cache):
    tok = AutoTokenizer.from_pretrained(tiny["model.base"])
    codec = load_codec(ModelConfig(audio_tokenizer=tiny["model.audio_tokenizer"]))
    ids = SpecialIds.from_parts(tok, HiggsAudioV2Config.from_pretrained(tiny["model.base"]))
    processor = HiggsAudioV2Processor(DacFeatureExtractor(sampling_rate=24000, hop_length=960), tok, codec)
    samples, skips = read_manifest(tiny["data.train_manifest"], DataConfig())
    assert not skips
    return tok, CodeCache(codes_cache, codec), ids, processor, samples


def _ours(parts, sample, train_on_prompt=True, train_eos=False, train_bos=True):
    tok, cache, ids, _, _ = parts
    ref = cache.codes(sample.ref_audio) if sample.ref_audio else None
    return build_example(sample, cache.codes(sample.audio), ref, tok, ids, SYSTEM, train_on_prompt, train_eos,
                         train_bos)


def _theirs(parts, sample):
    _, cache, _, processor, _ = parts
    audio = [load_audio(p.path, 24000) for p in (sample.ref_audio, sample.audio) if p is not None]
    return processor(text=[sample_prompt(sample, SYSTEM) + TARGET], audio=audio, output_labels=True,
                     return_tensors="pt")


def _with_reference(sample: Sample, other: Sample) -> Sample:
    return Sample(source=sample.source, line=sample.line, audio=sample.audio, text=sample.text,
                  ref_audio=other.audio, ref_text=other.text, scene="A quiet room.")


def test_matches_transformers_processor(parts):
    """Same text ids, delayed audio frames, frame mask and (in the processor's convention: no <|audio_out_bos|>
    text target, no stream EOS target) labels."""
    _, _, ids, _, samples = parts
    for sample in (samples[0], samples[3], _with_reference(samples[1], samples[2])):
        ours, theirs = _ours(parts, sample, train_bos=False), _theirs(parts, sample)
        assert torch.equal(ours["input_ids"], theirs["input_ids"][0])
        assert torch.equal(ours["audio_input_ids"], theirs["audio_input_ids"][0])
        assert theirs["audio_input_ids_mask"][0].all() and len(theirs["audio_input_ids_mask"][0]) == len(
            ours["audio_input_ids"])
        # transformers leaves delay placeholders as text labels; we never make a placeholder a text target.
        their_labels = theirs["labels"][0].clone()
        their_labels[their_labels == ids.delay] = IGNORE
        assert torch.equal(ours["labels"], their_labels)
        # With EOS not trained, target audio labels equal the processor's (which masks every BOS and EOS);
        # reference audio is never a target in ours.
        n_target = len(ours["audio_labels"]) - (0 if sample.ref_audio is None else len(
            _theirs(parts, Sample(sample.source, 0, sample.ref_audio, "x"))["audio_input_ids"][0]))
        assert torch.equal(ours["audio_labels"][-n_target:], theirs["audio_labels"][0][-n_target:])
        assert (ours["audio_labels"][:-n_target] == IGNORE).all()


def test_collated_batch_matches_the_processor_batching_the_same_two_conversations(parts):
    """Two conversations of different lengths, one with a reference audio (two audios in its row), collated by us and
    batched by the processor: the same ids, masks and padding. The processor pads text on the left unless told
    otherwise; asked for right padding (ours) it gives exactly our batch, and its left-padded rows hold our tokens."""
    _, _, ids, processor, samples = parts
    pair = [samples[0], _with_reference(samples[1], samples[2])]
    ours = collate([_ours(parts, s) for s in pair], ids.pad, ids.stream_eos)
    texts = [sample_prompt(s, SYSTEM) + TARGET for s in pair]
    audio = [load_audio(a.path, 24000) for s in pair for a in (s.ref_audio, s.audio) if a is not None]
    theirs = processor(text=list(texts), audio=audio, output_labels=True, return_tensors="pt", padding_side="right")
    text_len, frames = ours["attention_mask"].sum(1), ours["audio_input_ids_mask"].sum(1)
    assert text_len[0] != text_len[1] and frames[0] != frames[1]  # both rows really get padded somewhere
    for key in ("input_ids", "attention_mask", "audio_input_ids", "audio_input_ids_mask"):
        assert ours[key].dtype == theirs[key].dtype and torch.equal(ours[key], theirs[key]), key
    text_pad, frame_pad = ours["attention_mask"] == 0, ~ours["audio_input_ids_mask"]
    assert (ours["labels"][text_pad] == IGNORE).all() and (theirs["labels"][text_pad] == IGNORE).all()
    assert (ours["audio_labels"][frame_pad] == IGNORE).all() and (theirs["audio_labels"][frame_pad] == IGNORE).all()

    left = processor(text=list(texts), audio=audio, return_tensors="pt")
    assert (left["attention_mask"][:, 0] == 0).any()  # the default really pads on the left
    for i in range(2):
        kept = left["input_ids"][i][left["attention_mask"][i].bool()]
        assert torch.equal(kept, ours["input_ids"][i][: text_len[i]])
    assert torch.equal(left["audio_input_ids"], ours["audio_input_ids"])


def test_multi_speaker_transcript_reaches_the_user_turn_unchanged(parts, tmp_path):
    tok, _, ids, _, samples = parts
    text = "[SPEAKER0] Hi. [SPEAKER1] Hello."
    (tmp_path / "m.jsonl").write_text(json.dumps({"audio": str(samples[0].audio.path), "text": text}) + "\n")
    (sample,), _ = read_manifest(tmp_path / "m.jsonl", DataConfig())
    assert sample.text == text
    ex = _ours(parts, sample)
    user_turn = f"<|start_header_id|>user<|end_header_id|>\n\n{text}<|eot_id|>"
    assert user_turn in tok.decode(ex["input_ids"])
    expected = tok(user_turn, add_special_tokens=False)["input_ids"]
    ids_list = ex["input_ids"].tolist()
    assert any(ids_list[i:i + len(expected)] == expected for i in range(len(ids_list)))


def test_val_fraction_split_is_seeded_and_disjoint(tmp_path):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps({"audio": f"{i}.wav", "text": f"line {i}"}) + "\n" for i in range(40)))
    cfg = DataConfig(train_manifest=str(manifest), val_fraction=0.2)
    train, val, train_skips, val_skips = load_splits(cfg, seed=7)
    assert not train_skips and not val_skips and len(val) == 8 and len(train) == 32
    assert {s.line for s in train}.isdisjoint({s.line for s in val})
    assert sorted(s.line for s in train + val) == list(range(1, 41))
    again_train, again_val, _, _ = load_splits(cfg, seed=7)
    assert [s.line for s in again_train] == [s.line for s in train]
    assert [s.line for s in again_val] == [s.line for s in val]
    assert [s.line for s in load_splits(cfg, seed=8)[1]] != [s.line for s in val]


def test_unparsable_lines_of_a_val_manifest_are_val_skips(tmp_path):
    (tmp_path / "train.jsonl").write_text(json.dumps({"audio": "a.wav", "text": "fine"}) + "\n{broken\n")
    (tmp_path / "val.jsonl").write_text(json.dumps({"audio": "b.wav"}) + "\n" + json.dumps(
        {"audio": "b.wav", "text": "fine"}) + "\n")
    cfg = DataConfig(train_manifest=str(tmp_path / "train.jsonl"), val_manifest=str(tmp_path / "val.jsonl"))
    train, val, train_skips, val_skips = load_splits(cfg, seed=0)
    assert [s.text for s in train] == ["fine"] and [s.line for s in val] == [2]
    assert [(s.source, s.line, s.reason) for s in train_skips] == [(cfg.train_manifest, 2, "invalid_json")]
    assert [(s.source, s.line, s.reason) for s in val_skips] == [(cfg.val_manifest, 1, "missing_field")]


def test_delay_pattern_shape_for_one_second(parts, tmp_path):
    """1 s at 24 kHz -> 25 frames + stream BOS + stream EOS + 7 delay frames, as FACTS records."""
    tok, cache, ids, processor, _ = parts
    t = np.arange(24000) / 24000
    sf.write(tmp_path / "one.wav", (0.3 * np.sin(2 * np.pi * 200 * t)).astype(np.float32), 24000)
    sample = Sample("m.jsonl", 1, FileAudio(tmp_path / "one.wav"), "one second")
    ex = _ours(parts, sample)
    assert ex["audio_input_ids"].shape == (34, 8)
    assert (ex["audio_input_ids"][0] == ids.stream_bos).all()
    assert ex["audio_input_ids"][1, 1:].eq(ids.stream_bos).all() and ex["audio_input_ids"][1, 0] < 1024
    assert (ex["audio_input_ids"][-1] == ids.stream_eos).all()


def test_audio_labels_follow_the_original_collator(parts):
    """Per codebook: no BOS target, every code a target, exactly one EOS target at the end of its own stream."""
    _, cache, ids, _, samples = parts
    sample = samples[0]
    codes = cache.codes(sample.audio)
    labels = _ours(parts, sample, train_eos=True)["audio_labels"]
    t = codes.shape[1]
    for c in range(8):
        col = labels[:, c]
        assert (col == ids.stream_bos).sum() == 0
        assert (col == ids.stream_eos).sum() == 1
        assert col[c + t + 1] == ids.stream_eos
        assert torch.equal(col[c + 1:c + 1 + t], torch.as_tensor(codes[c].astype(np.int64)))
        assert (col[:c + 1] == IGNORE).all() and (col[c + t + 2:] == IGNORE).all()
    without = _ours(parts, sample, train_eos=False)["audio_labels"]
    assert (without == ids.stream_eos).sum() == 0


def test_text_targets_only_in_the_target_assistant_turn(parts):
    """The authors' convention (the default): <|audio_out_bos|> opening the target audio, then <|audio_eos|> and
    <|eot_id|> after it; never the reference turn's <|audio_out_bos|>, not even with train_on_prompt."""
    tok, _, ids, _, samples = parts
    sample = _with_reference(samples[1], samples[2])
    ex = _ours(parts, sample, train_on_prompt=False)
    where = (ex["labels"] != IGNORE).nonzero()[:, 0]
    targets = tok.convert_ids_to_tokens(ex["labels"][where].tolist())
    assert targets == ["<|audio_out_bos|>", "<|audio_eos|>", "<|eot_id|>"]
    # <|audio_out_bos|> is the one right before the target audio; the other two follow it
    bos = (ex["input_ids"] == ids.audio_bos).nonzero()[:, 0]
    placeholders = torch.isin(ex["input_ids"], torch.tensor([ids.audio, ids.delay])).nonzero()[:, 0]
    assert len(bos) == 2 and where[0] == bos[1] and ex["input_ids"][bos[1] + 1] == ids.audio
    assert (where[1:] > placeholders.max()).all()
    with_prompt = _ours(parts, sample, train_on_prompt=True)
    assert (with_prompt["labels"] != IGNORE).sum() > 10
    assert with_prompt["labels"][bos[0]] == IGNORE and with_prompt["labels"][bos[1]] == ids.audio_bos
    assert not torch.isin(with_prompt["labels"], torch.tensor([ids.audio, ids.delay])).any()


def test_train_audio_out_bos_adds_exactly_that_one_text_target(parts):
    """Against transformers' processor, which masks <|audio_out_bos|>: with the option on (the authors'
    convention) the labels differ in exactly one position per target turn, that token; off, they are equal."""
    _, _, ids, _, samples = parts
    for sample in (samples[0], _with_reference(samples[1], samples[2])):
        theirs = _theirs(parts, sample)["labels"][0].clone()
        theirs[theirs == ids.delay] = IGNORE  # transformers leaves delay placeholders as text labels; we never do
        for train_on_prompt in (False, True):
            on = _ours(parts, sample, train_on_prompt=train_on_prompt)["labels"]
            off = _ours(parts, sample, train_on_prompt=train_on_prompt, train_bos=False)["labels"]
            diff = (on != off).nonzero()[:, 0]
            assert len(diff) == 1 and on[diff[0]] == ids.audio_bos and off[diff[0]] == IGNORE
        assert torch.equal(off, theirs)
        assert torch.equal((on != theirs).nonzero()[:, 0], diff)


def test_collate_pads_right_and_masks(parts):
    _, _, ids, _, samples = parts
    items = [_ours(parts, s) for s in samples[:3]]
    batch = collate(items, ids.pad, ids.stream_eos)
    for i, item in enumerate(items):
        n, f = len(item["input_ids"]), len(item["audio_input_ids"])
        assert batch["attention_mask"][i].sum() == n and batch["audio_input_ids_mask"][i].sum() == f
        assert (batch["labels"][i, n:] == IGNORE).all() and (batch["audio_labels"][i, f:] == IGNORE).all()
        assert (batch["input_ids"][i, n:] == ids.pad).all()
    placeholders = torch.isin(batch["input_ids"], torch.tensor([ids.audio, ids.delay])).sum()
    assert placeholders == batch["audio_input_ids_mask"].sum()


def test_bad_manifest_lines_are_named(tmp_path):
    wav = tmp_path / "a.wav"
    sf.write(wav, np.zeros(2400, dtype=np.float32), 24000)
    lines = [json.dumps({"audio": "a.wav", "text": "fine"}), "{not json", json.dumps({"audio": "a.wav"}),
             json.dumps({"audio": "a.wav", "text": "  "})]
    manifest = tmp_path / "m.jsonl"
    manifest.write_bytes(("\n".join(lines) + "\n").encode() + b"\xff\xfe\n")
    samples, skips = read_manifest(manifest, DataConfig())
    assert [s.line for s in samples] == [1]
    assert [(s.line, s.reason) for s in skips] == [(2, "invalid_json"), (3, "missing_field"), (4, "empty_text"),
                                                    (5, "not_utf8")]
    assert all(s.source == str(manifest) for s in skips)


def test_an_invalid_json_line_names_the_column_of_that_line(tmp_path):
    good = json.dumps({"audio": "a.wav", "text": "fine"})
    lines = ['{"audio": "a.wav", "text": "cut short"', '{"audio": "é.wav" "text": "no comma"}', "\tnot json",
             '{"audio": "a.wav", "text": "two"}}', '{"audio": "a.wav", "text": "unterminated']
    manifest = tmp_path / "m.jsonl"
    manifest.write_bytes(("\r\n".join([good, *lines]) + "\r\n").encode())
    _, skips = read_manifest(manifest, DataConfig())
    assert [(s.line, s.reason, s.detail) for s in skips] == [
        (2, "invalid_json", "Expecting ',' delimiter at the end of the line"),
        (3, "invalid_json", "Expecting ',' delimiter at column 19"),  # characters, not bytes: é is one
        (4, "invalid_json", "Expecting value at column 2"),
        (5, "invalid_json", "Extra data at column 34"),
        (6, "invalid_json", "Unterminated string starting at column 28")]
    assert lines[1][18] == '"' and lines[3][33] == "}" and lines[4][27] == '"'


def test_skips_are_listed_in_line_order_whichever_check_found_them():
    from higgs_accel.data import Skip, in_line_order, strict_error

    found = [Skip("train.jsonl", 7, "invalid_json", "x"), Skip("val.jsonl", 2, "invalid_json", "x"),
             Skip("train.jsonl", 3, "missing_file", "x"), Skip("val.jsonl", 1, "too_long", "x"),
             Skip("train.jsonl", 5, "special_token", "x")]
    assert [(s.source, s.line) for s in in_line_order(found)] == [
        ("train.jsonl", 3), ("train.jsonl", 5), ("train.jsonl", 7), ("val.jsonl", 1), ("val.jsonl", 2)]
    listed = str(strict_error(found)).splitlines()[1:]
    assert [tuple(line.strip().split(":")[:2]) for line in listed] == [
        ("train.jsonl", "3"), ("train.jsonl", "5"), ("train.jsonl", "7"), ("val.jsonl", "1"), ("val.jsonl", "2")]


def test_audio_is_downmixed_and_resampled(tmp_path):
    t = np.arange(16000) / 16000
    mono = (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)
    sf.write(tmp_path / "s.wav", np.stack([mono, mono], axis=1), 16000)
    wave = load_audio(tmp_path / "s.wav", 24000)
    assert wave.dtype == np.float32 and wave.ndim == 1 and abs(len(wave) - 24000) <= 1
