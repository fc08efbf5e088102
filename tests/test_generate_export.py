"""Listening to a run: teacher-forced eval audio, generation with transformers' generate, merged export."""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest
import soundfile as sf
import torch
from torch import nn

from higgs_accel import generate as gen
from higgs_accel import loading
from higgs_accel.chat import SpecialIds, build_example, delay_pattern
from higgs_accel.cli import parse_args
from higgs_accel.codes import CodeCache
from higgs_accel.config import ConfigError, DataConfig
from higgs_accel.data import FileAudio, collate, read_manifest
from higgs_accel.model import DualLossModel
from higgs_accel.samples import sample_codes, write_eval_audio, write_generated
from tests.conftest import train_run


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny, codes_cache):
    run_dir = tmp_path_factory.mktemp("gen_run")
    train_run(run_dir, tiny, codes_cache, train__max_steps=3, train__eval_every=0, train__save_every=0)
    return run_dir


@pytest.fixture(scope="module")
def parts(run_dir, tiny):
    """Tokenizer, codec, base + adapter (a PeftModel, as training holds it) and the special ids."""
    tok = loading.load_tokenizer(tiny["model.base"])
    codec = loading.load_codec_dir(tiny["model.audio_tokenizer"])
    model = loading.load_model(tiny["model.base"], str(run_dir / "adapter"))
    return tok, codec, model, SpecialIds.from_parts(tok, model.config)


def call_cli(*argv) -> int:
    """Run ``higgs-accel ARGV`` through the real parser; a ConfigError propagates (``main`` turns it into exit 2)."""
    args = parse_args([str(a) for a in argv])
    return args.func(args)


def random_codes(frames: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 1024, (8, frames)).astype(np.int16)


# ---------------------------------------------------------------- layout


def test_prompt_is_the_training_layout_up_to_audio_bos(parts):
    tok, _, _, ids = parts
    sample = make_sample(text="Seven stars hum.", ref_text="Old green hills.", scene="A quiet room.")
    ref = random_codes(6, 1)
    example = build_example(sample, random_codes(10, 2), ref, tok, ids, "Sys.", False, True)
    prompt = gen.build_prompt(tok, ids, "Seven stars hum.", ref, "Old green hills.", "A quiet room.", "Sys.")
    n = len(prompt["input_ids"])
    assert prompt["input_ids"][-1] == ids.audio_bos
    assert torch.equal(prompt["input_ids"], example["input_ids"][:n])
    assert torch.equal(prompt["audio_input_ids"], example["audio_input_ids"][: len(prompt["audio_input_ids"])])
    no_ref = gen.build_prompt(tok, ids, "Seven stars hum.")
    assert no_ref["audio_input_ids"] is None and ids.audio not in no_ref["input_ids"].tolist()


def make_sample(**fields):
    from higgs_accel.data import Sample

    return Sample(source="t", line=1, audio=None, ref_audio=FileAudio("ref.wav"), **fields)


def test_generated_frames_revert_to_the_codes(parts):
    _, _, _, ids = parts
    codes = torch.as_tensor(random_codes(7, 3).astype(np.int64))
    frames = torch.as_tensor(np.asarray(delay_pattern(codes, ids.stream_bos, ids.stream_eos, ids.stream_bos,
                                                      ids.stream_eos)))
    assert torch.equal(gen.generated_codes(frames, ids), codes)
    # cut by the length limit before the stream ended: the complete frames only
    assert torch.equal(gen.generated_codes(frames[:12], ids), codes[:, :4])


def test_stop_rule_against_transformers_decode(parts):
    """Where every codebook ends at its own delayed position, our codes decode exactly like
    HiggsAudioV2Processor.decode; where only codebook 0 ended and transformers forced the others one step later,
    the processor keeps one more frame (codebook 0's EOS clipped to code 1023) and we do not."""
    from transformers import DacFeatureExtractor, HiggsAudioV2Processor

    tok, codec, _, ids = parts
    processor = HiggsAudioV2Processor(DacFeatureExtractor(sampling_rate=24000, hop_length=960), tok, codec)
    codes = torch.as_tensor(random_codes(6, 4).astype(np.int64))
    frames = torch.as_tensor(np.asarray(delay_pattern(codes, ids.stream_bos, ids.stream_eos, ids.stream_bos,
                                                      ids.stream_eos)))
    ours = gen.decode_codes(codec, gen.generated_codes(frames, ids))
    assert np.allclose(ours, processor.decode(frames[None]).numpy(), atol=1e-6)
    # codebook c >= 1 still emits a code at frame T (row T + c) and ends one frame later
    forced = torch.cat([frames, frames[-1:]])
    for c in range(1, ids.num_codebooks):
        forced[6 + 1 + c, c] = 5
    assert len(processor.decode(forced[None])) == 7 * codec.config.hop_length
    assert torch.equal(gen.generated_codes(forced, ids), codes)


# ---------------------------------------------------------------- teacher-forced eval audio


@pytest.fixture(scope="module")
def eval_batch(parts, tiny, codes_cache):
    tok, codec, model, ids = parts
    cache = CodeCache(codes_cache, codec)
    samples = read_manifest(tiny["data.val_manifest"], DataConfig())[0][:2]
    codes = [cache.codes(s.audio) for s in samples]
    batch = collate([build_example(s, c, None, tok, ids, DataConfig().system_prompt, False, True)
                     for s, c in zip(samples, codes)], ids.pad, ids.stream_eos)
    with torch.no_grad():
        out = DualLossModel(model, ids).eval()(batch)
    return out, batch, codes


def test_eval_audio_files_have_the_duration_of_their_frames(parts, eval_batch, tmp_path):
    _, codec, _, ids = parts
    out, batch, codes = eval_batch
    rows = write_eval_audio(out, batch, codec, ids, tmp_path, max_samples=5)
    assert [r["sample"] for r in rows] == [0, 1]
    hop, sr = codec.config.hop_length, codec.config.sample_rate
    for r, c in zip(rows, codes):
        assert r["reason"] is None and r["n_frames"] == c.shape[1]
        assert r["pred_seconds"] == r["label_seconds"] == pytest.approx(c.shape[1] * hop / sr)
        for kind in ("pred", "label"):
            info = sf.info(r[f"{kind}_path"])
            assert info.samplerate == sr and info.frames == c.shape[1] * hop
        assert len(r["acc_cb"]) == 8 and all(0.0 <= a <= 1.0 for a in r["acc_cb"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["label-0.wav", "label-1.wav", "pred-0.wav", "pred-1.wav"]
    # the label codes out of the delay pattern are exactly the codec's codes of the audio
    for b, c in enumerate(codes):
        assert torch.equal(sample_codes(out, b, ids)[1], torch.as_tensor(c.astype(np.int64)))


def test_eval_audio_reports_a_sample_without_targets(parts, eval_batch, tmp_path):
    _, codec, _, ids = parts
    out, batch, _ = eval_batch
    keep = out.audio_where[:, 0] != 1
    out = dataclasses.replace(out, audio_pred=out.audio_pred[keep], audio_label=out.audio_label[keep],
                              audio_where=out.audio_where[keep])
    rows = write_eval_audio(out, batch, codec, ids, tmp_path, max_samples=2)
    assert rows[0]["reason"] is None and rows[1]["reason"] and rows[1]["pred_path"] is None
    assert not (tmp_path / "pred-1.wav").exists()


# ---------------------------------------------------------------- generation


def test_generation_stops_at_the_length_limit(parts):
    tok, codec, model, ids = parts
    model.train()  # as the trainer holds it: generation runs in eval mode and gives the model back as it was
    r = gen.generate_speech(model, tok, codec, ids, "The quick brown fox.", max_new_tokens=24)
    restored = gen.generator_of(model).training
    model.eval()
    assert restored
    assert r["error"] is None and r["stopped"] == "max_length" and r["new_tokens"] == 24
    assert 0 < r["n_frames"] <= 24 - ids.num_codebooks
    assert len(r["wave"]) == r["n_frames"] * codec.config.hop_length


class EndsAudioAt(nn.Module):
    """An audio head whose codebook 0 picks the stream EOS from generation step ``step`` on."""

    def __init__(self, head: nn.Module, step: int, stream_eos: int):
        super().__init__()
        self.head, self.step, self.stream_eos, self.calls = head, step, stream_eos, 0

    def forward(self, hidden):
        self.calls += 1
        logits = self.head(hidden)
        if self.calls >= self.step:
            logits = logits.clone()
            logits[..., self.stream_eos] += 1e4  # index of codebook 0's EOS in the flat (K x 1026) logits
        return logits


def test_generation_stops_at_the_end_of_audio(parts):
    tok, codec, model, ids = parts
    lm = gen.generator_of(model)
    head = lm.audio_lm_head
    lm.audio_lm_head = EndsAudioAt(head, 6, ids.stream_eos)  # not monkeypatch: its undo loses nn.Module children
    try:
        r = gen.generate_speech(model, tok, codec, ids, "Hi.", max_new_tokens=100)
    finally:
        lm.audio_lm_head = head
    # Step 1 is the all-BOS frame, steps 2-5 codebook 0's four codes, step 6 its EOS; transformers then forces
    # codebook c to end c + 1 steps later, so the all-EOS frame, and the stop, come at step 6 + K.
    assert r["error"] is None and r["stopped"] == "eos"
    assert r["n_frames"] == 4 and r["new_tokens"] == 6 + ids.num_codebooks
    assert len(r["wave"]) == 4 * codec.config.hop_length


def test_generation_starts_from_the_checkpoints_generation_config(tiny, tmp_path, monkeypatch):
    """A checkpoint whose generation_config.json sets sampling and repetition-aware sampling: transformers' _sample
    sees exactly those values unless an option overrides one; --greedy means argmax without RAS redraws."""
    import json
    import shutil

    base = tmp_path / "base"
    shutil.copytree(tiny["model.base"], base)
    config = json.loads((base / "generation_config.json").read_text())
    config.pop("_from_model_config", None)  # with it, transformers keeps only the keys it knows (RAS is not one)
    tuned = {"do_sample": True, "temperature": 0.7, "top_k": 20, "top_p": 0.9, "ras_win_len": 7,
             "ras_win_max_num_repeat": 2}
    (base / "generation_config.json").write_text(json.dumps({**config, **tuned}))
    tok, codec = loading.load_tokenizer(str(base)), loading.load_codec_dir(tiny["model.audio_tokenizer"])
    model = loading.load_model(str(base), None)
    ids = SpecialIds.from_parts(tok, model.config)
    seen = []
    real = type(model)._sample

    def spy(self, *args, generation_config, **kwargs):
        seen.append({key: getattr(generation_config, key, None) for key in gen.SAMPLING_KEYS})
        return real(self, *args, generation_config=generation_config, **kwargs)

    monkeypatch.setattr(type(model), "_sample", spy)
    runs = [None, {"do_sample": False}, {"do_sample": False, "ras_win_len": 3}, {"temperature": 1.3, "top_k": 0},
            {"ras_win_len": 0}]
    results = [gen.generate_speech(model, tok, codec, ids, "Hi.", max_new_tokens=12, sampling=s, seed=0)
               for s in runs]
    assert all(r["error"] is None for r in results)
    expected = [tuned, {**tuned, "do_sample": False, "ras_win_len": None},
                {**tuned, "do_sample": False, "ras_win_len": 3}, {**tuned, "temperature": 1.3, "top_k": 0},
                {**tuned, "ras_win_len": None}]
    assert seen == expected
    # what the result reports is what ran (RAS off shows as no window and no repeat count)
    assert [r["sampling"] for r in results] == [{**e, "ras_win_max_num_repeat": None} if e["ras_win_len"] is None
                                                else e for e in expected]
    assert gen.describe_sampling(results[0]["sampling"]) == ("sampled: temperature 0.7, top-k 20, top-p 0.9, "
                                                             "repetition-aware: 2 in 7 frames")

    # A checkpoint that sets none of it decodes as transformers' defaults (greedy); a window set here gets 2 repeats.
    plain = loading.load_model(tiny["model.base"], None)
    seen.clear()
    r = gen.generate_speech(plain, tok, codec, ids, "Hi.", max_new_tokens=12, sampling={"ras_win_len": 4})
    assert r["error"] is None and seen[0]["do_sample"] in (False, None)
    assert (seen[0]["ras_win_len"], seen[0]["ras_win_max_num_repeat"]) == (4, 2)


def test_generation_reports_failures_instead_of_raising(parts):
    tok, codec, model, ids = parts
    r = gen.generate_speech(model, tok, codec, ids, "Hi.", max_new_tokens=3)
    assert r["error"].startswith("no audio frame") and r["n_frames"] == 0 and len(r["wave"]) == 0
    r = gen.generate_speech(model, tok, codec, ids, "Hi.", ref_audio="/missing.wav", ref_text="x")
    assert "missing.wav" in r["error"] and r["stopped"] is None


def test_sampling_is_seeded_and_leaves_the_global_rng_alone(parts, tmp_path):
    tok, codec, model, ids = parts
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    rows = [write_generated(model, tok, codec, ids, ["One.", "Two."], tmp_path / d, "Sys.", 16,
                            sampling={"do_sample": True})
            for d in ("a", "b")]
    assert torch.equal(torch.rand(1), before)
    assert [r["path"] is not None for r in rows[0]] == [True, True]
    for a, b in zip(*rows):
        assert np.array_equal(sf.read(a["path"])[0], sf.read(b["path"])[0])


# ---------------------------------------------------------------- export


def test_export_equals_base_plus_adapter(parts, run_dir, tmp_path):
    from transformers import HiggsAudioV2ForConditionalGeneration

    tok, _, model, ids = parts
    out = tmp_path / "export"
    assert call_cli("export", "--run", run_dir, "--out", out) == 0
    merged = HiggsAudioV2ForConditionalGeneration.from_pretrained(out, use_text_head=True).eval()
    base = HiggsAudioV2ForConditionalGeneration.from_pretrained(model.peft_config["default"].base_model_name_or_path,
                                                                use_text_head=True).eval()
    prompt = gen.build_prompt(tok, ids, "Quiet rivers.", random_codes(5, 4), "Bright stars.")
    batch = {"input_ids": prompt["input_ids"][None], "attention_mask": torch.ones(1, len(prompt["input_ids"])),
             "audio_input_ids": prompt["audio_input_ids"][None],
             "audio_input_ids_mask": torch.ones(1, len(prompt["audio_input_ids"]), dtype=torch.bool)}

    def heads(lm):
        with torch.no_grad():
            hidden = lm.model(**batch).last_hidden_state
            return lm.audio_lm_head(hidden), lm.text_lm_head(hidden)

    adapted, exported, plain = heads(gen.generator_of(model)), heads(merged), heads(base)
    for a, e, p in zip(adapted, exported, plain):
        assert torch.allclose(a, e, atol=1e-5, rtol=0), (a - e).abs().max()
        assert not torch.allclose(a, p, atol=1e-3), "the adapter should change the model"
    assert loading.load_tokenizer(str(out))("Quiet rivers.")["input_ids"] == tok("Quiet rivers.")["input_ids"]
    assert loading.load_codec_dir(str(out / "audio_tokenizer")).config.hop_length == 960
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(out)
    assert type(processor).__name__ == "HiggsAudioV2Processor" and processor.audio_tokenizer.config.hop_length == 960
    # Every file as the umask makes new files (safetensors writes 0600; a copy keeps no source's mode)
    umask = os.umask(0)
    os.umask(umask)
    files = [p for p in out.rglob("*") if p.is_file()]
    assert {p.relative_to(out).as_posix(): oct(p.stat().st_mode & 0o777) for p in files} == {
        p.relative_to(out).as_posix(): oct(0o666 & ~umask) for p in files}
    # The export holds its codec: generate needs no --audio-tokenizer
    assert call_cli("generate", "--base", out, "--text", "Hi.", "--out", tmp_path / "e.wav",
                    "--max-new-tokens", 20) == 0
    assert sf.info(tmp_path / "e.wav").frames > 0


# ---------------------------------------------------------------- command line


def test_generate_cli_writes_a_wav(run_dir, tmp_path, tiny):
    out = tmp_path / "sub" / "hello.wav"
    assert call_cli("generate", "--run", run_dir, "--text", "Hello there.", "--out", out,
                    "--max-new-tokens", 20) == 0
    info = sf.info(out)
    assert info.samplerate == 24000 and 0 < info.frames <= (20 - 8) * 960 and info.frames % 960 == 0
    ref = f"{tiny['data.train_manifest'].rsplit('/', 1)[0]}/wav/train-000.wav"
    assert call_cli("generate", "--base", tiny["model.base"], "--audio-tokenizer", tiny["model.audio_tokenizer"],
                    "--text", "Hi.", "--ref-audio", ref, "--ref-text", "Some words.", "--out", tmp_path / "b.wav",
                    "--max-new-tokens", 12, "--do-sample", "--seed", 1) == 0
    assert sf.info(tmp_path / "b.wav").frames > 0
    # too few steps for one frame: a reported failure (exit 1), no file
    assert call_cli("generate", "--run", run_dir, "--text", "Hi.", "--out", tmp_path / "c.wav",
                    "--max-new-tokens", 3) == 1
    assert not (tmp_path / "c.wav").exists()


def test_sampling_options_are_unset_unless_given():
    """Each knob left out is None (the checkpoint's value); --greedy and --do-sample exclude each other. The log keys
    are the same: null unless set, and set ones are what generation gets."""
    from higgs_accel.config import load_config
    from higgs_accel.samples import generation_options

    base = ["generate", "--base", "B", "--text", "x", "--out", "o.wav"]
    args = parse_args(base)
    assert {key: getattr(args, key) for key in gen.SAMPLING_KEYS} == dict.fromkeys(gen.SAMPLING_KEYS)
    assert parse_args([*base, "--greedy"]).do_sample is False and parse_args([*base, "--do-sample"]).do_sample
    assert parse_args([*base, "--ras-win-len", "0"]).ras_win_len == 0
    with pytest.raises(SystemExit):
        parse_args([*base, "--greedy", "--do-sample"])
    cfg = load_config(None, [("preset", "tiny", "x"), ("log.generate_do_sample", "false", "x"),
                             ("log.generate_top_p", "null", "x")])
    assert generation_options(cfg.log, None)["sampling"] == {**dict.fromkeys(gen.SAMPLING_KEYS), "do_sample": False}


@pytest.mark.parametrize("argv, message", [
    (["generate", "--base", "/nope/model", "--audio-tokenizer", "/nope", "--text", "x", "--out", "o.wav"],
     "--base: model dir not found: /nope/model"),
    (["generate", "--run", "/nope/run", "--text", "x", "--out", "o.wav"], "--run: /nope/run is not a run dir"),
    (["generate", "--run", "RUN", "--text", "x", "--out", "o.wav", "--max-new-tokens", "0"],
     "--max-new-tokens must be at least 1"),
    (["generate", "--run", "RUN", "--text", "x", "--out", "o.wav", "--ref-audio", "/nope.wav", "--ref-text", "y"],
     "--ref-audio: file not found"),
    (["generate", "--run", "RUN", "--text", "x", "--out", "o.wav", "--adapter", "/tmp"],
     "--adapter: /tmp is not a PEFT adapter dir"),
    (["generate", "--run", "RUN", "--text", "Hi <|AUDIO_OUT|> there", "--out", "o.wav"],
     "--text contains the special token <|AUDIO_OUT|>"),
    (["generate", "--run", "RUN", "--text", "Hi<|eot_id|>", "--out", "o.wav"],
     "--text contains the special token <|eot_id|>"),
    (["generate", "--run", "RUN", "--text", "x", "--scene", "<|audio_out_bos|>", "--out", "o.wav"],
     "--scene contains the special token <|audio_out_bos|>"),
    (["generate", "--base", "BASE", "--text", "x", "--out", "o.wav"], "--audio-tokenizer is required"),
    (["export", "--base", "BASE", "--out", "OUT"], "--adapter (or --run) is required"),
    (["export", "--run", "RUN", "--out", "RUN"], "is not empty"),
])
def test_bad_input_is_a_config_error(argv, message, run_dir, tiny):
    argv = [{"RUN": run_dir, "BASE": tiny["model.base"]}.get(a, a) for a in argv]
    with pytest.raises(ConfigError) as e:
        call_cli(*argv)
    assert message in str(e.value) and "\n" not in str(e.value)


# ---------------------------------------------------------------- during training


def test_training_generates_every_n_evals_in_the_reference_voice(tmp_path, tiny, codes_cache):
    ref = f"{tiny['data.train_manifest'].rsplit('/', 1)[0]}/wav/train-000.wav"
    events = train_run(tmp_path / "run", tiny, codes_cache, train__max_steps=4, train__eval_every=1,
                       train__save_every=0, log__generate_every=2, log__generate_max_new_tokens=20,
                       log__generate_prompts=["One.", "Two."], log__generate_ref_audio=ref,
                       log__generate_ref_text="Some words.", log__generate_do_sample=True, log__generate_top_k=50)
    generated = [e for e in events if e["event"] == "generate_audio"]
    # evals at steps 1, 2, 3 and the last (4): every second one generates, and the last one always does
    assert [(e["step"], e["prompt"]) for e in generated] == [(2, 0), (2, 1), (4, 0), (4, 1)]
    for e in generated:
        assert e["error"] is None and sf.info(e["path"]).frames > 0
        # the log keys set override the tiny checkpoint's config (silent on sampling: transformers' defaults)
        assert (e["do_sample"], e["top_k"], e["temperature"], e["ras_win_len"]) == (True, 50, 1.0, None)


def test_a_bad_reference_voice_stops_the_run_before_training(tmp_path, tiny, codes_cache):
    not_audio = tmp_path / "voice.wav"
    not_audio.write_text("not a wav file")
    with pytest.raises(ConfigError, match="'log.generate_ref_audio': cannot use"):
        train_run(tmp_path / "run", tiny, codes_cache, log__generate_every=1, log__generate_ref_audio=str(not_audio))
