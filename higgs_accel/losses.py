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

    def losses(self, text_ce, cb_ce, text_n: float, cb_n: list[float]):
        """(loss, text_loss, audio_loss) from summed cross-entropies (text, and each codebook's) and the target
        counts to divide them by. The one formula of the loss: with a step's summed statistics it gives the logged
        figures; with one micro-batch's sums and the whole step's counts (all micro-batches, all processes) it
        gives that micro-batch's share, and the shares add up to the logged loss, so the optimized and the logged
        loss are one quantity (``mean`` counts the codebooks with targets in the whole step)."""
        text = text_ce / text_n if text_n else None
        per_codebook = [ce / n for ce, n in zip(cb_ce, cb_n) if n]
        audio = self.audio_loss(sum(per_codebook), len(per_codebook)) if per_codebook else None
        return self.combine(text, audio), text, audio


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


def target_counts(labels, audio_labels_pos) -> torch.Tensor:
    """(1 + K,) targets of a batch: text, then each codebook's, after the causal shift; from the labels alone (no
    forward), so a step's counts are known before its first backward."""
    return torch.cat([(labels[:, 1:] != IGNORE).sum().reshape(1),
                      (audio_labels_pos[:, 1:] != IGNORE).sum((0, 1))]).float()


def dual_loss(hidden, text_head, audio_head, labels, audio_labels_pos, weights: LossWeights = LossWeights(),
              counts: list[float] | None = None) -> LossOutput:
    """Losses, accuracies and argmax predictions from the backbone's last hidden states (B, L, H).

    ``counts`` ([text, codebook 0, ...] targets, see ``target_counts``) are those of the whole optimizer step, so
    ``loss`` is this micro-batch's share of the step's loss; None: this batch's own (a loss of the batch alone)."""
    h_text, y_text, text_where = _shifted(hidden, labels)
    text_logits = text_head(h_text).float()
    text_ce = F.cross_entropy(text_logits, y_text, reduction="sum")
    text_pred = text_logits.argmax(-1)
    n_text = y_text.numel()

    h_audio, y_audio, audio_where = _shifted(hidden, audio_labels_pos)
    k = y_audio.shape[-1]
    audio_logits = audio_head(h_audio).float().view(len(h_audio), k, -1)
    ce = F.cross_entropy(audio_logits.reshape(-1, audio_logits.shape[-1]), y_audio.reshape(-1),
                         ignore_index=IGNORE, reduction="none").view(-1, k)
    has = y_audio != IGNORE
    audio_pred = audio_logits.argmax(-1)
    cb_ce, cb_n = ce.sum(0), has.sum(0)
    if counts is None:
        counts = [n_text, *cb_n.tolist()]
    loss, text_loss, audio_loss = weights.losses(text_ce, cb_ce, counts[0], counts[1:])
    if loss is None:  # a step without targets still runs a backward, so that every process joins the all-reduce
        loss = (text_ce + cb_ce.sum()) * 0.0

    with torch.no_grad():
        head = torch.stack([text_ce.detach(), text_ce.new_tensor(n_text), (text_pred == y_text).sum().float()])
        stats = torch.cat([head, head.new_zeros(4), cb_ce.detach(), cb_n.float(),
                           ((audio_pred == y_audio) & has).sum(0).float()])
    return LossOutput(
        loss=loss, text_loss=text_loss, audio_loss=audio_loss,
        stats=stats, text_pred=text_pred, text_label=y_text, text_where=text_where, audio_pred=audio_pred,
        audio_label=y_audio, audio_where=audio_where, text_logits_shape=list(text_logits.shape),
        audio_logits_shape=list(audio_logits.shape),
    )


def summarize(stats: list[float], weights: LossWeights) -> dict:
    """Token-weighted metrics from summed statistics (already reduced over micro-steps and processes)."""
    cb_ce, cb_n, cb_ok = _per_codebook(stats)
    cb_loss = [ce / n if n else None for ce, n in zip(cb_ce, cb_n)]
    cb_acc = [ok / n if n else None for ok, n in zip(cb_ok, cb_n)]
    # A part without targets is None, not 0.0: a step or eval that saw no targets must not read as a perfect loss.
    loss, text, audio = weights.losses(stats[TEXT_CE], cb_ce, stats[TEXT_N], cb_n)
    out = {
        "loss": loss,
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
