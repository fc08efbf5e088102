"""A PEFT LoRA adapter merged into its base checkpoint one tensor at a time, in bounded memory.

For every safetensors shard of the base, each tensor is read in the base's dtype (``safe_open``), gets its LoRA
delta ``B @ A * scaling`` added in fp32 (what PEFT's ``merge_and_unload`` does on an fp32 model), is cast to the
output dtype and streamed to the output shard of the same name. A ``modules_to_save`` tensor is replaced by the
adapter's trained copy. Neither a second copy of the model nor an fp32 copy of it ever exists: the peak is the
shard being read (its pages, mapped) plus one tensor's fp32 work (``MergePlan.peak_bytes``). The config (with its
dtype), generation config and tokenizer files are copied; the codec is copied file by file, as it is.

The result equals a full fp32 ``merge_and_unload`` followed by the same cast, bit for bit (tests/test_merge.py).

A base saved in another layout than the module PEFT wrapped (Higgs TTS 3's released key names) is merged through a
``KeyMap``: the adapter's names renamed to the base's keys, tied copies (a head saved beside the embedding it is
tied to) given the same merge, and carried keys (a bundled codec) written as they are or replaced whole by a bundle.
"""

from __future__ import annotations

import json
import math
import shutil
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .config import ConfigError
from .loading import DTYPES

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
PREFIX = "base_model.model."  # how PEFT names the wrapped model's tensors in adapter_model.safetensors
# Files copied from the base dir as they are: the generation config and the text tokenizer.
COPIED = ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
          "chat_template.jinja", "chat_template.json", "vocab.json", "merges.txt", "tokenizer.model")
# safetensors' dtype names (the file format's own), and their sizes
ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
             "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
             "BOOL": torch.bool}
ST_NAMES = {v: k for k, v in ST_DTYPES.items()}
CONFIG_DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
# Adapter features whose merge is more than B @ A * scaling: refused, each with what to do instead.
UNSUPPORTED = {"use_dora": "DoRA (use_dora)", "lora_bias": "LoRA biases (lora_bias)",
               "rank_pattern": "per-module ranks (rank_pattern)", "alpha_pattern": "per-module alphas (alpha_pattern)",
               "target_parameters": "target_parameters", "trainable_token_indices": "trainable_token_indices",
               "layer_replication": "layer_replication"}
INTERPRETER_BYTES = 3 << 28  # the process before the first tensor: 0.43 GiB measured with torch and safetensors
# imported, about 0.6 GiB for the command line with transformers and PEFT


def same_name(name: str) -> str:
    return name


@dataclass(frozen=True)
class KeyMap:
    """How the module PEFT wrapped names its weights against the base checkpoint's keys. The default is the same
    names (a checkpoint saved from that module: v2); ``export.tts3_keys`` is Higgs TTS 3's released layout."""
    rename: Callable[[str], str] = same_name
    """The module's parameter name -> the base checkpoint's key."""
    tied: Mapping[str, str] = field(default_factory=dict)
    """Base key -> the base key it is a saved copy of (a tied head): it gets the same merge or replacement."""
    carried: tuple[str, ...] = ()
    """Key prefixes of weights that are not the model's (a bundled codec): never adapted, saved in their own dtype,
    and replaced whole by the plan's ``bundle`` when one is given."""

    def is_carried(self, key: str) -> bool:
        return key.startswith(self.carried) if self.carried else False


@dataclass
class LoraPair:
    """One adapted weight: the adapter's A and B tensor names, and the scale of B @ A."""
    a: str
    b: str
    scaling: float
    fan_in_fan_out: bool


@dataclass
class MergePlan:
    """What a merge will read and write, known before anything is written (``plan_merge``)."""
    base: Path
    adapter: Path
    dtype: torch.dtype                  # of the saved floating-point weights
    base_dtype: torch.dtype             # of the base checkpoint's floating-point weights
    shards: dict[str, list[str]]        # base shard file -> its tensor names, in file order
    lora: dict[str, LoraPair]           # base tensor name -> its LoRA pair
    replaced: dict[str, str]            # base tensor name -> the adapter's full copy (modules_to_save)
    input_bytes: int                    # the base's weights
    output_bytes: int                   # the merged weights (file headers included)
    largest_shard_bytes: int
    largest_tensor: int                 # elements
    work_bytes: int                     # the most one tensor's merge holds at once (``tensor_work``)
    extra_bytes: int = 0                # copied files (config, tokenizer; the codec when given)
    codec: Path | None = None
    shapes: dict[str, tuple[list[int], torch.dtype]] = field(default_factory=dict, repr=False)
    """Every written tensor's shape and saved dtype, base and bundle."""
    bundle: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    """Tensors written as they are, in the last shard, in place of the base's carried ones (``KeyMap.carried``)."""

    @property
    def peak_bytes(self) -> int:
        """Peak resident memory, an upper estimate: the interpreter, the mapped pages of the largest shard, the
        largest one tensor's work (a 4-layer real-width model, bf16: 2.54 GiB measured, 3.3 predicted) and the
        bundle, held by the caller."""
        return INTERPRETER_BYTES + self.largest_shard_bytes + self.work_bytes + tensor_bytes(self.bundle)

    @property
    def disk_bytes(self) -> int:
        return self.output_bytes + self.extra_bytes

    def summary(self) -> str:
        """One line for the command to print before it starts."""
        gib = 2**30
        cost = ""
        if self.dtype.itemsize > self.base_dtype.itemsize:
            cost = (f" ({dtype_name(self.dtype)} is {self.dtype.itemsize // self.base_dtype.itemsize}x the base's "
                    f"{dtype_name(self.base_dtype)}: {self.output_bytes / gib:.1f} GiB instead of "
                    f"{self.input_bytes / gib:.1f} GiB, and no more precise to serve)")
        return (f"merging {len(self.lora)} LoRA weights and {len(self.replaced)} saved modules into "
                f"{sum(map(len, self.shards.values()))} tensors in {len(self.shards)} shard(s): writes "
                f"{self.disk_bytes / gib:.2f} GiB in {dtype_name(self.dtype)}{cost}, peak memory at most "
                f"{self.peak_bytes / gib:.2f} GiB")


def dtype_name(dtype: torch.dtype) -> str:
    return next((k for k, v in DTYPES.items() if v == dtype), str(dtype).removeprefix("torch."))


def base_shards(base: Path) -> dict[str, list[str]]:
    """The base dir's safetensors shards (from its index, or its one file) -> tensor names in file order."""
    from safetensors import safe_open

    if not base.is_dir():
        raise ConfigError(f"--base: {base} is not a local dir (resolve a hub id to its snapshot first)")
    if (base / INDEX).is_file():
        files = sorted(set(json.loads((base / INDEX).read_text())["weight_map"].values()))
    elif (base / SINGLE).is_file():
        files = [SINGLE]
    else:
        raise ConfigError(f"--base: {base} has no {SINGLE} or {INDEX} (the merge reads safetensors checkpoints)")
    shards = {}
    for name in files:
        if not (base / name).is_file():
            raise ConfigError(f"--base: {base / INDEX} names {name}, which is missing")
        with safe_open(str(base / name), framework="pt") as f:
            shards[name] = list(f.keys())
    return shards


def read_adapter_config(adapter: Path) -> dict:
    path = adapter / ADAPTER_CONFIG
    if not path.is_file() or not (adapter / ADAPTER_WEIGHTS).is_file():
        raise ConfigError(f"--adapter: {adapter} is not a PEFT adapter dir (needs {ADAPTER_CONFIG} and "
                          f"{ADAPTER_WEIGHTS})")
    cfg = json.loads(path.read_text())
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ConfigError(f"--adapter: {path}: peft_type {cfg['peft_type']} cannot be merged here (LoRA only)")
    for key, what in UNSUPPORTED.items():
        if cfg.get(key):
            raise ConfigError(f"--adapter: {path}: {what} cannot be merged here; export with PEFT's "
                              f"merge_and_unload on a machine with memory for the fp32 model")
    if cfg.get("bias", "none") != "none":
        raise ConfigError(f"--adapter: {path}: bias '{cfg['bias']}' (trained biases) cannot be merged here")
    return cfg


def adapter_tensors(adapter: Path, cfg: dict, base_names: set[str], keys: KeyMap = KeyMap()
                    ) -> tuple[dict[str, LoraPair], dict[str, str]]:
    """(base tensor -> LoRA pair, base tensor -> the adapter's full copy), every name renamed by ``keys`` and
    checked against the base; a tied copy in the base gets what its original gets."""
    from safetensors import safe_open

    r, alpha = cfg["r"], cfg["lora_alpha"]
    scaling = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
    pairs, replaced = {}, {}
    where = adapter / ADAPTER_WEIGHTS
    with safe_open(str(where), framework="pt") as f:
        names = list(f.keys())
        for name in names:
            if not name.startswith(PREFIX):
                raise ConfigError(f"--adapter: {where}: tensor {name} is not under '{PREFIX}'")
            inner = name[len(PREFIX):]
            if ".lora_A." in inner:
                module, _, param = inner.partition(".lora_A.")
                b = f"{PREFIX}{module}.lora_B.{param}"
                if b not in names:
                    raise ConfigError(f"--adapter: {where}: {name} has no lora_B")
                if len(f.get_slice(name).get_shape()) != 2:
                    raise ConfigError(f"--adapter: {where}: {name} is not a linear layer's LoRA (convolution "
                                      f"LoRA cannot be merged here)")
                target, into = keys.rename(f"{module}.{param}"), pairs
                value = LoraPair(name, b, scaling, bool(cfg.get("fan_in_fan_out")))
            elif ".lora_B." in inner:
                continue
            elif ".lora_" in inner:  # lora_embedding_A/B, lora_magnitude_vector, ...
                raise ConfigError(f"--adapter: {where}: {name} cannot be merged here (linear-layer LoRA and "
                                  f"modules_to_save only)")
            else:
                target, into, value = keys.rename(inner), replaced, name
            if target not in base_names or keys.is_carried(target):
                raise ConfigError(f"--adapter: {where}: {name} adapts {target}, which the base checkpoint does not "
                                  f"have (an adapter of another model?)")
            into[target] = value
            for copy, original in keys.tied.items():
                if original == target and copy in base_names:
                    into[copy] = value
    return pairs, replaced


def checkpoint_dtype(shapes: dict[str, tuple[list[int], torch.dtype]]) -> torch.dtype:
    """The floating dtype holding most of the base's elements."""
    count: dict[torch.dtype, int] = {}
    for shape, dtype in shapes.values():
        if dtype.is_floating_point:
            count[dtype] = count.get(dtype, 0) + math.prod(shape)
    return max(count, key=count.get) if count else torch.float32


def tensor_work(elements: int, dtype: torch.dtype, out: torch.dtype, lora: bool) -> int:
    """Bytes one tensor's merge holds at its peak, at most: a LoRA weight its fp32 copy, the fp32 delta and the cast
    result; any other tensor as read and, in another dtype, as cast."""
    if lora:
        return elements * (4 + 4 + out.itemsize)
    cast = cast_dtype(dtype, out)
    return elements * (dtype.itemsize + (cast.itemsize if cast != dtype else 0))


def plan_merge(base: str | Path, adapter: str | Path, dtype: torch.dtype | None = None,
               codec: str | Path | None = None, keys: KeyMap = KeyMap(),
               bundle: dict[str, torch.Tensor] | None = None) -> MergePlan:
    """Read the base's and the adapter's headers (no weights), refuse what cannot be merged, and size the output.
    ``dtype`` None: the base checkpoint's dtype. ``codec``: a dir copied beside the model as it is; ``bundle``:
    tensors written into the model's last shard in place of the base's carried ones (``keys.carried``)."""
    from safetensors import safe_open

    base, adapter = Path(base), Path(adapter)
    shards = base_shards(base)
    stored, shard_bytes = {}, {}
    for name, names in shards.items():
        with safe_open(str(base / name), framework="pt") as f:
            for k in names:
                s = f.get_slice(k)
                stored[k] = (list(s.get_shape()), ST_DTYPES[s.get_dtype()])
        shard_bytes[name] = (base / name).stat().st_size
    cfg = read_adapter_config(adapter)
    lora, replaced = adapter_tensors(adapter, cfg, set(stored), keys)
    with safe_open(str(adapter / ADAPTER_WEIGHTS), framework="pt") as f:
        copies = {k: ST_DTYPES[f.get_slice(v).get_dtype()] for k, v in replaced.items()}
    base_dtype = checkpoint_dtype({k: v for k, v in stored.items() if not keys.is_carried(k)})
    out_dtype = dtype or base_dtype
    work = max(tensor_work(math.prod(s), copies.get(k, d), out_dtype, k in lora)
               for k, (s, d) in stored.items() if not keys.is_carried(k))
    shapes = {k: (s, d if keys.is_carried(k) else cast_dtype(d, out_dtype)) for k, (s, d) in stored.items()}
    if bundle:
        shards = {name: [k for k in names if not keys.is_carried(k)] for name, names in shards.items()}
        shards[list(shards)[-1]] += list(bundle)
        shapes = {k: v for k, v in shapes.items() if not keys.is_carried(k)}
        shapes.update({k: (list(t.shape), t.dtype) for k, t in bundle.items()})
    output = sum(header_bytes(names, shapes) for names in shards.values())
    output += sum(math.prod(s) * d.itemsize for s, d in shapes.values())
    extra = sum((base / n).stat().st_size for n in ("config.json", *COPIED) if (base / n).is_file())
    codec = Path(codec) if codec else None
    if codec is not None:
        extra += sum(p.stat().st_size for p in codec.rglob("*") if p.is_file())
    return MergePlan(base=base, adapter=adapter, dtype=out_dtype, base_dtype=base_dtype, shards=shards, lora=lora,
                     replaced=replaced, input_bytes=sum(shard_bytes.values()), output_bytes=output,
                     largest_shard_bytes=max(shard_bytes.values()),
                     largest_tensor=max(math.prod(s) for s, _ in stored.values()),
                     work_bytes=work, extra_bytes=extra, codec=codec, shapes=shapes, bundle=dict(bundle or {}))


def tensor_bytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def check_disk(plan: MergePlan, out: str | Path) -> None:
    """Refuse, before anything is written, when the disk holding ``out`` has less free space than the export needs
    (what ``out`` already holds is not counted as free: an overwrite may keep some of it)."""
    probe = Path(out).resolve()
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < plan.disk_bytes:
        raise ConfigError(f"--out: {out} needs {plan.disk_bytes / 2**30:.2f} GiB and its disk has "
                          f"{free / 2**30:.2f} GiB free")


def cast_dtype(dtype: torch.dtype, out: torch.dtype) -> torch.dtype:
    """Floating tensors are saved in the output dtype; integer and boolean ones as they are."""
    return out if dtype.is_floating_point else dtype


# ---------------------------------------------------------------- safetensors, written one tensor at a time


def _header(keys: list[str], shapes: dict) -> bytes:
    """``shapes``: name -> (shape, the dtype saved)."""
    entries, offset = {"__metadata__": {"format": "pt"}}, 0
    for k in keys:
        shape, dtype = shapes[k]
        size = math.prod(shape) * dtype.itemsize
        entries[k] = {"dtype": ST_NAMES[dtype], "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(entries, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    return struct.pack("<Q", len(text)) + text


def header_bytes(keys: list[str], shapes: dict) -> int:
    return len(_header(keys, shapes))


class ShardWriter:
    """A safetensors file whose header is known up front (names, shapes, dtypes), so each tensor is written as it
    is made and none is kept."""

    def __init__(self, path: Path, keys: list[str], shapes: dict):
        self.file = path.open("wb")
        self.file.write(_header(keys, shapes))
        self.expected = [(k, *shapes[k]) for k in keys]
        self.done = 0

    def write(self, name: str, tensor: torch.Tensor) -> None:
        key, shape, dtype = self.expected[self.done]
        if name != key or list(tensor.shape) != shape or tensor.dtype != dtype:
            raise RuntimeError(f"merge wrote {name} {tuple(tensor.shape)} {tensor.dtype}, expected {key} "
                               f"{tuple(shape)} {dtype}")
        self.file.write(tensor.contiguous().view(torch.uint8).numpy().data)
        self.done += 1

    def close(self) -> None:
        self.file.close()
        if self.done != len(self.expected):
            raise RuntimeError(f"merge wrote {self.done} of {len(self.expected)} tensors")


def read_tensor(handle, name: str) -> torch.Tensor:
    """One tensor from an open safetensors file (tests wrap this to watch what is alive)."""
    return handle.get_tensor(name)


def merged_tensor(plan: MergePlan, name: str, base, adapter) -> torch.Tensor:
    """Base tensor ``name`` (read here, from the open shard ``base``, so no caller holds it) with its LoRA delta
    added in fp32, or the adapter's copy, or the bundle's tensor, in its saved dtype."""
    out = plan.shapes[name][1]
    if name in plan.bundle:
        return plan.bundle[name]
    if name in plan.replaced:
        return read_tensor(adapter, plan.replaced[name]).to(out)
    weight = read_tensor(base, name)
    pair = plan.lora.get(name)
    if pair is None:
        return weight.to(out)
    merged = weight.float()
    if merged.data_ptr() == weight.data_ptr():  # an fp32 base: add into a copy, never into the file's buffer
        merged = merged.clone()
    del weight
    delta = read_tensor(adapter, pair.b).float() @ read_tensor(adapter, pair.a).float()
    if pair.fan_in_fan_out:
        delta = delta.T
    # PEFT: delta = (B @ A) * scaling, then weight += delta; the same two roundings, in place
    merged += delta.mul_(pair.scaling)
    del delta
    return merged.to(out)


def write_weights(plan: MergePlan, out: Path) -> None:
    """The merged shards, one tensor at a time, and the index when the base has one."""
    from safetensors import safe_open

    for stale in [*out.glob("*.safetensors"), out / INDEX]:  # an earlier export's, in another layout, would load
        if stale.name not in plan.shards and stale.is_file():
            stale.unlink()
    with safe_open(str(plan.adapter / ADAPTER_WEIGHTS), framework="pt") as adapter:
        for shard, keys in plan.shards.items():
            writer = ShardWriter(out / shard, keys, plan.shapes)
            try:
                with safe_open(str(plan.base / shard), framework="pt") as f:
                    for k in keys:
                        writer.write(k, merged_tensor(plan, k, f, adapter))
            finally:
                writer.close()
    if (plan.base / INDEX).is_file():
        index = json.loads((plan.base / INDEX).read_text())
        index.setdefault("metadata", {})["total_size"] = sum(math.prod(s) * d.itemsize for s, d in plan.shapes.values())
        index["weight_map"] = {k: shard for shard, keys in plan.shards.items() for k in keys}
        (out / INDEX).write_text(json.dumps(index, indent=2) + "\n")


def copy_files(plan: MergePlan, out: Path) -> None:
    """config.json with the saved dtype, then the generation config and tokenizer files as they are."""
    config = json.loads((plan.base / "config.json").read_text())
    name = CONFIG_DTYPES.get(plan.dtype, str(plan.dtype).removeprefix("torch."))
    config["dtype"] = name
    if "torch_dtype" in config:
        config["torch_dtype"] = name
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    for n in COPIED:
        if (plan.base / n).is_file():
            shutil.copyfile(plan.base / n, out / n)


def copy_codec(src: str | Path, dst: Path) -> None:
    """The codec dir, file by file, as it is (never loaded: its weights and dtype stay the source's). The bytes
    only: new files get the umask's mode, not the source's (safetensors writes 0600, a hub cache may be read-only)."""
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".cache", ".git*"), copy_function=shutil.copyfile)


def merge(plan: MergePlan, out: str | Path, codec_dir: str | None = None) -> Path:
    """Write the merged model to ``out`` (and the plan's codec, as it is, to ``out/codec_dir``), after the disk
    check; return ``out``."""
    if plan.codec is not None and not codec_dir:
        raise ValueError("the plan has a codec: say where it goes (codec_dir)")
    out = Path(out)
    check_disk(plan, out)
    out.mkdir(parents=True, exist_ok=True)
    write_weights(plan, out)
    copy_files(plan, out)
    if plan.codec is not None:
        copy_codec(plan.codec, out / codec_dir)
    return out
