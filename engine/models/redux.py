"""FLUX.1 Redux: SigLIP's image features through BFL's Redux embedder become extra T5-width text tokens.

- SigLIP: transformers' `SiglipVisionModel`, built from the single file ComfyUI keeps in `models/clip_vision/`
  (`sigclip_vision_patch14_384.safetensors`: transformers' own names under `vision_model.`, no config beside it:
  every dimension is read off the tensors; the attention head width, invisible there, is so400m's 72; the
  pooling head, which Redux does not use, is left out). Its output is the last hidden state (after the
  post-layernorm), one token per 14×14 patch of the 384² image: 729 tokens.
- The Redux embedder (`models/style_models/flux1-redux-dev.safetensors`): `redux_down(silu(redux_up(x)))`,
  1152 → 12288 → 4096.
Both load and compute like the text encoders: weights as stored, fetched through `engine.runtime.ops`.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from transformers import SiglipVisionConfig, SiglipVisionModel

from engine.formats.weights import count_indexed
from engine.runtime import ops

REDUX_MARKER = "redux_down.weight"
SIGLIP_MARKER = "vision_model.embeddings.patch_embedding.weight"
SIGLIP_HEAD_DIM = 72  # so400m: 1152 wide, 16 heads
# The square image size each released SigLIP was trained at, by (positions, patch): 27² patches of 14 come from
# 384 pixels (the last 6 fall outside every patch), as ComfyUI's clip_vision_siglip_384.json and diffusers'
# SiglipImageProcessor (384×384) have it
KNOWN_IMAGE_SIZES = {(729, 14): 384, (1024, 16): 512}


def is_siglip(names) -> bool:
    """A SigLIP vision tower (CLIP's has a class embedding and a pre-layernorm; SigLIP has neither)."""
    return SIGLIP_MARKER in names and "vision_model.embeddings.class_embedding" not in names


class ReduxEmbedder(nn.Module):
    def __init__(self, vision_dim: int, hidden: int, text_dim: int):
        super().__init__()
        self.redux_up = ops.Linear(vision_dim, hidden)
        self.redux_down = ops.Linear(hidden, text_dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.redux_down(F.silu(self.redux_up(features)))


def build_redux(
    state: dict[str, torch.Tensor], scales: dict[str, torch.Tensor], dtype: torch.dtype
) -> nn.Module:
    hidden, vision_dim = state["redux_up.weight"].shape
    text_dim = state["redux_down.weight"].shape[0]
    with torch.device("meta"):
        model = ReduxEmbedder(vision_dim, hidden, text_dim)
    return ops.load_into(model, state, scales, dtype)


def siglip_config(shapes: dict[str, tuple[int, ...]]) -> SiglipVisionConfig:
    """From the names as SiglipVisionModel has them (the file's, without `vision_model.`)."""
    hidden, channels, patch, _ = shapes["embeddings.patch_embedding.weight"]
    positions = shapes["embeddings.position_embedding.weight"][0]
    return SiglipVisionConfig(
        hidden_size=hidden,
        intermediate_size=shapes["encoder.layers.0.mlp.fc1.weight"][0],
        num_hidden_layers=count_indexed(shapes, "encoder.layers."),
        num_attention_heads=max(1, hidden // SIGLIP_HEAD_DIM),
        num_channels=channels,
        image_size=image_size(positions, patch),
        patch_size=patch,
        hidden_act="gelu_pytorch_tanh",
        layer_norm_eps=1e-6,
        vision_use_head=False,
    )


def image_size(positions: int, patch: int) -> int:
    """The square size images are resized to: a released model's own, else the patches' side."""
    return KNOWN_IMAGE_SIZES.get((positions, patch), math.isqrt(positions) * patch)


def build_siglip(
    state: dict[str, torch.Tensor], scales: dict[str, torch.Tensor], dtype: torch.dtype
) -> nn.Module:
    # the file's names are transformers' under `vision_model.` (its base_model_prefix); the head is not used
    n = len("vision_model.")
    keep = lambda name: name.startswith("vision_model.") and not name.startswith("vision_model.head.")  # noqa: E731
    state = {k[n:]: v for k, v in state.items() if keep(k) and not k.endswith("position_ids")}
    scales = {k[n:]: v for k, v in scales.items() if keep(k)}
    config = siglip_config({k: tuple(v.shape) for k, v in state.items()})
    config._attn_implementation = "sdpa"
    with torch.device("meta"):
        model = SiglipVisionModel(config)
    ops.adopt(model)
    ops.load_into(model, state, scales, dtype)
    embeddings = model.embeddings
    embeddings.position_ids = torch.arange(embeddings.num_positions).expand((1, -1))
    return model


def pixels(image: Image.Image, size: int) -> torch.Tensor:
    """(1, 3, size, size) in [-1, 1]: RGB, resized (bicubic) to a square, mean 0.5 and std 0.5 per channel, as
    SigLIP's image processor prepares it for BFL's and diffusers' Redux (the whole image, squashed to the square;
    ComfyUI's CLIPVisionEncode centre-crops by default instead)."""
    image = image.convert("RGB").resize((size, size), Image.Resampling.BICUBIC)
    array = np.asarray(image, dtype=np.float32) / 255.0
    return torch.from_numpy((array - 0.5) / 0.5).permute(2, 0, 1)[None]


@torch.inference_mode()
def redux_tokens(siglip: nn.Module, embedder: nn.Module, image: Image.Image, device, dtype) -> torch.Tensor:
    """One image's Redux tokens (1, patches, 4096)."""
    size = siglip.config.image_size
    features = siglip(pixel_values=pixels(image, size).to(device=device, dtype=dtype)).last_hidden_state
    return embedder(features)
