"""The one place a layer gets its weight.

Every weight-carrying layer of every model (our FLUX transformer and autoencoder, and transformers' CLIP and T5,
whose nn.Linear / nn.Embedding are re-classed to the ones here) keeps its weight in the dtype the file stored it
in (fp8 stays fp8 in RAM) and calls `fetch` when it runs: the weight is moved to the input's device, cast to the
compute dtype, multiplied by a scaled-fp8 scale and patched (LoRA) there. Streaming, quantized storage and
patches compose in `fetch`, not in model code.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

# A patch takes the cast weight (compute dtype, on the compute device) and returns the patched weight; one with
# a `patch_bias(bias, weight)` method patches the bias too.
WeightPatch = Callable[[torch.Tensor], torch.Tensor]


class WeightSource:
    """How a stored weight becomes a compute weight. Plain tensors need only a cast; GGUF weights dequantize."""

    def materialize(self, stored: torch.Tensor, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        return stored.to(device=device, dtype=dtype, non_blocking=True)


class Staged:
    """A layer's stored tensors copied to the compute device (by the memory manager), still in storage dtype."""

    __slots__ = ("weight", "bias", "scale_weight")

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, scale_weight: torch.Tensor | None):
        self.weight, self.bias, self.scale_weight = weight, bias, scale_weight


class CastMixin:
    """State shared by the layers below: an optional scaled-fp8 scale, optional patches, an optional source,
    and the device copy the memory manager staged (None: the stored tensors are used where they are)."""

    scale_weight: torch.Tensor | None = None
    patches: tuple[WeightPatch, ...] = ()
    source: WeightSource | None = None
    staged: Staged | None = None

    def fetch(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        return fetch(self, like.dtype, like.device)


def fetch(
    layer: nn.Module, dtype: torch.dtype, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The layer's weight and bias, on `device` in `dtype`, with scale and patches applied."""
    stored = layer.staged or layer
    source = layer.source or _PLAIN
    weight = source.materialize(stored.weight, dtype, device)
    if stored.scale_weight is not None:
        weight = weight * stored.scale_weight.to(device=device, dtype=dtype)
    for patch in layer.patches:
        weight = patch(weight)
    bias = stored.bias
    if bias is not None:
        bias = bias.to(device=device, dtype=dtype, non_blocking=True)
    for patch in layer.patches:  # a patch may add to the bias too (BFL's LinearLora has one on up)
        patch_bias = getattr(patch, "patch_bias", None)
        if patch_bias is not None:
            bias = patch_bias(bias, weight)
    return weight, bias


_PLAIN = WeightSource()


class Linear(CastMixin, nn.Linear):
    """Every product with a linear layer's weight is one of these three methods, so a faster path (a quantized
    matmul, say) replaces them here and no model code can go around it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.fetch(x)
        return F.linear(x, weight, bias)

    def forward_split(self, x: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
        """`forward(x).split(sizes, -1)` as one product per row block of the weight: contiguous outputs, no
        split copies."""
        weight, bias = self.fetch(x)
        outputs, start = [], 0
        for size in sizes:
            rows = slice(start, start + size)
            outputs.append(F.linear(x, weight[rows], None if bias is None else bias[rows]))
            start += size
        return outputs

    def forward_concat(self, parts: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """`forward(torch.cat(parts, -1))` as products over column blocks of the weight, summed in place: no
        concatenated copy of the input."""
        weight, bias = self.fetch(parts[0])
        width = parts[0].shape[-1]
        out = F.linear(parts[0], weight[:, :width], bias)
        flat = out.flatten(0, -2)
        for part in parts[1:]:
            columns = weight[:, width : width + part.shape[-1]]
            flat = torch.addmm(flat, part.flatten(0, -2), columns.t())
            width += part.shape[-1]
        return flat.view_as(out)


class Conv2d(CastMixin, nn.Conv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.fetch(x)
        return self._conv_forward(x, weight, bias)


class Embedding(CastMixin, nn.Embedding):
    bias = None
    compute_dtype: torch.dtype = torch.float32

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        weight, _ = fetch(self, self.compute_dtype, ids.device)
        return F.embedding(ids, weight, self.padding_idx)


_RECLASS = {nn.Linear: Linear, nn.Conv2d: Conv2d, nn.Embedding: Embedding}


def adopt(model: nn.Module) -> nn.Module:
    """Re-class a foreign model's nn.Linear / nn.Conv2d / nn.Embedding in place so they fetch through here."""
    for module in model.modules():
        cast_class = _RECLASS.get(type(module))
        if cast_class is not None:
            module.__class__ = cast_class
    return model


def is_cast_layer(module: nn.Module) -> bool:
    return isinstance(module, CastMixin)


def set_compute_dtype(model: nn.Module, dtype: torch.dtype) -> None:
    """Small parameters of layers outside the chokepoint (norms, embeddings' compute dtype) follow `dtype`."""
    for module in model.modules():
        if isinstance(module, Embedding):
            module.compute_dtype = dtype
        if is_cast_layer(module):
            continue
        for name, param in list(module.named_parameters(recurse=False)):
            if param.is_floating_point() and param.dtype != dtype:
                setattr(module, name, nn.Parameter(param.detach().to(dtype), requires_grad=False))


def expanded_bytes(model: nn.Module, dtype: torch.dtype) -> int:
    """What the model's layer weights take once expanded to `dtype` (`expand`)."""
    layers = [m for m in model.modules() if is_cast_layer(m)]
    return sum(math.prod(getattr(m.source, "shape", None) or m.weight.shape) * dtype.itemsize for m in layers)


def needs_expanding(model: nn.Module, dtype: torch.dtype) -> bool:
    """Whether any layer's stored weight must be cast, dequantized or scaled to compute in `dtype`."""
    return any(
        m.source is not None or m.scale_weight is not None or m.weight.dtype != dtype
        for m in model.modules()
        if is_cast_layer(m)
    )


def expand(model: nn.Module, dtype: torch.dtype) -> int:
    """Every layer's weight made once in `dtype` (cast, GGUF dequantized, fp8 scale folded in) and kept: `fetch`
    then only moves and patches it. For a model that runs many times (the transformer, every step) on a device
    where its stored dtype is not the compute dtype, when memory holds the larger copy. Returns the layers' bytes."""
    for layer in model.modules():
        if not is_cast_layer(layer):
            continue
        stored = layer.weight
        if layer.source is None and layer.scale_weight is None and stored.dtype == dtype:
            continue
        weight = (layer.source or _PLAIN).materialize(stored, dtype, stored.device)
        if layer.scale_weight is not None:
            weight = weight * layer.scale_weight.to(device=weight.device, dtype=dtype)
        layer.weight = nn.Parameter(weight, requires_grad=False)
        layer.source, layer.scale_weight = None, None
        if layer.bias is not None and layer.bias.dtype != dtype:
            layer.bias = nn.Parameter(layer.bias.to(dtype), requires_grad=False)
    return expanded_bytes(model, dtype)


def load_into(
    model: nn.Module, state: dict[str, torch.Tensor], scales: dict[str, torch.Tensor], dtype: torch.dtype
) -> nn.Module:
    """Give a model built on the meta device its weights, as stored (no copy, no cast of the big ones).

    Quantized weights (objects with `raw` bytes and a `source()`, e.g. GGUF's) become the layer's stored
    weight as they are, with the source that expands them when the layer runs."""
    quantized = {name: value for name, value in state.items() if not isinstance(value, torch.Tensor)}
    for name, value in quantized.items():
        layer_name, _, attr = name.rpartition(".")
        layer = model.get_submodule(layer_name)
        if attr != "weight" or not is_cast_layer(layer):
            raise ValueError(
                f"{name} is quantized but is not the weight of a linear, conv or embedding layer"
            )
        layer.weight = nn.Parameter(value.raw, requires_grad=False)
        layer.source = value.source()
    plain = {name: value for name, value in state.items() if name not in quantized}
    missing, unexpected = model.load_state_dict(plain, strict=False, assign=True)
    missing = [name for name in missing if name not in quantized]
    if missing or unexpected:
        raise ValueError(f"weights do not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for name, scale in scales.items():
        model.get_submodule(name).scale_weight = scale
    for param in model.parameters():
        param.requires_grad_(False)
    set_compute_dtype(model, dtype)
    return model.eval()
