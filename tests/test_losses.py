"""The dual loss against transformers' own loss, and the masked heads against full logits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from higgs_accel.chat import IGNORE, SpecialIds
from higgs_accel.codes import CodeCache, resolve
from higgs_accel.config import DataConfig, LoraConfig, ModelConfig
from higgs_accel.data import HiggsDataset, collate, read_manifest
from higgs_accel.loading import load_base_model, load_codec, load_text_tokenizer
from higgs_accel.losses import LossWeights, audio_labels_by_position, dual_loss, summarize
from higgs_accel.model import DualLossModel, add_lora


@pytest.fixture(scope="module")
def setup(tiny, codes_cache):
    mc = ModelConfig(base=tiny["model.base"], audio_tokenizer=tiny["model.audio_tokenizer"])
    tok, base = load_text_tokenizer(mc), load_base_model(mc)
    ids = SpecialIds.from_parts(tok, base.config)
    cfg = DataConfig(train_on_prompt=True)
    cache = CodeCache(codes_cache, load_codec(mc))
    samples, _ = resolve(read_manifest(tiny["data.train_manifest"], cfg)[0], cache, 0, 30)
    ds = HiggsDataset(samples, cache, tok, ids, cfg)
    batch = collate([ds[i] for i in range(4)], ids.pad, ids.stream_eos)
    model = DualLossModel(add_lora(base, LoraConfig(dropout=0.0)), ids).eval()
    torch.manual_seed(0)
    for p in model.parameters():
        if p.requires_grad:  # random LoRA B (peft starts it at zero) so the adapter changes the outputs
            p.data.normal_(0, 0.05)
    return model, batch, ids


def test_loss_equals_transformers_loss(setup):
    model, batch, _ = setup
    with torch.no_grad():
        ours = model(batch)
        theirs = model.lm(**{k: batch[k] for k in ("input_ids", "attention_mask", "audio_input_ids",
                                                     "audio_input_ids_mask", "labels", "audio_labels")}).loss
    assert abs(ours.loss.item() - theirs.item()) < 1e-5
    assert ours.text_loss > 0 and ours.audio_loss > 0


def test_masked_heads_equal_full_logits(setup):
    """Heads on labelled positions only give the same losses, accuracies and predictions as full logits."""
    model, batch, ids = setup
    lm = model.lm
    with torch.no_grad():
        hidden = lm.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                          audio_input_ids=batch["audio_input_ids"],
                          audio_input_ids_mask=batch["audio_input_ids_mask"]).last_hidden_state
        audio_pos = audio_labels_by_position(batch["input_ids"], batch["audio_labels"],
                                             batch["audio_input_ids_mask"], torch.tensor([ids.audio, ids.delay]))
        out = dual_loss(hidden, lm.text_lm_head, lm.audio_lm_head, batch["labels"], audio_pos)
        text_logits = lm.text_lm_head(hidden)[:, :-1]
        y = batch["labels"][:, 1:]
        full_text = F.cross_entropy(text_logits.reshape(-1, text_logits.shape[-1]), y.reshape(-1),
                                    ignore_index=IGNORE)
        audio_logits = lm.audio_lm_head(hidden)[:, :-1].reshape(*y.shape, 8, -1)
        ya = audio_pos[:, 1:]
        per_cb = [F.cross_entropy(audio_logits[..., c, :].reshape(-1, audio_logits.shape[-1]),
                                  ya[..., c].reshape(-1), ignore_index=IGNORE) for c in range(8)]
        full_pred = audio_logits.argmax(-1)
    assert torch.allclose(out.text_loss, full_text, atol=1e-6)
    assert torch.allclose(out.audio_loss, torch.stack(per_cb).sum(), atol=1e-5)
    metrics = summarize(out.stats.tolist(), LossWeights())
    for c in range(8):
        assert abs(metrics[f"audio_loss_cb{c}"] - per_cb[c].item()) < 1e-5
        has = ya[..., c] != IGNORE
        full_acc = (full_pred[..., c][has] == ya[..., c][has]).float().mean().item()
        assert abs(metrics[f"audio_acc_cb{c}"] - full_acc) < 1e-6
    # predictions sit at the label's position: the argmax of the logits one position earlier
    b, pos = out.text_where[0].tolist()
    assert out.text_pred[0] == text_logits[b, pos - 1].argmax() and out.text_label[0] == batch["labels"][b, pos]


def test_audio_mean_reduction_and_weights(setup):
    model, batch, _ = setup
    with torch.no_grad():
        summed = model(batch)
        model.weights = LossWeights(text=0.5, audio=2.0, audio_reduction="mean")
        try:
            weighted = model(batch)
        finally:
            model.weights = LossWeights()
    assert torch.allclose(weighted.audio_loss, summed.audio_loss / 8, atol=1e-5)
    assert torch.allclose(weighted.loss, 0.5 * summed.text_loss + 2.0 * summed.audio_loss / 8, atol=1e-5)
