"""The Higgs chat layout of one sample: token ids, the delay pattern of its audio, and what is a target."""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

IGNORE = -100
AUDIO_PLACEHOLDER = "<|AUDIO_OUT|>"
AUDIO_TURN = f"<|audio_out_bos|>{AUDIO_PLACEHOLDER}<|audio_eos|>"
TARGET = f"{AUDIO_TURN}<|eot_id|>"


@dataclass
class SpecialIds:
    """Token ids the layout needs, read from the tokenizer and model config (never hard-coded)."""

    audio: int
    audio_bos: int
    audio_eos: int
    delay: int
    pad: int
    stream_bos: int
    stream_eos: int
    num_codebooks: int

    @classmethod
    def from_parts(cls, tokenizer, model_config) -> SpecialIds:
        ids = tokenizer.convert_tokens_to_ids
        return cls(audio=ids(AUDIO_PLACEHOLDER), audio_bos=ids("<|audio_out_bos|>"), audio_eos=ids("<|audio_eos|>"),
                   delay=ids("<|reserved_special_token_6|>"), pad=tokenizer.pad_token_id,
                   stream_bos=model_config.audio_stream_bos_id, stream_eos=model_config.audio_stream_eos_id,
                   num_codebooks=model_config.num_codebooks)


def _turn(role: str, content: str) -> str:
    return f"<|start_header_id|>{role}<|end_header_id|>\n\n{content}<|eot_id|>"


def chat_prompt(text: str, system: str, scene: str = "", ref_text: str | None = None) -> str:
    """Everything before the target audio, ending with the assistant header, in Higgs's Llama-3 chat format: the
    one prompt layout of training samples and of generation.

    With a reference (``ref_text`` not None: its transcript), the reference transcript and audio come first, as an
    earlier user/assistant exchange (voice cloning)."""
    if scene:
        system += f"\n\n<|scene_desc_start|>\n{scene}\n<|scene_desc_end|>"
    prompt = f"<|begin_of_text|>{_turn('system', system)}"
    if ref_text is not None:
        prompt += _turn("user", ref_text) + _turn("assistant", AUDIO_TURN)
    return prompt + _turn("user", text) + "<|start_header_id|>assistant<|end_header_id|>\n\n"


def delay_pattern(codes: np.ndarray, bos: int, eos: int, fill_bos: int, fill_eos: int) -> np.ndarray:
    """(codebooks, T) codes -> (T + 2 + codebooks - 1, codebooks) frames: ``bos``, codes, ``eos``, each codebook
    shifted one frame later than the one before, the gaps filled with ``fill_bos`` before and ``fill_eos`` after."""
    k, t = codes.shape
    stream = np.concatenate([np.full((k, 1), bos), codes, np.full((k, 1), eos)], axis=1)
    j = np.arange(t + k + 1)[None, :] - np.arange(k)[:, None]  # position in its codebook's stream
    out = np.where(j < 0, fill_bos, fill_eos)
    inside = (j >= 0) & (j < t + 2)
    out[inside] = stream[np.nonzero(inside)[0], j[inside]]
    return out.T


def audio_streams(codes: np.ndarray, ids: SpecialIds, is_target: bool, train_eos: bool):
    """Model inputs and labels of one audio segment in the delay pattern.

    Labels follow the original Higgs collator: per codebook [ignore for stream BOS, the codes, stream EOS], then
    the delay pattern with ignore as both fills. Reference audio (not a target) gets no labels at all."""
    codes = np.asarray(codes, dtype=np.int64)
    inputs = delay_pattern(codes, ids.stream_bos, ids.stream_eos, ids.stream_bos, ids.stream_eos)
    if not is_target:
        return inputs, np.full_like(inputs, IGNORE)
    labels = delay_pattern(codes, IGNORE, ids.stream_eos if train_eos else IGNORE, IGNORE, IGNORE)
    return inputs, labels


@lru_cache(maxsize=65536)
def _tokens(tokenizer, piece: str) -> tuple[int, ...]:
    """Most pieces (headers, the target turn, system prompts) repeat in every sample: tokenize them once."""
    return tuple(tokenizer(piece, add_special_tokens=False)["input_ids"]) if piece else ()


def audio_placeholders(n_frames: int, ids: SpecialIds) -> list[int]:
    return [ids.audio] * (n_frames - (ids.num_codebooks - 1)) + [ids.delay] * (ids.num_codebooks - 1)


def lay_out(segments: list[tuple[str, bool]], audios: list[tuple[np.ndarray, bool]], tokenizer, ids: SpecialIds,
            train_audio_eos: bool, train_audio_out_bos: bool = True
            ) -> tuple[list[int], list[int], list[np.ndarray], list[np.ndarray]]:
    """Token ids, text labels, delayed frames and frame labels of ``segments`` (text, whether its tokens are
    targets), each ``<|AUDIO_OUT|>`` in them taking the next of ``audios`` (codes, whether a target).

    Text is tokenized piece by piece between audio placeholders, which equals tokenizing the expanded string since
    special tokens always split. Audio placeholders are never text targets; the ``<|audio_out_bos|>`` opening a
    target audio in a target segment is one with ``train_audio_out_bos`` (the authors' ``prepare_chatml_sample``
    labels it; transformers' processor masks it, as generation always gives it in the prompt)."""
    audio_iter = iter(audios)
    next_audio_is_target = [is_target for _, is_target in audios] + [False]
    n_audio = 0
    input_ids, labels, frames, frame_labels = [], [], [], []
    for text, text_is_target in segments:
        for i, piece in enumerate(text.split(AUDIO_PLACEHOLDER)):
            if i > 0:
                seg_codes, is_target = next(audio_iter)
                n_audio += 1
                inp, lab = audio_streams(seg_codes, ids, is_target, train_audio_eos)
                frames.append(inp)
                frame_labels.append(lab)
                input_ids += audio_placeholders(len(inp), ids)
                labels += [IGNORE] * len(inp)
            tokens = _tokens(tokenizer, piece)
            input_ids += tokens
            # <|audio_out_bos|> opening the target audio, not a reference's (even with train_on_prompt)
            bos_is_target = train_audio_out_bos and next_audio_is_target[n_audio]
            labels += [t if text_is_target and (t != ids.audio_bos or bos_is_target) else IGNORE for t in tokens]
    return input_ids, labels, frames, frame_labels


def sample_prompt(sample, system_prompt: str) -> str:
    """The prompt of a training sample: its own system prompt, else the configured one."""
    return chat_prompt(sample.text, sample.system or system_prompt, sample.scene,
                       sample.ref_text if sample.ref_audio is not None else None)


def build_example(sample, codes: np.ndarray, ref_codes: np.ndarray | None, tokenizer, ids: SpecialIds,
                  system_prompt: str, train_on_prompt: bool, train_audio_eos: bool,
                  train_audio_out_bos: bool = True) -> dict[str, torch.Tensor]:
    """Token ids, text labels, delayed audio frames and audio labels of one sample.

    Text targets sit in the assistant turn holding the target audio (``<|audio_out_bos|>`` before its audio with
    ``train_audio_out_bos``, the authors' convention and ``data.train_audio_out_bos``'s default; ``<|audio_eos|>``
    and ``<|eot_id|>`` after it), plus the system and user turns with ``train_on_prompt``."""
    segments = [(sample_prompt(sample, system_prompt), train_on_prompt), (TARGET, True)]
    audios = ([(ref_codes, False)] if sample.ref_audio is not None else []) + [(codes, True)]
    input_ids, labels, frames, frame_labels = lay_out(segments, audios, tokenizer, ids, train_audio_eos,
                                                      train_audio_out_bos)
    return {
        "input_ids": torch.tensor(input_ids),
        "labels": torch.tensor(labels),
        "audio_input_ids": torch.from_numpy(np.concatenate(frames)),
        "audio_labels": torch.from_numpy(np.concatenate(frame_labels)),
    }


# Higgs TTS 3's inline control tags (``<|emotion:elation|>``, ``<|style:whispering|>``, ``<|prosody:pause|>``,
# ``<|sfx:...|>``): special tokens of its tokenizer that belong in the text by design (the model card), so a
# transcript may hold them.
CONTROL_TAG = re.compile(r"<\|(?:emotion|style|prosody|sfx):")


@lru_cache(maxsize=8)
def _special_pattern(tokenizer) -> re.Pattern | None:
    tokens = sorted((t.content for t in tokenizer.added_tokens_decoder.values()
                     if t.special and not CONTROL_TAG.match(t.content)), key=len, reverse=True)
    return re.compile("|".join(map(re.escape, tokens))) if tokens else None


def special_tokens_in(text: str, tokenizer) -> list[str]:
    """The tokenizer's special tokens spelled out in ``text``, in order of appearance. Text always splits on them, so
    a transcript holding one would add an audio placeholder without audio, a turn boundary or a delay token to the
    layout: such a sample is refused, never built. Inline control tags (``CONTROL_TAG``) are text, not counted."""
    pattern = _special_pattern(tokenizer)
    return pattern.findall(text) if pattern and text else []


def sequence_lengths(samples: list, tokenizer, num_codebooks: int, system_prompt: str) -> list[int]:
    """Positions of each sample's full sequence as ``build_example`` lays it out (a test holds them equal), without
    building it: the text tokens between its audios, plus per audio its frames, stream BOS and EOS and the delay
    frames. Needs the frame counts ``codes.resolve`` sets."""
    pieces = [(sample_prompt(s, system_prompt) + TARGET).split(AUDIO_PLACEHOLDER) for s in samples]
    flat = [p for ps in pieces for p in ps]
    counts = iter(len(ids) for ids in tokenizer(flat, add_special_tokens=False)["input_ids"]) if flat else iter(())
    return [sum(next(counts) for _ in ps) + s.frames + (len(ps) - 1) * (num_codebooks + 1)
            for s, ps in zip(samples, pieces)]
