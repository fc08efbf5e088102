"""Higgs TTS 3 generation: the delayed audio rows a ``HiggsTts3`` speaks after its prompt, as the authors' runtime
(SGLang-Omni's sampler, docs/tts3.md) produces them.

The hidden state at ``<|audio|>`` gives row 0; each sampled row is fed back through the fused audio embedding (a KV
cache on transformers' ``Qwen3Model``). Ramp-up: in row i < K, codebooks above i are forced to stream BOS. When
codebook 0 emits stream EOS, K - 2 more rows follow and generation stops: T + K - 1 rows, the training layout
(``tts3_prompt.delayed_rows``). In those wind-down rows a codebook that has ended keeps stream EOS, as the layout
has it. Sampling uses transformers' own temperature / top-k / top-p warpers; repetition-aware sampling is v2's
(transformers' ``_sample``) and not available here.
"""

from __future__ import annotations

import torch

from .tts3_prompt import Tts3Ids

# The runtimes' defaults (SGLang-Omni: temperature 1.0; vLLM-Omni's deploy file: top-p 0.95, top-k 50): the
# release ships no generation config, so these apply where a knob is not set.
DEFAULT_SAMPLING = {"do_sample": True, "temperature": 1.0, "top_k": 50, "top_p": 0.95, "ras_win_len": None,
                    "ras_win_max_num_repeat": None}


def effective_sampling(sampling: dict | None) -> dict:
    """The knobs a generation runs with: ``DEFAULT_SAMPLING`` with those set in ``sampling`` on top. A
    repetition-aware window other than 0/None is refused (ValueError): v3 has no such sampler here."""
    out = {**DEFAULT_SAMPLING, **{k: v for k, v in (sampling or {}).items() if v is not None}}
    if out["ras_win_len"]:
        raise ValueError("repetition-aware sampling (ras_win_len) is not available for Higgs TTS 3; set it to 0")
    out["ras_win_len"] = out["ras_win_max_num_repeat"] = None
    return out


def sample_row(logits: torch.Tensor, sampling: dict) -> torch.Tensor:
    """(K, V) logits -> (K,) codes: argmax, or sampled through transformers' warpers."""
    if not sampling["do_sample"]:
        return logits.argmax(-1)
    from transformers.generation.logits_process import (
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    scores = logits.float()
    if sampling["temperature"] not in (None, 1.0):
        scores = TemperatureLogitsWarper(sampling["temperature"])(None, scores)
    if sampling["top_k"]:
        scores = TopKLogitsWarper(sampling["top_k"])(None, scores)
    if sampling["top_p"] is not None and sampling["top_p"] < 1.0:
        scores = TopPLogitsWarper(sampling["top_p"])(None, scores)
    return torch.multinomial(scores.softmax(-1), 1)[:, 0]


@torch.no_grad()
def generate_rows(model, ids: Tts3Ids, prompt: dict, max_new_rows: int, sampling: dict) -> tuple[torch.Tensor, str]:
    """(rows (F, K), stopped) for ``prompt`` (``tts3_prompt.build_example`` with no target: ``input_ids`` ending at
    ``<|audio|>``, ``audio_input_ids`` the reference rows). ``stopped``: "eos" after the wind-down, "max_length"
    when ``max_new_rows`` cut it first. ``model``: a ``HiggsTts3`` (LoRA layers injected or not)."""
    from transformers import DynamicCache

    k, device = ids.num_codebooks, next(model.parameters()).device
    input_ids = prompt["input_ids"][None].to(device)
    audio = prompt["audio_input_ids"]
    audio = audio[None].to(device) if len(audio) else None
    embeds = model.embed(input_ids, audio)
    cache = DynamicCache()
    hidden = model.backbone(inputs_embeds=embeds, cache=cache, use_cache=True).last_hidden_state[:, -1]
    rows, eos_row = [], None
    for i in range(max_new_rows):
        row = sample_row(model.audio_logits(hidden)[0], sampling)
        if i < k:  # ramp-up: codebook c starts at row c
            row[i + 1:] = ids.stream_bos
        if eos_row is not None:  # wind-down: codebook c emitted its EOS at row eos_row + c; it stays ended
            row[: i - eos_row] = ids.stream_eos
        elif row[0] == ids.stream_eos:
            eos_row = i
        rows.append(row)
        if eos_row is not None and i == eos_row + k - 2:
            return torch.stack(rows).cpu(), "eos"
        step = model.embed_audio(row)[None, None].to(embeds.dtype)
        hidden = model.backbone(inputs_embeds=step, cache=cache, use_cache=True).last_hidden_state[:, -1]
    return (torch.stack(rows).cpu() if rows else torch.zeros((0, k), dtype=torch.long)), "max_length"
