"""Tiny LoRAs written in the layouts people share, and the oracle's merge of each (written here from the layouts'
names, independently of engine/formats/lora.py): W += strength · alpha/rank · up @ down on the right rows."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from engine.models.flux1 import FluxParams


@dataclass
class Delta:
    """One LoRA pair as the oracle merges it: `name` is a BFL or diffusers weight name, `rows` its slice."""

    name: str
    up: torch.Tensor
    down: torch.Tensor
    scale: float  # alpha / rank
    rows: tuple[int, int] | None = None

    def matrix(self) -> torch.Tensor:
        return self.scale * (self.up.double() @ self.down.double())


@dataclass
class TinyLora:
    path: Path
    space: str  # "bfl": deltas name BFL weights; "diffusers": diffusers FluxTransformer2DModel weights
    deltas: list[Delta] = field(default_factory=list)


def _pair(
    gen: torch.Generator, out: int, inn: int, rank: int, size: float
) -> tuple[torch.Tensor, torch.Tensor]:
    down = torch.randn(rank, inn, generator=gen) / inn**0.5
    up = torch.randn(out, rank, generator=gen) * size / rank**0.5
    return up, down


def bfl_linears(state: dict[str, torch.Tensor]) -> dict[str, tuple[int, int]]:
    """Every linear layer of a BFL transformer state: name → (out, in)."""
    return {
        k.removesuffix(".weight"): tuple(v.shape)
        for k, v in state.items()
        if k.endswith(".weight") and v.ndim == 2
    }


def diffusers_linears(diffusers_state: dict[str, torch.Tensor]) -> dict[str, tuple[int, int]]:
    return bfl_linears(diffusers_state)


def _save(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)


def kohya(path: Path, state, *, rank=4, alpha=2.0, size=0.4, seed=1, dtype=torch.bfloat16) -> TinyLora:
    """sd-scripts: lora_unet_<BFL name with underscores>.lora_down/.lora_up/.alpha, on every linear layer."""
    gen = torch.Generator().manual_seed(seed)
    lora, tensors = TinyLora(path, "bfl"), {}
    for name, (out, inn) in bfl_linears(state).items():
        up, down = _pair(gen, out, inn, rank, size)
        up, down = up.to(dtype), down.to(dtype)
        key = "lora_unet_" + name.replace(".", "_")
        tensors |= {
            f"{key}.lora_down.weight": down,
            f"{key}.lora_up.weight": up,
            f"{key}.alpha": torch.tensor(alpha),
        }
        lora.deltas.append(Delta(name, up.float(), down.float(), alpha / rank))
    _save(path, tensors)
    return lora


def comfy(path: Path, state, *, rank=4, alpha=8.0, size=0.4, seed=2, dtype=torch.float16) -> TinyLora:
    """BFL/ComfyUI names: diffusion_model.<BFL name>.lora_down.weight / .lora_up.weight / .alpha."""
    gen = torch.Generator().manual_seed(seed)
    lora, tensors = TinyLora(path, "bfl"), {}
    for name, (out, inn) in bfl_linears(state).items():
        up, down = _pair(gen, out, inn, rank, size)
        up, down = up.to(dtype), down.to(dtype)
        key = f"diffusion_model.{name}"
        tensors |= {
            f"{key}.lora_down.weight": down,
            f"{key}.lora_up.weight": up,
            f"{key}.alpha": torch.tensor(alpha),
        }
        lora.deltas.append(Delta(name, up.float(), down.float(), alpha / rank))
    _save(path, tensors)
    return lora


def peft(
    path: Path, diffusers_state, *, prefix="transformer.", rank=4, alpha=2.0, size=0.4, seed=3
) -> TinyLora:
    """diffusers/PEFT: transformer.<diffusers name>.lora_A.weight / lora_B.weight, alpha in the metadata as
    diffusers writes it (lora_adapter_metadata, keys prefixed by the component)."""
    gen = torch.Generator().manual_seed(seed)
    lora, tensors = TinyLora(path, "diffusers"), {}
    for name, (out, inn) in diffusers_linears(diffusers_state).items():
        up, down = _pair(gen, out, inn, rank, size)
        tensors |= {f"{prefix}{name}.lora_A.weight": down, f"{prefix}{name}.lora_B.weight": up}
        lora.deltas.append(Delta(name, up, down, alpha / rank))
    meta = (
        {"transformer.r": rank, "transformer.lora_alpha": alpha}
        if prefix
        else {"r": rank, "lora_alpha": alpha}
    )
    _save(path, tensors, {"format": "pt", "lora_adapter_metadata": json.dumps(meta)})
    return lora


def xlabs(path: Path, p: FluxParams, *, rank=4, size=0.5, seed=4) -> TinyLora:
    """XLabs: processor LoRAs on the double blocks' qkv/proj (1: image, 2: text) and the single blocks' qkv (the
    first 3·hidden rows of linear1); no alpha (scale 1)."""
    gen = torch.Generator().manual_seed(seed)
    h = p.hidden_size
    lora, tensors = TinyLora(path, "bfl"), {}
    for i in range(p.depth):
        for n, stream in (("1", "img"), ("2", "txt")):
            for kind, out, target in (("qkv", 3 * h, "qkv"), ("proj", h, "proj")):
                up, down = _pair(gen, out, h, rank, size)
                key = f"double_blocks.{i}.processor.{kind}_lora{n}"
                tensors |= {f"{key}.down.weight": down, f"{key}.up.weight": up}
                lora.deltas.append(Delta(f"double_blocks.{i}.{stream}_attn.{target}", up, down, 1.0))
    for i in range(p.depth_single):
        up, down = _pair(gen, 3 * h, h, rank, size)
        key = f"single_blocks.{i}.processor.qkv_lora"
        tensors |= {f"{key}.down.weight": down, f"{key}.up.weight": up}
        lora.deltas.append(Delta(f"single_blocks.{i}.linear1", up, down, 1.0, (0, 3 * h)))
    _save(path, tensors)
    return lora


def clip_kohya(path: Path, clip_state, *, rank=4, alpha=4.0, size=0.5, seed=5) -> TinyLora:
    """lora_te1_text_model_<...>: CLIP-L's linear layers (names as the clip_l file has them)."""
    gen = torch.Generator().manual_seed(seed)
    lora, tensors = TinyLora(path, "clip"), {}
    for name, (out, inn) in bfl_linears(clip_state).items():
        if ".encoder." not in f".{name}":
            continue
        up, down = _pair(gen, out, inn, rank, size)
        key = "lora_te1_" + name.replace(".", "_")
        tensors |= {
            f"{key}.lora_down.weight": down,
            f"{key}.lora_up.weight": up,
            f"{key}.alpha": torch.tensor(alpha),
        }
        lora.deltas.append(Delta(name, up, down, alpha / rank))
    _save(path, tensors)
    return lora


def merged(state: dict[str, torch.Tensor], loras: list[tuple[TinyLora, float]]) -> dict[str, torch.Tensor]:
    """A float32 copy of `state` with the LoRAs' deltas added to the weights they name (strength each)."""
    out = {k: v.float().clone() for k, v in state.items()}
    for lora, strength in loras:
        for d in lora.deltas:
            weight = out[f"{d.name}.weight"]
            rows = slice(*d.rows) if d.rows else slice(None)
            weight[rows] = (weight[rows].double() + strength * d.matrix()).float()
    return out


def write_raw(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    _save(path, tensors)
    return path
