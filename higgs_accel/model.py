"""Loading transformers' own Higgs Audio v2 (model, text tokenizer, codec) and adding PEFT LoRA adapters."""

from __future__ import annotations

import torch
from torch import nn

from .chat import SpecialIds
from .config import ConfigError, LoraConfig, ModelConfig, check_model_ref
from .losses import FRAMES, PADDED, SAMPLES, TOKENS, LossOutput, audio_labels_by_position, dual_loss

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def load_ref(name: str, what: str, ref: str, loader):
    """``loader(ref)``, with a missing dir or a failed load as one line naming ``name`` (a config key in quotes,
    or a command-line flag) and the first line of the reason."""
    check_model_ref(name, ref)
    try:
        return loader(ref)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"{name}: cannot load {what} from '{ref}': {first}") from None


def load_base_model(cfg: ModelConfig):
    from transformers import HiggsAudioV2ForConditionalGeneration

    # use_text_head=True keeps text_lm_head so a text loss exists; never trust_remote_code.
    return load_ref("'model.base'", "HiggsAudioV2ForConditionalGeneration", cfg.base,
                    lambda ref: HiggsAudioV2ForConditionalGeneration.from_pretrained(
                        ref, use_text_head=True, dtype=DTYPES[cfg.dtype], attn_implementation=cfg.attn_implementation))


def load_text_tokenizer(cfg: ModelConfig):
    from transformers import AutoTokenizer

    ref = cfg.text_tokenizer or cfg.base
    tok = load_ref("'model.text_tokenizer'", "the text tokenizer", ref, AutoTokenizer.from_pretrained)
    if tok.pad_token_id is None:
        raise ConfigError(f"'model.text_tokenizer': the tokenizer at '{ref}' has no pad token")
    return tok


def load_codec(cfg: ModelConfig):
    from transformers import HiggsAudioV2TokenizerModel

    codec = load_ref("'model.audio_tokenizer'", "HiggsAudioV2TokenizerModel", cfg.audio_tokenizer,
                     HiggsAudioV2TokenizerModel.from_pretrained)
    return codec.eval().requires_grad_(False)


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

    def __init__(self, peft_model, ids: SpecialIds, text_weight=1.0, audio_weight=1.0, audio_reduction="sum"):
        super().__init__()
        self.peft = peft_model
        self.weights = dict(text_weight=text_weight, audio_weight=audio_weight, audio_reduction=audio_reduction)
        self.register_buffer("audio_token_ids", torch.tensor([ids.audio, ids.delay]), persistent=False)

    @property
    def lm(self):
        """The underlying HiggsAudioV2ForConditionalGeneration (with LoRA layers injected)."""
        return self.peft.get_base_model()

    def forward(self, batch: dict[str, torch.Tensor]) -> LossOutput:
        lm = self.lm
        hidden = lm.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                          audio_input_ids=batch["audio_input_ids"],
                          audio_input_ids_mask=batch["audio_input_ids_mask"]).last_hidden_state
        audio_pos = audio_labels_by_position(batch["input_ids"], batch["audio_labels"], batch["audio_input_ids_mask"],
                                             self.audio_token_ids)
        out = dual_loss(hidden, lm.text_lm_head, lm.audio_lm_head, batch["labels"], audio_pos, **self.weights)
        out.stats[TOKENS] = batch["attention_mask"].sum()
        out.stats[FRAMES] = batch["audio_input_ids_mask"].sum()
        out.stats[SAMPLES] = len(batch["input_ids"])
        out.stats[PADDED] = batch["input_ids"].numel()
        return out
