"""safetensors files: the header read and checked against the file's size, tensors as views of a memory map."""

from __future__ import annotations

import json
import math
import mmap
import struct
import warnings
from pathlib import Path

import torch

from engine.contract.errors import UserError
from engine.formats.weight_file import TensorInfo

DTYPES = {
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
                dtype = DTYPES[info.dtype]
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
        if not isinstance(dtype, str) or dtype not in DTYPES:
            raise UserError(f"{path} holds a tensor of type {str(dtype)[:20]!r} that FluxDeck cannot read.")
        if not isinstance(shape, list) or not all(_whole(d) for d in shape):
            raise _bad_header(path, f"{shown} has no shape of non-negative whole numbers")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_whole(o) for o in offsets)):
            raise _bad_header(path, f"{shown} has no [start, end] byte offsets")
        start, end = offsets
        if end < start:
            raise _bad_header(path, f"{shown} ends before it starts")
        if math.prod(shape) * DTYPES[dtype].itemsize != end - start:
            raise _bad_header(path, f"{shown} is {shape} {dtype} but its bytes are {end - start:,} long")
        tensors[name] = TensorInfo(dtype, tuple(shape), start, end)
    ranges = sorted((info.start, info.end, name) for name, info in tensors.items())
    for (_, end, first), (start, _, second) in zip(ranges, ranges[1:]):
        if start < end:
            raise _bad_header(path, f"the bytes of {first[:60]!r} and {second[:60]!r} overlap")
    return tensors, metadata


def _whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
