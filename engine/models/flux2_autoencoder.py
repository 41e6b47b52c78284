"""The FLUX.2 autoencoder (BFL names), every dimension read off the weights.

FLUX.1's encoder and decoder (engine/models/autoencoder.py) with 32 latent channels and two 1×1 convolutions
(`encoder.quant_conv` after the encoder, `decoder.post_quant_conv` before the decoder). The transformer sees
the latent patched 2×2 into 128 channels (16× down-sampling in all) and normalised per channel by batch-norm
statistics stored in the file (`bn.running_mean`, `bn.running_var`; no scale/shift constants as in FLUX.1):
latent = (patch(mean) − running_mean) / sqrt(running_var + 1e-4).
"""

from __future__ import annotations

import torch
from torch import nn

from engine.models.autoencoder import AutoEncoderParams, Decoder, Encoder
from engine.runtime import ops

BN_EPS = 1e-4  # not in the file: BFL's bn_eps and diffusers' batch_norm_eps
PATCH = 2


def canonical_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """BFL's names from either layout in circulation: top-level `quant_conv.*`/`post_quant_conv.*` (as
    ComfyUI's loader renames them) become `encoder.quant_conv.*`/`decoder.post_quant_conv.*`; the batch
    norm's step counter, which nothing reads, is dropped."""
    out = {}
    for name, tensor in state.items():
        if name.startswith("quant_conv."):
            name = "encoder." + name
        elif name.startswith("post_quant_conv."):
            name = "decoder." + name
        elif name == "bn.num_batches_tracked":
            continue
        out[name] = tensor
    return out


def is_flux2_autoencoder(names) -> bool:
    return "bn.running_mean" in names


def patch(z: torch.Tensor) -> torch.Tensor:
    """(B, C, 2H, 2W) → (B, 4C, H, W), the 2×2 patch fastest: channel c·4 + 2·pi + pj."""
    b, c, h, w = z.shape
    z = z.reshape(b, c, h // PATCH, PATCH, w // PATCH, PATCH).permute(0, 1, 3, 5, 2, 4)
    return z.reshape(b, c * PATCH * PATCH, h // PATCH, w // PATCH)


def unpatch(z: torch.Tensor) -> torch.Tensor:
    """Inverse of `patch`."""
    b, c, h, w = z.shape
    z = z.reshape(b, c // (PATCH * PATCH), PATCH, PATCH, h, w).permute(0, 1, 4, 2, 5, 3)
    return z.reshape(b, c // (PATCH * PATCH), h * PATCH, w * PATCH)


class Flux2Encoder(Encoder):
    def __init__(self, p: AutoEncoderParams):
        super().__init__(p)
        self.quant_conv = ops.Conv2d(2 * p.z_channels, 2 * p.z_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.quant_conv(super().forward(x))


class Flux2Decoder(Decoder):
    def __init__(self, p: AutoEncoderParams):
        super().__init__(p)
        self.post_quant_conv = ops.Conv2d(p.z_channels, p.z_channels, 1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return super().forward(self.post_quant_conv(z))


class LatentNorm(nn.Module):
    """The batch-norm statistics of the patched latent (running_mean, running_var: 128 each), kept in float32."""

    def __init__(self, channels: int):
        super().__init__()
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))

    def _stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean = self.running_mean.float().view(1, -1, 1, 1)
        std = torch.sqrt(self.running_var.float().view(1, -1, 1, 1) + BN_EPS)
        return mean.to(like.device, like.dtype), std.to(like.device, like.dtype)

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        mean, std = self._stats(z)
        return (z - mean) / std

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        mean, std = self._stats(z)
        return z * std + mean


class Flux2AutoEncoder(nn.Module):
    def __init__(self, p: AutoEncoderParams):
        super().__init__()
        self.params = p
        self.encoder = Flux2Encoder(p)
        self.decoder = Flux2Decoder(p)
        self.bn = LatentNorm(PATCH * PATCH * p.z_channels)

    @property
    def latent_channels(self) -> int:
        """What the transformer sees per token: 128 for 32 latent channels."""
        return PATCH * PATCH * self.params.z_channels

    @property
    def downscale(self) -> int:
        """Pixels per latent token along each side: 16 (8 by the encoder, 2 by the patch)."""
        return PATCH * 2 ** (len(self.params.ch_mult) - 1)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Image in [-1, 1], (B, 3, H, W) → normalised patched latent (B, 128, H/16, W/16), the posterior's mean
        (deterministic)."""
        mean = self.encoder(x).chunk(2, dim=1)[0]
        return self.bn.normalize(patch(mean))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Normalised patched latent → image in about [-1, 1]."""
        return self.decoder(unpatch(self.bn.denormalize(z)))
