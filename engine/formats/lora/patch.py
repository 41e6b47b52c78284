"""The math: a layer's LoRA deltas added to the weight the chokepoint (`ops.fetch`) hands over,
W + Σ strength · alpha/rank · up @ down, on the device and in the dtype the layer computes in.

A `LoraPatch` is one of the layer's `WeightPatch`es (`layer.patches`): the stored weight is never written, so
replacing or removing the patches gives the base weights back exactly."""

from __future__ import annotations

from dataclasses import dataclass

import torch
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


def clear(model: nn.Module | None) -> None:
    """Take every LoRA patch off the model's layers (other patches stay)."""
    if model is None:
        return
    for module in model.modules():
        if ops.is_cast_layer(module) and module.patches:
            module.patches = tuple(p for p in module.patches if not isinstance(p, LoraPatch))


def install(per_layer: dict[int, tuple[nn.Module, list[Term]]]) -> None:
    """One LoraPatch per layer, after the patches it already has."""
    for layer, terms in per_layer.values():
        layer.patches = (*layer.patches, LoraPatch(terms))
