"""Latents to 8-bit images: one image of the batch at a time through the (tiled) autoencoder, so a batch never
holds float pixels; an image holding NaN/infinity stops the job with its likely cause."""

from __future__ import annotations

import torch
from PIL import Image
from torch import nn

from engine.contract.errors import UserError
from engine.contract.events import EventSink, Message
from engine.generation import sampling, vae_tiling
from engine.generation.plan import Plan


def decode(vae: nn.Module, latents: torch.Tensor, plan: Plan, on_event: EventSink) -> list[Image.Image]:
    """Packed latents (batch, L_img, 64) → one PIL image each."""
    request = plan.request
    images = []
    with torch.inference_mode():
        unpacked = sampling.unpack(latents, request.height, request.width).to(plan.support)
        for i in range(unpacked.shape[0]):
            pixels = vae_tiling.decode(vae, unpacked[i : i + 1], on_message=lambda t: on_event(Message(t)))
            images += checked_images(pixels, plan)
    return images


def checked_images(pixels: torch.Tensor, plan: Plan) -> list[Image.Image]:
    """Decoded [-1, 1] pixels as 8-bit images, after refusing NaN/infinity with its likely cause."""
    pixels = pixels.float().cpu()
    if not bool(torch.isfinite(pixels).all()):
        raise UserError(
            f"The decoded image holds NaN/infinity: the likely cause is the autoencoder file "
            f"{plan.files.components['vae'].file.path} (damaged weights: download it again, or use "
            "--dtype fp32)."
        )
    return to_images(pixels)


def to_images(pixels: torch.Tensor) -> list[Image.Image]:
    """[-1, 1] float images → 8-bit PIL images (rounded, as diffusers does)."""
    arrays = ((pixels / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(a) for a in arrays]
