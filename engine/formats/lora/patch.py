"""The math: a layer's LoRA deltas added to the weight the chokepoint (`ops.fetch`) hands over,
W + Σ strength · alpha/rank · up @ down, on the device and in the dtype the layer computes in (and the bias plus
Σ strength · up's bias for BFL's LinearLora pairs; `img_in` padded with zero columns when a control LoRA widens it).
A norm scale a LoRA replaces (`NormScale`) is the norm's `scale_patch` while the LoRA is on.

A `LoraPatch` is one of the layer's `WeightPatch`es (`layer.patches`): the stored weight is never written, so
replacing or removing the patches gives the base weights back exactly."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from engine.formats.lora.files import LoraPair
from engine.runtime import ops


@dataclass(frozen=True)
class Term:
    """One LoRA pair's share of a layer."""

    pair: LoraPair
    scale: float  # strength × alpha / rank
    rows: tuple[int, int] | None  # the rows of the layer it adds to (None: all)
    up_rows: tuple[int, int] | None  # the rows of the pair's up it takes (None: all)


class LoraPatch:
    """A layer's LoRA deltas, added to the weight `ops.fetch` hands over (compute dtype, compute device).
    The stored weight is never written: the result is a new tensor."""

    __slots__ = ("terms",)

    def __init__(self, terms: list[Term]):
        self.terms = tuple(terms)

    def __call__(self, weight: torch.Tensor) -> torch.Tensor:
        out = None
        width = max(term.pair.down.shape[1] for term in self.terms)
        if width > weight.shape[1]:  # a control LoRA widens img_in: the new input columns start at zero
            out = F.pad(weight, (0, width - weight.shape[1]))
        for term in self.terms:
            up, down = term.pair.tensors(weight.device, weight.dtype)
            if term.up_rows is not None:
                up = up[term.up_rows[0] : term.up_rows[1]]
            if out is None and term.rows is None:
                out = torch.addmm(weight, up, down, alpha=term.scale)
                continue
            if out is None:
                out = weight.clone()
            target = out if term.rows is None else out[term.rows[0] : term.rows[1]]
            target.addmm_(up, down, alpha=term.scale)
        return weight if out is None else out

    def patch_bias(self, bias: torch.Tensor | None, weight: torch.Tensor) -> torch.Tensor | None:
        """The layer's bias plus Σ scale · up's bias (BFL's LinearLora computes up(down(x)) + b, scaled); the
        bias as it was when no pair has one."""
        out = None
        for term in self.terms:
            if term.pair.bias is None:
                continue
            if out is None:
                out = bias.clone() if bias is not None else weight.new_zeros(weight.shape[0])
            add = term.pair.bias_on(weight.device, weight.dtype)
            if term.up_rows is not None:
                add = add[term.up_rows[0] : term.up_rows[1]]
            target = out if term.rows is None else out[term.rows[0] : term.rows[1]]
            target.add_(add, alpha=term.scale)
        return bias if out is None else out


class NormScale:
    """A norm scale a LoRA gives in place of the model's (BFL control LoRAs; ComfyUI's "set" patch): the norm
    computes with it while installed; the model's own stays as stored."""

    __slots__ = ("scale", "_on")

    def __init__(self, scale: torch.Tensor):
        self.scale, self._on = scale, {}

    def __call__(self, like: torch.Tensor) -> torch.Tensor:
        key = (like.device, like.dtype)
        if key not in self._on:
            self._on[key] = self.scale.to(device=like.device, dtype=like.dtype)
        return self._on[key]


def clear(model: nn.Module | None) -> None:
    """Take every LoRA patch off the model's layers (other patches stay) and give its norms their own scales."""
    if model is None:
        return
    for module in model.modules():
        if ops.is_cast_layer(module) and module.patches:
            module.patches = tuple(p for p in module.patches if not isinstance(p, LoraPatch))
        if getattr(module, "scale_patch", None) is not None:
            module.scale_patch = None


def install_norms(norms: list[tuple[nn.Module, torch.Tensor]]) -> None:
    """Each norm computes with its LoRA's scale (the last LoRA that gives one wins, as ComfyUI's "set")."""
    for norm, scale in norms:
        norm.scale_patch = NormScale(scale)


def install(per_layer: dict[int, tuple[nn.Module, list[Term]]]) -> None:
    """One LoraPatch per layer, after the patches it already has."""
    for layer, terms in per_layer.values():
        layer.patches = (*layer.patches, LoraPatch(terms))
