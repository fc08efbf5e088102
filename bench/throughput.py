"""Training tokens/s: higgs-accel's step (DualLossModel, heads only at labelled positions) vs transformers' Trainer
on the model's own forward loss (text and audio logits at every position), in one process, on the same batches.

Two sizes of the same architecture (HiggsAudioV2ForConditionalGeneration with its text head):
  tiny  the --preset tiny model (hidden 64, 2 layers, ~400-token vocabulary) and the tiny preset's LoRA;
  mid   random weights at the real widths (vocabulary 128,256, hidden 3072, 24 heads / 8 KV heads of 128,
        intermediate 8192, 8 codebooks of 1026) but only 2 layers, and the default LoRA (r 16, 7 projections).

Both paths run the same batches (voice-cloning TTS samples built by higgs_accel.chat with random codes, every
sample exactly --seq tokens, so each step trains the same tokens), the same LoRA adapter, torch AdamW (non-fused,
as higgs-accel uses off CUDA) at the same lr with a constant schedule and clipping at 1.0, and the same number
of steps; each warms up before the timed steps. higgs-accel's side is the loop's own step function,
``higgs_accel.loop.train_step`` (the step's target counts, model(batch), backward under the process scaling, clip,
one device-to-host read of the step's statistics, the non-finite guard, optimizer and schedule step), without data
loading and event logging (bench/logging_overhead.py measures those). Trainer gets a Dataset that
returns the prepared batches and a pass-through collator. tokens/s = tokens per step / the median timed step, over
--rounds alternating rounds (other processes on a shared machine stall single steps; the median ignores those).
--plain adds a third path, the model's own loss in higgs-accel's loop, which splits the gap into Trainer's overhead
and the loss computation. The last line is the mid-size ratio (the real vocabulary is what the masked heads save
on). On a CUDA machine the model trains there; ``--sizes mid --layers 28 --seq 2048 --dtype bf16`` is then the
real model.

    python bench/throughput.py [--sizes tiny,mid] [--seq 256] [--batch 1] [--steps 3] [--rounds 2] [--dtype fp32]
                               [--plain] [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from higgs_accel import loop
from higgs_accel.chat import SpecialIds, build_example
from higgs_accel.config import DataConfig, LoraConfig, ModelConfig, TrainConfig, load_config
from higgs_accel.data import FileAudio, Sample, collate
from higgs_accel.loading import DTYPES, load_base_model
from higgs_accel.losses import LossWeights, n_stats
from higgs_accel.model import DualLossModel, add_lora, count_parameters
from higgs_accel.stopping import NonFiniteGuard
from higgs_accel.tiny import PAD_TOKEN, WORDS, build_model, build_text_tokenizer

LR, MAX_GRAD_NORM, SEED = 2e-4, 1.0, 0
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # where Trainer and Accelerator would put the model


@dataclass
class Size:
    name: str
    seq: int           # tokens per sample (no padding)
    batch: int         # samples per step
    warmup: int        # untimed steps first
    steps: int         # timed steps
    layers: int = 2    # mid only
    hidden: int = 3072  # mid only; --quick shrinks it so the smoke test stays fast
    dtype: str = "fp32"  # weights, as model.dtype: fp32 or bf16 (no autocast on either path)


SIZES = {"tiny": Size("tiny", seq=256, batch=4, warmup=5, steps=30),
         "mid": Size("mid", seq=256, batch=1, warmup=1, steps=3)}
QUICK = {"tiny": Size("tiny", seq=128, batch=2, warmup=1, steps=2),
         "mid": Size("mid", seq=128, batch=1, warmup=1, steps=1, layers=1, hidden=128)}


# ---------------------------------------------------------------- shared with memory.py and gpu_real_size.py


def text_tokenizer(root: Path):
    """The tiny preset's byte-level BPE tokenizer: its special tokens give the chat layout; the model's vocabulary
    size (and so its text head) is set independently, so any id it produces is valid for a 128,256-token model."""
    return build_text_tokenizer(root)


def special_token_config(tokenizer) -> dict:
    """HiggsAudioV2Config kwargs tying the model's special ids to the tokenizer's, as tiny.build_model does."""
    ids = tokenizer.convert_tokens_to_ids
    return dict(audio_token_id=ids("<|AUDIO_OUT|>"), audio_bos_token_id=ids("<|audio_out_bos|>"),
                audio_delay_token_id=ids("<|reserved_special_token_6|>"), pad_token_id=ids(PAD_TOKEN),
                bos_token_id=ids("<|begin_of_text|>"), eos_token_id=ids("<|eot_id|>"))


def real_width_config(tokenizer, layers: int, max_seq: int = 2048, **overrides):
    """The real architecture's widths (HiggsAudioV2Config's defaults: vocabulary 128,256, hidden 3072, 24 heads,
    8 KV heads, head_dim 128, intermediate 8192) with the real 8 codebooks of 1026 codes and ``layers`` layers."""
    from transformers import HiggsAudioV2Config

    return HiggsAudioV2Config(num_hidden_layers=layers, num_codebooks=8, codebook_size=1026,
                              audio_stream_bos_id=1024, audio_stream_eos_id=1025,
                              max_position_embeddings=max(2048, max_seq), **special_token_config(tokenizer),
                              **overrides)


def synthetic_batches(tokenizer, ids: SpecialIds, seq: int, batch: int, n_batches: int, seed: int = SEED):
    """Batches in ``collate``'s format, every sample exactly ``seq`` tokens: a voice-cloning TTS sample (system
    turn, reference transcript and audio as context, target transcript, target audio) laid out by
    higgs_accel.chat with random codes, so placeholders, delay pattern and labels follow the trainer's rules.
    Text targets are only the two tokens after the target audio, as in real TTS fine-tuning. Every sample has the
    same transcripts and so the same layout, only other codes: tensor shapes never change from step to step, so one
    warm-up step builds every kernel the timed steps use (oneDNN builds one per new shape, which takes seconds)."""
    rng = np.random.default_rng(seed)
    n_words = max(2, seq // 40)
    words = [WORDS[j] for j in rng.integers(len(WORDS), size=2 * n_words)]
    sample = Sample(source="bench", line=1, audio=FileAudio(Path("target.wav")), text=" ".join(words[:n_words]),
                    ref_audio=FileAudio(Path("ref.wav")), ref_text=" ".join(words[n_words:]))

    def example(ref_frames: int, target_frames: int) -> dict:
        codes = [rng.integers(0, 1024, size=(ids.num_codebooks, n), dtype=np.int64)
                 for n in (target_frames, ref_frames)]
        return build_example(sample, codes[0], codes[1], tokenizer, ids, DataConfig().system_prompt,
                             train_on_prompt=False, train_audio_eos=True)

    text_only = len(example(0, 0)["input_ids"])  # the layout with empty audio: text plus the delay frames
    spare = seq - text_only
    if spare < 2:
        raise SystemExit(f"--seq {seq} is too short for one sample's text ({text_only} tokens)")
    items = [example(spare // 3, spare - spare // 3) for _ in range(n_batches * batch)]  # audio fills it to `seq`
    assert all(len(x["input_ids"]) == seq for x in items)
    return [collate(items[i:i + batch], pad_id=ids.pad, stream_eos=ids.stream_eos)
            for i in range(0, len(items), batch)]


def forward_kwargs(batch: dict) -> dict:
    """A collated batch as keyword arguments of the model's own forward (its loss takes labels and audio_labels)."""
    return {k: v for k, v in batch.items() if k != "skipped"}


# ---------------------------------------------------------------- the training paths


class OwnLoss(torch.nn.Module):
    """The PEFT model's own forward loss behind DualLossModel's interface (``count_targets``, ``forward(batch,
    counts)`` -> ``.loss``, ``.stats``), so the loop's step runs it unchanged."""

    def __init__(self, peft_model):
        super().__init__()
        self.peft = peft_model
        self.n_stats = n_stats(peft_model.get_base_model().config.num_codebooks)

    def count_targets(self, batch: dict) -> torch.Tensor:
        return torch.zeros(1, device=batch["input_ids"].device)

    def forward(self, batch: dict, counts=None):
        loss = self.peft(**forward_kwargs(batch)).loss
        return SimpleNamespace(loss=loss, stats=loss.detach().expand(self.n_stats))


def time_loop(model, batches: list[dict], warmup: int, steps: int, model_forward: bool = False) -> list[float]:
    """Step end times of the loop's own step (``loop.train_step``), minus logging. ``model`` is a DualLossModel, or
    with ``model_forward`` the PEFT model, whose own forward then computes the loss (``OwnLoss``)."""
    from accelerate import Accelerator

    accelerator = Accelerator()
    model = OwnLoss(model) if model_forward else model
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR, weight_decay=0.0, fused=torch.cuda.is_available() or None)
    num_codebooks = (model.peft.get_base_model() if model_forward else model.lm).config.num_codebooks
    model, optimizer = accelerator.prepare(model, optimizer)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)  # constant, as Trainer's here
    state = SimpleNamespace(accelerator=accelerator, model=model, optimizer=optimizer, scheduler=scheduler,
                            last_batch=None)
    t = TrainConfig()
    guard = NonFiniteGuard(t.on_nonfinite, t.max_nonfinite_steps)
    stats = torch.zeros(n_stats(num_codebooks), device=accelerator.device)
    stamps = []
    model.train()
    for i in range(warmup + steps):
        # The loop's prepared DataLoader hands each batch over on the device, as Trainer's _prepare_inputs does.
        batch = {k: v.to(accelerator.device) if torch.is_tensor(v) else v
                 for k, v in batches[i % len(batches)].items()}
        loop.train_step(state, [batch], stats, params, MAX_GRAD_NORM, guard)
        stats.zero_()
        stamps.append(time.perf_counter())
    return stamps


class PreparedBatches(torch.utils.data.Dataset):
    """Item i is the whole prepared batch i; the collator passes it through unchanged."""

    def __init__(self, batches: list[dict]):
        self.batches = [forward_kwargs(b) for b in batches]

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> dict:
        return self.batches[i]


def pass_through(items: list[dict]) -> dict:
    return items[0]


def time_trainer(peft_model, batches: list[dict], warmup: int, steps: int, out_dir: Path) -> list[float]:
    """Step end times of transformers' Trainer: the PEFT model's forward computes its own loss."""
    from transformers import PrinterCallback, Trainer, TrainerCallback, TrainingArguments

    stamps: list[float] = []

    class StepClock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if torch.cuda.is_available():
                torch.cuda.synchronize()  # Trainer never waits for the device; the higgs-accel side's read does
            stamps.append(time.perf_counter())

    args = TrainingArguments(
        output_dir=str(out_dir), use_cpu=not torch.cuda.is_available(), report_to=[], max_steps=warmup + steps,
        per_device_train_batch_size=1, learning_rate=LR, weight_decay=0.0, lr_scheduler_type="constant",
        optim="adamw_torch", max_grad_norm=MAX_GRAD_NORM, logging_strategy="no", save_strategy="no",
        disable_tqdm=True, dataloader_num_workers=0, remove_unused_columns=False, seed=SEED)
    trainer = Trainer(model=peft_model, args=args, train_dataset=PreparedBatches(batches), data_collator=pass_through,
                      callbacks=[StepClock()])
    trainer.remove_callback(PrinterCallback)  # with tqdm off it prints its final metrics dict to stdout
    # Trainer would pass num_items_in_batch (the count of text labels) into the forward, which then divides the
    # summed audio losses by the number of text targets; without it the model's loss is the same objective as
    # DualLossModel's (text mean + sum of codebook means). The compute is identical either way.
    trainer.model_accepts_loss_kwargs = False
    trainer.train()
    return stamps


def step_times(stamps: list[float], warmup: int) -> list[float]:
    """Durations of the steps after the warm-up (each from the previous step's end to its own)."""
    return [b - a for a, b in zip(stamps[warmup - 1:], stamps[warmup:])]


# ---------------------------------------------------------------- one size


def build(size: Size, root: Path):
    """(PEFT model, special ids, tokenizer, description) for a size."""
    tokenizer = text_tokenizer(root / "tokenizer")
    if size.name == "tiny":
        build_model(root / "tiny", tokenizer)  # the --preset tiny model, saved and read back as the preset does
        base = load_base_model(ModelConfig(base=str(root / "tiny"), dtype=size.dtype))
        lora = load_config(None, [("preset", "tiny", "bench")]).lora
    else:
        from transformers import HiggsAudioV2ForConditionalGeneration

        narrow = {} if size.hidden == 3072 else dict(hidden_size=size.hidden, intermediate_size=2 * size.hidden,
                                                     num_attention_heads=4, num_key_value_heads=2,
                                                     head_dim=size.hidden // 4)
        config = real_width_config(tokenizer, size.layers, size.seq, **narrow)
        with torch.device(DEVICE):  # initialise where it will train: a real-depth model is slow to fill on a CPU
            base = HiggsAudioV2ForConditionalGeneration(config, use_text_head=True).to(DTYPES[size.dtype])
        lora = LoraConfig()
    ids = SpecialIds.from_parts(tokenizer, base.config)
    c = base.config
    peft_model = add_lora(base.to(DEVICE), lora)
    trainable, total = count_parameters(peft_model)
    about = (f"hidden {c.hidden_size}, {c.num_hidden_layers} layers, vocabulary {c.vocab_size:,}, {size.dtype}, "
             f"{total / 1e6:.1f} M parameters, LoRA r {lora.r} ({trainable / 1e6:.2f} M trainable)")
    return peft_model, ids, tokenizer, about


def check_same_objective(peft_model, ids: SpecialIds, batch: dict) -> tuple[float, float]:
    """Both losses on one batch, dropout off: the two paths must train the same objective."""
    t = TrainConfig()
    peft_model.eval()
    batch = {k: v.to(DEVICE) if torch.is_tensor(v) else v for k, v in batch.items()}
    with torch.no_grad():
        dual = DualLossModel(peft_model, ids, LossWeights.of(t)).to(DEVICE)
        ours = dual(batch).loss.item()
        theirs = peft_model(**forward_kwargs(batch)).loss.item()
    peft_model.train()
    return ours, theirs


def bench_size(size: Size, root: Path, rounds: int, plain: bool) -> float:
    torch.manual_seed(SEED)
    t0 = time.perf_counter()
    peft_model, ids, tokenizer, about = build(size, root)
    batches = synthetic_batches(tokenizer, ids, size.seq, size.batch, n_batches=4)
    tokens = {int(b["attention_mask"].sum()) for b in batches}
    assert len(tokens) == 1, "every batch must hold the same tokens for the two paths' counts to agree"
    tokens_per_step = tokens.pop()
    print(f"{size.name}: {about}; built in {time.perf_counter() - t0:.0f} s")
    print(f"  batch {size.batch} x {size.seq} tokens, {size.warmup} warm-up + {size.steps} timed steps, "
          f"{rounds} round(s), torch {torch.__version__} on {DEVICE} ({torch.get_num_threads()} CPU threads)")
    ours, theirs = check_same_objective(peft_model, ids, batches[0])
    print(f"  same objective: loss {ours:.4f} (DualLossModel) vs {theirs:.4f} (model forward)")

    t = TrainConfig()
    dual = DualLossModel(peft_model, ids, LossWeights.of(t))
    paths = {"higgs-accel": ("DualLossModel, masked heads", lambda: time_loop(dual, batches, size.warmup, size.steps)),
             "Trainer": ("model forward, full logits", lambda: time_trainer(peft_model, batches, size.warmup,
                                                                            size.steps, root / "trainer"))}
    if plain:
        paths["plain loop"] = ("model forward in higgs-accel's loop",
                               lambda: time_loop(peft_model, batches, size.warmup, size.steps, model_forward=True))
    steps: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(rounds):  # alternate the paths so a slow patch of the machine hits each
        for name, (_, run) in paths.items():
            steps[name] += step_times(run(), size.warmup)
    rate = {}
    for name, times in steps.items():
        # The median step: other processes on a shared machine stall single steps; the median ignores those.
        median = statistics.median(times)
        rate[name] = tokens_per_step / median
        print(f"  {name:<11} ({paths[name][0]}): {rate[name]:9.1f} tokens/s, median step {1000 * median:8.1f} ms "
              f"(mean {1000 * statistics.mean(times):.1f} ms over {len(times)})")
    ratio = rate["higgs-accel"] / rate["Trainer"]
    print(f"  {size.name}: higgs-accel / Trainer tokens/s {ratio:.2f}x")
    return ratio


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="tiny,mid", help="comma-separated: tiny, mid")
    parser.add_argument("--seq", type=int, help="tokens per sample (default: tiny 256, mid 256)")
    parser.add_argument("--batch", type=int, help="samples per step (default: tiny 4, mid 1)")
    parser.add_argument("--warmup", type=int, help="untimed steps (default: tiny 5, mid 1)")
    parser.add_argument("--steps", type=int, help="timed steps (default: tiny 30, mid 3)")
    parser.add_argument("--layers", type=int, help="mid-size layers (default 2)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="weights dtype (default fp32)")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds of the two paths")
    parser.add_argument("--plain", action="store_true",
                        help="also time the model's own loss in higgs-accel's loop, without Trainer: splits the gap "
                             "into Trainer's overhead and the loss computation")
    parser.add_argument("--quick", action="store_true", help="tiny sizes and steps: checks the script, no figures")
    args = parser.parse_args()
    names = [s.strip() for s in args.sizes.split(",") if s.strip()]
    unknown = set(names) - set(SIZES)
    if unknown or not names:
        parser.error(f"--sizes: unknown {sorted(unknown)}; choose from {sorted(SIZES)}")
    ratios = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            size = (QUICK if args.quick else SIZES)[name]
            chosen = {k: getattr(args, k) for k in ("seq", "batch", "warmup", "steps", "layers", "dtype")}
            size = replace(size, **{k: v for k, v in chosen.items() if v is not None})
            if size.warmup < 1 or size.steps < 1:
                parser.error("--warmup and --steps must be at least 1")
            ratios[name] = bench_size(size, Path(tmp) / name, args.rounds, args.plain)
    head = "mid" if "mid" in ratios else names[0]
    others = ", ".join(f"{n} {r:.2f}x" for n, r in ratios.items() if n != head)
    print(f"higgs-accel / Trainer tokens/s: {ratios[head]:.2f}x ({head}{'; ' + others if others else ''}) "
          f"(target >= 1.1)")


if __name__ == "__main__":
    main()
