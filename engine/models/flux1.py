"""The FLUX.1 transformer (BFL tensor names), every dimension read off the weights.

Seams for the models built on it: `in_channels`/`out_channels` differ for Fill/Canny/Depth (conditioning
channels concatenated to the image tokens: `img_cond`), Kontext adds reference image tokens with their own
position ids (`ref_img`/`ref_ids`), ControlNets add per-block residuals to the image tokens (`control`), and
`streamable_blocks` tells the memory manager what it may stream.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from engine.formats.weights import count_indexed
from engine.runtime import ops


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
    out_channels: int = 64  # the packed latent the model predicts; in_channels is larger for Fill/Canny/Depth

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
            out_channels=shapes["final_layer.linear.weight"][0],
        )


class StepCache(Protocol):
    """Decides, per step, whether the blocks after the first must run or an earlier step's result is reused
    (engine.generation.step_cache). `rest(rows, img, txt)` runs them for some batch rows; `head_residual` is what
    the first block added to the image stream."""

    def run(
        self,
        head_residual: torch.Tensor,
        img: torch.Tensor,
        txt: torch.Tensor,
        rest: Callable[[slice, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    ) -> tuple[torch.Tensor, torch.Tensor]: ...


# ---- the token layout: latents as 2×2 patches, row by row ----


def pack(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) → (B, H/2·W/2, C·4), the 2×2 patch as the fastest axes."""
    b, c, h, w = x.shape
    return (
        x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)
    )


def unpack(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Tokens back to (B, 16, H/8, W/8) for an image of height × width pixels."""
    b, _, d = x.shape
    h, w = height // 16, width // 16
    return x.reshape(b, h, w, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, d // 4, h * 2, w * 2)


def image_ids(batch: int, height: int, width: int) -> torch.Tensor:
    """(0, row, col) per 2×2 latent patch."""
    h, w = height // 16, width // 16
    ids = torch.zeros(h, w, 3)
    ids[..., 1] = torch.arange(h)[:, None]
    ids[..., 2] = torch.arange(w)[None, :]
    return ids.reshape(1, h * w, 3).expand(batch, -1, -1)


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
    # a LoRA's replacement scale (BFL's control LoRAs), set and cleared by engine/formats/lora: (like) → scale
    scale_patch: Callable[[torch.Tensor], torch.Tensor] | None = None

    def __init__(self, dim: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)
        scale = self.scale if self.scale_patch is None else self.scale_patch(x)
        return normed.to(x.dtype) * scale.to(x.dtype)


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


@dataclass(frozen=True)
class ModulationOut:
    """One adaptive layer norm's parameters, (B, 1, hidden) each: x → x·(1 + scale) + shift, output × gate."""

    shift: torch.Tensor
    scale: torch.Tensor
    gate: torch.Tensor

    def modulate(self, x: torch.Tensor) -> torch.Tensor:
        return modulate(_layer_norm(x), self.shift, self.scale)

    def gated_add(self, residual: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return torch.addcmul(residual, self.gate, out)


class Modulation(nn.Module):
    """Modulation for one stream: one ModulationOut (single blocks) or two (attention, then MLP)."""

    def __init__(self, hidden: int, double: bool):
        super().__init__()
        self.count = 2 if double else 1
        self.lin = ops.Linear(hidden, 3 * self.count * hidden)

    def forward(self, vec: torch.Tensor) -> list[ModulationOut]:
        parts = self.lin(F.silu(vec))[:, None, :].chunk(3 * self.count, dim=-1)
        return [ModulationOut(*parts[3 * i : 3 * i + 3]) for i in range(self.count)]


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
        self.img_mod, self.img_attn, self.img_mlp = Modulation(p.hidden_size, True), SelfAttention(p), _mlp(p)
        self.txt_mod, self.txt_attn, self.txt_mlp = Modulation(p.hidden_size, True), SelfAttention(p), _mlp(p)

    def forward(self, img, txt, vec, pe):
        return double_stream(self, img, txt, self.img_mod(vec), self.txt_mod(vec), pe)


def double_stream(block: nn.Module, img, txt, img_mods: Sequence[ModulationOut], txt_mods, pe):
    """A double block's two streams (FLUX.1 and FLUX.2 alike): joint attention over text and image, then each
    stream's MLP, each gated into its residual. `block` has img_/txt_attn (qkv_heads, proj), img_/txt_mlp and
    num_heads; the mods are (attention, MLP) ModulationOut pairs."""
    (img_attn_mod, img_mlp_mod), (txt_attn_mod, txt_mlp_mod) = img_mods, txt_mods
    iq, ik, iv = block.img_attn.qkv_heads(img_attn_mod.modulate(img), block.num_heads)
    tq, tk, tv = block.txt_attn.qkv_heads(txt_attn_mod.modulate(txt), block.num_heads)
    attn = attention(torch.cat((tq, iq), 2), torch.cat((tk, ik), 2), torch.cat((tv, iv), 2), pe)
    txt_attn, img_attn = attn[:, : txt.shape[1]], attn[:, txt.shape[1] :]
    img = img_attn_mod.gated_add(img, block.img_attn.proj(img_attn))
    img = img_mlp_mod.gated_add(img, block.img_mlp(img_mlp_mod.modulate(img)))
    txt = txt_attn_mod.gated_add(txt, block.txt_attn.proj(txt_attn))
    txt = txt_mlp_mod.gated_add(txt, block.txt_mlp(txt_mlp_mod.modulate(txt)))
    return fp16_safe(img), fp16_safe(txt)


class SingleStreamBlock(nn.Module):
    def __init__(self, p: FluxParams):
        super().__init__()
        self.num_heads = p.num_heads
        self.split = [3 * p.hidden_size, p.mlp_hidden]
        self.linear1 = ops.Linear(p.hidden_size, 3 * p.hidden_size + p.mlp_hidden)
        self.linear2 = ops.Linear(p.hidden_size + p.mlp_hidden, p.hidden_size)
        self.norm = QKNorm(p.head_dim)
        self.modulation = Modulation(p.hidden_size, False)

    def forward(self, x, vec, pe):
        (mod,) = self.modulation(vec)
        qkv, mlp = self.linear1.forward_split(mod.modulate(x), self.split)
        q, k, v = split_heads(qkv, self.num_heads)
        attn = attention(self.norm.query_norm(q), self.norm.key_norm(k), v, pe)
        out = self.linear2.forward_concat((attn, F.gelu(mlp, approximate="tanh")))
        return fp16_safe(mod.gated_add(x, out))


class LastLayer(nn.Module):
    """The output projection after an adaptive layer norm (FLUX.2's has no biases)."""

    def __init__(self, p: FluxParams, bias: bool = True):
        super().__init__()
        self.linear = ops.Linear(p.hidden_size, p.out_channels, bias=bias)
        self.adaLN_modulation = nn.Sequential(
            nn.SiLU(), ops.Linear(p.hidden_size, 2 * p.hidden_size, bias=bias)
        )

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

    def streamable_blocks(self) -> list[nn.Module]:
        """The repeated blocks, in the order they run: the memory manager streams these."""
        return [*self.double_blocks, *self.single_blocks]

    def forward(
        self,
        img: torch.Tensor,  # (B, L_img, 64) packed latent
        img_ids: torch.Tensor,  # (B, L_img, 3)
        txt: torch.Tensor,  # (B, L_txt, 4096) T5 states
        txt_ids: torch.Tensor,  # (B, L_txt, 3)
        timesteps: torch.Tensor,  # (B,) in [0, 1]
        y: torch.Tensor,  # (B, 768) CLIP pooled
        guidance: torch.Tensor | None = None,  # (B,)
        pe: torch.Tensor | None = None,  # RoPE of cat(txt_ids, img_ids, ref_ids), reused across steps
        img_cond: torch.Tensor | None = None,  # (B, L_img, in_channels - 64): Fill/Canny/Depth conditioning
        ref_img: torch.Tensor | None = None,  # (B, L_ref, 64): Kontext reference tokens (attended only)
        ref_ids: torch.Tensor | None = None,  # (B, L_ref, 3)
        control: ControlResiduals | None = None,
        cache: StepCache | None = None,  # may reuse the blocks after the first from an earlier step
    ) -> torch.Tensor:
        """The predicted velocity for the L_img image tokens, (B, L_img, out_channels)."""
        dtype = img.dtype
        n_img = img.shape[1]
        if img_cond is not None:
            img = torch.cat((img, img_cond), dim=-1)
        if ref_img is not None:
            img, img_ids = torch.cat((img, ref_img), 1), torch.cat((img_ids, ref_ids), 1)
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
        head_in = img
        img, txt = self.double_blocks[0](img, txt, vec, pe)
        head_residual = img - head_in if cache is not None else None
        if control is not None:
            img = control.add_double(0, img, n_img)

        def rest(rows: slice, img: torch.Tensor, txt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            """Every block after the first, for the batch rows `rows`."""
            sub_pe = pe if pe.shape[0] == 1 else pe[rows]
            sub_control = None if control is None else control.rows(rows)
            return self._after_head(img, txt, vec[rows], sub_pe, sub_control, n_img)

        if cache is None:
            img, txt = rest(slice(None), img, txt)
        else:
            img, txt = cache.run(head_residual, img, txt, rest)
        return self.final_layer(img[:, :n_img], vec)

    def _after_head(self, img, txt, vec, pe, control: ControlResiduals | None, n_img: int):
        for i, block in enumerate(self.double_blocks[1:], start=1):
            img, txt = block(img, txt, vec, pe)
            if control is not None:
                img = control.add_double(i, img, n_img)
        x = torch.cat((txt, img), 1)
        n_txt = txt.shape[1]
        for i, block in enumerate(self.single_blocks):
            x = block(x, vec, pe)
            if control is not None:
                x = control.add_single(i, x, n_txt, n_img)
        return x[:, n_txt:], x[:, :n_txt]


@dataclass(frozen=True)
class ControlResiduals:
    """Residuals a ControlNet adds to the image tokens after each double and each single block (None or a
    missing index: nothing for that block); (B, L_img, hidden) each."""

    double: Sequence[torch.Tensor | None] = ()
    single: Sequence[torch.Tensor | None] = ()

    def add_double(self, index: int, img: torch.Tensor, n_img: int) -> torch.Tensor:
        residual = self.double[index] if index < len(self.double) else None
        if residual is None:
            return img
        return torch.cat((img[:, :n_img] + residual.to(img.dtype), img[:, n_img:]), 1)

    def rows(self, rows: slice) -> ControlResiduals:
        """The residuals of some batch rows (a step cache computes only the rows it does not reuse)."""
        pick = lambda residuals: [None if r is None else r[rows] for r in residuals]  # noqa: E731
        return ControlResiduals(pick(self.double), pick(self.single))

    def add_single(self, index: int, x: torch.Tensor, n_txt: int, n_img: int) -> torch.Tensor:
        residual = self.single[index] if index < len(self.single) else None
        if residual is None:
            return x
        end = n_txt + n_img
        return torch.cat((x[:, :n_txt], x[:, n_txt:end] + residual.to(x.dtype), x[:, end:]), 1)
