"""Prediction-vs-label slices: what the model predicts next to what it should, built from one batch."""

from __future__ import annotations

import hashlib

import numpy as np

from .chat import IGNORE
from .losses import LossOutput


def _ends(pos: np.ndarray, pred: np.ndarray, label: np.ndarray, k: int) -> dict:
    out = {}
    for part, sl in (("first", slice(0, k)), ("last", slice(max(len(pos) - k, 0), len(pos)))):
        out[f"{part}_pos"] = pos[sl].tolist()
        out[f"{part}_pred"] = pred[sl].tolist()
        out[f"{part}_label"] = label[sl].tolist()
    out["n_targets"] = len(pos)
    out["n_match"] = int((pred == label).sum())
    return out


def build_slices(out: LossOutput, batch: dict, tokenizer, samples: int, k: int, codebooks: list[int]) -> list[dict]:
    """Fields of the pred_slice events for the first ``samples`` samples of the batch; moves only those tensors
    to the CPU, and only on the steps that log slices. The selection runs in numpy: on these small arrays each
    torch call costs more than the work it does."""
    text_where, text_pred, text_label, audio_where, audio_pred, audio_label = (
        t.cpu().numpy() for t in (out.text_where, out.text_pred, out.text_label, out.audio_where, out.audio_pred,
                                  out.audio_label))
    input_ids = batch["input_ids"].cpu().numpy()
    keys = sample_keys(batch, samples)
    has = audio_label != IGNORE
    batch_match = ((audio_pred == audio_label) & has).sum(0).tolist()
    batch_targets = has.sum(0).tolist()
    text_shapes = dict(logits_shape=out.text_logits_shape, labels_shape=list(batch["labels"].shape))
    audio_shapes = dict(logits_shape=out.audio_logits_shape, labels_shape=list(batch["audio_labels"].shape))

    audio_bos = tokenizer.convert_tokens_to_ids("<|audio_out_bos|>")

    def decode(ids):
        return tokenizer.batch_decode([[i] for i in ids])

    rows = []
    for b in range(min(samples, len(input_ids))):
        sel = text_where[:, 0] == b
        row = _ends(text_where[sel, 1], text_pred[sel], text_label[sel], k)
        for part in ("first", "last"):
            row[f"{part}_pred_text"] = decode(row[f"{part}_pred"])
            row[f"{part}_label_text"] = decode(row[f"{part}_label"])
        rows.append(dict(modality="text", sample=b, sample_key=keys[b], codebook=None, **row, **text_shapes))
        in_b = audio_where[:, 0] == b
        # Frame numbers inside the target utterance: the target audio starts after the last <|audio_out_bos|>,
        # with its stream BOS; codebook c's stream is delayed by c frames.
        starts = np.flatnonzero(input_ids[b] == audio_bos)
        first_frame = int(starts[-1]) + 1 if len(starts) else 0
        for c in codebooks:
            sel = in_b & has[:, c]
            row = _ends(audio_where[sel, 1], audio_pred[sel, c], audio_label[sel, c], k)
            for part in ("first", "last"):
                row[f"{part}_frame"] = [p - first_frame - c for p in row[f"{part}_pos"]]
            rows.append(dict(modality="audio", sample=b, sample_key=keys[b], codebook=c, **row,
                             batch_match=batch_match[c], batch_targets=batch_targets[c], **audio_shapes))
    return rows


def sample_keys(batch: dict, samples: int) -> list[str]:
    """A short content hash of each of the first ``samples`` samples (its text tokens and audio codes, padding
    left out): two runs saw the same sample at a step when the keys are equal, whatever order their data came in."""
    keys = []
    for b in range(min(samples, len(batch["input_ids"]))):
        ids = batch["input_ids"][b][batch["attention_mask"][b].bool()].cpu().numpy().astype(np.int64)
        codes = batch["audio_labels"][b][batch["audio_input_ids_mask"][b]].cpu().numpy().astype(np.int64)
        keys.append(hashlib.blake2b(ids.tobytes() + b"|" + codes.tobytes(), digest_size=8).hexdigest())
    return keys
