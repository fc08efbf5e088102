"""Checkpoints in either layout: transformers' Higgs Audio v2, or the authors' original one (boson-ai/higgs-audio).

``resolve_base`` / ``resolve_codec`` read a checkpoint's config (a local dir or a hub id), tell which layout it is
in, refuse anything else with one line, and return the dir transformers loads. An original-format checkpoint is
converted once into the cache, under a key made of the source's content, and reused by every later run:

    <cache>/converted/model-<key>/   HiggsAudioV2ForConditionalGeneration with its text head, text tokenizer (pad
                                     and chat template added), generation config, higgs_accel_convert.json
    <cache>/converted/codec-<key>/   HiggsAudioV2TokenizerModel and its DacFeatureExtractor, higgs_accel_convert.json

A copy appears by atomic rename, so an interrupted conversion leaves nothing half-written, and processes that
convert at the same time each finish with the same complete copy. ``higgs-accel convert`` does the same into a dir
of the user's choice, with the processor config when a codec is given.

The conversion itself is in ``original_layout``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from . import original_layout
from .codes import default_cache_dir as codes_cache_dir
from .config import ConfigError, check_model_ref, error_line, first_line

TRANSFORMERS, ORIGINAL = "transformers", "original"
MODEL, CODEC = "model", "codec"
RECORD = "higgs_accel_convert.json"
CODEC_DIR = "audio_tokenizer"  # the codec inside a model dir, which the processor config points at (convert, export)

# The authors' codec config has no model_type; these keys are what every one of them carries.
ORIGINAL_CODEC_KEYS = {"D", "bins", "n_q", "ratios"}

# How long the one look at the hub endpoint waits for a connection before calling it unreachable.
HUB_PROBE_TIMEOUT_S = 5.0


@dataclass
class ResolvedCheckpoint:
    """Where a model or codec reference leads: ``path`` is what ``from_pretrained`` loads."""

    source: str            # the reference as given (a local dir or a hub id)
    path: str              # the source itself (transformers layout) or the converted copy
    layout: str            # "transformers" or "original"
    converted: str | None  # "now" (converted in this call), "reused" (from the cache), None (no conversion)

    def event(self) -> dict:
        """The fields of the run_start event's ``checkpoints`` entry."""
        return {"source": self.source, "layout": self.layout, "path": self.path, "converted": self.converted}


def default_cache_dir() -> Path:
    """Next to the codes cache: $HIGGS_ACCEL_CACHE/converted (or ~/.cache/higgs_accel/converted)."""
    return codes_cache_dir().parent / "converted"


def resolve_base(ref: str, cache_dir: str | Path | None = None, name: str = "'model.base'") -> ResolvedCheckpoint:
    """The Higgs Audio v2 model at ``ref``, converted if it is in the original layout; ConfigError (one line
    naming ``name``) for a codec, another kind of model, a dir without a config, or a hub id out of reach."""
    return _resolve(ref, MODEL, cache_dir, name)


def resolve_codec(ref: str, cache_dir: str | Path | None = None,
                  name: str = "'model.audio_tokenizer'") -> ResolvedCheckpoint:
    """The Higgs Audio v2 audio tokenizer at ``ref``, converted if it is the authors' ``model.pth`` layout."""
    return _resolve(ref, CODEC, cache_dir, name)


# ---------------------------------------------------------------- layout detection


def classify(config: dict | None) -> tuple[str, str]:
    """(what, layout) of a checkpoint from its config.json: what is "model", "codec", or a description of
    something else, layout is "transformers", "original" or ""."""
    if config is None:
        return "a dir without config.json", ""
    model_type = config.get("model_type")
    if model_type == "higgs_audio_v2":
        return MODEL, TRANSFORMERS
    if model_type == "higgs_audio":
        return MODEL, ORIGINAL
    if model_type == "higgs_audio_v2_tokenizer":
        return CODEC, TRANSFORMERS
    if model_type is None and ORIGINAL_CODEC_KEYS <= set(config):
        return CODEC, ORIGINAL
    return (f"a '{model_type}' checkpoint" if model_type else "a config.json without model_type"), ""


def refusal(name: str, ref: str, what: str, want: str) -> ConfigError:
    if what == CODEC:
        return ConfigError(f"{name}: '{ref}' is an audio tokenizer (codec), not the Higgs Audio v2 model; it belongs "
                           "in 'model.audio_tokenizer'")
    if what == MODEL:
        return ConfigError(f"{name}: '{ref}' is the Higgs Audio v2 model, not its audio tokenizer; it belongs in "
                           "'model.base'")
    expected = ("a Higgs Audio v2 model (model_type 'higgs_audio_v2', or the authors' 'higgs_audio')" if want == MODEL
                else "a Higgs Audio v2 audio tokenizer (model_type 'higgs_audio_v2_tokenizer', or the authors' "
                     "config.json + model.pth)")
    return ConfigError(f"{name}: '{ref}' is {what}, not {expected}")


def _is_local(ref: str) -> bool:
    return Path(ref).expanduser().is_dir()


def _hub_file(ref: str, filename: str, name: str) -> Path | None:
    """A file of a hub repo (from the hub cache when offline); None if the repo has no such file."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HFValidationError, RemoteEntryNotFoundError

    down = _hub_down()
    try:
        # Without a connection, only the cache: the hub client would retry for half a minute before saying so.
        return Path(hf_hub_download(ref, filename, local_files_only=bool(down)))
    except RemoteEntryNotFoundError:  # the repo is there, the file is not (not found in an offline cache: below)
        return None
    except HFValidationError:
        raise ConfigError(f"{name}: '{ref}' is neither a local dir nor a hub id") from None
    except Exception as e:  # noqa: BLE001 - offline, unreachable, missing, gated: all end the same way
        raise _unreachable(name, ref, e, down) from None


@functools.cache
def _hub_down() -> str | None:
    """Why the hub endpoint cannot be reached (one connection, through the hub client's own session, proxies
    included), or None when it answers or the hub is switched off (``HF_HUB_OFFLINE``: the cache alone)."""
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    if constants.HF_HUB_OFFLINE:
        return None
    try:
        get_session().head(constants.ENDPOINT, timeout=HUB_PROBE_TIMEOUT_S)
    except Exception as e:  # noqa: BLE001 - refused, timed out, no route, no name, TLS: no hub either way
        return f"{constants.ENDPOINT} unreachable: {error_line(e)}"
    return None


def _unreachable(name: str, ref: str, e: Exception, down: str | None = None) -> ConfigError:
    reason = down or _sentence(f"{type(e).__name__}: {first_line(e) or type(e).__name__}")
    return ConfigError(f"{name}: cannot get hub id '{ref}' ({reason}); without a network, give a local dir, or set "
                       "HF_HUB_OFFLINE=1 with the repo already in the hub cache")


def _sentence(text: str, limit: int = 200) -> str:
    """``text`` up to ``limit`` characters, cut after a sentence or a word, never inside one."""
    if len(text) <= limit:
        return text
    head = text[:limit]
    end = head.rfind(". ")
    return head[:end + 1] if end > 0 else head[:head.rfind(" ")] + " ..."


def read_config(ref: str, name: str) -> dict | None:
    """config.json of a local dir or hub repo; None if there is none."""
    path = Path(ref).expanduser() / "config.json" if _is_local(ref) else _hub_file(ref, "config.json", name)
    if path is None or not path.is_file():
        return None
    try:
        config = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise ConfigError(f"{name}: {path} is not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{name}: {path} is not a JSON object")
    return config


def source_dir(ref: str, what: str, name: str) -> Path:
    """A local dir holding the files a conversion reads (downloaded for a hub id)."""
    if _is_local(ref):
        return Path(ref).expanduser()
    from huggingface_hub import snapshot_download

    patterns = (["*.json", "*.safetensors", "*.bin", "tokenizer*", "*.model", "*.txt"] if what == MODEL
                else ["config.json", "model.pth"])
    down = _hub_down()
    try:
        return Path(snapshot_download(ref, allow_patterns=patterns, local_files_only=bool(down)))
    except Exception as e:  # noqa: BLE001 - see _hub_file
        raise _unreachable(name, ref, e, down) from None


# ---------------------------------------------------------------- the cache


def content_key(src: Path) -> str:
    """A hash of the files in ``src`` that a conversion may read (names and bytes; hub-cache blobs by their
    content-derived names) and of the converter version: the same checkpoint gives the same key wherever it lies,
    a changed file a new one. Sub-dirs (e.g. a trainer's checkpoint-N) are not part of a checkpoint."""
    h = hashlib.sha256(f"higgs-accel convert {original_layout.VERSION}\n".encode())
    for path in sorted(p for p in src.iterdir() if p.is_file() and not p.name.startswith(".") and p.name != RECORD):
        h.update(f"{path.name}\n".encode())
        target = path.resolve()
        if path.is_symlink() and "blobs" in target.parts:  # the hub cache names a blob after its content
            h.update(target.name.encode())
            continue
        with open(path, "rb") as f:
            while chunk := f.read(1 << 24):
                h.update(chunk)
    return h.hexdigest()[:20]


def convert_into(what: str, src: Path, out: Path, name: str, source: str) -> None:
    """Convert the original-format model or codec in ``src`` into ``out``, with the record of what was done."""
    convert = original_layout.convert_model if what == MODEL else original_layout.convert_codec
    dropped = convert(src, out, name)
    record = {"kind": what, "source": source, "layout_found": ORIGINAL, "converter_version": original_layout.VERSION,
              "dropped": dropped}
    (out / RECORD).write_text(json.dumps(record, indent=2) + "\n")


def _resolve(ref: str, want: str, cache_dir, name: str) -> ResolvedCheckpoint:
    check_model_ref(name, ref)
    what, layout = classify(read_config(ref, name))
    if what != want:
        raise refusal(name, ref, what, want)
    if layout == TRANSFORMERS:
        return ResolvedCheckpoint(ref, ref, TRANSFORMERS, None)
    src = source_dir(ref, want, name)
    out = Path(cache_dir or default_cache_dir()) / f"{want}-{content_key(src)}"
    if (out / RECORD).is_file():
        return ResolvedCheckpoint(ref, str(out), ORIGINAL, "reused")
    print(f"higgs-accel: converting {ref} from the original layout into {out} (once)", file=sys.stderr)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        convert_into(want, src, tmp, name, source=ref)
        try:
            os.replace(tmp, out)
        except OSError:  # another process finished the same copy first
            if not (out / RECORD).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return ResolvedCheckpoint(ref, str(out), ORIGINAL, "now")


# ---------------------------------------------------------------- a copy of one's own


def convert_checkpoint(src: str, out: Path, audio_tokenizer: str | None = None) -> tuple[str, str | None]:
    """``higgs-accel convert``: the original-format model or codec ``src`` converted into ``out``; a model with the
    codec ``audio_tokenizer`` (either layout) under ``out/audio_tokenizer`` and the processor config. Returns (what
    was converted: MODEL or CODEC, the codec's layout for a model). Flags are named as ``SRC`` and
    ``--audio-tokenizer``."""
    check_model_ref("SRC", src)
    if audio_tokenizer:
        check_model_ref("--audio-tokenizer", audio_tokenizer)
    what, layout = classify(read_config(src, "SRC"))
    if what not in (MODEL, CODEC):
        raise refusal("SRC", src, what, MODEL)
    if layout == TRANSFORMERS:
        raise ConfigError(f"SRC: '{src}' is already in transformers' layout; nothing to convert")
    if what == CODEC:
        convert_into(CODEC, source_dir(src, CODEC, "SRC"), out, "SRC", source=src)
        return CODEC, None
    if not audio_tokenizer:
        raise ConfigError("--audio-tokenizer is required to convert a model: the processor config needs the codec "
                          "(e.g. bosonai/higgs-audio-v2-tokenizer, or a local copy)")
    codec_what, codec_layout = classify(read_config(audio_tokenizer, "--audio-tokenizer"))
    if codec_what != CODEC:
        raise refusal("--audio-tokenizer", audio_tokenizer, codec_what, CODEC)
    convert_into(MODEL, source_dir(src, MODEL, "SRC"), out, "SRC", source=src)
    from transformers import AutoTokenizer, HiggsAudioV2TokenizerModel

    codec_dir = out / CODEC_DIR
    shutil.rmtree(codec_dir, ignore_errors=True)
    if codec_layout == ORIGINAL:
        convert_into(CODEC, source_dir(audio_tokenizer, CODEC, "--audio-tokenizer"), codec_dir,
                     "--audio-tokenizer", source=audio_tokenizer)
    else:
        HiggsAudioV2TokenizerModel.from_pretrained(audio_tokenizer).save_pretrained(codec_dir)
    status = save_processor(out, AutoTokenizer.from_pretrained(out), codec_dir)
    if status != "saved":
        raise ConfigError(f"--audio-tokenizer: processor config {status}")
    return MODEL, codec_layout


def bundled_codec(base: str) -> str | None:
    """The codec a model dir carries as ``DIR/audio_tokenizer`` (an export or a conversion with its codec), or
    None (a hub id, or a dir without one)."""
    path = Path(base).expanduser() / CODEC_DIR
    return str(path) if (path / "config.json").is_file() else None


def save_processor(out: Path, tokenizer, codec_dir: Path) -> str:
    """transformers' HiggsAudioV2Processor config next to the model, pointing at the codec in ``codec_dir``; returns
    what happened (a model stands without it, so a failure here is reported, not raised)."""
    try:
        from transformers import DacFeatureExtractor, HiggsAudioV2Processor, HiggsAudioV2TokenizerModel

        # Loaded back from where it was saved, so the processor config names that codec, not the source.
        codec = HiggsAudioV2TokenizerModel.from_pretrained(codec_dir.resolve())
        features = DacFeatureExtractor(sampling_rate=codec.config.sample_rate, hop_length=codec.config.hop_length)
        HiggsAudioV2Processor(features, tokenizer, codec).save_pretrained(out)
        return "saved"
    except Exception as e:  # noqa: BLE001 - an optional extra; transformers versions differ in processor support
        return f"not saved: {type(e).__name__}: {e}"
