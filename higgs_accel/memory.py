"""GPU memory of a LoRA training step predicted from the model config, the tokens per micro-batch, gradient
checkpointing and the LoRA settings; and the decision ``model.gradient_checkpointing: auto`` takes from it.

The prediction is a sum of parts, each in bytes:
  weights      every parameter in the weights dtype (the LoRA adapters in fp32, as PEFT keeps them)
  codec        the audio codec's parameters and buffers, in the dtype it is held in: the trainer moves it to the
               device (it encodes what the codes cache lacks and decodes eval audio); fp32 as loaded, 0.75 GiB for
               the released 200 M codec
  training     per trainable (LoRA) parameter: its fp32 gradient and AdamW's two fp32 moments
  layers       what each decoder layer keeps for backward, per token: ``layer_bytes_per_token`` below, the saved
               tensors of higgs-accel's lean step (higgs_accel.activations) counted one by one; with gradient
               checkpointing only each layer's input is kept, and one layer's saved tensors exist at a time
  heads        per audio target: the fp32 log-softmax over num_codebooks x codebook_size codes that cross-entropy
               keeps, and the logits' gradient in backward; per text target the same over the text vocabulary
  transient    per token, what the step builds besides what is saved (gradients of the hidden states, the
               recomputed casts), ``TRANSIENT_PER_TOKEN`` bytes per hidden unit, plus ``STEP_OVERHEAD``: both fitted
               to the intercepts of bf16 CPU measurements (bench/memory.py --per-layer at hidden 512, 1024 and 3072;
               bench/RESULTS.md), which they match within 2 MiB
The layers part was checked against CPU measurements at the real width (bench/memory.py --per-layer); on a GPU the
caching allocator rounds and fragments on top of this, which ``ALLOCATOR_OVERHEAD`` covers until bench/
gpu_real_size.py has been run on one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

GIB = 2**30
MIB = 2**20
DTYPE_BYTES = {"fp32": 4, "bf16": 2}
ADAPTER_BYTES = 4                # PEFT keeps LoRA weights in fp32 even on a bf16 model
TRAINING_BYTES = 4 + 4 + 4       # per LoRA parameter: fp32 gradient, AdamW exp_avg and exp_avg_sq
HEAD_BYTES_PER_LOGIT = 4 + 4    # the saved fp32 log-softmax and, at the start of backward, its fp32 gradient
TRANSIENT_PER_TOKEN = 15.5       # bytes per hidden unit per token alive besides the saved tensors; fitted
STEP_OVERHEAD = 32 * MIB         # fixed scratch of the step (kernels' workspaces, autograd's); fitted
ALLOCATOR_OVERHEAD = 1.10        # CUDA caching allocator: block rounding and fragmentation (not yet measured)
FITS_MARGIN = 0.95               # auto turns checkpointing on above this fraction of the device's memory


def widths(c) -> dict[str, int]:
    """The widths the formulas use, from a HiggsAudioV2Config or a Tts3Config (or anything with their names)."""
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return {"hidden": c.hidden_size, "attn": c.num_attention_heads * head_dim,
            "kv": c.num_key_value_heads * head_dim, "inter": c.intermediate_size, "heads": c.num_attention_heads}


def floor_values_per_token(c) -> int:
    """Values per token per decoder layer a LoRA step must keep for backward: both RMSNorms' inputs and outputs,
    q/k/v after rotary, the attention output, and the MLP's gate, up and their activated product."""
    w = widths(c)
    return 4 * w["hidden"] + (w["attn"] + 2 * w["kv"]) + w["attn"] + 3 * w["inter"]


def layer_bytes_per_token(c, dtype: str = "bf16") -> int:
    """Bytes per token one decoder layer of the lean step keeps for backward: the floor in the weights dtype and
    sdpa's fp32 log-sum-exp per head (o_proj's LoRA reads sdpa's own output, no copy of it)."""
    return DTYPE_BYTES[dtype] * floor_values_per_token(c) + 4 * widths(c)["heads"]


def parameter_counts(c, lora) -> tuple[int, int]:
    """(base model parameters, LoRA parameters) of HiggsAudioV2ForConditionalGeneration with its text head, or of
    Higgs TTS 3 (a ``Tts3Config``: one MLP per layer, q/k norms, the fused audio embedding, heads tied as its config
    says)."""
    from .tts3 import Tts3Config

    v3 = isinstance(c, Tts3Config)
    w = widths(c)
    h, inter = w["hidden"], w["inter"]
    audio_vocab = c.num_codebooks * c.codebook_size
    attention = [(h, w["attn"]), (h, w["kv"]), (h, w["kv"]), (w["attn"], h)]
    mlp = [(h, inter), (h, inter), (inter, h)]
    mlps = 1 if v3 else 2  # v2's DualFFN: a text and an audio MLP per layer
    norms = 2 * h + 2 * (w["attn"] // w["heads"]) if v3 else 4 * h
    per_layer = sum(i * o for i, o in attention) + mlps * sum(i * o for i, o in mlp) + norms
    if v3:
        heads = c.vocab_size * h * (not c.tie_word_embeddings) + audio_vocab * h * (not c.tie_audio_head)
        base = c.num_hidden_layers * per_layer + c.vocab_size * h + audio_vocab * h + heads + h
    else:
        base = c.num_hidden_layers * per_layer + 2 * c.vocab_size * h + 2 * audio_vocab * h + h
    targets = set(lora.target_modules)
    names = ["q_proj", "k_proj", "v_proj", "o_proj"]
    adapted = [(i, o) for (i, o), n in zip(attention, names) if n in targets]
    adapted += mlps * [(i, o) for (i, o), n in zip(mlp, ["gate_proj", "up_proj", "down_proj"]) if n in targets]
    return base, c.num_hidden_layers * lora.r * sum(i + o for i, o in adapted)


@dataclass
class Prediction:
    weights: int
    training: int
    layers: int
    heads: int
    transient: int
    codec: int = 0

    @property
    def activations(self) -> int:
        """What the step adds on top of the model and its optimizer state."""
        return self.layers + self.heads + self.transient

    @property
    def allocated(self) -> int:
        """The peak of live tensors: what torch.cuda.max_memory_allocated() reports."""
        return self.weights + self.codec + self.training + self.activations

    @property
    def total(self) -> int:
        """What the device must hold: the live peak plus the caching allocator's overhead."""
        return math.ceil(self.allocated * ALLOCATOR_OVERHEAD)

    def to_dict(self) -> dict:
        return {"weights_gib": self.weights / GIB, "codec_gib": self.codec / GIB, "training_gib": self.training / GIB,
                "activations_gib": self.activations / GIB, "total_gib": self.total / GIB}


def predict(c, lora, tokens: int, *, dtype: str = "bf16", gradient_checkpointing: bool = False,
            audio_targets: int | None = None, text_targets: int = 0, codec_bytes: int = 0) -> Prediction:
    """Peak memory of one training step over ``tokens`` positions (batch x padded length) of a model with config
    ``c`` and LoRA settings ``lora`` (a LoraConfig), with a codec of ``codec_bytes`` on the same device.
    ``audio_targets`` defaults to every position (a TTS sample is mostly target audio), which is the upper bound."""
    w, size = widths(c), DTYPE_BYTES[dtype]
    base, adapters = parameter_counts(c, lora)
    layer = layer_bytes_per_token(c, dtype)
    if gradient_checkpointing:  # each layer's input kept, and one layer's tensors while it is recomputed
        kept = tokens * (c.num_hidden_layers * size * w["hidden"] + layer)
    else:
        kept = tokens * c.num_hidden_layers * layer
    audio_targets = tokens if audio_targets is None else audio_targets
    heads = HEAD_BYTES_PER_LOGIT * (audio_targets * c.num_codebooks * c.codebook_size + text_targets * c.vocab_size)
    transient = math.ceil(tokens * TRANSIENT_PER_TOKEN * w["hidden"]) + STEP_OVERHEAD
    return Prediction(weights=base * size + adapters * ADAPTER_BYTES, training=adapters * TRAINING_BYTES,
                      layers=kept, heads=heads, transient=transient, codec=codec_bytes)


def module_bytes(module) -> int:
    """Bytes of a module's parameters and buffers, each in its own dtype: what moving it to a device costs."""
    tensors = [*module.parameters(), *module.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


def step_tokens(cfg, longest: int | None = None) -> int:
    """Padded positions in the largest micro-batch the run can build: ``data.max_tokens_per_batch`` when set,
    else ``train.batch_size`` x the longest sample (``longest`` when the data is known, else the longest a sample
    of ``data.max_seconds`` can be: 25 audio frames a second plus 9 stream and delay frames, a reference clip as
    long again, and 8 text tokens a second of speech plus 128 for the prompt)."""
    if cfg.data.max_tokens_per_batch:
        return cfg.data.max_tokens_per_batch
    if longest is None:
        longest = 2 * (math.ceil(25 * cfg.data.max_seconds) + 9 + 8 * math.ceil(cfg.data.max_seconds)) + 128
    return cfg.train.batch_size * longest


def plan(cfg, model_config, device, longest: int | None = None, capacity: int | None = None, codec=None) -> dict:
    """The predicted peak of the configured step and whether to recompute activations: ``model.gradient_
    checkpointing`` true/false as set; auto turns it on only on a CUDA device whose memory (``capacity`` bytes,
    read from the device when not given) the step without it would not fit, and never elsewhere. ``codec``: the
    codec the trainer holds on the device (its bytes are counted as they are held). The dict goes into run_start
    as it is."""
    import torch

    device = torch.device(device)
    tokens = step_tokens(cfg, longest)
    codec_bytes = module_bytes(codec) if codec is not None else 0
    without = predict(model_config, cfg.lora, tokens, dtype=cfg.model.dtype, codec_bytes=codec_bytes)
    with_ckpt = predict(model_config, cfg.lora, tokens, dtype=cfg.model.dtype, gradient_checkpointing=True,
                        codec_bytes=codec_bytes)
    if device.type != "cuda":
        capacity = None
    elif capacity is None:
        capacity = torch.cuda.get_device_properties(device).total_memory
    setting = cfg.model.gradient_checkpointing
    if setting == "auto":
        on = capacity is not None and without.total > FITS_MARGIN * capacity
    else:
        on = setting == "true"
    return {"gradient_checkpointing": on, "setting": setting, "tokens_per_micro_batch": tokens,
            "device_gib": capacity / GIB if capacity else None, "codec_gib": codec_bytes / GIB,
            "predicted_gib": (with_ckpt if on else without).total / GIB,
            "predicted_without_checkpointing_gib": without.total / GIB,
            "predicted_with_checkpointing_gib": with_ckpt.total / GIB}


def real_model_config():
    """The real Higgs Audio v2 3B architecture: HiggsAudioV2Config's defaults with its 8 codebooks of 1026 codes."""
    from transformers import HiggsAudioV2Config

    return HiggsAudioV2Config(num_codebooks=8, codebook_size=1026)


def real_tts3_config():
    """Higgs TTS 3's released architecture (4.04 B parameters): its Qwen3-4B backbone with the fused audio embedding
    of 8 x 1026 rows tied to its head."""
    from .tts3 import RELEASE_TEXT_CONFIG, build_config

    return build_config(dict(RELEASE_TEXT_CONFIG))


def real_codec_config():
    """The released codec's settings (25 frames/s, 8 quantizers of 1024 codes, 200 M parameters): transformers'
    HiggsAudioV2TokenizerConfig defaults give 75 frames/s and other quantizers."""
    from transformers import HiggsAudioV2TokenizerConfig

    return HiggsAudioV2TokenizerConfig(target_bandwidths=[0.5, 1, 1.5, 2],
                                       acoustic_model_config=dict(downsampling_ratios=[8, 5, 4, 2, 3],
                                                                  upsampling_ratios=[8, 5, 4, 2, 3]))


def codec_bytes_of(codec_config) -> int:
    """Bytes of a codec built from ``codec_config`` as loaded (fp32), counted on the meta device: nothing allocated."""
    import torch
    from transformers import HiggsAudioV2TokenizerModel

    with torch.device("meta"):
        return module_bytes(HiggsAudioV2TokenizerModel(codec_config))


def table(c, lora, seqs=(1024, 2048, 4096), batches=(1, 2, 4), dtype: str = "bf16",
          codec_bytes: int | None = None) -> list[str]:
    """Markdown rows: predicted GPU memory per (sequence, batch), without and with gradient checkpointing, the codec
    included (``codec_bytes``; by default the released codec's, as loaded)."""
    if codec_bytes is None:
        codec_bytes = codec_bytes_of(real_codec_config())
    rows = ["| tokens per sample | batch | without checkpointing | with checkpointing |", "|---|---|---|---|"]
    for seq in seqs:
        for b in batches:
            off, on = (predict(c, lora, seq * b, dtype=dtype, gradient_checkpointing=g,
                               codec_bytes=codec_bytes).total / GIB for g in (False, True))
            rows.append(f"| {seq:,} | {b} | {off:.1f} GiB | {on:.1f} GiB |")
    return rows
