"""The FLUX.1 transformer (BFL tensor names), every dimension read off the weights."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from engine import ops
from engine.weights import count_indexed


@dataclass(frozen=True)
class FluxParams:
    in_channels: int  # 64: 16 latent channels × a 2×2 patch
    context_in_dim: int  # 4096: T5-XXL's width
    vec_in_dim: int  # 768: CLIP-L's pooled width
    hidden_size: int
    mlp_hidden: int
    num_heads: int
    depth: int  # double-stream blocks
    depth_single: int
    axes_dim: tuple[int, ...]
    guidance_embed: bool
    qkv_bias: bool
    theta: int = 10_000

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @classmethod
    def from_shapes(cls, shapes: dict[str, tuple[int, ...]]) -> FluxParams:
        hidden, in_channels = shapes["img_in.weight"]
        head_dim = shapes["double_blocks.0.img_attn.norm.query_norm.scale"][0]
        rope = (7 * head_dim // 16) // 2 * 2
        return cls(
            in_channels=in_channels,
            context_in_dim=shapes["txt_in.weight"][1],
            vec_in_dim=shapes["vector_in.in_layer.weight"][1],
            hidden_size=hidden,
            mlp_hidden=shapes["double_blocks.0.img_mlp.0.weight"][0],
            num_heads=hidden // head_dim,
            depth=count_indexed(shapes, "double_blocks."),
            depth_single=count_indexed(shapes, "single_blocks."),
            axes_dim=(head_dim - 2 * rope, rope, rope),
            guidance_embed="guidance_in.in_layer.weight" in shapes,
            qkv_bias="double_blocks.0.img_attn.qkv.bias" in shapes,
        )


# ---- pure functions: embeddings, RoPE, attention ----


def timestep_embedding(t: torch.Tensor, dim: int = 256, max_period: float = 10_000.0) -> torch.Tensor:
    """Sinusoidal embedding of t×1000, cos half first."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = (t.float() * 1000.0)[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def rope(pos: torch.Tensor, dim: int, theta: int) -> torch.Tensor:
    """Unit complex rotations (…, n, dim/2) for positions `pos` (…, n) along one axis."""
    omega = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64, device=pos.device) / dim)
    angles = pos.to(torch.float64)[..., None] * omega
    return torch.polar(torch.ones_like(angles), angles).to(torch.complex64)


def position_embedding(ids: torch.Tensor, axes_dim: tuple[int, ...], theta: int) -> torch.Tensor:
    """RoPE for (batch, n, axes) ids: complex (batch, 1, n, head_dim/2)."""
    parts = [rope(ids[..., i], d, theta) for i, d in enumerate(axes_dim)]
    return torch.cat(parts, dim=-1).unsqueeze(1)


def apply_rope(x: torch.Tensor, pe: torch.Tensor) -> torch.Tensor:
    """Rotate each (even, odd) pair of features by its position's angle: one complex multiply."""
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))
    return torch.view_as_real(pairs * pe).flatten(-2).type_as(x)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pe: torch.Tensor) -> torch.Tensor:
    """(B, H, L, D) in, (B, L, H·D) out."""
    q, k = apply_rope(q, pe), apply_rope(k, pe)
    out = F.scaled_dot_product_attention(q, k, v)
    return out.transpose(1, 2).flatten(2)


def split_heads(qkv: torch.Tensor, num_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, L, 3·H·D) → three (B, H, L, D)."""
    q, k, v = qkv.unflatten(-1, (3, num_heads, -1)).permute(2, 0, 3, 1, 4)
    return q, k, v


def fp16_safe(x: torch.Tensor) -> torch.Tensor:
    """fp16's range ends at 65504 and FLUX's residual stream goes past it: saturate instead of inf/NaN
    (black images). A no-op in bf16 and fp32."""
    if x.dtype != torch.float16:
        return x
    return torch.nan_to_num(x, nan=0.0, posinf=65504.0, neginf=-65504.0)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return torch.addcmul(shift, x, 1 + scale)


# ---- modules ----


class MLPEmbedder(nn.Module):
    def __init__(self, in_dim: int, hidden: int):
        super().__init__()
        self.in_layer = ops.Linear(in_dim, hidden)
        self.out_layer = ops.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_layer(F.silu(self.in_layer(x)))


class RMSNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)
        return normed.to(x.dtype) * self.scale.to(x.dtype)


class QKNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.query_norm = RMSNorm(dim)
        self.key_norm = RMSNorm(dim)


class SelfAttention(nn.Module):
    def __init__(self, p: FluxParams):
        super().__init__()
        self.qkv = ops.Linear(p.hidden_size, 3 * p.hidden_size, bias=p.qkv_bias)
        self.norm = QKNorm(p.head_dim)
        self.proj = ops.Linear(p.hidden_size, p.hidden_size)

    def qkv_heads(self, x: torch.Tensor, num_heads: int):
        q, k, v = split_heads(self.qkv(x), num_heads)
        return self.norm.query_norm(q), self.norm.key_norm(k), v


class Modulation(nn.Module):
    def __init__(self, hidden: int, parts: int):
        super().__init__()
        self.parts = parts
        self.lin = ops.Linear(hidden, parts * hidden)

    def forward(self, vec: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.lin(F.silu(vec))[:, None, :].chunk(self.parts, dim=-1)


def _layer_norm(x: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:], eps=1e-6)


def _mlp(p: FluxParams) -> nn.Sequential:
    return nn.Sequential(
        ops.Linear(p.hidden_size, p.mlp_hidden),
        nn.GELU(approximate="tanh"),
        ops.Linear(p.mlp_hidden, p.hidden_size),
    )


class DoubleStreamBlock(nn.Module):
    def __init__(self, p: FluxParams):
        super().__init__()
        self.num_heads = p.num_heads
        self.img_mod, self.img_attn, self.img_mlp = Modulation(p.hidden_size, 6), SelfAttention(p), _mlp(p)
        self.txt_mod, self.txt_attn, self.txt_mlp = Modulation(p.hidden_size, 6), SelfAttention(p), _mlp(p)

    def forward(self, img, txt, vec, pe):
        img_mod = self.img_mod(vec)
        txt_mod = self.txt_mod(vec)
        iq, ik, iv = self.img_attn.qkv_heads(
            modulate(_layer_norm(img), img_mod[0], img_mod[1]), self.num_heads
        )
        tq, tk, tv = self.txt_attn.qkv_heads(
            modulate(_layer_norm(txt), txt_mod[0], txt_mod[1]), self.num_heads
        )
        attn = attention(torch.cat((tq, iq), 2), torch.cat((tk, ik), 2), torch.cat((tv, iv), 2), pe)
        txt_attn, img_attn = attn[:, : txt.shape[1]], attn[:, txt.shape[1] :]
        img = torch.addcmul(img, img_mod[2], self.img_attn.proj(img_attn))
        img = torch.addcmul(img, img_mod[5], self.img_mlp(modulate(_layer_norm(img), img_mod[3], img_mod[4])))
        txt = torch.addcmul(txt, txt_mod[2], self.txt_attn.proj(txt_attn))
        txt = torch.addcmul(txt, txt_mod[5], self.txt_mlp(modulate(_layer_norm(txt), txt_mod[3], txt_mod[4])))
        return fp16_safe(img), fp16_safe(txt)


class SingleStreamBlock(nn.Module):
    def __init__(self, p: FluxParams):
        super().__init__()
        self.num_heads = p.num_heads
        self.split = [3 * p.hidden_size, p.mlp_hidden]
        self.linear1 = ops.Linear(p.hidden_size, 3 * p.hidden_size + p.mlp_hidden)
        self.linear2 = ops.Linear(p.hidden_size + p.mlp_hidden, p.hidden_size)
        self.norm = QKNorm(p.head_dim)
        self.modulation = Modulation(p.hidden_size, 3)

    def forward(self, x, vec, pe):
        shift, scale, gate = self.modulation(vec)
        # linear1 as two products over row blocks of its weight: contiguous outputs, no split copies
        weight, bias = self.linear1.fetch(x)
        x_mod = modulate(_layer_norm(x), shift, scale)
        qkv = F.linear(x_mod, weight[: self.split[0]], None if bias is None else bias[: self.split[0]])
        mlp = F.linear(x_mod, weight[self.split[0] :], None if bias is None else bias[self.split[0] :])
        q, k, v = split_heads(qkv, self.num_heads)
        attn = attention(self.norm.query_norm(q), self.norm.key_norm(k), v, pe)
        # linear2 over cat(attn, gelu(mlp)) as two products summed in place: no concatenated copy
        weight2, bias2 = self.linear2.fetch(x)
        hidden = self.split[0] // 3
        out = F.linear(attn, weight2[:, :hidden], bias2)
        mlp = F.gelu(mlp, approximate="tanh")
        out = torch.addmm(out.flatten(0, 1), mlp.flatten(0, 1), weight2[:, hidden:].t()).view_as(out)
        return fp16_safe(torch.addcmul(x, gate, out))


class LastLayer(nn.Module):
    def __init__(self, p: FluxParams):
        super().__init__()
        self.linear = ops.Linear(p.hidden_size, p.in_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), ops.Linear(p.hidden_size, 2 * p.hidden_size))

    def forward(self, x, vec):
        shift, scale = self.adaLN_modulation(vec)[:, None, :].chunk(2, dim=-1)
        return self.linear(modulate(_layer_norm(x), shift, scale))


class Flux(nn.Module):
    def __init__(self, p: FluxParams):
        super().__init__()
        self.params = p
        self.img_in = ops.Linear(p.in_channels, p.hidden_size)
        self.time_in = MLPEmbedder(256, p.hidden_size)
        self.vector_in = MLPEmbedder(p.vec_in_dim, p.hidden_size)
        self.guidance_in = MLPEmbedder(256, p.hidden_size) if p.guidance_embed else None
        self.txt_in = ops.Linear(p.context_in_dim, p.hidden_size)
        self.double_blocks = nn.ModuleList(DoubleStreamBlock(p) for _ in range(p.depth))
        self.single_blocks = nn.ModuleList(SingleStreamBlock(p) for _ in range(p.depth_single))
        self.final_layer = LastLayer(p)

    def forward(
        self,
        img: torch.Tensor,  # (B, L_img, 64) packed latent
        img_ids: torch.Tensor,  # (B, L_img, 3)
        txt: torch.Tensor,  # (B, L_txt, 4096) T5 states
        txt_ids: torch.Tensor,  # (B, L_txt, 3)
        timesteps: torch.Tensor,  # (B,) in [0, 1]
        y: torch.Tensor,  # (B, 768) CLIP pooled
        guidance: torch.Tensor | None = None,  # (B,)
        pe: torch.Tensor | None = None,  # position_embedding of cat(txt_ids, img_ids), to reuse across steps
    ) -> torch.Tensor:
        dtype = img.dtype
        vec = self.time_in(timestep_embedding(timesteps).to(dtype))
        if self.guidance_in is not None:
            if guidance is None:
                raise ValueError("this transformer has a guidance embedding: pass guidance")
            vec = vec + self.guidance_in(timestep_embedding(guidance).to(dtype))
        vec = vec + self.vector_in(y)
        img = self.img_in(img)
        txt = self.txt_in(txt)
        if pe is None:
            pe = position_embedding(torch.cat((txt_ids, img_ids), 1), self.params.axes_dim, self.params.theta)
        for block in self.double_blocks:
            img, txt = block(img, txt, vec, pe)
        x = torch.cat((txt, img), 1)
        for block in self.single_blocks:
            x = block(x, vec, pe)
        return self.final_layer(x[:, txt.shape[1] :], vec)
