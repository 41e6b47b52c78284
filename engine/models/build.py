"""A role's model (transformer, autoencoder, CLIP, T5) built from its file, weights kept as stored."""

from __future__ import annotations

import torch
from torch import nn

from engine.contract.errors import UserError
from engine.formats.weights import Component, quantized_layers, split_quantized
from engine.models.autoencoder import AutoEncoder, AutoEncoderParams
from engine.models.controlnet import build_controlnet
from engine.models.flux1 import Flux, FluxParams
from engine.models.text_encoders import build_clip, build_t5
from engine.runtime import ops

_BUILDERS = {
    "transformer": lambda state, scales, dtype: _build_own(Flux, FluxParams, state, scales, dtype),
    "vae": lambda state, scales, dtype: _build_own(AutoEncoder, AutoEncoderParams, state, scales, dtype),
    "clip": build_clip,
    "t5": build_t5,
    "controlnet": build_controlnet,  # roles "controlnet:0", "controlnet:1", …: one per --controlnet
}


def _build_own(model_class, params_class, state, scales, dtype) -> nn.Module:
    params = params_class.from_shapes({k: tuple(v.shape) for k, v in state.items()})
    with torch.device("meta"):
        model = model_class(params)
    return ops.load_into(model, state, scales, dtype)


def build_model(component: Component, dtype: torch.dtype) -> nn.Module:
    """A role's model from its file, weights kept in the stored dtype."""
    state, scales = split_quantized(component.load(), quantized_layers(component), str(component.file.path))
    try:
        return _BUILDERS[component.role.partition(":")[0]](state, scales, dtype)
    except (KeyError, ValueError, IndexError) as e:
        raise UserError(
            f"{component.file.path} does not have the tensors a {component.role} needs ({e}): "
            "the file is damaged or of another model family."
        ) from None
