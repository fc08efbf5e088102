"""The trained module: PEFT LoRA adapters on the family's model (transformers' own Higgs Audio v2, or Higgs TTS 3 on
transformers' Qwen3), and the dual loss around it."""

from __future__ import annotations

import torch
from torch import nn

from .chat import SpecialIds
from .config import ConfigError, LoraConfig
from .family import audio_slot_ids, forward_hidden
from .losses import (
    FRAMES,
    PADDED,
    SAMPLES,
    TOKENS,
    LossOutput,
    LossWeights,
    audio_labels_by_position,
    dual_loss,
    target_counts,
)
from .tts3_prompt import Tts3Ids


def add_lora(model, cfg: LoraConfig, gradient_checkpointing: bool | str = False):
    """Freeze ``model``, wrap it in PEFT LoRA and make the step keep only what backward needs (see
    ``higgs_accel.activations``). ``gradient_checkpointing`` is a bool or the config's "true"/"false"; "auto" is
    decided by ``higgs_accel.memory.plan`` before this call and counts as off here."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    from .activations import lean_activations

    model.requires_grad_(False)
    if gradient_checkpointing in (True, "true"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    peft_cfg = PeftLoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, bias="none",
                              target_modules=list(cfg.target_modules),
                              modules_to_save=list(cfg.modules_to_save) or None)
    try:
        peft_model = get_peft_model(model, peft_cfg)
    except ValueError as e:
        raise ConfigError(f"'lora.target_modules' / 'lora.modules_to_save': {e}") from None
    lean_activations(peft_model)
    return peft_model


def count_parameters(model: nn.Module) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


class DualLossModel(nn.Module):
    """The PEFT-wrapped model plus the dual loss, as one module so DDP sees a single forward."""

    def __init__(self, peft_model, ids: SpecialIds | Tts3Ids, weights: LossWeights | None = None):
        super().__init__()
        self.peft = peft_model
        self.weights = weights or LossWeights()
        self.register_buffer("audio_token_ids", torch.tensor(audio_slot_ids(ids)), persistent=False)

    @property
    def lm(self):
        """The underlying model (HiggsAudioV2ForConditionalGeneration or HiggsTts3, LoRA layers injected)."""
        return self.peft.get_base_model()

    def audio_labels(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return audio_labels_by_position(batch["input_ids"], batch["audio_labels"], batch["audio_input_ids_mask"],
                                        self.audio_token_ids)

    def count_targets(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(1 + K,) text and per-codebook targets of ``batch``, from its labels alone (no forward)."""
        return target_counts(batch["labels"], self.audio_labels(batch))

    def forward(self, batch: dict[str, torch.Tensor], counts: list[float] | None = None) -> LossOutput:
        """``counts``: the optimizer step's target counts (``count_targets`` summed over its micro-batches and
        processes), which makes ``loss`` this micro-batch's share of the step's loss; None: the batch's own."""
        hidden, text_head, audio_head = forward_hidden(self.lm, batch)
        out = dual_loss(hidden, text_head, audio_head, batch["labels"], self.audio_labels(batch), self.weights,
                        counts)
        out.stats[TOKENS] = batch["attention_mask"].sum()
        out.stats[FRAMES] = batch["audio_input_ids_mask"].sum()
        out.stats[SAMPLES] = len(batch["input_ids"])
        out.stats[PADDED] = batch["input_ids"].numel()
        return out
