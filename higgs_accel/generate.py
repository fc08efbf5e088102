"""Speech from a (fine-tuned) Higgs Audio v2 model: our chat layout in, transformers' own ``generate``, WAV out.

The prompt is laid out exactly like the inputs of a training sample (``chat.build_example``) up to and including
``<|audio_out_bos|>``, so the model continues where training taught it to: with the delayed audio frames of the
answer. Generation itself is transformers' ``HiggsAudioV2ForConditionalGeneration.generate``, whose logits
processor enforces the delay pattern and which stops once every codebook has emitted the stream EOS. It starts from
the checkpoint's own generation config (``generation_config.json``: sampling, temperature, top-k/top-p and
repetition-aware sampling, as the authors tune it); every knob of ``SAMPLING_KEYS`` given explicitly overrides it.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

from .chat import SpecialIds, chat_prompt, lay_out
from .config import ConfigError, DataConfig, ModelConfig
from .data import load_audio
from .loading import load_codec_dir, load_model, load_tokenizer, resolve_checkpoints

DEFAULT_SYSTEM_PROMPT = DataConfig().system_prompt
DEFAULT_MAX_NEW_TOKENS = 750  # 30 s at the codec's 25 frames/s, plus the delay-pattern frames

# The generation-config keys a caller may set (None: keep the checkpoint's). ras_win_len / ras_win_max_num_repeat
# are the repetition-aware sampling of transformers' HiggsAudioV2 ``_sample``: a code already seen
# ras_win_max_num_repeat times in the last ras_win_len frames of its codebook is redrawn from the untempered
# distribution (this happens in greedy decoding too).
SAMPLING_KEYS = ("do_sample", "temperature", "top_k", "top_p", "ras_win_len", "ras_win_max_num_repeat")
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
    ``num_codebooks`` steps, and the processor would decode those last frames with the EOS clipped to code 1023, a
    code the model never meant. A model that ends every codebook at its own delayed position (as training with
    ``data.train_audio_eos`` teaches) gives the same codes both ways. A stray stream BOS code is clipped into the
    codebook, as the processor does."""
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
        prompt = build_prompt(tokenizer, ids, text, ref_codes, ref_text, scene, system_prompt)
        kwargs = sampling_kwargs(lm, sampling)
        result["sampling"] = effective_sampling(lm, kwargs)
        with torch.random.fork_rng(devices=_cuda_devices(lm)):
            if seed is not None:
                torch.manual_seed(seed)
            out = _generate(lm, prompt, max_new_tokens, kwargs)
        n_ref = 0 if prompt["audio_input_ids"] is None else len(prompt["audio_input_ids"])
        frames = out.audio_sequences[0, n_ref:].cpu()
        result["new_tokens"] = len(frames)
        result["stopped"] = "eos" if int(out.sequences[0, -1]) == lm.config.eos_token_id else "max_length"
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
        result["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
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


# ---------------------------------------------------------------- where the model comes from (shared with export)


def run_sources(run_dir: str, need_adapter: bool = True) -> dict:
    """base, audio_tokenizer, text_tokenizer, adapter, system_prompt and dtype of a run; the adapter is its finished
    one, required unless ``need_adapter`` is off (another adapter or none is used), and then None when absent."""
    import yaml

    run = Path(run_dir)
    if not (run / "config.yaml").is_file():
        raise ConfigError(f"--run: {run_dir} is not a run dir (no config.yaml)")
    cfg = yaml.safe_load((run / "config.yaml").read_text()) or {}
    model, data = cfg.get("model") or {}, cfg.get("data") or {}
    base, codec = model.get("base") or "", model.get("audio_tokenizer") or ""
    if cfg.get("preset") == "tiny" and not (base and codec):
        # A --preset tiny run builds its assets under RUN_DIR/tiny and leaves the paths out of config.yaml.
        from .tiny import ensure_tiny_assets

        tiny = ensure_tiny_assets(run / "tiny")
        base, codec = base or tiny["model.base"], codec or tiny["model.audio_tokenizer"]
    finished = (run / "adapter" / "adapter_config.json").is_file()
    if need_adapter and not finished:
        raise ConfigError(f"--run: {run_dir} has no finished adapter ({run / 'adapter'}); pass --adapter "
                          "RUN_DIR/checkpoints/step-N/adapter for a checkpoint")
    return {"base": base, "audio_tokenizer": codec, "text_tokenizer": model.get("text_tokenizer") or base,
            "adapter": str(run / "adapter") if finished else None,
            "system_prompt": data.get("system_prompt") or DEFAULT_SYSTEM_PROMPT,
            "dtype": model.get("dtype") or "fp32", "attn_implementation": model.get("attn_implementation") or "sdpa"}


def resolve_sources(args) -> dict:
    """--run fills in what --base / --audio-tokenizer / --adapter leave out; explicit flags win."""
    src = {"adapter": None, "system_prompt": DEFAULT_SYSTEM_PROMPT, "dtype": "fp32", "audio_tokenizer": None,
           "attn_implementation": "sdpa"}
    if args.run:
        src.update(run_sources(args.run))
    flags = {key: getattr(args, key, None) for key in ("base", "audio_tokenizer", "adapter")}
    src.update({key: value for key, value in flags.items() if value})
    if flags["base"] or not src.get("text_tokenizer"):
        src["text_tokenizer"] = src.get("base")
    if not src.get("base"):
        raise ConfigError("--base (or --run) is required")
    return src


# ---------------------------------------------------------------- command line


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "generate", help="speak a text with a base model and a LoRA adapter",
        description="Generate speech with transformers' HiggsAudioV2ForConditionalGeneration.generate, using the "
                    "training chat layout. Writes a WAV file; exits 1 if no audio came out.",
        epilog="Examples:\n  higgs-accel generate --run runs/demo --text 'Hello there.' --out hello.wav\n"
               "  higgs-accel generate --base BASE --audio-tokenizer CODEC --adapter runs/demo/adapter \\\n"
               "      --text 'Hello.' --ref-audio voice.wav --ref-text 'What the voice says.' --out hello.wav",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_argument_group("model")
    src.add_argument("--run", help="finished run dir: base, codec and system prompt from its config.yaml, "
                                   "adapter from RUN_DIR/adapter")
    src.add_argument("--base", help="HiggsAudioV2ForConditionalGeneration: local dir or hub id")
    src.add_argument("--audio-tokenizer", help="HiggsAudioV2TokenizerModel codec: local dir or hub id")
    src.add_argument("--adapter", help="PEFT adapter dir (e.g. RUN_DIR/adapter); none: the base model alone")
    src.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    src.add_argument("--dtype", choices=["fp32", "bf16"], help="model weights dtype (default: the run's, or fp32)")
    prompt = p.add_argument_group("prompt")
    prompt.add_argument("--text", required=True, help="what to say")
    prompt.add_argument("--ref-audio", help="reference audio whose voice to clone (any soundfile format)")
    prompt.add_argument("--ref-text", default="", help="transcript of --ref-audio")
    prompt.add_argument("--scene", default="", help="scene description added to the system turn")
    prompt.add_argument("--system", help="system prompt (default: the run's data.system_prompt)")
    gen = p.add_argument_group("generation")
    gen.add_argument("--out", required=True, help="output WAV file")
    gen.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS,
                     help="generation steps, one delayed audio frame each: 25 per second of audio at 25 "
                          f"frames/s, plus 8 for the delay pattern; default: {DEFAULT_MAX_NEW_TOKENS}")
    gen.add_argument("--seed", type=int, help="seed for sampling (and for repetition-aware redraws)")
    scoring = p.add_argument_group(
        "scoring", "Score the speech (docs/quality.md): WER/CER against --text, speaker similarity to --ref-audio. "
                   "Defaults: the run's eval.* keys; none set: no scoring.")
    scoring.add_argument("--asr-model", help="ASR model for WER/CER (hub id or local dir)")
    scoring.add_argument("--speaker-model", help="x-vector speaker model for similarity (hub id or local dir)")
    scoring.add_argument("--asr-language", help="language a Whisper ASR model transcribes in")
    knobs = p.add_argument_group(
        "sampling", "Unset options keep the checkpoint's generation_config.json (the authors' tuning: sampling, "
                    "temperature, top-k/top-p, repetition-aware sampling); each one given overrides it.")
    mode = knobs.add_mutually_exclusive_group()
    mode.add_argument("--do-sample", dest="do_sample", action="store_const", const=True,
                      help="sample from the (tempered, top-k/top-p filtered) distribution")
    mode.add_argument("--greedy", dest="do_sample", action="store_const", const=False,
                      help="argmax decoding, without repetition-aware redraws unless --ras-win-len is given")
    knobs.add_argument("--temperature", type=float, help="sampling temperature")
    knobs.add_argument("--top-k", type=int, help="keep the K most likely codes per codebook (0: no limit)")
    knobs.add_argument("--top-p", type=float, help="nucleus sampling mass (1: no limit)")
    knobs.add_argument("--ras-win-len", type=int,
                       help="repetition-aware sampling: redraw a code seen --ras-win-max-num-repeat times in the last "
                            "N frames of its codebook from the untempered distribution (0: off)")
    knobs.add_argument("--ras-win-max-num-repeat", type=int,
                       help=f"repeats in the window that trigger a redraw (default: the checkpoint's, else "
                            f"{DEFAULT_RAS_MAX_REPEAT})")
    p.set_defaults(func=cmd_generate)
    return p


def check_args(args) -> None:
    if args.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if not args.text.strip():
        raise ConfigError("--text must not be empty")
    if args.ref_audio and not Path(args.ref_audio).is_file():
        raise ConfigError(f"--ref-audio: file not found: {args.ref_audio}")
    if args.ref_audio and not args.ref_text:
        raise ConfigError("--ref-audio needs --ref-text (the reference's transcript)")
    if args.temperature is not None and args.temperature <= 0:
        raise ConfigError(f"--temperature must be positive, got {args.temperature}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise ConfigError(f"--top-p must be in (0, 1], got {args.top_p}")
    for flag, value in (("--top-k", args.top_k), ("--ras-win-len", args.ras_win_len)):
        if value is not None and value < 0:
            raise ConfigError(f"{flag} must not be negative, got {value}")
    if args.ras_win_max_num_repeat is not None and args.ras_win_max_num_repeat < 1:
        raise ConfigError(f"--ras-win-max-num-repeat must be at least 1, got {args.ras_win_max_num_repeat}")


def cmd_generate(args) -> int:
    check_args(args)
    src = resolve_sources(args)
    if not src.get("audio_tokenizer"):
        raise ConfigError("--audio-tokenizer (or --run) is required")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    sources = ModelConfig(base=src["base"], audio_tokenizer=src["audio_tokenizer"],
                          text_tokenizer=src["text_tokenizer"])
    model_cfg, _ = resolve_checkpoints(sources, base_name="--base", codec_name="--audio-tokenizer")
    tokenizer = load_tokenizer(model_cfg.text_tokenizer)
    codec = load_codec_dir(model_cfg.audio_tokenizer).to(device)
    dtype = args.dtype or src["dtype"]
    model = load_model(model_cfg.base, src["adapter"], dtype, src["attn_implementation"]).to(device)
    ids = SpecialIds.from_parts(tokenizer, model.config)
    scorer = load_scorer(args, device)  # before generating: a bad scorer dir is one line, not wasted work
    start = time.perf_counter()
    result = generate_speech(model, tokenizer, codec, ids, args.text, ref_audio=args.ref_audio,
                             ref_text=args.ref_text, scene=args.scene,
                             system_prompt=args.system or src["system_prompt"], max_new_tokens=args.max_new_tokens,
                             sampling={key: getattr(args, key) for key in SAMPLING_KEYS}, seed=args.seed)
    if result["error"]:
        print(f"higgs-accel: generation failed: {result['error']}", file=sys.stderr)
        return 1
    path = write_wav(args.out, result["wave"], result["sample_rate"])
    how = "end of audio" if result["stopped"] == "eos" else f"length limit of {args.max_new_tokens} steps"
    print(f"wrote {path}: {result['seconds']:.2f}s, {result['n_frames']} frames (stopped at {how}; "
          f"{describe_sampling(result['sampling'])})", file=sys.stderr)
    if scorer is not None:
        row = scorer.score(result["wave"], result["sample_rate"], args.text, reference_audio=args.ref_audio,
                           gen_time_s=time.perf_counter() - start)
        print(score_line(row), file=sys.stderr)
    return 0


def load_scorer(args, device):
    """The scorers the flags name, else the run's ``eval.*`` keys (with --run); None when there are none."""
    from .config import EvalConfig
    from .quality import QualityScorer, run_section

    flags = {"asr_model": args.asr_model, "speaker_model": args.speaker_model, "asr_language": args.asr_language}
    cfg = run_section(args.run, "eval", EvalConfig, **flags) if args.run else EvalConfig(
        **{k: v for k, v in flags.items() if v})
    return QualityScorer.from_config(cfg, device)


def score_line(row: dict) -> str:
    def fmt(v):
        return "-" if v is None else f"{v:.3f}"

    return (f"scored: WER {fmt(row['wer'])}, CER {fmt(row['cer'])}, similarity {fmt(row['similarity'])}, "
            f"transcript {row['transcript']!r}")
