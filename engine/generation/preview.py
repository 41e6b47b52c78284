"""Live previews: a 16→RGB linear map fitted to the autoencoder once, then one small matrix product a step."""

from __future__ import annotations

import torch
from torch import nn

from engine.contract.events import Preview
from engine.generation import sampling


def fit_projection(vae: nn.Module, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Decode a few random latents, average each decoded 8×8 patch (16×16 for FLUX.2, whose latent pixels are
    2×2-patched), solve least squares: (channels + 1, 3), the last row the bias (FLUX.1: 17, FLUX.2: 129)."""
    generator = torch.Generator().manual_seed(0)
    channels = getattr(vae, "latent_channels", vae.params.z_channels)  # FLUX.2's: 128 patched channels
    count = max(4, 8 * (channels + 1) // 64)  # at least 8 samples (8×8 pixels each) per unknown: 4 for FLUX.1
    latents = torch.randn(count, channels, 8, 8, generator=generator)
    with torch.inference_mode():
        images = vae.decode(latents.to(device, dtype)).float().cpu()
    factor = images.shape[-1] // latents.shape[-1]
    rgb = torch.nn.functional.avg_pool2d(images, factor).permute(0, 2, 3, 1).reshape(-1, 3)
    flat = latents.permute(0, 2, 3, 1).reshape(-1, latents.shape[1])
    return torch.linalg.lstsq(torch.cat([flat, torch.ones(len(rgb), 1)], 1), rgb).solution


def preview(report: sampling.StepReport, projection: torch.Tensor, height: int, width: int) -> Preview:
    """The first image of the batch, as the step sees it, at 1/8 of the size: 8-bit RGB bytes."""
    latent = sampling.unpack(report.denoised[:1].cpu(), height, width)[0]  # (16, h, w)
    flat = torch.cat(
        [latent.permute(1, 2, 0).reshape(-1, latent.shape[0]), torch.ones(latent[0].numel(), 1)], 1
    )
    rgb = ((flat @ projection).clamp(-1, 1) + 1) * 127.5
    return Preview(report.step, width // 8, height // 8, rgb.round().to(torch.uint8).numpy().tobytes())


def latent_preview(step: int, latent: torch.Tensor, projection: torch.Tensor) -> Preview:
    """A (channels, h, w) latent through the projection: one RGB pixel per latent pixel."""
    h, w = latent.shape[-2:]
    flat = torch.cat([latent.permute(1, 2, 0).reshape(-1, latent.shape[0]), torch.ones(h * w, 1)], 1)
    rgb = ((flat @ projection).clamp(-1, 1) + 1) * 127.5
    return Preview(step, w, h, rgb.round().to(torch.uint8).numpy().tobytes())
