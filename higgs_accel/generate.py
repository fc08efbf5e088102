"""Speech from a (fine-tuned) Higgs Audio v2 model: our chat layout in, transformers' own ``generate``, WAV out.

The prompt is laid out exactly like the inputs of a training sample (``chat.build_example``) up to and including
``<|audio_out_bos|>``, so the model continues where training taught it to: with the delayed audio frames of the
answer. Generation itself is transformers' ``HiggsAudioV2ForConditionalGeneration.generate``, whose logits
processor enforces the delay pattern and which stops once every codebook has emitted the stream EOS. It starts from
the checkpoint's own generation config (``generation_config.json``: sampling, temperature, top-k/top-p and
repetition-aware sampling, as the authors tune it); every knob of ``SAMPLING_KEYS`` given explicitly overrides it.
"""

from __future__ import annotations

import time
from functools import partial
from pathlib import Path

import numpy as np
import torch

from .chat import SpecialIds, chat_prompt, lay_out
from .config import SAMPLING_KEYS, DataConfig, error_line
from .data import load_audio
from .family import is_v3

DEFAULT_SYSTEM_PROMPT = DataConfig().system_prompt
DEFAULT_MAX_NEW_TOKENS = 750  # generation steps (one delayed audio frame each) of the generate and evaluate commands

RAS_KEYS = ("ras_win_len", "ras_win_max_num_repeat")
DEFAULT_RAS_MAX_REPEAT = 2  # transformers' converter and the authors' examples, for a window set without one


# ---------------------------------------------------------------- prompt


def build_prompt(tokenizer, ids: SpecialIds, text: str, ref_codes: np.ndarray | None = None, ref_text: str = "",
                 scene: str = "", system_prompt: str = DEFAULT_SYSTEM_PROMPT) -> dict[str, torch.Tensor | None]:
    """Token ids (L,) of the prompt and the delayed frames (F, K) of its reference audio (None without one): the
    training layout (``chat.chat_prompt``, ``chat.lay_out``) up to and including ``<|audio_out_bos|>``."""
    prompt = chat_prompt(text, system_prompt, scene, ref_text if ref_codes is not None else None)
    audios = [(np.asarray(ref_codes), False)] if ref_codes is not None else []
    input_ids, _, frames, _ = lay_out([(prompt + "<|audio_out_bos|>", False)], audios, tokenizer, ids, False)
    audio = torch.as_tensor(np.concatenate(frames)) if frames else None
    return {"input_ids": torch.tensor(input_ids), "audio_input_ids": audio}


def encode_reference(codec, path: str | Path) -> np.ndarray:
    """Codec codes (K, T) of a reference audio file (any format and rate soundfile reads)."""
    wave = load_audio(path, codec.config.sample_rate)
    if len(wave) == 0:
        raise ValueError(f"{path}: no audio samples")
    with torch.no_grad():
        codes = codec.encode(torch.from_numpy(wave)[None, None].to(_device(codec))).audio_codes[0]
    if codes.shape[-1] == 0:
        raise ValueError(f"{path}: shorter than one codec frame")
    return codes.cpu().numpy()


# ---------------------------------------------------------------- codes out


def revert_delay_pattern(frames: torch.Tensor) -> torch.Tensor:
    """Delayed frames (F, K), codebook c of frame j at row j + c -> (F - K + 1, K) aligned frames."""
    n, k = frames.shape
    t = n - k + 1
    if t <= 0:
        return frames.new_zeros((0, k))
    return torch.stack([frames[c:c + t, c] for c in range(k)], dim=1)


def generated_codes(frames: torch.Tensor, ids: SpecialIds) -> torch.Tensor:
    """The generated delayed frames (F, K) -> codec codes (K, T).

    Frame 0 is the all-BOS frame the delay-pattern processor forces; the stream ends at the first all-EOS frame
    (or wherever the length limit cut it), then the delay pattern is reverted, as in
    ``HiggsAudioV2Processor.batch_decode``. Unlike it, the audio also ends at the first frame holding a stream
    EOS in any codebook: once one codebook ends, transformers' ``_sample`` forces the others to end within
    ``num_codebooks`` steps, and the processor would decode those last frames with the EOS clipped to the
    codebook's last code, a code the model never meant. A model that ends every codebook at its own delayed
    position (as training with ``data.train_audio_eos`` teaches) gives the same codes both ways. A stray stream BOS
    code is clipped into the codebook, as the processor does."""
    all_eos = (frames == ids.stream_eos).all(-1).nonzero()
    end = int(all_eos[0]) if len(all_eos) else len(frames)
    codes = revert_delay_pattern(frames[1:end])
    eos = (codes == ids.stream_eos).any(-1).nonzero()
    if len(eos):
        codes = codes[: int(eos[0])]
    return codes.clip(0, ids.stream_bos - 1).T.contiguous()


def decode_codes(codec, codes: torch.Tensor) -> np.ndarray:
    """Codes (K, T) -> mono float32 wave of T x hop_length samples at the codec's rate."""
    with torch.no_grad():
        wave = codec.decode(codes[None].to(_device(codec))).audio_values
    return wave.reshape(-1).float().cpu().numpy()


# ---------------------------------------------------------------- generation


def generator_of(model):
    """The HiggsAudioV2ForConditionalGeneration inside a DDP / DualLossModel / PeftModel wrapper (LoRA layers
    are injected in place, so generating with it uses the adapter)."""
    model = getattr(model, "module", model)
    if hasattr(model, "lm"):
        return model.lm
    if hasattr(model, "get_base_model"):
        return model.get_base_model()
    return model


def sampling_kwargs(lm, sampling: dict | None) -> dict:
    """``generate`` keyword arguments for the knobs of ``sampling`` (keys of ``SAMPLING_KEYS``) that are set; the
    others keep the checkpoint's generation config.

    ``ras_win_len`` 0 turns repetition-aware sampling off, and so does ``do_sample`` False without a
    ``ras_win_len``: greedy means argmax. A window set on a checkpoint that has no ``ras_win_max_num_repeat``
    gets ``DEFAULT_RAS_MAX_REPEAT``."""
    sampling = {k: v for k, v in (sampling or {}).items() if v is not None}
    if unknown := set(sampling) - set(SAMPLING_KEYS):
        raise ValueError(f"unknown sampling options: {sorted(unknown)}")
    config = lm.generation_config
    for key in RAS_KEYS:
        # generate() accepts a key only if the model's generation config has it; None there means "no RAS" too
        if not hasattr(config, key):
            setattr(config, key, None)
    if sampling.get("ras_win_len") == 0 or (sampling.get("do_sample") is False and "ras_win_len" not in sampling):
        sampling["ras_win_len"] = None
    elif "ras_win_len" in sampling and config.ras_win_max_num_repeat is None:
        sampling.setdefault("ras_win_max_num_repeat", DEFAULT_RAS_MAX_REPEAT)
    return sampling


def effective_sampling(lm, kwargs: dict) -> dict:
    """The values of ``SAMPLING_KEYS`` a generation with ``kwargs`` (``sampling_kwargs``) runs with; repetition-aware
    sampling off shows as ``ras_win_len`` None."""
    config = lm.generation_config
    defaults = config._get_default_generation_params()  # what generate() fills in where the checkpoint is silent
    out = {key: kwargs.get(key, getattr(config, key, None)) for key in SAMPLING_KEYS}
    out = {key: defaults.get(key) if value is None and key not in kwargs else value for key, value in out.items()}
    if out["ras_win_len"] is None or out["ras_win_max_num_repeat"] is None:
        out["ras_win_len"] = out["ras_win_max_num_repeat"] = None
    return out


def generate_speech(model, tokenizer, codec, ids: SpecialIds, text: str, ref_audio: str | Path | None = None,
                    ref_text: str = "", scene: str = "", system_prompt: str = DEFAULT_SYSTEM_PROMPT,
                    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, sampling: dict | None = None,
                    seed: int | None = None, ref_codes: np.ndarray | None = None) -> dict:
    """Speak ``text`` (optionally in the voice of ``ref_audio`` / precomputed ``ref_codes``, whose transcript is
    ``ref_text``), decoding as the checkpoint's generation config says except for the knobs set in ``sampling``
    (``sampling_kwargs``). Never raises for a failed generation: the result's ``error`` says what went wrong.

    Returns ``wave`` (float32, possibly empty), ``sample_rate``, ``n_frames`` (codec frames), ``seconds``,
    ``new_tokens`` (generation steps), ``stopped`` ("eos": the model ended the audio; "max_length": the limit
    cut it; None on error), ``sampling`` (``effective_sampling``) and ``error`` (None or one line). The global
    RNG is left as it was, so a trainer calling this keeps its exact-resume guarantees."""
    sample_rate = codec.config.sample_rate
    result = {"wave": np.zeros(0, np.float32), "sample_rate": sample_rate, "n_frames": 0, "seconds": 0.0,
              "new_tokens": 0, "stopped": None, "sampling": None, "error": None}
    lm = generator_of(model)
    was_training = lm.training
    lm.eval()
    try:
        if ref_audio is not None and ref_codes is None:
            ref_codes = encode_reference(codec, ref_audio)
        if is_v3(ids):
            from .tts3_generate import effective_sampling as tts3_sampling

            knobs = tts3_sampling(sampling)
            result["sampling"] = knobs
            run = partial(_generate_tts3, lm, tokenizer, ids, text, ref_codes, ref_text, max_new_tokens, knobs)
        else:
            prompt = build_prompt(tokenizer, ids, text, ref_codes, ref_text, scene, system_prompt)
            kwargs = sampling_kwargs(lm, sampling)
            result["sampling"] = effective_sampling(lm, kwargs)
            run = partial(_generate_v2, lm, prompt, max_new_tokens, kwargs)
        with torch.random.fork_rng(devices=_cuda_devices(lm)):
            if seed is not None:
                torch.manual_seed(seed)
            frames, result["stopped"] = run()
        result["new_tokens"] = len(frames) - is_v3(ids)  # v3: the all-BOS frame in front was not generated
        codes = generated_codes(frames, ids)
        result["n_frames"] = codes.shape[1]
        if codes.shape[1] == 0:
            why = ("the model ended the audio before its first frame" if result["stopped"] == "eos" else
                   f"the delay pattern needs {ids.num_codebooks + 1} steps before the first full frame")
            result["error"] = f"no audio frame generated in {len(frames)} steps ({why})"
            return result
        result["wave"] = decode_codes(codec, codes)
        result["seconds"] = len(result["wave"]) / sample_rate
    except Exception as e:  # noqa: BLE001 - a failed generation is reported, never raised (the trainer goes on)
        result["error"] = error_line(e)
    finally:
        lm.train(was_training)
    return result


def describe_sampling(sampling: dict) -> str:
    """One line for ``effective_sampling``'s values."""
    if sampling["do_sample"]:
        how = f"sampled: temperature {sampling['temperature']}, top-k {sampling['top_k']}, top-p {sampling['top_p']}"
    else:
        how = "greedy"
    if sampling["ras_win_len"] is not None:
        return f"{how}, repetition-aware: {sampling['ras_win_max_num_repeat']} in {sampling['ras_win_len']} frames"
    return how


def _generate_v2(lm, prompt: dict, max_new_tokens: int, kwargs: dict) -> tuple[torch.Tensor, str]:
    """(delayed frames (F, K) from the all-BOS frame on, stopped) through transformers' ``generate``."""
    out = _generate(lm, prompt, max_new_tokens, kwargs)
    n_ref = 0 if prompt["audio_input_ids"] is None else len(prompt["audio_input_ids"])
    stopped = "eos" if int(out.sequences[0, -1]) == lm.config.eos_token_id else "max_length"
    return out.audio_sequences[0, n_ref:].cpu(), stopped


def _generate_tts3(lm, tokenizer, ids, text: str, ref_codes, ref_text: str, max_new_tokens: int,
                   knobs: dict) -> tuple[torch.Tensor, str]:
    """The same for Higgs TTS 3 (``tts3_generate``): its rows lack v2's leading all-BOS frame, which is put in front
    so ``generated_codes`` reads both families' frames alike. The layout has no system prompt or scene."""
    from .tts3_generate import generate_rows
    from .tts3_prompt import build_example

    prompt = build_example(tokenizer, ids, text, None, ref_codes, ref_text or None)
    rows, stopped = generate_rows(lm, ids, prompt, max_new_tokens, knobs)
    return torch.cat([rows.new_full((1, ids.num_codebooks), ids.stream_bos), rows]), stopped


def _generate(lm, prompt: dict, max_new_tokens: int, sampling: dict):
    device = _device(lm)
    input_ids = prompt["input_ids"][None].to(device)
    kwargs = {}
    if prompt["audio_input_ids"] is not None:
        frames = prompt["audio_input_ids"][None].to(device)
        kwargs = {"audio_input_ids": frames,
                  "audio_input_ids_mask": torch.ones(frames.shape[:2], dtype=torch.bool, device=device)}
    # eos_token_id is what _sample emits once every codebook has ended: stop there, whatever generation_config says.
    # synced_gpus=False: one process generates alone (during training: the main one, with the full parameters
    # gathered by engine.full_parameters); under FSDP or ZeRO-3 transformers would wait for the others every token.
    return lm.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), **kwargs,
                       max_new_tokens=max_new_tokens, **sampling,
                       eos_token_id=lm.config.eos_token_id, pad_token_id=lm.config.pad_token_id,
                       return_dict_in_generate=True, synced_gpus=False)


def _device(module) -> torch.device:
    return next(module.parameters()).device


def _cuda_devices(module) -> list:
    device = _device(module)
    return [device] if device.type == "cuda" else []


def write_wav(path: str | Path, wave: np.ndarray, sample_rate: int) -> Path:
    import soundfile as sf

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # 16-bit PCM plays everywhere; clip first, since an untrained model's wave may leave [-1, 1].
    sf.write(path, np.clip(wave, -1.0, 1.0), sample_rate, subtype="PCM_16")
    return path


def write_generation(model, tokenizer, codec, ids: SpecialIds, text: str, out_dir: str | Path, index: int,
                     **kwargs) -> dict:
    """``generate_speech`` of ``text`` (``kwargs`` as it takes them), timed and written to ``out_dir/gen-<index>.wav``:
    its result plus ``path`` (None when it failed: no file) and ``gen_time_s``. Training's generate evals and
    ``higgs-accel evaluate`` both write their generations this way."""
    start = time.perf_counter()
    result = generate_speech(model, tokenizer, codec, ids, text, **kwargs)
    result["gen_time_s"] = time.perf_counter() - start
    result["path"] = None
    if result["error"] is None:
        result["path"] = str(write_wav(Path(out_dir) / f"gen-{index}.wav", result["wave"], result["sample_rate"]))
    return result
