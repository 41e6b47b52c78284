"""Tiny random FLUX.1 ControlNets in the layouts people download (tensor names as the files have them).

- `diffusers_controlnet_state`: InstantX / Shakker-Labs `FluxControlNetModel` names; `modes` > 0 adds a Union
  mode embedding, `depth_single=0` is Union Pro 2.0's shape.
- `xlabs_controlnet_state`: XLabs' x-flux `ControlNetFlux` names (BFL blocks, `controlnet_blocks`,
  `pos_embed_input`, `input_hint_block.{0,2,…,14}`).

The widths follow a `TinySpec`, so a net fits the tiny transformer of the same spec.
"""

from __future__ import annotations

import torch

from engine.fixtures import TinySpec, _seeded
from engine.models.controlnet import DIFFUSERS, XLABS, ControlNetParams, controlnet_class


def controlnet_params(
    spec: TinySpec, layout: str, depth: int, depth_single: int = 0, modes: int = 0
) -> ControlNetParams:
    fp = spec.flux_params()
    return ControlNetParams(
        layout=layout,
        in_channels=64,
        context_in_dim=fp.context_in_dim,
        vec_in_dim=fp.vec_in_dim,
        hidden_size=fp.hidden_size,
        mlp_hidden=fp.mlp_hidden,
        num_heads=fp.num_heads,
        depth=depth,
        depth_single=depth_single if layout == DIFFUSERS else 0,
        axes_dim=fp.axes_dim,
        guidance_embed=fp.guidance_embed,
        qkv_bias=True,
        num_modes=modes,
    )


def _state(p: ControlNetParams, seed: int) -> dict[str, torch.Tensor]:
    state = _seeded(seed, lambda: controlnet_class(p)(p))
    return {name: t for name, t in state.items() if "_extra_state" not in name}


def diffusers_controlnet_state(
    spec: TinySpec, depth: int = 2, depth_single: int = 3, modes: int = 0, seed: int = 11
) -> dict[str, torch.Tensor]:
    return _state(controlnet_params(spec, DIFFUSERS, depth, depth_single, modes), seed)


def xlabs_controlnet_state(spec: TinySpec, depth: int = 2, seed: int = 12) -> dict[str, torch.Tensor]:
    return _state(controlnet_params(spec, XLABS, depth), seed)
