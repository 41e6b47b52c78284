"""Weight files: reading safetensors headers, telling what a file holds, and loading a component in its stored dtype.

A file holds one or more components (an all-in-one checkpoint holds all four), each found by its tensor names
under a known prefix. Tensors are loaded one at a time in the dtype the file stores (fp8 stays fp8).
"""

from __future__ import annotations

import json
import math
import mmap
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from engine.contract.errors import UserError

ROLES = ("transformer", "clip", "t5", "vae")
ROLE_NAMES = {
    "transformer": "a FLUX transformer (diffusion model)",
    "clip": "a CLIP-L text encoder",
    "t5": "a T5-XXL text encoder",
    "vae": "a FLUX autoencoder (VAE)",
}

# Prefixes under which each role's tensors appear: ComfyUI all-in-one checkpoints first, then bare files.
PREFIXES = {
    "transformer": ("model.diffusion_model.", "diffusion_model.", ""),
    "clip": ("text_encoders.clip_l.transformer.", "cond_stage_model.clip_l.transformer.", ""),
    "t5": ("text_encoders.t5xxl.transformer.", "cond_stage_model.t5xxl.transformer.", ""),
    "vae": ("vae.", "first_stage_model.", ""),
}
# One tensor that only that role has, relative to its prefix.
MARKERS = {
    "transformer": "double_blocks.0.img_attn.qkv.weight",
    "clip": "text_model.embeddings.token_embedding.weight",
    "t5": "encoder.block.0.layer.0.SelfAttention.q.weight",
    "vae": "decoder.conv_in.weight",
}

_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def count_indexed(names, prefix: str) -> int:
    """How many numbered parts (`<prefix>0.`, `<prefix>1.`, ...) the tensor names have: blocks, layers, levels."""
    indices = {int(name[len(prefix) :].split(".")[0]) for name in names if name.startswith(prefix)}
    return max(indices) + 1 if indices else 0


@dataclass(frozen=True)
class TensorInfo:
    dtype: str  # safetensors' name: "BF16", "F8_E4M3", ... (GGUF: "GGUF:Q8_0", ...)
    shape: tuple[int, ...]  # the logical shape, whatever the storage
    start: int  # byte offsets into the data section
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


class SafetensorsFile:
    """A safetensors file whose header has been read and checked against the file's size.

    Tensors are views of a read-only memory map of the file: loading copies nothing, the pages are the OS's
    file cache (shared, reclaimable), and dropping the tensors gives the memory back.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.tensors, self.metadata, self.data_offset = _read_header(self.path)

    def names(self) -> list[str]:
        return list(self.tensors)

    def load(self, names: list[str]) -> dict[str, torch.Tensor]:
        """The named tensors, in the dtype stored, as views of the mapped file (never written to)."""
        with self.path.open("rb") as f:
            mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if self.path.stat().st_size else None
        out = {}
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*not writable.*")
            for name in names:
                info = self.tensors[name]
                dtype = _DTYPES[info.dtype]
                count = (info.end - info.start) // dtype.itemsize
                if count == 0:
                    out[name] = torch.empty(info.shape, dtype=dtype)
                    continue
                flat = torch.frombuffer(
                    mapped, dtype=dtype, count=count, offset=self.data_offset + info.start
                )
                out[name] = flat.reshape(info.shape)
        return out


def _read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str], int]:
    if not path.exists():
        raise UserError(f"{path} does not exist: check the path.")
    if not path.is_file():
        raise UserError(f"{path} is a folder, not a weights file: give the .safetensors file inside it.")
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise UserError(f"{path} is empty or truncated: download it again.")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > min(size - 8, 100_000_000):
            raise UserError(
                f"{path} is not a safetensors file (or its download is incomplete): download it again "
                "or give the right file."
            )
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
            raise UserError(f"{path} is not a safetensors file: its header is unreadable.") from None
    tensors, metadata = check_header(header, path)
    data_size = size - 8 - header_len
    end = max((info.end for info in tensors.values()), default=0)
    if end > data_size:
        raise UserError(
            f"{path} is truncated ({end - data_size:,} bytes missing): its download did not finish; "
            "download it again."
        )
    return tensors, metadata, 8 + header_len


def _bad_header(path: Path, what: str) -> UserError:
    return UserError(
        f"{path} is not a valid safetensors file ({what}): download it again or give the right file."
    )


def check_header(header, path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Every field of a safetensors header checked before any tensor is made from it: an object of entries,
    each with a known dtype, a shape of non-negative whole numbers, and [start, end) byte offsets that are
    whole numbers, in order, hold exactly shape × item size bytes and overlap no other tensor's."""
    if not isinstance(header, dict):
        raise _bad_header(path, "its header is not a JSON object")
    metadata = header.get("__metadata__") or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise _bad_header(path, "its __metadata__ is not an object of texts")
    tensors: dict[str, TensorInfo] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        shown = repr(name[:60])
        if not isinstance(info, dict):
            raise _bad_header(path, f"the entry for {shown} is not an object")
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in _DTYPES:
            raise UserError(f"{path} holds a tensor of type {str(dtype)[:20]!r} that FluxDeck cannot read.")
        if not isinstance(shape, list) or not all(_whole(d) for d in shape):
            raise _bad_header(path, f"{shown} has no shape of non-negative whole numbers")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_whole(o) for o in offsets)):
            raise _bad_header(path, f"{shown} has no [start, end] byte offsets")
        start, end = offsets
        if end < start:
            raise _bad_header(path, f"{shown} ends before it starts")
        if math.prod(shape) * _DTYPES[dtype].itemsize != end - start:
            raise _bad_header(path, f"{shown} is {shape} {dtype} but its bytes are {end - start:,} long")
        tensors[name] = TensorInfo(dtype, tuple(shape), start, end)
    ranges = sorted((info.start, info.end, name) for name, info in tensors.items())
    for (_, end, first), (start, _, second) in zip(ranges, ranges[1:]):
        if start < end:
            raise _bad_header(path, f"the bytes of {first[:60]!r} and {second[:60]!r} overlap")
    return tensors, metadata


def _whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


class GGUFFile:
    """A GGUF file (city96's FLUX transformer or T5 encoder quantizations) with the same face as
    SafetensorsFile: tensor names as the engine's models use them, logical shapes, and `load` handing out
    float tensors as views and quantized ones as GGUFWeight (raw bytes, dequantized per layer at compute time)."""

    def __init__(self, path: str | Path):
        from engine.formats.gguf_file import T5_ARCHITECTURES, architecture, read_gguf, t5_gguf_to_hf_names

        self.path = Path(path)
        if not self.path.is_file():
            raise UserError(f"{path} does not exist: check the path.")
        try:
            weights, self.metadata = read_gguf(self.path)
        except (ValueError, OSError, KeyError, IndexError) as e:
            raise UserError(f"{path} is not a readable GGUF file ({e}): download it again.") from None
        rename = t5_gguf_to_hf_names if architecture(self.metadata) in T5_ARCHITECTURES else (lambda n: n)
        self._weights = {}
        for name, weight in weights.items():
            try:
                self._weights[rename(name)] = weight
            except KeyError:
                continue  # e.g. a T5 conversion's decoder or lm_head: not the encoder's
        self.tensors = {
            name: TensorInfo(f"GGUF:{w.qtype.name}", tuple(w.shape), 0, w.nbytes)
            for name, w in self._weights.items()
        }

    def names(self) -> list[str]:
        return list(self.tensors)

    def load(self, names: list[str]) -> dict:
        out = {}
        for name in names:
            weight = self._weights[name]
            out[name] = weight if weight.is_quantized else weight.dequantize()
        return out


def open_weights(path: str | Path) -> SafetensorsFile | GGUFFile:
    """The file behind a path, by its format (GGUF by its name, safetensors otherwise)."""
    return GGUFFile(path) if str(path).lower().endswith(".gguf") else SafetensorsFile(path)


@dataclass
class Component:
    """One role's tensors inside a file: names are given relative to `prefix`."""

    role: str
    file: SafetensorsFile | GGUFFile
    prefix: str

    def shapes(self) -> dict[str, tuple[int, ...]]:
        n = len(self.prefix)
        return {
            name[n:]: info.shape for name, info in self.file.tensors.items() if name.startswith(self.prefix)
        }

    def load(self) -> dict[str, torch.Tensor]:
        n = len(self.prefix)
        names = [name for name in self.file.tensors if name.startswith(self.prefix)]
        return {name[n:]: tensor for name, tensor in self.file.load(names).items()}

    @property
    def nbytes(self) -> int:
        """Bytes as stored (what the model costs in RAM, and on the bus when streamed)."""
        return sum(info.nbytes for name, info in self.file.tensors.items() if name.startswith(self.prefix))


def find_components(file: SafetensorsFile | GGUFFile) -> dict[str, Component]:
    """Every role this file holds, found by its tensor names."""
    names = file.tensors
    found = {}
    for role in ROLES:
        for prefix in PREFIXES[role]:
            if prefix + MARKERS[role] in names:
                found[role] = Component(role, file, prefix)
                break
    return found


def describe(file: SafetensorsFile | GGUFFile) -> str:
    """What the file looks like, for error messages."""
    roles = find_components(file)
    if len(roles) > 1:
        return "an all-in-one checkpoint with " + ", ".join(ROLE_NAMES[r] for r in roles)
    if roles:
        return ROLE_NAMES[next(iter(roles))]
    names = list(file.tensors)
    if any("lora_" in n or ".lora" in n for n in names):
        return "a LoRA"
    if any("transformer_blocks." in n and "attn.to_q" in n for n in names):
        return "a diffusers-format transformer (use the single-file BFL/ComfyUI format instead)"
    if any("input_blocks." in n for n in names):
        return "a Stable Diffusion UNet checkpoint"
    if any("joint_blocks." in n for n in names):
        return "a Stable Diffusion 3 model"
    return f"an unknown model ({len(names)} tensors, e.g. {', '.join(names[:3])})"


def component_from(path: str | Path, role: str, flag: str) -> Component:
    """The `role` component of the file a flag named, or one sentence saying what the file is instead."""
    file = open_weights(path)
    found = find_components(file)
    if role not in found:
        raise UserError(
            f"{flag} {path} looks like {describe(file)}, not {ROLE_NAMES[role]}: give the right file for {flag}."
        )
    return found[role]


# ComfyUI's quantized layers. Older "scaled fp8" files: a `scaled_fp8` marker tensor and, per layer,
# `<layer>.scale_weight` (and `<layer>.scale_input`). Current ones (ComfyUI converts the older kind to this on load
# and writes it when it saves): `<layer>.weight` stored quantized, `<layer>.weight_scale` (fp32, weight = q × scale),
# `<layer>.input_scale` (for fp8 activations, which the engine does not use: it computes in bf16/fp16/fp32) and
# `<layer>.comfy_quant`, uint8 bytes of the layer's JSON config such as {"format": "float8_e4m3fn"}; or, instead of
# the uint8 tensors, the configs in the header: `_quantization_metadata` = {"format_version", "layers": {layer:
# config}}. The engine computes the fp8 formats (kept fp8 in memory, scaled when a layer runs) and names the rest.
COMFY_FP8_FORMATS = {"float8_e4m3fn": torch.float8_e4m3fn, "float8_e5m2": torch.float8_e5m2}
_QUANT_EXTRAS = (".scale_input", ".input_scale", ".comfy_quant")


def quantized_layers(component: Component) -> dict[str, dict]:
    """{layer name relative to the component's prefix: its ComfyUI quantization config} from `.comfy_quant`
    tensors and the header's `_quantization_metadata` (layer names there may or may not carry the prefix)."""
    file, prefix = component.file, component.prefix
    configs: dict[str, dict] = {}
    raw = file.metadata.get("_quantization_metadata") if isinstance(file, SafetensorsFile) else None
    if raw:
        try:
            layers = json.loads(raw)["layers"]
            layers = {name: _layer_config(conf) for name, conf in layers.items()}
        except (ValueError, KeyError, TypeError, AttributeError):
            raise UserError(
                f"{file.path} has an unreadable _quantization_metadata in its header: the file is damaged; "
                "download it again."
            ) from None
        for name, conf in layers.items():
            if prefix and name.startswith(prefix) and name + ".weight" in file.tensors:
                configs[name[len(prefix) :]] = conf
            elif prefix + name + ".weight" in file.tensors:
                configs[name] = conf
    marked = [n for n in file.tensors if n.startswith(prefix) and n.endswith(".comfy_quant")]
    for name, tensor in file.load(marked).items():
        try:
            conf = _layer_config(json.loads(tensor.numpy().tobytes()))
        except (ValueError, TypeError, AttributeError):
            raise UserError(
                f"{file.path}: {name} is not readable quantization JSON: the file is damaged."
            ) from None
        configs[name[len(prefix) : -len(".comfy_quant")]] = conf
    return configs


def _layer_config(conf) -> dict:
    if not isinstance(conf, dict) or not isinstance(conf.get("format"), str):
        raise ValueError("a layer's quantization config has no format")
    return conf


def uncomputable_format(component: Component) -> str | None:
    """The name of a ComfyUI quantization the component uses that the engine does not compute (None: all fine)."""
    formats = {conf["format"] for conf in quantized_layers(component).values()}
    return next(iter(sorted(formats - set(COMFY_FP8_FORMATS))), None)


def split_quantized(
    state: dict[str, torch.Tensor], configs: dict[str, dict] | None = None, source: str = "the file"
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Take ComfyUI's quantization extras out of a state dict: (weights, {layer name: scale}).

    Both the legacy scaled-fp8 names and the current comfy_quant layout (`configs`: `quantized_layers`) give a
    layer's scale, which `ops.fetch` applies to the stored fp8 weight; fp8 bytes in a uint8 container are viewed as
    the fp8 type their config names. Formats the engine does not compute are refused by name."""
    configs, state = configs or {}, dict(state)
    for layer, conf in configs.items():
        dtype = COMFY_FP8_FORMATS.get(conf["format"])
        if dtype is None:
            raise UserError(
                f"{source} stores {layer} in ComfyUI's {conf['format']!r} quantization, which FluxDeck does not "
                "compute: use a bf16, fp8 (float8_e4m3fn/e5m2) or GGUF file of the model instead."
            )
        weight = state.get(layer + ".weight")
        if weight is None or layer + ".weight_scale" not in state:
            raise UserError(
                f"{source} marks {layer} as {conf['format']} but lacks its weight or weight_scale: "
                "the file is damaged; download it again."
            )
        if weight.dtype == torch.uint8:
            state[layer + ".weight"] = weight.view(dtype)
    scales, weights = {}, {}
    for name, tensor in state.items():
        if name == "scaled_fp8" or name.endswith(_QUANT_EXTRAS):
            continue
        for suffix in (".scale_weight", ".weight_scale"):
            if name.endswith(suffix):
                scales[name[: -len(suffix)]] = tensor
                break
        else:
            weights[name] = tensor
    packed = [
        n
        for n, t in weights.items()
        if isinstance(t, torch.Tensor) and n.endswith(".weight") and t.dtype == torch.uint8
    ]
    if packed:
        raise UserError(
            f"{source} stores {packed[0]} as packed bytes (a 4-bit quantization such as nvfp4), which FluxDeck "
            "does not compute: use a bf16, fp8 or GGUF file of the model instead."
        )
    return weights, scales
