"""Audio to listen to during training: teacher-forced eval predictions and free-running generations, as WAV.

Teacher-forced audio decodes, for a few eval samples, the codes the model predicts at each target frame given the
true previous frames, next to the label codes decoded the same way: it shows what the per-codebook accuracies
sound like. Generated audio runs ``generate.generate_speech`` on fixed prompts: what the model does on its own.
"""

from __future__ import annotations

from pathlib import Path

import torch

from analysis.schema import step_dir_name

from .chat import SpecialIds
from .config import SAMPLING_KEYS, ConfigError, LogConfig
from .generate import decode_codes, encode_reference, write_generation, write_wav
from .losses import LossOutput
from .run_dir import SAMPLES_DIR


def samples_dir(run_dir: str | Path, step: int) -> Path:
    """Where the audio of one eval goes: RUN_DIR/samples/step-<8 digits>, sorting like the checkpoints."""
    return Path(run_dir) / SAMPLES_DIR / step_dir_name(step)


def sample_codes(out: LossOutput, b: int, ids: SpecialIds) -> tuple[torch.Tensor, torch.Tensor]:
    """Predicted and label codes (K, T) of the target audio of batch sample ``b``, out of the delay pattern.

    The rows of ``out`` for a sample are its target frames in the delay layout (codebook c of frame j at
    delayed frame j + 1 + c, after the all-BOS frame). Selecting, per codebook, the rows whose label is a real
    code (not stream BOS/EOS, not the ignored fill) in position order gives that codebook's codes in frame order:
    that is the reverted delay pattern. Predictions may still be stream BOS/EOS (never equal to a label)."""
    where = out.audio_where[:, 0] == b
    order = out.audio_where[where, 1].argsort()
    pred, label = out.audio_pred[where][order], out.audio_label[where][order]
    is_code = (label >= 0) & (label < ids.stream_bos)
    preds = [pred[is_code[:, c], c] for c in range(label.shape[1])]
    labels = [label[is_code[:, c], c] for c in range(label.shape[1])]
    t = min(len(x) for x in labels) if labels else 0  # equal in a well-formed sample; never trust it blindly
    return torch.stack([p[:t] for p in preds]), torch.stack([x[:t] for x in labels])


def codebook_accuracy(pred: torch.Tensor, label: torch.Tensor) -> list[float]:
    """Per-codebook share of frames whose predicted code equals the label (codes only, stream EOS excluded)."""
    return (pred == label).float().mean(1).tolist()


def write_eval_audio(out: LossOutput, batch: dict, codec, ids: SpecialIds, out_dir: Path,
                     max_samples: int) -> list[dict]:
    """Decode the teacher-forced predictions and the labels of the first ``max_samples`` samples of ``batch`` to
    ``out_dir/pred-<i>.wav`` and ``out_dir/label-<i>.wav``; one dict (an ``eval_audio`` event's fields) per sample.

    A sample without target codes, or whose decode fails, gets ``reason`` set and no files: it never raises for
    one sample."""
    out_dir = Path(out_dir)
    sample_rate = codec.config.sample_rate
    rows = []
    for b in range(min(max_samples, len(batch["input_ids"]))):
        row = {"sample": b, "pred_path": None, "label_path": None, "n_frames": 0, "pred_seconds": None,
               "label_seconds": None, "sample_rate": sample_rate, "acc": None, "acc_cb": None, "reason": None}
        rows.append(row)
        pred, label = (x.cpu() for x in sample_codes(out, b, ids))
        row["n_frames"] = label.shape[1]
        if label.shape[1] == 0:
            row["reason"] = "no target audio codes in this sample"
            continue
        row["acc_cb"] = codebook_accuracy(pred, label)
        row["acc"] = float((pred == label).float().mean())
        try:  # a predicted stream BOS/EOS is no code the codec knows: clip it in, as the processor does
            for kind, codes in (("pred", pred.clip(0, ids.stream_bos - 1)), ("label", label)):
                wave = decode_codes(codec, codes)
                row[f"{kind}_path"] = str(write_wav(out_dir / f"{kind}-{b}.wav", wave, sample_rate))
                row[f"{kind}_seconds"] = len(wave) / sample_rate
        except Exception as e:  # noqa: BLE001 - one sample's failed decode must not cost the others
            row["reason"] = f"decode failed: {type(e).__name__}: {e}"
    return rows


def write_generated(model, tokenizer, codec, ids: SpecialIds, prompts: list[str], out_dir: Path,
                    system_prompt: str, max_new_tokens: int, seed: int = 0, **gen_kwargs) -> list[dict]:
    """Generate each prompt to ``out_dir/gen-<i>.wav``; one dict (a ``generate_audio`` event's fields) per prompt.

    Decoded as the checkpoint's generation config says, but for the knobs ``gen_kwargs["sampling"]`` sets; seeded
    per prompt, so the same step of a resumed run sounds the same; failures are reported in ``error`` (and leave
    no file), never raised."""
    rows = []
    for i, text in enumerate(prompts):
        r = write_generation(model, tokenizer, codec, ids, text, out_dir, i, system_prompt=system_prompt,
                             max_new_tokens=max_new_tokens, seed=seed + i, **gen_kwargs)
        rows.append({"prompt": i, "text": text, "path": r["path"], "seconds": r["seconds"], "n_frames": r["n_frames"],
                     "new_tokens": r["new_tokens"], "stopped": r["stopped"], "sample_rate": r["sample_rate"],
                     **(r["sampling"] or dict.fromkeys(SAMPLING_KEYS)), "gen_time_s": r["gen_time_s"],
                     "error": r["error"]})
    return rows


def generation_options(lc: LogConfig, codec) -> dict:
    """``write_generated`` keyword arguments from the log config: ``sampling`` holds ``log.generate_<knob>`` for each
    of ``config.SAMPLING_KEYS`` (null: the checkpoint's value). The reference voice is encoded once, here, so a
    bad file stops the run before training instead of failing at every generate eval."""
    opts = {"sampling": {key: getattr(lc, f"generate_{key}") for key in SAMPLING_KEYS}}
    if lc.generate_every and lc.generate_ref_audio:
        try:
            opts["ref_codes"] = encode_reference(codec, lc.generate_ref_audio)
        except Exception as e:  # noqa: BLE001 - any decode or encode failure is this file's fault
            raise ConfigError(f"'log.generate_ref_audio': cannot use {lc.generate_ref_audio}: {e}") from None
        opts["ref_text"] = lc.generate_ref_text
    return opts
