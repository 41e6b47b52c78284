"""The FLUX autoencoder (BFL ae.safetensors names), every dimension read off the weights."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from engine.formats.weights import count_indexed
from engine.runtime import ops

# Not stored in the file: the published constants of FLUX.1's autoencoder.
SCALE_FACTOR = 0.3611
SHIFT_FACTOR = 0.1159


@dataclass(frozen=True)
class AutoEncoderParams:
    in_channels: int  # 3
    ch: int
    ch_mult: tuple[int, ...]
    num_res_blocks: int
    z_channels: int  # 16
    out_ch: int  # 3

    @classmethod
    def from_shapes(cls, shapes: dict[str, tuple[int, ...]]) -> AutoEncoderParams:
        ch, in_channels = shapes["encoder.conv_in.weight"][:2]
        levels = count_indexed(shapes, "encoder.down.")
        ch_mult = tuple(shapes[f"encoder.down.{i}.block.0.conv1.weight"][0] // ch for i in range(levels))
        blocks = count_indexed(shapes, "encoder.down.0.block.")
        return cls(
            in_channels=in_channels,
            ch=ch,
            ch_mult=ch_mult,
            num_res_blocks=blocks,
            z_channels=shapes["decoder.conv_in.weight"][1],
            out_ch=shapes["decoder.conv_out.weight"][0],
        )


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, channels, eps=1e-6, affine=True)


class AttnBlock(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.norm = _norm(c)
        self.q, self.k, self.v, self.proj_out = (ops.Conv2d(c, c, 1) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        n = self.norm(x)
        q, k, v = (layer(n).reshape(b, 1, c, h * w).transpose(2, 3) for layer in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)
        return x + self.proj_out(out.transpose(2, 3).reshape(b, c, h, w))


class ResnetBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.norm1 = _norm(c_in)
        self.conv1 = ops.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2 = _norm(c_out)
        self.conv2 = ops.Conv2d(c_out, c_out, 3, padding=1)
        self.nin_shortcut = ops.Conv2d(c_in, c_out, 1) if c_in != c_out else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.nin_shortcut is None else self.nin_shortcut(x)) + h


class Downsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = ops.Conv2d(c, c, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = ops.Conv2d(c, c, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    def __init__(self, blocks: list[nn.Module]):
        super().__init__()
        self.block = nn.ModuleList(blocks)


class Mid(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.block_1 = ResnetBlock(c, c)
        self.attn_1 = AttnBlock(c)
        self.block_2 = ResnetBlock(c, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nn.Module):
    def __init__(self, p: AutoEncoderParams):
        super().__init__()
        widths = [p.ch * m for m in p.ch_mult]
        self.conv_in = ops.Conv2d(p.in_channels, p.ch, 3, padding=1)
        self.down = nn.ModuleList()
        c_in = p.ch
        for i, c_out in enumerate(widths):
            level = Level([ResnetBlock(c_in if j == 0 else c_out, c_out) for j in range(p.num_res_blocks)])
            if i != len(widths) - 1:
                level.downsample = Downsample(c_out)
            self.down.append(level)
            c_in = c_out
        self.mid = Mid(c_in)
        self.norm_out = _norm(c_in)
        self.conv_out = ops.Conv2d(c_in, 2 * p.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            for block in level.block:
                h = block(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, p: AutoEncoderParams):
        super().__init__()
        widths = [p.ch * m for m in p.ch_mult]
        c_in = widths[-1]
        self.conv_in = ops.Conv2d(p.z_channels, c_in, 3, padding=1)
        self.mid = Mid(c_in)
        levels: list[Level] = []
        for i in reversed(range(len(widths))):
            c_out = widths[i]
            level = Level(
                [ResnetBlock(c_in if j == 0 else c_out, c_out) for j in range(p.num_res_blocks + 1)]
            )
            if i != 0:
                level.upsample = Upsample(c_out)
            levels.insert(0, level)
            c_in = c_out
        self.up = nn.ModuleList(levels)
        self.norm_out = _norm(c_in)
        self.conv_out = ops.Conv2d(c_in, p.out_ch, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            for block in level.block:
                h = block(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class AutoEncoder(nn.Module):
    def __init__(self, p: AutoEncoderParams):
        super().__init__()
        self.params = p
        self.encoder = Encoder(p)
        self.decoder = Decoder(p)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Image in [-1, 1] → scaled latent (the distribution's mean: deterministic)."""
        mean = self.encoder(x).chunk(2, dim=1)[0]
        return (mean - SHIFT_FACTOR) * SCALE_FACTOR

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Scaled latent → image in about [-1, 1]."""
        return self.decoder(z / SCALE_FACTOR + SHIFT_FACTOR)
