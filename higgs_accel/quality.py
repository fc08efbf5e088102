"""Is the voice getting better? Intelligibility and speaker similarity of generated speech.

Two optional scorers, both transformers models loaded by hub id or local dir through their own ``from_pretrained``:

- an ASR model (anything the ``automatic-speech-recognition`` pipeline accepts: Whisper, a CTC model, ...) whose
  transcript is compared with the text asked for: word and character error rate (jiwer), after ``normalize_text``;
- a speaker-verification x-vector model (``AutoModelForAudioXVector``, e.g. a WavLM ``ForXVector``): speaker
  similarity is the cosine between the embeddings of the generation and of a reference recording of the voice.

This is the Seed-TTS way of judging a TTS model. Scoring runs on the main process, outside the training step, and
leaves the global RNG as it was (a resumed run stays exact); its wall time is reported as ``score_s``.
"""

from __future__ import annotations

import re
import time
import unicodedata
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

from .config import ConfigError, EvalConfig, error_line
from .data import load_audio, resample
from .loading import load_ref

ASR_TASK = "automatic-speech-recognition"

# ---------------------------------------------------------------- text normalisation

_ONES = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
         "seventeen eighteen nineteen").split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()
_SCALES = ((10**9, "billion"), (10**6, "million"), (1000, "thousand"))
_DIGIT_NAMES = _ONES[:10]


def spell_number(digits: str) -> str:
    """English words of a run of digits: ``"42"`` -> ``"forty two"``, ``"1999"`` -> ``"one thousand nine hundred
    ninety nine"`` (no "and", no year reading). A run with a leading zero or of 13 digits and more is read digit by
    digit (``"007"`` -> ``"zero zero seven"``): it is a code, not an amount."""
    if (len(digits) > 1 and digits[0] == "0") or len(digits) > 12:
        return " ".join(_DIGIT_NAMES[int(d)] for d in digits)
    return _words(int(digits))


def _words(n: int) -> str:
    if n < 20:
        return _ONES[n]
    if n < 100:
        return _TENS[n // 10] + ("" if n % 10 == 0 else " " + _ONES[n % 10])
    if n < 1000:
        return _ONES[n // 100] + " hundred" + ("" if n % 100 == 0 else " " + _words(n % 100))
    for scale, name in _SCALES:
        if n >= scale:
            rest = n % scale
            return _words(n // scale) + " " + name + ("" if rest == 0 else " " + _words(rest))
    raise AssertionError(n)


_THOUSANDS_SEP = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
_DECIMAL = re.compile(r"(\d+)\.(\d+)")
_DIGITS = re.compile(r"\d+")
_APOSTROPHES = re.compile(r"['\u2019\u02bc]")


def normalize_text(text: str, spell_numbers: bool = True) -> str:
    """The text WER and CER are computed on, the same rule for the prompt and the transcript:

    1. Unicode NFKC, then case folding (``"Straße"`` -> ``"strasse"``);
    2. with ``spell_numbers`` (English): thousands separators go (``"1,000"`` -> ``"1000"``), a decimal is read with
       "point" and its fraction digit by digit (``"3.14"`` -> ``"three point one four"``), every other run of digits
       by ``spell_number``. Without it digits stay as they are, one token per run (for other languages);
    3. apostrophes are dropped (``"don't"`` -> ``"dont"``), every other punctuation or symbol character
       (Unicode categories P* and S*: ``- , . ! ? " % $ ...``) becomes a space;
    4. runs of whitespace become one space, none at either end.

    Not handled (both sides must say it the same way): ordinals (``"1st"`` -> ``"one st"``), currencies and
    percentages (``"5%"`` -> ``"five"``), years read in pairs ("nineteen ninety nine" differs from ``"1999"``)."""
    text = unicodedata.normalize("NFKC", text).casefold()
    if spell_numbers:
        text = _THOUSANDS_SEP.sub("", text)
        text = _DECIMAL.sub(lambda m: f" {spell_number(m[1])} point {' '.join(spell_number(d) for d in m[2])} ",
                            text)
        text = _DIGITS.sub(lambda m: f" {spell_number(m[0])} ", text)
    text = _APOSTROPHES.sub("", text)
    text = "".join(" " if unicodedata.category(c)[0] in "PS" else c for c in text)
    return " ".join(text.split())


def error_rates(references: list[str], hypotheses: list[str]) -> tuple[float, float]:
    """(WER, CER) of hypotheses against references, both already normalised, pooled over all pairs: total word
    (character) edits over total reference words (characters), by jiwer. CER counts the single spaces between
    words as characters. An empty hypothesis (no speech) is all deletions: error rate 1."""
    import jiwer

    return float(jiwer.wer(references, hypotheses)), float(jiwer.cer(references, hypotheses))


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity of two embedding vectors, in [-1, 1]."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.dot(a, b) / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-12))


# ---------------------------------------------------------------- audio


def _audio_at(audio, sample_rate: int | None, target_rate: int) -> np.ndarray:
    """``audio`` (a file path, or a wave at ``sample_rate``) as mono float32 at ``target_rate``."""
    if isinstance(audio, (str, Path)):
        return load_audio(audio, target_rate)
    if sample_rate is None:
        raise ValueError("a wave needs its sample_rate")
    return resample(audio, sample_rate, target_rate)


# ---------------------------------------------------------------- scorers


def load_asr(ref: str, device: torch.device | str = "cpu", key: str = "'eval.asr_model'"):
    """transformers' ``automatic-speech-recognition`` pipeline for the model at ``ref`` (hub id or local dir);
    a missing dir or a failed load is one ConfigError line naming ``key``."""
    from transformers import pipeline

    device = torch.device(device)
    # The pipeline loads a checkpoint in its stored dtype (Whisper's is float16), which a CPU runs badly or not at all.
    dtype = "auto" if device.type == "cuda" else torch.float32
    pipe = load_ref(key, "an automatic-speech-recognition model", ref,
                    lambda r: pipeline(ASR_TASK, model=r, device=device, dtype=dtype))
    if pipe.feature_extractor is None:
        raise ConfigError(f"{key}: '{ref}' has no feature extractor (preprocessor_config.json)")
    return pipe


def load_speaker(ref: str, device: torch.device | str = "cpu", key: str = "'eval.speaker_model'"):
    """(feature extractor, ``AutoModelForAudioXVector``) of the speaker-verification model at ``ref``."""
    from transformers import AutoFeatureExtractor, AutoModelForAudioXVector

    what = "a speaker-verification x-vector model (AutoModelForAudioXVector)"
    features = load_ref(key, f"the feature extractor of {what}", ref, AutoFeatureExtractor.from_pretrained)
    model, info = load_ref(key, what, ref,
                           lambda r: AutoModelForAudioXVector.from_pretrained(r, output_loading_info=True))
    if info["missing_keys"]:
        # transformers builds an x-vector head on any checkpoint of the family (a plain WavLM, a CTC model) and
        # initialises it at random: its "similarities" would mean nothing.
        missing = sorted(info["missing_keys"])
        raise ConfigError(f"{key}: '{ref}' is no trained x-vector model: {len(missing)} weights missing "
                          f"({', '.join(missing[:3])}, ...)")
    return features, model.to(device).eval().requires_grad_(False)


@dataclass
class Utterance:
    """One thing to score: ``audio`` (a file path or a wave at ``sample_rate``; None when generation failed) that
    should say ``text`` in the voice of ``reference`` (path or wave at ``reference_rate``; None: no similarity).
    ``gen_time_s`` is how long generating it took (None: unknown, no real-time factor)."""

    text: str
    audio: str | Path | np.ndarray | None
    sample_rate: int | None = None
    reference: str | Path | np.ndarray | None = None
    reference_rate: int | None = None
    prompt: int | None = None
    gen_time_s: float | None = None
    error: str | None = None


class QualityScorer:
    """WER/CER from an ASR pipeline and speaker similarity from an x-vector model; either may be None."""

    def __init__(self, asr=None, speaker=None, spell_numbers: bool = True, batch_size: int = 8,
                 asr_language: str = "", asr_name: str | None = None, speaker_name: str | None = None):
        self.asr, self.speaker = asr, speaker
        self.spell_numbers, self.batch_size, self.asr_language = spell_numbers, batch_size, asr_language
        self.asr_name, self.speaker_name = asr_name, speaker_name
        self._embeddings: dict[tuple[str, int], np.ndarray] = {}  # reference file -> its x-vector

    @classmethod
    def from_config(cls, cfg: EvalConfig, device: torch.device | str = "cpu") -> QualityScorer | None:
        """The scorers ``eval.asr_model`` / ``eval.speaker_model`` name, on ``device``; None when neither is set
        (a run without scorers does exactly what it did before)."""
        if not (cfg.asr_model or cfg.speaker_model):
            return None
        if cfg.asr_model:
            try:
                import jiwer  # noqa: F401 - checked before the run, not at its first scoring round
            except ImportError:
                raise ConfigError("'eval.asr_model': WER/CER need jiwer: pip install 'higgs-accel[quality]'") from None
        asr = load_asr(cfg.asr_model, device) if cfg.asr_model else None
        if cfg.asr_language and getattr(asr, "type", None) != "seq2seq_whisper":
            raise ConfigError("'eval.asr_language' applies to a Whisper 'eval.asr_model' only, not to "
                              f"{'none' if asr is None else type(asr.model).__name__}")
        return cls(asr=asr,
                   speaker=load_speaker(cfg.speaker_model, device) if cfg.speaker_model else None,
                   spell_numbers=cfg.spell_numbers, batch_size=cfg.batch_size, asr_language=cfg.asr_language,
                   asr_name=cfg.asr_model or None, speaker_name=cfg.speaker_model or None)

    # -------------------------------------------------------- the two models

    def transcribe(self, waves: list[np.ndarray]) -> list[str]:
        """Transcripts of waves already at the ASR model's rate, ``batch_size`` at a time through the pipeline."""
        rate = self.asr.feature_extractor.sampling_rate
        inputs = [{"raw": w, "sampling_rate": rate} for w in waves]
        kwargs = {"generate_kwargs": {"language": self.asr_language}} if self.asr_language else {}
        out = self.asr(inputs, batch_size=self.batch_size, **kwargs)
        return [o["text"].strip() for o in out]

    def embed(self, wave: np.ndarray) -> np.ndarray:
        """The x-vector of one wave already at the speaker model's rate. One at a time: a padded batch would change
        the embeddings of the shorter waves, and there are a few prompts per round."""
        features, model = self.speaker
        inputs = features(wave, sampling_rate=features.sampling_rate, return_tensors="pt")
        inputs = {k: v.to(model.device) for k, v in inputs.items()}
        with torch.no_grad(), warnings.catch_warnings():
            # transformers' WavLM attention passes torch masks of two types: torch's notice of it says nothing
            # about the scores, and would be the only line of `evaluate` besides its result.
            warnings.filterwarnings("ignore", message="Support for mismatched key_padding_mask", category=UserWarning)
            return model(**inputs).embeddings[0].float().cpu().numpy()

    def _reference_embedding(self, u: Utterance, waves_seen: dict) -> np.ndarray:
        """The x-vector of ``u.reference``, computed once: a file once per content (path and modification time,
        across rounds), a wave once per ``score_batch`` call (``waves_seen``, by identity)."""
        rate = self.speaker[0].sampling_rate
        if isinstance(u.reference, (str, Path)):
            key, cache = (str(u.reference), Path(u.reference).stat().st_mtime_ns), self._embeddings
        else:
            key, cache = id(u.reference), waves_seen
        if key not in cache:
            cache[key] = self.embed(_audio_at(u.reference, u.reference_rate, rate))
        return cache[key]

    # -------------------------------------------------------- scoring

    def score(self, audio, sample_rate: int | None, text: str, reference_audio=None,
              reference_rate: int | None = None, prompt: int | None = None, gen_time_s: float | None = None) -> dict:
        """One utterance's ``quality`` event fields (see ``score_batch``)."""
        return self.score_batch([Utterance(text, audio, sample_rate, reference_audio, reference_rate, prompt,
                                           gen_time_s)])[0]

    def score_batch(self, utterances: list[Utterance]) -> list[dict]:
        """One dict per utterance: ``prompt``, ``text``, ``path``, ``transcript``, ``wer``, ``cer``,
        ``similarity``, ``seconds``, ``rtf``, ``error`` (the ``quality`` event's fields, docs/events.md).

        Missing audio (a failed generation) is scored as silence: an empty transcript, WER and CER 1, no
        similarity, and ``error`` says why. A scorer that fails on one utterance leaves its field null with the
        reason in ``error``; nothing here raises for one utterance."""
        with torch.random.fork_rng(devices=_cuda_devices(self)):
            rows = [self._prepare(u) for u in utterances]
            if self.asr is not None:
                self._score_words(rows)
            if self.speaker is not None:
                waves_seen: dict[int, np.ndarray] = {}
                for row, u in zip(rows, utterances):
                    self._score_voice(row, u, waves_seen)
        return [{k: v for k, v in row.items() if not k.startswith("_")} for row in rows]

    def _prepare(self, u: Utterance) -> dict:
        row = {"prompt": u.prompt, "text": u.text, "path": str(u.audio) if isinstance(u.audio, (str, Path)) else None,
               "transcript": None, "wer": None, "cer": None, "similarity": None, "seconds": None, "rtf": None,
               "error": u.error, "_wave": None, "_rate": None}
        if u.audio is None:
            row["error"] = row["error"] or "no audio"
            row["seconds"] = 0.0
            return row
        try:
            rate = sf.info(str(u.audio)).samplerate if isinstance(u.audio, (str, Path)) else u.sample_rate
            wave = _audio_at(u.audio, rate, rate)
        except Exception as e:  # noqa: BLE001 - an unreadable file is this utterance's failure
            row["error"] = f"cannot read the audio: {error_line(e)}"
            row["seconds"] = 0.0
            return row
        row["_wave"], row["_rate"] = wave, rate
        row["seconds"] = len(wave) / rate
        if len(wave) == 0:
            row["error"] = row["error"] or "no audio"
        if u.gen_time_s is not None and row["seconds"] > 0:
            row["rtf"] = u.gen_time_s / row["seconds"]
        return row

    def _score_words(self, rows: list[dict]) -> None:
        rate = self.asr.feature_extractor.sampling_rate
        heard = [r for r in rows if r["_wave"] is not None and len(r["_wave"])]
        try:
            transcripts = self.transcribe([resample(r["_wave"], r["_rate"], rate) for r in heard]) if heard else []
        except Exception as e:  # noqa: BLE001 - the ASR failing costs the WER of this round, never the run
            transcripts = [None] * len(heard)
            for r in heard:
                r["error"] = f"ASR failed: {error_line(e)}"
        for r, t in zip(heard, transcripts):
            r["transcript"] = t
        for r in rows:
            ref = normalize_text(r["text"], self.spell_numbers)
            if not ref:
                r["error"] = r["error"] or "the text is empty after normalisation: nothing to score"
                continue
            if r["_wave"] is None or not len(r["_wave"]):
                r["transcript"] = ""
            if r["transcript"] is None:  # the ASR failed on it
                continue
            r["wer"], r["cer"] = error_rates([ref], [normalize_text(r["transcript"], self.spell_numbers)])

    def _score_voice(self, row: dict, u: Utterance, waves_seen: dict) -> None:
        if row["_wave"] is None or not len(row["_wave"]) or u.reference is None:
            return
        try:
            ref = self._reference_embedding(u, waves_seen)
            gen = self.embed(resample(row["_wave"], row["_rate"], self.speaker[0].sampling_rate))
            row["similarity"] = cosine(gen, ref)
        except Exception as e:  # noqa: BLE001 - as for the ASR
            row["error"] = f"speaker model failed: {error_line(e)}"


def summarize_round(rows: list[dict], score_s: float, asr_model: str | None = None,
                    speaker_model: str | None = None, reference: str | None = None, baseline: bool = False,
                    spell_numbers: bool = True) -> dict:
    """The ``quality_summary`` event's fields for one round of ``score_batch`` rows (docs/events.md).

    ``wer`` and ``cer`` are pooled over the round (``error_rates``: total edits over total reference words), so a
    long prompt weighs more than a short one; ``similarity`` is the mean over utterances that have one."""
    scored = [r for r in rows if r["wer"] is not None]
    refs = [normalize_text(r["text"], spell_numbers) for r in scored]
    hyps = [normalize_text(r["transcript"] or "", spell_numbers) for r in scored]
    wer, cer = error_rates(refs, hyps) if scored else (None, None)
    sims = [r["similarity"] for r in rows if r["similarity"] is not None]
    rtfs = [r["rtf"] for r in rows if r["rtf"] is not None]
    return {"baseline": baseline, "utterances": len(rows),
            "no_audio": sum(1 for r in rows if not r["seconds"]),
            "wer": wer, "cer": cer, "similarity": sum(sims) / len(sims) if sims else None,
            "rtf": sum(rtfs) / len(rtfs) if rtfs else None,
            "asr_model": asr_model, "speaker_model": speaker_model, "reference": reference, "score_s": score_s}


def score_round(scorer: QualityScorer, generated: list[dict], reference: str | Path | np.ndarray | None = None,
                reference_rate: int | None = None, baseline: bool = False) -> tuple[list[dict], dict]:
    """Score one generation round: ``generated`` are ``generate_audio`` event rows (``prompt``, ``text``,
    ``path``, ``error`` and, when the generator timed itself, ``gen_time_s``); ``reference`` is the voice the
    prompts should be spoken in, a file or a wave at ``reference_rate``. Returns the ``quality`` event rows
    (``baseline`` added) and the ``quality_summary`` fields, ``score_s`` being this call's wall time."""
    start = time.perf_counter()
    utterances = [Utterance(text=g["text"], audio=g["path"], reference=reference, reference_rate=reference_rate,
                            prompt=g["prompt"], gen_time_s=g.get("gen_time_s"), error=g.get("error"))
                  for g in generated]
    rows = [{**row, "baseline": baseline} for row in scorer.score_batch(utterances)]
    summary = summarize_round(rows, time.perf_counter() - start, scorer.asr_name, scorer.speaker_name,
                              str(reference) if isinstance(reference, (str, Path)) else None, baseline,
                              scorer.spell_numbers)
    return rows, summary


def training_reference(cfg, val_samples: list, sample_rate: int) -> tuple[str | np.ndarray | None, int | None]:
    """The voice a training run's generations should speak in: ``log.generate_ref_audio`` when set, else the first
    validation sample's recording (decoded at ``sample_rate``), else none (no similarity). Returns (reference,
    its rate: None for a file)."""
    from .data import decode_audio

    if cfg.log.generate_ref_audio:
        return cfg.log.generate_ref_audio, None
    if not val_samples:
        return None, None
    return decode_audio(val_samples[0].audio.read(), sample_rate), sample_rate


def emit_round(log, rows: list[dict], summary: dict) -> None:
    """The events of one scored round into ``log`` (an ``EventLog``): a ``quality`` per utterance (level warning
    when its ``error`` is set), then the ``quality_summary``."""
    for row in rows:
        log.emit("quality", level="warning" if row["error"] else "info", **row)
    log.emit("quality_summary", **summary)


def _cuda_devices(scorer: QualityScorer) -> list:
    devices = []
    if scorer.asr is not None:
        devices.append(scorer.asr.model.device)
    if scorer.speaker is not None:
        devices.append(scorer.speaker[1].device)
    return [d for d in dict.fromkeys(devices) if d.type == "cuda"]

