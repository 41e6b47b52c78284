"""Which layer each LoRA tensor name patches: the index of a model's cast layers under every known layout's names
(FLUX.1's and FLUX.2's for the transformer, CLIP's for the text encoder)."""

from __future__ import annotations

from torch import nn

from engine.formats.lora import layouts as known
from engine.formats.lora.flux2_layouts import FLUX2_LAYOUTS
from engine.formats.lora.layouts import CLIP_PREFIXES, TRANSFORMER_PREFIXES, LayerIndex, Names
from engine.runtime import ops


def index(model: nn.Module | None, part: str) -> LayerIndex:
    """The `part` ("transformer" or "clip") model's index (empty when the model is not there)."""
    strip_name = "text_model." if part == "clip" else ""
    # read at call time: a layout registered in `layouts` (its tuples) counts from then on
    chosen = known.CLIP_LAYOUTS if part == "clip" else known.TRANSFORMER_LAYOUTS + FLUX2_LAYOUTS
    prefixes = CLIP_PREFIXES if part == "clip" else TRANSFORMER_PREFIXES
    if model is None:
        return LayerIndex({}, {}, prefixes)
    layers = {
        name.removeprefix(strip_name): m
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and ops.is_cast_layer(m)
    }
    params = getattr(model, "params", None)
    names: Names = {}
    for layout in chosen:
        for key, targets in layout.names(list(layers), params).items():
            names.setdefault(key, targets)
    norms = {name: m for name, m in model.named_modules() if hasattr(m, "scale_patch")}
    return LayerIndex(layers, names, prefixes, norms)
