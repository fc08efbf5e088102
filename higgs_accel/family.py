"""The model family of a checkpoint, and what differs between the families, behind one seam.

Two families: Higgs Audio v2 (transformers' ``HiggsAudioV2ForConditionalGeneration``, the Llama-3 chat layout of
``chat``) and Higgs TTS 3 (``tts3.HiggsTts3``, the TTS layout of ``tts3_prompt``). The family is read from the
checkpoint's ``config.json`` (``model_type``: ``family_of``). Data, the codes cache, events, slices, reports,
checkpoints, resume, engines and the command line are one code path: where they meet a difference they ask this
module, which tells the families apart by their special ids (``chat.SpecialIds`` or ``tts3_prompt.Tts3Ids``, built
once per model stack)."""

from __future__ import annotations

import dataclasses

from . import chat, tts3_prompt
from .config import ConfigError
from .tts3 import MODEL_TYPE as V3_MODEL_TYPE

V2, V3 = "v2", "v3"


def family_of(config: dict | None) -> str:
    """V3 for a Higgs TTS 3 checkpoint's config.json (``model_type: higgs_multimodal_qwen3``), else V2: the v2 path
    resolves, converts (the authors' original layout) or refuses everything else, as it always has. Reading the
    file (local dir or hub) is ``loading.model_family``'s."""
    return V3 if config and config.get("model_type") == V3_MODEL_TYPE else V2


def check_settings(data_cfg, family: str) -> None:
    """Refuse, in one line, a data setting the family's layout has no place for, rather than ignore it: Higgs TTS
    3's prompt has no system turn and no text targets (``tts3_prompt``)."""
    if family != V3:
        return
    default = {f.name: f.default for f in dataclasses.fields(data_cfg)}
    if data_cfg.system_prompt != default["system_prompt"]:
        raise ConfigError("'data.system_prompt': Higgs TTS 3's prompt has no system turn; leave it at its default "
                          "(docs/tts3.md)")
    if data_cfg.train_on_prompt:
        raise ConfigError("'data.train_on_prompt': Higgs TTS 3's prompt has no text targets; leave it false "
                          "(docs/tts3.md)")


def is_v3(ids) -> bool:
    """Whether a model stack's special ids are Higgs TTS 3's."""
    return isinstance(ids, tts3_prompt.Tts3Ids)


def build_example(sample, codes, ref_codes, tokenizer, ids, data_cfg) -> dict:
    """One training example in the family's layout (the same dict keys either way, so collation and the loss are
    shared). v3 has no system prompt, scene or text targets: those settings apply to v2 alone."""
    if is_v3(ids):
        return tts3_prompt.build_example(tokenizer, ids, sample.text, codes,
                                         ref_codes if sample.ref_audio is not None else None,
                                         sample.ref_text or None, data_cfg.train_audio_eos)
    return chat.build_example(sample, codes, ref_codes, tokenizer, ids, data_cfg.system_prompt,
                              data_cfg.train_on_prompt, data_cfg.train_audio_eos, data_cfg.train_audio_out_bos)


def sequence_lengths(samples: list, tokenizer, ids, system_prompt: str) -> list[int]:
    """Positions of each sample's sequence as ``build_example`` lays it out, without building it."""
    if is_v3(ids):
        return tts3_prompt.sequence_lengths(samples, tokenizer, ids)
    return chat.sequence_lengths(samples, tokenizer, ids.num_codebooks, system_prompt)


def audio_slot_ids(ids) -> list[int]:
    """The ``input_ids`` values whose positions hold audio rows (``losses.audio_labels_by_position``)."""
    return [ids.slot] if is_v3(ids) else [ids.audio, ids.delay]


def forward_hidden(lm, batch: dict):
    """(last hidden states, text head, audio head) of ``batch`` through the family's model (LoRA layers injected),
    as ``losses.dual_loss`` takes them. v3's heads are the fused audio head and the (tied) text head; the TTS layout
    has no text target, so its text part is empty."""
    from .tts3 import HiggsTts3

    if isinstance(lm, HiggsTts3):
        hidden = lm.hidden_states(batch["input_ids"], batch["audio_input_ids"], batch["audio_input_ids_mask"],
                                  batch["attention_mask"])
        return hidden, lm.text_logits, lm.audio_logits
    hidden = lm.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                      audio_input_ids=batch["audio_input_ids"],
                      audio_input_ids_mask=batch["audio_input_ids_mask"]).last_hidden_state
    return hidden, lm.text_lm_head, lm.audio_lm_head


def backbone(lm):
    """The decoder stack of the family's model: what ``model.compile`` compiles and gradient checkpointing wraps."""
    from .tts3 import HiggsTts3

    return lm.backbone if isinstance(lm, HiggsTts3) else lm.model
