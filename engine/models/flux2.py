"""The FLUX.2 transformer (BFL tensor names, as BFL's single files and ComfyUI's split files have them), every
dimension read off the weights, so klein 4B and 9B (base and distilled) and FLUX.2 [dev] load through one class.

What differs from FLUX.1 (engine/models/flux1.py): no biases anywhere; one modulation per stream shared by all
blocks (`double_stream_modulation_img/_txt`, `single_stream_modulation`) instead of one per block; a fused
SwiGLU MLP (`img_mlp.0` yields gate and value halves, silu(gate)·value); no pooled text vector (`vector_in`);
klein has no guidance embedding; 128 input channels (32 latent channels × a 2×2 patch, patched by the
autoencoder); RoPE over four axes (t, h, w, l) with theta 2000. Text tokens count along l, image tokens along
(h, w), reference images sit at t = 10, 20, ...
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from engine.contract import families
from engine.formats.weights import count_indexed
from engine.models.flux1 import (
    LastLayer,
    ModulationOut,
    QKNorm,
    StepCache,
    attention,
    double_stream,
    fp16_safe,
    position_embedding,
    split_heads,
    timestep_embedding,
)
from engine.runtime import ops

THETA = 2000  # not in the weights: BFL's Flux2Params and diffusers' rope_theta
ROPE_AXES = 4  # (t, h, w, l), head_dim split evenly: (32, 32, 32, 32) for head_dim 128
REFERENCE_TIME_SCALE = 10  # reference image i sits at t = 10 + 10·i (diffusers' _prepare_image_ids)


@dataclass(frozen=True)
class Flux2Params:
    in_channels: int  # 128: 32 latent channels × a 2×2 patch
    context_in_dim: int  # 3 × the text encoder's width: 7680 (klein 4B, Qwen3-4B), 12288 (9B, Qwen3-8B)
    hidden_size: int  # 3072 (4B), 4096 (9B), 6144 ([dev])
    mlp_hidden: int  # 3 × hidden
    num_heads: int
    depth: int  # double-stream blocks: 5 (4B), 8 (9B, [dev])
    depth_single: int  # 20 (4B), 24 (9B), 48 ([dev])
    axes_dim: tuple[int, ...]
    guidance_embed: bool  # [dev] has guidance_in; klein has not
    out_channels: int = 128
    theta: int = THETA

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @classmethod
    def from_shapes(cls, shapes: dict[str, tuple[int, ...]]) -> Flux2Params:
        hidden, in_channels = shapes["img_in.weight"]
        head_dim = shapes["double_blocks.0.img_attn.norm.query_norm.scale"][0]
        return cls(
            in_channels=in_channels,
            context_in_dim=shapes["txt_in.weight"][1],
            hidden_size=hidden,
            mlp_hidden=shapes["double_blocks.0.img_mlp.2.weight"][1],
            num_heads=hidden // head_dim,
            depth=count_indexed(shapes, "double_blocks."),
            depth_single=count_indexed(shapes, "single_blocks."),
            axes_dim=(head_dim // ROPE_AXES,) * ROPE_AXES,
            guidance_embed="guidance_in.in_layer.weight" in shapes,
            out_channels=shapes["final_layer.linear.weight"][0],
        )


# FLUX.2's transformer by its tensor names: in the contract, so that the TUI asks the same question without torch
is_flux2 = families.is_flux2


# ---- position ids and token packing (the layout the model was trained on) ----


def image_ids(batch: int, rows: int, cols: int, t: int = 0) -> torch.Tensor:
    """(batch, rows·cols, 4) ids (t, row, col, 0), row by row: the tokens of a (B, 128, rows, cols) latent."""
    row, col = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    ids = torch.stack([torch.full_like(row, t), row, col, torch.zeros_like(row)], dim=-1).reshape(-1, 4)
    return ids.unsqueeze(0).expand(batch, -1, -1)


def text_ids(batch: int, length: int) -> torch.Tensor:
    """(batch, length, 4) ids (0, 0, 0, position): text tokens count along the last axis."""
    ids = torch.zeros(length, 4, dtype=torch.long)
    ids[:, 3] = torch.arange(length)
    return ids.unsqueeze(0).expand(batch, -1, -1)


def reference_ids(batch: int, sizes: list[tuple[int, int]]) -> torch.Tensor:
    """Ids of reference latents of (rows, cols) each, in order, the i-th at t = 10 + 10·i."""
    parts = [image_ids(batch, r, c, REFERENCE_TIME_SCALE * (i + 1)) for i, (r, c) in enumerate(sizes)]
    return torch.cat(parts, dim=1)


def pack(latent: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) patched latent → (B, H·W, C) tokens, row by row."""
    return latent.flatten(2).transpose(1, 2)


def unpack(tokens: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """(B, rows·cols, C) → (B, C, rows, cols)."""
    return tokens.transpose(1, 2).unflatten(2, (rows, cols))


# ---- modules ----


class MLPEmbedder(nn.Module):
    def __init__(self, in_dim: int, hidden: int):
        super().__init__()
        self.in_layer = ops.Linear(in_dim, hidden, bias=False)
        self.out_layer = ops.Linear(hidden, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_layer(F.silu(self.in_layer(x)))


class SharedModulation(nn.Module):
    """One stream's modulation, computed once per step for every block: two ModulationOut (attention, MLP) for
    the double blocks' streams, one for the single blocks."""

    def __init__(self, hidden: int, double: bool):
        super().__init__()
        self.count = 2 if double else 1
        self.lin = ops.Linear(hidden, 3 * self.count * hidden, bias=False)

    def forward(self, vec: torch.Tensor) -> list[ModulationOut]:
        parts = self.lin(F.silu(vec))[:, None, :].chunk(3 * self.count, dim=-1)
        return [ModulationOut(*parts[3 * i : 3 * i + 3]) for i in range(self.count)]


class SwiGLUMLP(nn.Sequential):
    """`0` projects to a gate half and a value half, `2` back: out = W2·(silu(gate)·value). Named as BFL's
    nn.Sequential (the activation at index 1 has no weights)."""

    def __init__(self, hidden: int, mlp_hidden: int):
        super().__init__(
            ops.Linear(hidden, 2 * mlp_hidden, bias=False),
            nn.SiLU(),
            ops.Linear(mlp_hidden, hidden, bias=False),
        )
        self.mlp_hidden = mlp_hidden

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, value = self[0].forward_split(x, [self.mlp_hidden, self.mlp_hidden])
        return self[2](F.silu(gate) * value)


class SelfAttention(nn.Module):
    def __init__(self, p: Flux2Params):
        super().__init__()
        self.qkv = ops.Linear(p.hidden_size, 3 * p.hidden_size, bias=False)
        self.norm = QKNorm(p.head_dim)
        self.proj = ops.Linear(p.hidden_size, p.hidden_size, bias=False)

    def qkv_heads(self, x: torch.Tensor, num_heads: int):
        q, k, v = split_heads(self.qkv(x), num_heads)
        return self.norm.query_norm(q), self.norm.key_norm(k), v


@dataclass(frozen=True)
class Modulations:
    """Everything the blocks are modulated with in one step (shared by all blocks of a kind)."""

    img: list[ModulationOut]  # attention, MLP
    txt: list[ModulationOut]
    single: ModulationOut

    def rows(self, rows: slice) -> Modulations:
        pick = lambda m: ModulationOut(m.shift[rows], m.scale[rows], m.gate[rows])  # noqa: E731
        return Modulations([pick(m) for m in self.img], [pick(m) for m in self.txt], pick(self.single))


class DoubleStreamBlock(nn.Module):
    def __init__(self, p: Flux2Params):
        super().__init__()
        self.num_heads = p.num_heads
        self.img_attn, self.img_mlp = SelfAttention(p), SwiGLUMLP(p.hidden_size, p.mlp_hidden)
        self.txt_attn, self.txt_mlp = SelfAttention(p), SwiGLUMLP(p.hidden_size, p.mlp_hidden)

    def forward(self, img, txt, mods: Modulations, pe):
        return double_stream(self, img, txt, mods.img, mods.txt, pe)


class SingleStreamBlock(nn.Module):
    """Attention and the SwiGLU MLP in parallel: linear1 gives q, k, v, gate, value; linear2 takes the attention
    output and silu(gate)·value side by side."""

    def __init__(self, p: Flux2Params):
        super().__init__()
        self.num_heads = p.num_heads
        self.split = [3 * p.hidden_size, p.mlp_hidden, p.mlp_hidden]
        self.linear1 = ops.Linear(p.hidden_size, 3 * p.hidden_size + 2 * p.mlp_hidden, bias=False)
        self.linear2 = ops.Linear(p.hidden_size + p.mlp_hidden, p.hidden_size, bias=False)
        self.norm = QKNorm(p.head_dim)

    def forward(self, x, mod: ModulationOut, pe):
        qkv, gate, value = self.linear1.forward_split(mod.modulate(x), self.split)
        q, k, v = split_heads(qkv, self.num_heads)
        attn = attention(self.norm.query_norm(q), self.norm.key_norm(k), v, pe)
        out = self.linear2.forward_concat((attn, F.silu(gate) * value))
        return fp16_safe(mod.gated_add(x, out))


class Flux2(nn.Module):
    def __init__(self, p: Flux2Params):
        super().__init__()
        self.params = p
        self.img_in = ops.Linear(p.in_channels, p.hidden_size, bias=False)
        self.time_in = MLPEmbedder(256, p.hidden_size)
        self.guidance_in = MLPEmbedder(256, p.hidden_size) if p.guidance_embed else None
        self.txt_in = ops.Linear(p.context_in_dim, p.hidden_size, bias=False)
        self.double_stream_modulation_img = SharedModulation(p.hidden_size, True)
        self.double_stream_modulation_txt = SharedModulation(p.hidden_size, True)
        self.single_stream_modulation = SharedModulation(p.hidden_size, False)
        self.double_blocks = nn.ModuleList(DoubleStreamBlock(p) for _ in range(p.depth))
        self.single_blocks = nn.ModuleList(SingleStreamBlock(p) for _ in range(p.depth_single))
        self.final_layer = LastLayer(p, bias=False)

    def streamable_blocks(self) -> list[nn.Module]:
        """The repeated blocks, in the order they run: the memory manager streams these."""
        return [*self.double_blocks, *self.single_blocks]

    def position_embedding(self, ids: torch.Tensor) -> torch.Tensor:
        """RoPE of (B, n, 4) ids: pass `pe` of cat(txt_ids, img_ids, ref_ids) to reuse it across steps."""
        return position_embedding(ids, self.params.axes_dim, self.params.theta)

    def forward(
        self,
        img: torch.Tensor,  # (B, L_img, 128) packed, patched latent
        img_ids: torch.Tensor,  # (B, L_img, 4)
        txt: torch.Tensor,  # (B, L_txt, context_in_dim) stacked Qwen3 hidden states
        txt_ids: torch.Tensor,  # (B, L_txt, 4)
        timesteps: torch.Tensor,  # (B,) in [0, 1]
        guidance: torch.Tensor | None = None,  # (B,), only for a transformer with guidance_in ([dev])
        pe: torch.Tensor | None = None,  # RoPE of cat(txt_ids, img_ids, ref_ids), reused across steps
        ref_img: torch.Tensor | None = None,  # (B, L_ref, 128): reference image tokens (attended only)
        ref_ids: torch.Tensor | None = None,  # (B, L_ref, 4)
        cache: StepCache | None = None,  # may reuse the blocks after the first from an earlier step
    ) -> torch.Tensor:
        """The predicted velocity for the L_img image tokens, (B, L_img, out_channels)."""
        dtype = img.dtype
        n_img = img.shape[1]
        if ref_img is not None:
            img, img_ids = torch.cat((img, ref_img), 1), torch.cat((img_ids, ref_ids), 1)
        vec = self.time_in(timestep_embedding(timesteps).to(dtype))
        if self.guidance_in is not None:
            if guidance is None:
                raise ValueError("this transformer has a guidance embedding: pass guidance")
            vec = vec + self.guidance_in(timestep_embedding(guidance).to(dtype))
        (single,) = self.single_stream_modulation(vec)
        mods = Modulations(
            self.double_stream_modulation_img(vec), self.double_stream_modulation_txt(vec), single
        )
        img = self.img_in(img)
        txt = self.txt_in(txt)
        if pe is None:
            pe = self.position_embedding(torch.cat((txt_ids, img_ids), 1))
        head_in = img
        img, txt = self.double_blocks[0](img, txt, mods, pe)
        head_residual = img - head_in if cache is not None else None

        def rest(rows: slice, img: torch.Tensor, txt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            """Every block after the first, for the batch rows `rows`."""
            return self._after_head(img, txt, mods.rows(rows), pe if pe.shape[0] == 1 else pe[rows])

        if cache is None:
            img, txt = rest(slice(None), img, txt)
        else:
            img, txt = cache.run(head_residual, img, txt, rest)
        return self.final_layer(img[:, :n_img], vec)

    def _after_head(self, img, txt, mods: Modulations, pe):
        for block in self.double_blocks[1:]:
            img, txt = block(img, txt, mods, pe)
        x = torch.cat((txt, img), 1)
        for block in self.single_blocks:
            x = block(x, mods.single, pe)
        n_txt = txt.shape[1]
        return x[:, n_txt:], x[:, :n_txt]
