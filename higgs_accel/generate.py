"""Speech from a (fine-tuned) Higgs Audio v2 model: our chat layout in, transformers' own ``generate``, WAV out.

The prompt is laid out exactly like the inputs of a training sample (``chat.build_example``) up to and including
``<|audio_out_bos|>``, so the model continues where training taught it to: with the delayed audio frames of the
answer. Generation itself is transformers' ``HiggsAudioV2ForConditionalGeneration.generate``, whose logits
processor enforces the delay pattern and which stops once every codebook has emitted the stream EOS.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from .chat import SpecialIds, chat_prompt, lay_out
from .config import ConfigError, DataConfig, ModelConfig
from .data import load_audio
from .loading import load_codec_dir, load_model, load_tokenizer, resolve_checkpoints

DEFAULT_SYSTEM_PROMPT = DataConfig().system_prompt
DEFAULT_MAX_NEW_TOKENS = 750  # 30 s at the codec's 25 frames/s, plus the delay-pattern frames


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
    (or wherever the length limit cut it). A codebook's stream EOS ends the audio too, and a stray stream BOS
    or EOS code is clipped into the codebook, like ``HiggsAudioV2Processor.batch_decode`` does."""
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


def generate_speech(model, tokenizer, codec, ids: SpecialIds, text: str, ref_audio: str | Path | None = None,
                    ref_text: str = "", scene: str = "", system_prompt: str = DEFAULT_SYSTEM_PROMPT,
                    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, do_sample: bool = False, temperature: float = 1.0,
                    top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                    ref_codes: np.ndarray | None = None) -> dict:
    """Speak ``text`` (optionally in the voice of ``ref_audio`` / precomputed ``ref_codes``, whose transcript is
    ``ref_text``). Never raises for a failed generation: the result's ``error`` says what went wrong.

    Returns ``wave`` (float32, possibly empty), ``sample_rate``, ``n_frames`` (codec frames), ``seconds``,
    ``new_tokens`` (generation steps), ``stopped`` ("eos": the model ended the audio; "max_length": the limit
    cut it; None on error) and ``error`` (None or one line). The global RNG is left as it was, so a trainer
    calling this keeps its exact-resume guarantees."""
    sample_rate = codec.config.sample_rate
    result = {"wave": np.zeros(0, np.float32), "sample_rate": sample_rate, "n_frames": 0, "seconds": 0.0,
              "new_tokens": 0, "stopped": None, "error": None}
    lm = generator_of(model)
    was_training = lm.training
    lm.eval()
    try:
        if ref_audio is not None and ref_codes is None:
            ref_codes = encode_reference(codec, ref_audio)
        prompt = build_prompt(tokenizer, ids, text, ref_codes, ref_text, scene, system_prompt)
        with torch.random.fork_rng(devices=_cuda_devices(lm)):
            if seed is not None:
                torch.manual_seed(seed)
            out = _generate(lm, prompt, max_new_tokens, do_sample, temperature, top_k, top_p)
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


def _generate(lm, prompt: dict, max_new_tokens: int, do_sample: bool, temperature: float, top_k, top_p):
    device = _device(lm)
    input_ids = prompt["input_ids"][None].to(device)
    kwargs = {}
    if prompt["audio_input_ids"] is not None:
        frames = prompt["audio_input_ids"][None].to(device)
        kwargs = {"audio_input_ids": frames,
                  "audio_input_ids_mask": torch.ones(frames.shape[:2], dtype=torch.bool, device=device)}
    sampling = {"temperature": temperature, "top_k": top_k, "top_p": top_p} if do_sample else {}
    # eos_token_id is what _sample emits once every codebook has ended: stop there, whatever generation_config says.
    return lm.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), **kwargs,
                       max_new_tokens=max_new_tokens, do_sample=do_sample, **sampling,
                       eos_token_id=lm.config.eos_token_id, pad_token_id=lm.config.pad_token_id,
                       return_dict_in_generate=True)


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


def run_sources(run_dir: str) -> dict:
    """base, audio_tokenizer, text_tokenizer, adapter, system_prompt and dtype of a finished run."""
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
    if not (run / "adapter" / "adapter_config.json").is_file():
        raise ConfigError(f"--run: {run_dir} has no finished adapter ({run / 'adapter'}); pass --adapter "
                          "RUN_DIR/checkpoints/step-N/adapter for a checkpoint")
    return {"base": base, "audio_tokenizer": codec, "text_tokenizer": model.get("text_tokenizer") or base,
            "adapter": str(run / "adapter"), "system_prompt": data.get("system_prompt") or DEFAULT_SYSTEM_PROMPT,
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
    gen.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    gen.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (with --do-sample)")
    gen.add_argument("--top-k", type=int, help="keep the K most likely codes per codebook (with --do-sample)")
    gen.add_argument("--top-p", type=float, help="nucleus sampling mass (with --do-sample)")
    gen.add_argument("--seed", type=int, help="seed for sampling")
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
    if args.temperature <= 0:
        raise ConfigError(f"--temperature must be positive, got {args.temperature}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise ConfigError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.top_k is not None and args.top_k < 1:
        raise ConfigError(f"--top-k must be at least 1, got {args.top_k}")


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
    result = generate_speech(model, tokenizer, codec, ids, args.text, ref_audio=args.ref_audio,
                             ref_text=args.ref_text, scene=args.scene,
                             system_prompt=args.system or src["system_prompt"], max_new_tokens=args.max_new_tokens,
                             do_sample=args.do_sample,
                             temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    if result["error"]:
        print(f"higgs-accel: generation failed: {result['error']}", file=sys.stderr)
        return 1
    path = write_wav(args.out, result["wave"], result["sample_rate"])
    how = "end of audio" if result["stopped"] == "eos" else f"length limit of {args.max_new_tokens} steps"
    print(f"wrote {path}: {result['seconds']:.2f}s, {result['n_frames']} frames (stopped at {how})", file=sys.stderr)
    return 0
