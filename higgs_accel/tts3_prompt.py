"""The Higgs TTS 3 prompt of one sample, as the authors' runtime (SGLang-Omni) lays it out, and what is a target.

The runtime's prompt (``sglang_omni/models/higgs_tts/text_tokenizer.py``; see docs/tts3.md)::

    <|tts|> [<|ref_text|> ref transcript] [<|ref_audio|> slot x (T_ref + K - 1)] <|text|> text <|audio|>

Audio rows are in the delay pattern without stream BOS/EOS frames: T frames of K codebooks become T + K - 1 rows,
codebook c holding stream BOS (1024) in rows 0..c-1, its codes in rows c..c+T-1, stream EOS (1025) after. The
hidden state at ``<|audio|>`` predicts row 0 and each generated row predicts the next; generation stops once
codebook 0 has emitted stream EOS and K - 2 more rows have followed, i.e. after exactly T + K - 1 rows. Training
therefore appends the target's T + K - 1 rows as audio slots after ``<|audio|>``.

Targets: the target's codes, and in each codebook the first stream EOS (the last codebook has none inside the
runtime's window). Stream BOS fills (the runtime forces them), later EOS fills, reference audio and all text are
never targets. The example dict has the v2 example's keys, so collation and the position-wise loss are shared.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from .chat import IGNORE, delay_pattern
from .config import ConfigError

TTS, REF_TEXT, REF_AUDIO, TEXT, AUDIO = "<|tts|>", "<|ref_text|>", "<|ref_audio|>", "<|text|>", "<|audio|>"
SPECIAL_TOKENS = (TTS, REF_TEXT, REF_AUDIO, TEXT, AUDIO)


@dataclasses.dataclass
class Tts3Ids:
    """Token ids the layout needs, read from the tokenizer and the model config (never hard-coded)."""

    tts: int
    ref_text: int | None  # older checkpoints lack it: the runtime then drops the reference transcript
    ref_audio: int
    text: int
    audio: int
    slot: int             # config.audio_token_id: the id of an audio slot in input_ids
    stream_bos: int
    stream_eos: int
    num_codebooks: int
    pad: int | None = None  # the tokenizer's pad token: what batches are padded with

    @classmethod
    def from_parts(cls, tokenizer, config) -> Tts3Ids:
        vocab = tokenizer.get_added_vocab()
        missing = [t for t in SPECIAL_TOKENS if t != REF_TEXT and t not in vocab]
        if missing:
            raise ConfigError(f"tokenizer: lacks the Higgs TTS 3 special token(s) {', '.join(missing)}")
        return cls(tts=vocab[TTS], ref_text=vocab.get(REF_TEXT), ref_audio=vocab[REF_AUDIO], text=vocab[TEXT],
                   audio=vocab[AUDIO], slot=config.audio_token_id, stream_bos=config.stream_bos,
                   stream_eos=config.stream_eos, num_codebooks=config.num_codebooks, pad=tokenizer.pad_token_id)


def delayed_rows(codes: np.ndarray, ids: Tts3Ids) -> np.ndarray:
    """(K, T) codes -> (T + K - 1, K) rows: the v2 delay pattern with stream BOS/EOS as fills, less its all-BOS
    first row and its last row (which holds only the last codebook's EOS)."""
    return delay_pattern(np.asarray(codes, dtype=np.int64), ids.stream_bos, ids.stream_eos, ids.stream_bos,
                         ids.stream_eos)[1:-1]


def row_labels(codes: np.ndarray, ids: Tts3Ids, train_eos: bool = True) -> np.ndarray:
    """Labels of ``delayed_rows``: the codes, each codebook's first EOS (with ``train_eos``), IGNORE elsewhere."""
    return delay_pattern(np.asarray(codes, dtype=np.int64), IGNORE, ids.stream_eos if train_eos else IGNORE,
                         IGNORE, IGNORE)[1:-1]


def prompt_ids(tokenizer, ids: Tts3Ids, text: str, ref_rows: int = 0, ref_text: str | None = None) -> list[int]:
    """The prompt up to and including ``<|audio|>``, with ``ref_rows`` reference audio slots (0: plain TTS)."""
    def tokens(s: str) -> list[int]:
        return tokenizer(s, add_special_tokens=False)["input_ids"]

    out = [ids.tts]
    if ref_rows and ref_text and ids.ref_text is not None:
        out += [ids.ref_text, *tokens(ref_text)]
    if ref_rows:
        out += [ids.ref_audio] + [ids.slot] * ref_rows
    return out + [ids.text, *tokens(text), ids.audio]


def build_example(tokenizer, ids: Tts3Ids, text: str, codes: np.ndarray | None,
                  ref_codes: np.ndarray | None = None, ref_text: str | None = None,
                  train_eos: bool = True) -> dict[str, torch.Tensor]:
    """``input_ids`` (L,), text ``labels`` (L,, none are targets), ``audio_input_ids`` (F, K): the rows of every
    audio slot in order (reference, then target) and their ``audio_labels`` (F, K). With ``codes`` None, the
    generation prompt (ending at ``<|audio|>``)."""
    k = ids.num_codebooks
    rows, labels = [], []
    if ref_codes is not None:
        rows.append(delayed_rows(ref_codes, ids))
        labels.append(np.full_like(rows[-1], IGNORE))
    input_ids = prompt_ids(tokenizer, ids, text, len(rows[0]) if rows else 0, ref_text)
    if codes is not None:
        rows.append(delayed_rows(codes, ids))
        labels.append(row_labels(codes, ids, train_eos))
        input_ids += [ids.slot] * len(rows[-1])
    empty = np.zeros((0, k), dtype=np.int64)
    return {
        "input_ids": torch.tensor(input_ids),
        "labels": torch.full((len(input_ids),), IGNORE),
        "audio_input_ids": torch.from_numpy(np.concatenate(rows) if rows else empty),
        "audio_labels": torch.from_numpy(np.concatenate(labels) if labels else empty),
    }


def sequence_lengths(samples: list, tokenizer, ids: Tts3Ids) -> list[int]:
    """Positions of each training sample's sequence as ``build_example`` lays it out (a test holds them equal),
    without building it: the prompt's tokens, plus T + K - 1 slots per audio (``sample.frames`` holds the frames of
    target and reference together, as ``codes.resolve`` sets them)."""
    texts = [t for s in samples for t in (s.text, s.ref_text)]
    counts = iter(len(x) for x in tokenizer(texts, add_special_tokens=False)["input_ids"]) if texts else iter(())
    out = []
    for s in samples:
        text, ref_text = next(counts), next(counts)
        ref = s.ref_audio is not None
        prompt = 3 + text + (1 if ref else 0) + (1 + ref_text if ref and s.ref_text and ids.ref_text is not None
                                                  else 0)
        out.append(prompt + s.frames + (1 + ref) * (ids.num_codebooks - 1))
    return out
