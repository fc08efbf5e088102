"""The tiny codec's audio is worth hearing: decoded audio depends on the codes (equal codes, equal waves; other codes,
another waveform and another mel picture), encoding the demo's speech still gives varied codes, and a short
training run's sample WAVs are not all one tone."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from analysis.mel import mel_db
from tests.conftest import of, train_run

RATE = 24000
HOP = 960  # 25 frames/s


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(a))


@pytest.fixture(scope="module")
def codec(tiny):
    from transformers import HiggsAudioV2TokenizerModel

    model = HiggsAudioV2TokenizerModel.from_pretrained(tiny["model.audio_tokenizer"]).eval()
    assert (model.config.num_quantizers, model.config.frame_rate) == (8, 25)
    assert 0.5e6 < sum(p.numel() for p in model.parameters()) < 1.5e6
    return model


def decode(codec, codes: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return codec.decode(codes[None]).audio_values.reshape(-1).numpy()


def demo_codes(codec, tiny) -> torch.Tensor:
    wave, rate = sf.read(Path(tiny["data.train_manifest"]).parent / "wav" / "train-000.wav", dtype="float32")
    assert rate == RATE
    with torch.no_grad():
        return codec.encode(torch.from_numpy(wave)[None, None]).audio_codes[0]


def test_encoding_the_demo_speech_gives_varied_codes(codec, tiny):
    codes = demo_codes(codec, tiny)
    assert codes.shape[0] == 8 and codes.shape[1] >= 20
    assert all(len(set(row.tolist())) >= codes.shape[1] // 3 for row in codes)  # not one code per codebook


def test_equal_codes_decode_equal_and_other_codes_differ_in_wave_and_mel(codec, tiny):
    codes = demo_codes(codec, tiny)
    wave = decode(codec, codes)
    assert len(wave) == codes.shape[1] * HOP
    assert 0.02 < float(np.sqrt(np.mean(wave**2))) < 0.5  # audible, not clipping
    assert np.array_equal(wave, decode(codec, codes.clone()))
    other = torch.roll(codes, 7, dims=1)  # the same codes at other frames: another sequence
    changed = decode(codec, other)
    assert rel(wave, changed) > 0.1
    assert rel(mel_db(wave, RATE), mel_db(changed, RATE)) > 0.1
    # Codes equal but for frames 25-29: equal audio where the codes are equal (beyond the decoder's reach of 10
    # frames each way), different where they differ.
    codes = torch.cat([codes, codes], dim=1)[:, :60]
    wave = decode(codec, codes)
    part = codes.clone()
    part[:, 25:30] = (codes[:, 25:30] + 511) % 1024
    partial = decode(codec, part)
    assert np.array_equal(wave[: 15 * HOP], partial[: 15 * HOP])
    assert np.array_equal(wave[40 * HOP:], partial[40 * HOP:])
    assert rel(wave[25 * HOP:30 * HOP], partial[25 * HOP:30 * HOP]) > 0.1

def test_a_short_run_writes_sample_wavs_that_differ_where_their_codes_do(tmp_path, tiny, codes_cache):
    events = train_run(tmp_path / "run", tiny, codes_cache, train__max_steps=2, train__eval_every=2,
                       log__generate_every=1, log__generate_max_new_tokens=20)
    rows = of(events, "eval_audio")
    assert len(rows) >= 2
    waves = {}
    for r in rows:
        label, pred = (sf.read(r[k], dtype="float32")[0] for k in ("label_path", "pred_path"))
        waves[r["sample"]] = label
        if r["acc"] < 1:  # some code differs: so does the audio
            assert not np.array_equal(label, pred)
        else:
            assert np.array_equal(label, pred)
    for a, b in itertools.combinations(waves.values(), 2):  # other samples: other sounds, not one tone
        n = min(len(a), len(b))
        assert rel(a[:n], b[:n]) > 0.1 and rel(mel_db(a[:n], RATE), mel_db(b[:n], RATE)) > 0.05


def test_tiny_scorers_load_through_from_pretrained(tmp_path):
    from transformers import Wav2Vec2ForCTC, WavLMForXVector

    from higgs_accel.tiny import ensure_tiny_scorers

    paths = ensure_tiny_scorers(tmp_path / "scorers")
    assert set(paths) == {"eval.asr_model", "eval.speaker_model"}
    assert ensure_tiny_scorers(tmp_path / "scorers") == paths  # built once
    Wav2Vec2ForCTC.from_pretrained(paths["eval.asr_model"])
    WavLMForXVector.from_pretrained(paths["eval.speaker_model"])
