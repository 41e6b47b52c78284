"""LoRA files applied at the weight chokepoint: W + Σ strength·scale·up@down, computed where the layer runs.

- files.py: reading a file into up/down pairs with their alpha/rank scale (`LoraWeights`), and `LoraFiles`, the
  files read so far (once per path, modification time and size);
- layouts.py: how kohya, diffusers/PEFT, BFL/ComfyUI, XLabs and CLIP-L files name our layers, one `Layout`
  each, in the registries `TRANSFORMER_LAYOUTS` / `CLIP_LAYOUTS` (a new layout lands there);
- matching.py: which pairs go to which layers (rows of fused ones), and the notes about the rest;
- patch.py: `LoraPatch`, the math, one `WeightPatch` per layer;
- library.py: `LoraLibrary`, which owns the files read and applies a job's LoRAs;
- tags.py: A1111's `<lora:name:strength>` prompt tags; hashes.py: the files' SHA-256 for PNG metadata.

A LoRA on a part of a fused layer (diffusers' to_q / to_k / to_v / add_*_proj / proj_mlp, XLabs' single-block
qkv, the final modulation whose halves diffusers swaps) patches only its rows. Nothing is merged into the stored
weights: each job replaces the patches, so removing a LoRA gives the base weights back exactly.

An engine holds its own `LoraLibrary` (its ModelCache's) and `FileHashes`. The functions below serve callers that
hold none (tests, one-off tools): each call uses a fresh library, so no state is shared across a process.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from engine.contract.request import LoraSpec
from engine.formats.lora.files import LORA_SUFFIXES, LoraFiles, LoraPair, LoraWeights, lora_name
from engine.formats.lora.hashes import FileHashes
from engine.formats.lora.layouts import CLIP_LAYOUTS, TRANSFORMER_LAYOUTS, Layout
from engine.formats.lora.library import PARTS, LoraLibrary
from engine.formats.lora.patch import LoraPatch
from engine.formats.lora.tags import prompt_loras

__all__ = [
    "CLIP_LAYOUTS",
    "LORA_SUFFIXES",
    "PARTS",
    "TRANSFORMER_LAYOUTS",
    "FileHashes",
    "Layout",
    "LoraFiles",
    "LoraLibrary",
    "LoraPair",
    "LoraPatch",
    "LoraWeights",
    "apply_loras",
    "clip_lora_key",
    "file_sha256",
    "load_lora",
    "lora_name",
    "prompt_loras",
]


def apply_loras(
    transformer: nn.Module | None,
    clip: nn.Module | None,
    loras: list[LoraSpec],
    parts: tuple[str, ...] = PARTS,
) -> list[str]:
    """`LoraLibrary.apply` on a library of its own."""
    return LoraLibrary().apply(transformer, clip, loras, parts)


def clip_lora_key(loras: list[LoraSpec]) -> str:
    """`LoraLibrary.clip_key` on a library of its own."""
    return LoraLibrary().clip_key(loras)


def load_lora(path: str | Path) -> LoraWeights:
    """The LoRA at `path`, read and checked (a library of its own: read each time)."""
    return LoraLibrary().load(path)


def file_sha256(path: str | Path) -> str:
    """The SHA-256 of the whole file (hex)."""
    return FileHashes().sha256(path)
