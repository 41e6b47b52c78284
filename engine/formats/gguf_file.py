"""GGUF files: city96's FLUX transformer and T5-XXL encoder quantizations (flux1-dev-Q8_0.gguf, ...).

`read_gguf` memory-maps the file and hands out each tensor as raw bytes (no copy, nothing dequantized);
a `GGUFWeight` is expanded on demand, on the device that computes with it (see engine.formats.gguf_quants).
FLUX files keep the BFL tensor names (double_blocks.0.img_attn.qkv.weight, ...); T5 files use llama.cpp's
names, which `t5_gguf_to_hf_names` maps to the HF T5EncoderModel names the engine loads.
"""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch

from engine.contract.errors import UserError
from engine.formats.gguf_quants import FLOAT_TYPES, SUPPORTED_TYPES, QType, block_layout, dequantize
from engine.formats.weight_file import TensorInfo
from engine.runtime.ops import WeightSource

FLUX_ARCHITECTURES = ("flux",)
T5_ARCHITECTURES = ("t5encoder", "t5")
# city96's converter stores the torch shape of tensors it had to reshape under this key prefix.
ORIG_SHAPE_PREFIX = "comfy.gguf.orig_shape."


@dataclass(frozen=True, eq=False)
class GGUFWeight:
    """One tensor of a GGUF file, still in its stored (quantized) form.

    `raw` is a flat uint8 view of the read-only memory map: never write to it (it is not a copy).
    """

    raw: torch.Tensor
    qtype: QType
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return self.raw.numel()

    @property
    def is_quantized(self) -> bool:
        return self.qtype not in FLOAT_TYPES

    def dequantize(
        self, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
    ) -> torch.Tensor:
        """Move the raw bytes to `device` (if given), then expand them there to a `shape` tensor of `dtype`."""
        raw = self.raw if device is None else self.raw.to(device)
        out = dequantize(raw, self.qtype, self.shape, dtype)
        if out.untyped_storage().data_ptr() == self.raw.untyped_storage().data_ptr():
            out = out.clone()  # a float tensor that would alias the read-only file mapping
        return out

    def source(self) -> GGUFSource:
        """How a layer that stores these bytes gets its compute weight (see engine.runtime.ops)."""
        return GGUFSource(self.qtype, self.shape)


class GGUFSource(WeightSource):
    """The stored bytes cross to the compute device as they are (quantized) and are expanded there."""

    def __init__(self, qtype: QType, shape: tuple[int, ...]):
        self.qtype, self.shape = qtype, shape

    def materialize(self, stored: torch.Tensor, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        return dequantize(stored.to(device, non_blocking=True), self.qtype, self.shape, dtype)


def _raw_bytes(array: np.ndarray) -> torch.Tensor:
    """A flat uint8 torch view of a (read-only) memmap slice, without copying."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(array.reshape(-1).view(np.uint8))


def read_gguf(path: str | Path) -> tuple[dict[str, GGUFWeight], dict[str, Any]]:
    """Tensors (by their names in the file) and metadata (key -> Python value) of a GGUF file.

    The architecture is metadata["general.architecture"]: "flux" for city96's FLUX files,
    "t5encoder" (or "t5") for T5 encoders.
    """
    # mode "r": a plain read-only mapping (a copy-on-write one would commit the whole file's size on Windows)
    reader = gguf.GGUFReader(path)
    metadata = {
        name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")
    }
    tensors: dict[str, GGUFWeight] = {}
    for tensor in reader.tensors:
        qtype, shape = check_tensor(
            path, tensor.name, int(tensor.tensor_type), tensor.shape.tolist(), metadata
        )
        tensors[tensor.name] = GGUFWeight(raw=_raw_bytes(tensor.data), qtype=qtype, shape=shape)
    return tensors, metadata


def check_tensor(
    path: str | Path, name: str, type_id: int, dims: list[int], metadata: dict[str, Any]
) -> tuple[QType, tuple[int, ...]]:
    """A GGUF tensor's type and logical shape, checked before any tensor is made from it: a type FluxDeck can
    expand, and a `comfy.gguf.orig_shape` (if any) of non-negative whole numbers with the stored element count."""
    try:
        qtype = QType(type_id)
    except ValueError:
        qtype = None
    if qtype not in SUPPORTED_TYPES:
        kind = qtype.name if qtype is not None else f"number {type_id}"
        raise UserError(
            f"{path} holds tensors of GGUF type {kind} (e.g. {name[:60]}), which FluxDeck cannot read: "
            "use a file quantized as Q8_0, Q6_K, Q5_K, Q5_0, Q4_K, Q4_0, Q3_K, Q2_K, F16 or BF16."
        )
    stored = tuple(int(d) for d in reversed(dims))
    if any(d < 0 for d in stored) or math.prod(stored) % block_layout(qtype)[0]:
        raise UserError(
            f"{path} has a tensor {name[:60]} of shape {stored} that {qtype.name} cannot hold: the file is "
            "broken; download it again."
        )
    if ORIG_SHAPE_PREFIX + name not in metadata:
        return qtype, stored
    shape = metadata[ORIG_SHAPE_PREFIX + name]
    if (
        not isinstance(shape, list | tuple)
        or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
        or math.prod(shape) != math.prod(stored)
    ):
        raise UserError(
            f"{path} has a {ORIG_SHAPE_PREFIX}{name[:60]} of {str(shape)[:40]} that does not fit the tensor's "
            f"{math.prod(stored)} values: the file is broken; download it again."
        )
    return qtype, tuple(shape)


def architecture(metadata: dict[str, Any]) -> str:
    """general.architecture of a GGUF file ("" when missing)."""
    return str(metadata.get("general.architecture", ""))


# ---- T5: llama.cpp names -> HF T5EncoderModel names ----------------------------------------------------

_T5_GLOBAL_NAMES = {
    "token_embd": "shared",
    "enc.output_norm": "encoder.final_layer_norm",
    "output": "lm_head",  # only in full T5 conversions; an encoder model ignores it
}
# T5 v1.1 (the FLUX text encoder) has a gated FF: gate -> wi_0, up -> wi_1. (Old T5 v1.0 "wi" is also "ffn_up".)
_T5_BLOCK_NAMES = {
    "attn_norm": "layer.0.layer_norm",
    "attn_q": "layer.0.SelfAttention.q",
    "attn_k": "layer.0.SelfAttention.k",
    "attn_v": "layer.0.SelfAttention.v",
    "attn_o": "layer.0.SelfAttention.o",
    "attn_rel_b": "layer.0.SelfAttention.relative_attention_bias",
    "ffn_norm": "layer.1.layer_norm",
    "ffn_gate": "layer.1.DenseReluDense.wi_0",
    "ffn_up": "layer.1.DenseReluDense.wi_1",
    "ffn_down": "layer.1.DenseReluDense.wo",
}
_T5_BLOCK = re.compile(r"enc\.blk\.(\d+)\.(\w+)")


def t5_gguf_to_hf_names(name: str) -> str:
    """llama.cpp T5 encoder tensor name -> HF T5EncoderModel name (KeyError for names T5 does not have).

    enc.blk.3.attn_q.weight -> encoder.block.3.layer.0.SelfAttention.q.weight, token_embd.weight -> shared.weight.
    """
    base, dot, suffix = name.rpartition(".")
    if not dot or suffix not in ("weight", "bias"):
        raise KeyError(f"not a T5 GGUF tensor name: {name!r}")
    if base in _T5_GLOBAL_NAMES:
        return f"{_T5_GLOBAL_NAMES[base]}.{suffix}"
    match = _T5_BLOCK.fullmatch(base)
    if match is None or match.group(2) not in _T5_BLOCK_NAMES:
        raise KeyError(f"not a T5 GGUF tensor name: {name!r}")
    return f"encoder.block.{match.group(1)}.{_T5_BLOCK_NAMES[match.group(2)]}.{suffix}"


# ---- writing small files (tests and fixtures) ----------------------------------------------------------


def _stored_array(array: np.ndarray, qtype: QType) -> np.ndarray:
    """Float arrays are quantized with gguf's numpy code; uint8 arrays are taken as raw blocks already
    (the byte shape: last dim = row bytes), which is how K-quant tensors are written (numpy cannot quantize them)."""
    if array.dtype == np.uint8:
        return array
    return gguf.quants.quantize(np.ascontiguousarray(array, dtype=np.float32), qtype)


def write_gguf(
    path: str | Path,
    tensors: dict[str, np.ndarray],
    qtypes: dict[str, QType],
    arch: str,
    metadata: dict[str, str | int | float | list[int]] | None = None,
) -> None:
    """Write a GGUF file with general.architecture = `arch`. Each tensor is stored as qtypes[name] (F32 when
    absent): float arrays are quantized (F32, F16, BF16, Q8_0, Q5_0, Q5_1, Q4_0, Q4_1), uint8 arrays are
    written as raw blocks of that type. `metadata` adds string, int, float or int-list key-values."""
    writer = gguf.GGUFWriter(path, arch)
    for key, value in (metadata or {}).items():
        if isinstance(value, str):
            writer.add_string(key, value)
        elif isinstance(value, list):
            writer.add_array(key, value)
        elif isinstance(value, int):
            writer.add_int64(key, value)
        else:
            writer.add_float32(key, float(value))
    for name, array in tensors.items():
        qtype = QType(qtypes.get(name, QType.F32))
        writer.add_tensor(name, _stored_array(array, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


class GGUFFile:
    """A GGUF file (city96's FLUX transformer or T5 encoder quantizations) with the `WeightFile` face
    (engine/formats/weight_file.py): tensor names as the engine's models use them, logical shapes, and `load`
    handing out float tensors as views and quantized ones as GGUFWeight (raw bytes, dequantized per layer at
    compute time)."""

    def __init__(self, path: str | Path):
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
