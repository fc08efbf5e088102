"""Data: manifest -> audio -> codec codes (cached) -> Higgs chat tokens with the delay pattern -> padded batches."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

IGNORE = -100
AUDIO_PLACEHOLDER = "<|AUDIO_OUT|>"


@dataclass
class Sample:
    """One manifest line: the target utterance and optional voice-cloning reference."""

    source: str
    line: int
    audio: Path
    text: str
    speaker: str = ""
    ref_audio: Path | None = None
    ref_text: str = ""
    scene: str = ""


@dataclass
class Skip:
    source: str
    line: int
    reason: str
    detail: str


@dataclass
class SpecialIds:
    """Token ids the layout needs, read from the tokenizer and model config (never hard-coded)."""

    audio: int
    audio_bos: int
    audio_eos: int
    delay: int
    pad: int
    stream_bos: int
    stream_eos: int
    num_codebooks: int

    @classmethod
    def from_parts(cls, tokenizer, model_config) -> SpecialIds:
        ids = tokenizer.convert_tokens_to_ids
        return cls(audio=ids(AUDIO_PLACEHOLDER), audio_bos=ids("<|audio_out_bos|>"), audio_eos=ids("<|audio_eos|>"),
                   delay=ids("<|reserved_special_token_6|>"), pad=tokenizer.pad_token_id,
                   stream_bos=model_config.audio_stream_bos_id, stream_eos=model_config.audio_stream_eos_id,
                   num_codebooks=model_config.num_codebooks)


# ---------------------------------------------------------------- manifest and audio

def read_manifest(path: str | Path) -> tuple[list[Sample], list[Skip]]:
    """Parse a JSONL manifest; every bad line becomes a Skip naming the file, the line and the reason."""
    path = Path(path)
    root = path.parent
    samples, skips = [], []
    with open(path, "rb") as f:
        for n, raw in enumerate(f, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                skips.append(Skip(str(path), n, "not_utf8", "line is not valid UTF-8"))
                continue
            if not text.strip():
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError as e:
                skips.append(Skip(str(path), n, "invalid_json", e.msg))
                continue
            if not isinstance(row, dict):
                skips.append(Skip(str(path), n, "invalid_json", "line is not a JSON object"))
                continue
            missing = [k for k in ("audio", "text") if not isinstance(row.get(k), str)]
            if missing:
                skips.append(Skip(str(path), n, "missing_field", f"missing or non-string field(s): {missing}"))
                continue
            if not row["text"].strip():
                skips.append(Skip(str(path), n, "empty_text", "transcript is empty"))
                continue
            ref = row.get("ref_audio")
            samples.append(Sample(source=str(path), line=n, audio=root / row["audio"], text=row["text"],
                                  speaker=str(row.get("speaker", "")), ref_audio=root / ref if ref else None,
                                  ref_text=str(row.get("ref_text", "")), scene=str(row.get("scene", ""))))
    return samples, skips


def load_audio(path: Path, sample_rate: int) -> np.ndarray:
    """Read any soundfile-readable file as mono float32 at ``sample_rate``."""
    wave, sr = sf.read(str(path), dtype="float32", always_2d=True)
    wave = wave.mean(axis=1)
    if sr != sample_rate:
        import torchaudio

        wave = torchaudio.functional.resample(torch.from_numpy(wave), sr, sample_rate).numpy()
    return np.ascontiguousarray(wave, dtype=np.float32)


# ---------------------------------------------------------------- codec codes, cached on disk

def codec_identity(codec) -> str:
    """Changes when the codec's config or weights change: part of every cache key."""
    h = hashlib.sha256(codec.config.to_json_string(use_diff=False).encode())
    for name, t in sorted(codec.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().float().sum().double().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


class CodeCache:
    """Codec codes keyed by audio content hash and codec identity; entries appear atomically (rename)."""

    def __init__(self, root: str | Path, codec):
        self.codec = codec
        self.sample_rate = codec.config.sample_rate
        self.dir = Path(root) / codec_identity(codec)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.encode_calls = 0

    def path_for(self, audio: Path) -> Path:
        digest = hashlib.sha256(Path(audio).read_bytes()).hexdigest()
        return self.dir / f"{digest}.npy"

    def codes(self, audio: Path) -> np.ndarray:
        """(num_codebooks, frames) int16 codes of one file, encoded once."""
        target = self.path_for(audio)
        if target.is_file():
            return np.load(target)
        wave = load_audio(audio, self.sample_rate)
        with torch.no_grad():
            device = next(self.codec.parameters()).device
            codes = self.codec.encode(torch.from_numpy(wave)[None, None].to(device)).audio_codes[0]
        self.encode_calls += 1
        arr = codes.cpu().numpy().astype(np.int16)
        tmp = target.with_suffix(f".{os.getpid()}.tmp")
        with open(tmp, "wb") as f:
            np.save(f, arr)
        os.replace(tmp, target)
        return arr


def check_audio(sample: Sample, min_seconds: float, max_seconds: float) -> Skip | None:
    """Problems found from the file header alone, before any decoding."""
    for path in filter(None, (sample.audio, sample.ref_audio)):
        if not path.is_file():
            return Skip(sample.source, sample.line, "missing_file", f"audio file not found: {path}")
        try:
            info = sf.info(str(path))
        except Exception as e:  # soundfile raises several types for corrupt files
            return Skip(sample.source, sample.line, "unreadable_audio", f"{path}: {e}")
        seconds = info.frames / info.samplerate if info.samplerate else 0.0
        if path == sample.audio and not (min_seconds <= seconds <= max_seconds):
            return Skip(sample.source, sample.line, "length", f"{path}: {seconds:.2f}s outside "
                        f"[{min_seconds}, {max_seconds}]")
        if seconds == 0:
            return Skip(sample.source, sample.line, "empty_audio", f"{path}: no samples")
    return None


# ---------------------------------------------------------------- chat layout and labels

def chat_prompt(sample: Sample, system_prompt: str) -> str:
    """Everything before the target audio, ending with the assistant header, in Higgs's Llama-3 chat format."""
    system = system_prompt
    if sample.scene:
        system += f"\n\n<|scene_desc_start|>\n{sample.scene}\n<|scene_desc_end|>"
    text = f"<|begin_of_text|>{_turn('system', system)}"
    if sample.ref_audio is not None:
        text += _turn("user", sample.ref_text) + _turn("assistant", AUDIO_TURN)
    return text + _turn("user", sample.text) + "<|start_header_id|>assistant<|end_header_id|>\n\n"


AUDIO_TURN = f"<|audio_out_bos|>{AUDIO_PLACEHOLDER}<|audio_eos|>"
TARGET = f"{AUDIO_TURN}<|eot_id|>"


def _turn(role: str, content: str) -> str:
    return f"<|start_header_id|>{role}<|end_header_id|>\n\n{content}<|eot_id|>"


def delay_pattern(codes: torch.Tensor, bos: int, eos: int, fill_bos: int, fill_eos: int) -> torch.Tensor:
    """(codebooks, T) codes -> (T + 2 + codebooks - 1, codebooks) frames: ``bos``, codes, ``eos``, each codebook
    shifted one frame later than the one before, the gaps filled with ``fill_bos`` before and ``fill_eos`` after."""
    k, t = codes.shape
    stream = torch.cat([codes.new_full((k, 1), bos), codes, codes.new_full((k, 1), eos)], dim=1)
    out = codes.new_full((k, t + 2 + k - 1), fill_eos)
    for c in range(k):
        out[c, :c] = fill_bos
        out[c, c:c + t + 2] = stream[c]
    return out.T.contiguous()


def audio_streams(codes: np.ndarray, ids: SpecialIds, is_target: bool, train_eos: bool):
    """Model inputs and labels of one audio segment in the delay pattern.

    Labels follow the original Higgs collator: per codebook [ignore for stream BOS, the codes, stream EOS], then
    the delay pattern with ignore as both fills. Reference audio (not a target) gets no labels at all."""
    codes = torch.as_tensor(codes.astype(np.int64))
    inputs = delay_pattern(codes, ids.stream_bos, ids.stream_eos, ids.stream_bos, ids.stream_eos)
    if not is_target:
        return inputs, torch.full_like(inputs, IGNORE)
    labels = delay_pattern(codes, IGNORE, ids.stream_eos if train_eos else IGNORE, IGNORE, IGNORE)
    return inputs, labels


def audio_placeholders(n_frames: int, ids: SpecialIds) -> list[int]:
    return [ids.audio] * (n_frames - (ids.num_codebooks - 1)) + [ids.delay] * (ids.num_codebooks - 1)


def build_example(sample: Sample, codes: np.ndarray, ref_codes: np.ndarray | None, tokenizer, ids: SpecialIds,
                  system_prompt: str, train_on_prompt: bool, train_audio_eos: bool) -> dict[str, torch.Tensor]:
    """Token ids, text labels, delayed audio frames and audio labels of one sample."""
    segments = [(chat_prompt(sample, system_prompt), train_on_prompt), (TARGET, True)]
    audios = ([(ref_codes, False)] if sample.ref_audio is not None else []) + [(codes, True)]
    audio_iter = iter(audios)
    input_ids, labels, frames, frame_labels = [], [], [], []
    for text, text_is_target in segments:
        for i, piece in enumerate(text.split(AUDIO_PLACEHOLDER)):
            if i > 0:
                seg_codes, is_target = next(audio_iter)
                inp, lab = audio_streams(seg_codes, ids, is_target, train_audio_eos)
                frames.append(inp)
                frame_labels.append(lab)
                input_ids += audio_placeholders(len(inp), ids)
                labels += [IGNORE] * len(inp)
            tokens = tokenizer(piece, add_special_tokens=False)["input_ids"] if piece else []
            input_ids += tokens
            labels += [t if text_is_target and t != ids.audio_bos else IGNORE for t in tokens]
    return {
        "input_ids": torch.tensor(input_ids),
        "labels": torch.tensor(labels),
        "audio_input_ids": torch.cat(frames),
        "audio_labels": torch.cat(frame_labels),
    }


# ---------------------------------------------------------------- dataset, sampler, collator

class HiggsDataset(torch.utils.data.Dataset):
    """Samples whose codes are already cached; items are built on access, so memory holds only codes."""

    def __init__(self, samples: list[Sample], cache: CodeCache, tokenizer, ids: SpecialIds, data_cfg):
        self.samples, self.cache, self.tokenizer, self.ids, self.cfg = samples, cache, tokenizer, ids, data_cfg

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        s = self.samples[i]
        ref = self.cache.codes(s.ref_audio) if s.ref_audio is not None else None
        return build_example(s, self.cache.codes(s.audio), ref, self.tokenizer, self.ids, self.cfg.system_prompt,
                             self.cfg.train_on_prompt, self.cfg.train_audio_eos)


class EpochSampler(torch.utils.data.Sampler):
    """A shuffle that depends only on (seed, epoch), so a resumed run sees the same order."""

    def __init__(self, n: int, seed: int, shuffle: bool = True):
        self.n, self.seed, self.shuffle, self.epoch = n, seed, shuffle, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        if not self.shuffle:
            return iter(range(self.n))
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())


def collate(items: list[dict[str, torch.Tensor]], pad_id: int, stream_eos: int) -> dict[str, torch.Tensor]:
    """Right-pad text and audio; audio frames pad with stream EOS like transformers' processor."""
    def pad(key, value, length):
        return torch.stack([_pad_rows(x[key], length, value) for x in items])

    max_len = max(len(x["input_ids"]) for x in items)
    max_frames = max(len(x["audio_input_ids"]) for x in items)
    lengths = torch.tensor([len(x["input_ids"]) for x in items])
    frames = torch.tensor([len(x["audio_input_ids"]) for x in items])
    return {
        "input_ids": pad("input_ids", pad_id, max_len),
        "attention_mask": (torch.arange(max_len)[None] < lengths[:, None]).long(),
        "labels": pad("labels", IGNORE, max_len),
        "audio_input_ids": pad("audio_input_ids", stream_eos, max_frames),
        "audio_input_ids_mask": torch.arange(max_frames)[None] < frames[:, None],
        "audio_labels": pad("audio_labels", IGNORE, max_frames),
    }


def _pad_rows(x: torch.Tensor, length: int, value: int) -> torch.Tensor:
    out = x.new_full((length, *x.shape[1:]), value)
    out[: len(x)] = x
    return out


# ---------------------------------------------------------------- splits and validation before training

def load_splits(cfg, seed: int) -> tuple[list[Sample], list[Sample], list[Skip]]:
    """Train and validation samples: a separate manifest, or a seeded ``val_fraction`` of the training one."""
    train, skips = read_manifest(cfg.train_manifest)
    if cfg.val_manifest:
        val, val_skips = read_manifest(cfg.val_manifest)
        return train, val, skips + val_skips
    if cfg.val_fraction > 0 and len(train) > 1:
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed)).tolist()
        n_val = max(1, round(cfg.val_fraction * len(train)))
        held = set(order[:n_val])
        return [s for i, s in enumerate(train) if i not in held], [train[i] for i in sorted(held)], skips
    return train, [], skips


def prepare_codes(samples: list[Sample], cache: CodeCache, cfg) -> tuple[list[Sample], list[Skip]]:
    """Check every sample and make sure its codes are cached; a sample that fails is skipped, not fatal."""
    kept, skips = [], []
    for s in samples:
        problem = check_audio(s, cfg.min_seconds, cfg.max_seconds)
        if problem is None:
            try:
                for path in filter(None, (s.ref_audio, s.audio)):
                    codes = cache.codes(path)
                    if codes.shape[-1] == 0:
                        raise ValueError("audio is shorter than one codec frame")
            except Exception as e:  # noqa: BLE001 - any decode/encode failure skips this one sample
                problem = Skip(s.source, s.line, "unreadable_audio", f"{type(e).__name__}: {e}")
        if problem is None:
            kept.append(s)
        else:
            skips.append(problem)
    return kept, skips
