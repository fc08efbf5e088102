"""The dual loss: text cross-entropy through ``text_lm_head`` and per-codebook audio cross-entropy through
``audio_lm_head``, both with the causal shift, computed only at positions that carry a target.

Each head sees the hidden states of labelled positions only: the text head of a TTS sample would otherwise
produce (batch x length x 128,256) logits of which almost all are thrown away. The result equals computing
every position and ignoring the unlabelled ones (a test checks it against transformers' own loss).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .chat import IGNORE

# Layout of the per-step statistics vector: summed on device over micro-steps and processes, read once per step.
# Seven scalars, then per codebook (as many as the model config has): summed CE, target count, correct count.
TEXT_CE, TEXT_N, TEXT_OK, TOKENS, FRAMES, SAMPLES, PADDED = range(7)
_HEAD = 7


def n_stats(num_codebooks: int) -> int:
    """Length of the statistics vector for a model with ``num_codebooks`` codebooks."""
    return _HEAD + 3 * num_codebooks


def _per_codebook(stats: list[float]) -> tuple[list[float], list[float], list[float]]:
    k = (len(stats) - _HEAD) // 3
    return stats[_HEAD:_HEAD + k], stats[_HEAD + k:_HEAD + 2 * k], stats[_HEAD + 2 * k:_HEAD + 3 * k]


@dataclass(frozen=True)
class LossWeights:
    """How the text loss and the codebook losses make the total loss: built once from the config (``train.
    text_weight``, ``train.audio_weight``, ``train.audio_reduction``) and used both for the loss that is
    backpropagated and for the logged one, so the two always agree."""

    text: float = 1.0
    audio: float = 1.0
    audio_reduction: str = "sum"  # "sum" (transformers' own loss) or "mean" over the codebooks with targets

    @classmethod
    def of(cls, train_cfg) -> LossWeights:
        return cls(train_cfg.text_weight, train_cfg.audio_weight, train_cfg.audio_reduction)

    def audio_loss(self, codebook_sum, with_targets):
        """The audio loss from the summed losses of the codebooks that have targets, and their count."""
        return codebook_sum if self.audio_reduction == "sum" else codebook_sum / with_targets

    def combine(self, text, audio):
        """The total loss; a part without targets (None) is left out, and None when both are."""
        parts = [w * x for w, x in ((self.text, text), (self.audio, audio)) if x is not None]
        return sum(parts) if parts else None


@dataclass
class LossOutput:
    loss: torch.Tensor          # scalar to backpropagate
    text_loss: torch.Tensor
    audio_loss: torch.Tensor
    stats: torch.Tensor         # (N_STATS,) detached sums, see the layout above
    text_pred: torch.Tensor     # (M,) argmax at each text target, predicted from the position before it
    text_label: torch.Tensor    # (M,)
    text_where: torch.Tensor    # (M, 2) batch index and position of the label
    audio_pred: torch.Tensor    # (N, K)
    audio_label: torch.Tensor   # (N, K), IGNORE where that codebook has no target
    audio_where: torch.Tensor   # (N, 2) batch index and position of the label
    text_logits_shape: list[int]
    audio_logits_shape: list[int]


def audio_labels_by_position(input_ids, audio_labels, audio_input_ids_mask, audio_token_ids) -> torch.Tensor:
    """Scatter per-frame audio labels (B, F, K) onto the text positions of the audio placeholders (B, L, K)."""
    is_audio = torch.isin(input_ids, audio_token_ids)
    out = input_ids.new_full((*input_ids.shape, audio_labels.shape[-1]), IGNORE)
    out[is_audio] = audio_labels[audio_input_ids_mask]
    return out


def _shifted(hidden: torch.Tensor, labels: torch.Tensor):
    """Hidden states at t and labels at t + 1, kept only where a label exists."""
    h, y = hidden[:, :-1], labels[:, 1:]
    valid = y != IGNORE if y.dim() == 2 else (y != IGNORE).any(-1)
    where = valid.nonzero()
    where[:, 1] += 1
    return h[valid], y[valid], where


def dual_loss(hidden, text_head, audio_head, labels, audio_labels_pos,
              weights: LossWeights = LossWeights()) -> LossOutput:
    """Losses, accuracies and argmax predictions from the backbone's last hidden states (B, L, H)."""
    h_text, y_text, text_where = _shifted(hidden, labels)
    text_logits = text_head(h_text).float()
    text_ce = F.cross_entropy(text_logits, y_text, reduction="sum")
    text_pred = text_logits.argmax(-1)
    n_text = y_text.numel()
    text_loss = text_ce / max(n_text, 1)

    h_audio, y_audio, audio_where = _shifted(hidden, audio_labels_pos)
    k = y_audio.shape[-1]
    audio_logits = audio_head(h_audio).float().view(len(h_audio), k, -1)
    ce = F.cross_entropy(audio_logits.reshape(-1, audio_logits.shape[-1]), y_audio.reshape(-1),
                         ignore_index=IGNORE, reduction="none").view(-1, k)
    has = y_audio != IGNORE
    audio_pred = audio_logits.argmax(-1)
    cb_ce, cb_n = ce.sum(0), has.sum(0)
    cb_loss = cb_ce / cb_n.clamp(min=1)
    audio_loss = weights.audio_loss(cb_loss.sum(), (cb_n > 0).sum().clamp(min=1))

    with torch.no_grad():
        head = torch.stack([text_ce.detach(), text_ce.new_tensor(n_text), (text_pred == y_text).sum().float()])
        stats = torch.cat([head, head.new_zeros(4), cb_ce.detach(), cb_n.float(),
                           ((audio_pred == y_audio) & has).sum(0).float()])
    return LossOutput(
        loss=weights.combine(text_loss, audio_loss), text_loss=text_loss, audio_loss=audio_loss,
        stats=stats, text_pred=text_pred, text_label=y_text, text_where=text_where, audio_pred=audio_pred,
        audio_label=y_audio, audio_where=audio_where, text_logits_shape=list(text_logits.shape),
        audio_logits_shape=list(audio_logits.shape),
    )


def summarize(stats: list[float], weights: LossWeights) -> dict:
    """Token-weighted metrics from summed statistics (already reduced over micro-steps and processes)."""
    cb_ce, cb_n, cb_ok = _per_codebook(stats)
    cb_loss = [ce / n if n else None for ce, n in zip(cb_ce, cb_n)]
    cb_acc = [ok / n if n else None for ok, n in zip(cb_ok, cb_n)]
    present = [x for x in cb_loss if x is not None]
    # A part without targets is None, not 0.0: a step or eval that saw no targets must not read as a perfect loss.
    audio = weights.audio_loss(sum(present), len(present)) if present else None
    text = stats[TEXT_CE] / stats[TEXT_N] if stats[TEXT_N] else None
    out = {
        "loss": weights.combine(text, audio),
        "text_loss": text,
        "audio_loss": audio,
        "text_acc": stats[TEXT_OK] / stats[TEXT_N] if stats[TEXT_N] else None,
        "audio_acc": sum(cb_ok) / sum(cb_n) if sum(cb_n) else None,
        "text_targets": int(stats[TEXT_N]),
        "audio_targets": int(sum(cb_n)),
        "tokens": int(stats[TOKENS]),
        "audio_frames": int(stats[FRAMES]),
        "samples": int(stats[SAMPLES]),
        "padding_frac": 1 - stats[TOKENS] / stats[PADDED] if stats[PADDED] else None,
    }
    for c in range(len(cb_n)):
        out[f"audio_loss_cb{c}"] = cb_loss[c]
        out[f"audio_acc_cb{c}"] = cb_acc[c]
    return out
