"""A role's model (transformer, autoencoder, CLIP, T5) built from its file, weights kept as stored."""

from __future__ import annotations

import torch
from torch import nn

from engine.contract.errors import UserError
from engine.formats.weights import Component, quantized_layers, split_quantized
from engine.models.autoencoder import AutoEncoder, AutoEncoderParams
from engine.models.controlnet import build_controlnet
from engine.models.flux1 import Flux, FluxParams
from engine.models.flux2 import Flux2, Flux2Params, is_flux2
from engine.models.flux2_autoencoder import Flux2AutoEncoder, canonical_names, is_flux2_autoencoder
from engine.models.qwen3_encoder import build_qwen3
from engine.models.redux import build_redux, build_siglip
from engine.models.text_encoders import build_clip, build_t5
from engine.runtime import ops


def _transformer(state, scales, dtype) -> nn.Module:
    if is_flux2(state):
        return _build_own(Flux2, Flux2Params, state, scales, dtype)
    return _build_own(Flux, FluxParams, state, scales, dtype)


def _autoencoder(state, scales, dtype) -> nn.Module:
    if is_flux2_autoencoder(state):
        return _build_own(Flux2AutoEncoder, AutoEncoderParams, canonical_names(state), scales, dtype)
    return _build_own(AutoEncoder, AutoEncoderParams, state, scales, dtype)


_BUILDERS = {
    "transformer": _transformer,
    "vae": _autoencoder,
    "clip": build_clip,
    "t5": build_t5,
    "controlnet": build_controlnet,  # roles "controlnet:0", "controlnet:1", …: one per --controlnet
    "text_encoder": build_qwen3,
    "siglip": build_siglip,  # FLUX.1 Redux's image encoder and embedder (engine/generation/redux.py)
    "redux": build_redux,
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
