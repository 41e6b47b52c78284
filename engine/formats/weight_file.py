"""What a weight file offers the engine, and the registry that opens one by its format.

Every format (safetensors, GGUF, the next one) is one module with one class that has the `WeightFile` face:
tensor names as the engine's models use them, each tensor's logical shape and stored size, `load(names)` and the
file's metadata. `open_weights` walks `OPENERS`: a format whose magic bytes start the file wins, then one whose
suffix the name has, then safetensors (which has no magic: its errors say best what an unknown file is not).
A new format is one module plus one `Opener` line below; its module is imported only when such a file is opened.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from engine.contract import layout

if TYPE_CHECKING:  # torch-free at run time: the launcher may read the suffixes without loading torch
    import torch


@dataclass(frozen=True)
class TensorInfo:
    dtype: str  # safetensors' name: "BF16", "F8_E4M3", ... (GGUF: "GGUF:Q8_0", ...)
    shape: tuple[int, ...]  # the logical shape, whatever the storage
    start: int  # byte offsets into the data section
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


class WeightFile(Protocol):
    """A weight file whose index has been read and checked: what the engine may ask of any format."""

    path: Path
    tensors: Mapping[str, TensorInfo]  # name → dtype, logical shape, stored bytes
    metadata: Mapping[str, Any]  # the file's own key/values (safetensors: texts; GGUF: typed values)

    def names(self) -> list[str]:
        """Every tensor name, in the file's order."""
        ...

    def load(self, names: list[str]) -> dict[str, torch.Tensor]:
        """The named tensors, in the form the engine computes from (views of the file where the format allows;
        quantized tensors as their own weight sources)."""
        ...


@dataclass(frozen=True)
class Opener:
    """One format: how its files are recognised and which class reads them (imported on first use)."""

    name: str
    suffixes: tuple[str, ...]  # lower-case file name endings
    magic: bytes | None  # the bytes every such file starts with (None: the format has none)
    module: str
    cls: str

    def open(self, path: str | Path) -> WeightFile:
        return getattr(importlib.import_module(self.module), self.cls)(path)


# The suffixes live in the torch-free layout (the launcher lists files by them): a new format adds its suffixes
# there and its Opener here.
SAFETENSORS = Opener(
    "safetensors", layout.SAFETENSORS_SUFFIXES, None, "engine.formats.safetensors_file", "SafetensorsFile"
)
GGUF = Opener("GGUF", layout.GGUF_SUFFIXES, b"GGUF", "engine.formats.gguf_file", "GGUFFile")
OPENERS = (GGUF, SAFETENSORS)


def opener_for(path: str | Path) -> Opener:
    """The format of the file at `path`: by its first bytes, then by its name, else safetensors (whose header
    checks say best what an unknown file is not)."""
    p, openers = Path(path), OPENERS
    longest = max((len(o.magic) for o in openers if o.magic), default=0)
    head = b""
    if longest and p.is_file():
        try:
            with p.open("rb") as f:
                head = f.read(longest)
        except OSError:
            head = b""  # the opener says what is wrong with the file
    for opener in openers:
        if opener.magic and head.startswith(opener.magic):
            return opener
    name = p.name.lower()
    for opener in openers:
        if name.endswith(opener.suffixes):
            return opener
    return SAFETENSORS


def open_weights(path: str | Path) -> WeightFile:
    """The file behind a path, read by the class of its format."""
    return opener_for(path).open(path)
