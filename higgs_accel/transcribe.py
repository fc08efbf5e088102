"""Transcribing clips through transformers' ``automatic-speech-recognition`` pipeline, and the rules Whisper users
apply before trusting a transcript: not empty, no repetition loop (gzip compression ratio above 2.4), a confident
decoder (average log-probability of its tokens not below -1.0, where the model generates tokens), and no more text
than the clip's duration can hold.

The pipeline returns text only; the decoder's log-probabilities are read on the way by a logits processor handed to
``generate``, so each clip is decoded once."""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np
import torch

from .config import ConfigError
from .data import resample

MAX_COMPRESSION_RATIO = 2.4    # Whisper's own thresholds (openai/whisper, transcribe.py)
MIN_AVG_LOGPROB = -1.0
MAX_CHARS_PER_SECOND = 25.0    # fast speech is about 15 characters a second


@dataclass
class Transcript:
    text: str
    avg_logprob: float | None      # None: the model does not generate tokens (CTC)
    compression_ratio: float

    def scores(self) -> dict:
        return {"avg_logprob": None if self.avg_logprob is None else round(self.avg_logprob, 4),
                "compression_ratio": round(self.compression_ratio, 3)}


def compression_ratio(text: str) -> float:
    """Whisper's repetition measure: bytes of the text over bytes of its zlib compression."""
    data = text.encode("utf-8")
    return len(data) / len(zlib.compress(data)) if data else 0.0


def judge(t: Transcript, seconds: float, max_chars_per_second: float = MAX_CHARS_PER_SECOND
          ) -> tuple[str, str] | None:
    """Why a transcript of a ``seconds`` long clip is not to be trusted, as (reason, detail); None when it passes."""
    if not t.text.strip():
        return "asr_empty", "the recogniser heard no words"
    if t.compression_ratio > MAX_COMPRESSION_RATIO:
        return "asr_repetition", f"compression ratio {t.compression_ratio:.2f} > {MAX_COMPRESSION_RATIO}"
    if t.avg_logprob is not None and t.avg_logprob < MIN_AVG_LOGPROB:
        return "asr_low_logprob", f"average log-probability {t.avg_logprob:.2f} < {MIN_AVG_LOGPROB}"
    if len(t.text) > max_chars_per_second * seconds:
        return "asr_too_long", (f"{len(t.text)} characters in {seconds:.1f} s, over {max_chars_per_second:g} "
                                f"a second")
    return None


class _TokenLogProbs:
    """A logits processor that changes nothing and adds up, per row of a batch, the log-probability of each token
    the decoder picks (as Whisper does: after the other processors, end-of-text included). The token picked from
    one step's scores is the last input of the next step; the last pick is the greedy one."""

    def __init__(self, eos: int):
        self.eos = eos
        self.reset()

    def reset(self) -> None:
        self.last = self.sums = self.counts = self.done = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.last is None:
            rows = scores.shape[0]
            self.sums, self.counts = torch.zeros(rows, dtype=torch.float64), torch.zeros(rows, dtype=torch.long)
            self.done = torch.zeros(rows, dtype=torch.bool)
        else:
            self._take(input_ids[:, -1])
        self.last = scores.float().log_softmax(-1).cpu()
        return scores

    def _take(self, picked: torch.Tensor) -> None:
        picked = picked.cpu()
        live = ~self.done
        self.sums += torch.where(live, self.last.gather(1, picked[:, None])[:, 0].double(), 0.0)
        self.counts += live.long()
        self.done |= picked == self.eos

    def finish(self) -> list[float | None]:
        if self.last is None:
            return []
        self._take(self.last.argmax(-1))
        return [float(s / c) if c else None for s, c in zip(self.sums.tolist(), self.counts.tolist())]


class Transcriber:
    """An ASR pipeline (``quality.load_asr``) with the language it is told and the scores ``judge`` needs; a model
    that generates decodes greedily."""

    def __init__(self, pipe, language: str = "", batch_size: int = 8):
        self.pipe, self.language, self.batch_size = pipe, language, batch_size
        self.generates = pipe.type != "ctc" and hasattr(pipe.model, "generate")
        if language and pipe.type != "seq2seq_whisper":
            raise ConfigError(f"--language applies to a Whisper --asr-model only, not to {type(pipe.model).__name__}")
        eos = getattr(getattr(pipe.model, "generation_config", None), "eos_token_id", None)
        self.recorder = _TokenLogProbs(eos[0] if isinstance(eos, list) else eos) if self.generates else None

    @classmethod
    def load(cls, ref: str, language: str = "", device: str = "cpu", batch_size: int = 8) -> Transcriber:
        from .quality import load_asr

        return cls(load_asr(ref, device, key="--asr-model"), language, batch_size)

    def transcribe(self, waves: list[np.ndarray], sample_rate: int) -> list[Transcript]:
        """Transcripts of mono waves at ``sample_rate``, ``batch_size`` at a time."""
        from transformers import LogitsProcessorList

        rate = self.pipe.feature_extractor.sampling_rate
        out = []
        for first in range(0, len(waves), self.batch_size):
            batch = [{"raw": resample(w, sample_rate, rate), "sampling_rate": rate}
                     for w in waves[first:first + self.batch_size]]
            kwargs = {}
            if self.generates:
                self.recorder.reset()
                # Greedy, like openai-whisper's transcribe() (the pipeline's default is 5 beams, 5x the decoding)
                kwargs["generate_kwargs"] = {"logits_processor": LogitsProcessorList([self.recorder]), "num_beams": 1,
                                             **({"language": self.language} if self.language else {})}
            texts = [r["text"].strip() for r in self.pipe(batch, batch_size=len(batch), **kwargs)]
            logprobs = self.recorder.finish() if self.generates else [None] * len(texts)
            out += [Transcript(t, lp, compression_ratio(t)) for t, lp in zip(texts, logprobs)]
        return out
