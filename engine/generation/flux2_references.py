"""FLUX.2 [klein]'s reference images (`--reference IMG`, repeatable), as diffusers' Flux2KleinPipeline takes
its `image=` list — not FLUX.1 Kontext's preferred resolutions:

- Size: an image above 1024² pixels is first scaled (Lanczos) to about 1024² keeping its aspect ratio (each side
  int(side · sqrt(1024² / area))); then both sides are floored to a multiple of 16 and the image is centre-cropped
  to that (no resampling). Images under 64 pixels a side or beyond 8:1 are refused, as the pipeline refuses them.
- Encode: the FLUX.2 autoencoder's posterior mean, 2×2 patched and batch-norm normalised (Flux2AutoEncoder.encode),
  packed row by row; the references' token runs concatenated in order.
- Position ids: (t, row, col, 0) with t = 10 for the first reference, 20 for the second, ... (the generated image
  sits at t = 0); the transformer attends to them and predicts only the image tokens.
- Without --width/--height the output takes the first reference's size after this sizing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from engine.contract.errors import UserError
from engine.generation import vae_tiling
from engine.models import flux2

TARGET_AREA = 1024 * 1024  # references above this many pixels are scaled down to about it
MULTIPLE = 16  # the VAE's 8× and the 2×2 patch
MIN_SIDE = 64
MAX_ASPECT = 8


def scaled_size(width: int, height: int) -> tuple[int, int]:
    """The size a reference is resampled to before cropping: its own up to 1024² pixels, else about 1024²."""
    if width * height <= TARGET_AREA:
        return width, height
    scale = math.sqrt(TARGET_AREA / (width * height))
    return int(width * scale), int(height * scale)


def reference_size(width: int, height: int) -> tuple[int, int]:
    """(width, height) of a reference of this size as the transformer sees it (multiples of 16)."""
    width, height = scaled_size(width, height)
    return width // MULTIPLE * MULTIPLE, height // MULTIPLE * MULTIPLE


def check_reference(path: str, size: tuple[int, int]) -> None:
    """A reference the pipeline would refuse gets one sentence naming it."""
    width, height = size
    if width < MIN_SIDE or height < MIN_SIDE:
        raise UserError(
            f"--reference {path} is {width}x{height}: FLUX.2 [klein] needs at least {MIN_SIDE} pixels a side; "
            "give a larger image."
        )
    if max(width / height, height / width) > MAX_ASPECT:
        raise UserError(
            f"--reference {path} is {width}x{height}, wider than {MAX_ASPECT}:1 in one direction: crop it first."
        )


def default_size(references: Sequence[str]) -> tuple[int, int] | None:
    """The output size without --width/--height: the first reference's (None without references)."""
    if not references:
        return None
    with Image.open(references[0]) as image:
        size = image.size
    check_reference(references[0], size)
    return reference_size(*size)


def prepare(image: Image.Image) -> Image.Image:
    """The reference as the pipeline feeds it to the VAE: scaled down when above 1024², floored to 16 by a
    centre crop, RGB."""
    size = scaled_size(*image.size)
    if size != image.size:
        image = image.resize(size, Image.Resampling.LANCZOS)
    width, height = reference_size(*image.size)
    left, top = (image.size[0] - width) // 2, (image.size[1] - height) // 2
    image = image.crop((left, top, left + width, top + height))
    return image.convert("RGB")


def to_pixels(image: Image.Image) -> torch.Tensor:
    """(1, 3, H, W) in [-1, 1] (value / 255 · 2 − 1)."""
    array = np.asarray(image, dtype=np.float32) / 255.0
    return torch.from_numpy(array * 2.0 - 1.0).permute(2, 0, 1)[None].contiguous()


@dataclass(frozen=True)
class References:
    tokens: torch.Tensor  # (1, L_ref, 128): repeat along the batch as needed
    ids: torch.Tensor  # (1, L_ref, 4)
    sizes: tuple[tuple[int, int], ...]  # each reference's (width, height) as encoded


def reference_tokens(vae, images: Sequence[tuple[str, Image.Image]], device, dtype) -> References:
    """The references (path, image) encoded by the FLUX.2 autoencoder `vae`, packed and concatenated, with their
    position ids (t = 10, 20, ...)."""
    tokens, sizes, latent_sizes = [], [], []
    for path, image in images:
        check_reference(path, image.size)
        prepared = prepare(image)
        pixels = to_pixels(prepared).to(device, dtype)
        latent = vae_tiling.encode(vae, pixels)  # (1, 128, H/16, W/16); tiled only if memory is short
        tokens.append(flux2.pack(latent))
        sizes.append(prepared.size)
        latent_sizes.append(tuple(latent.shape[-2:]))
    return References(torch.cat(tokens, dim=1), flux2.reference_ids(1, latent_sizes).to(device), tuple(sizes))
