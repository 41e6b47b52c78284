"""FLUX.1 ControlNets in the layouts people download, every dimension read off the weights.

Two layouts, told apart by their tensor names (`layout_of`):

- "diffusers": InstantX's and Shakker-Labs' nets (`FluxControlNetModel`): `x_embedder`, `controlnet_x_embedder`,
  `context_embedder`, `time_text_embed.*`, `transformer_blocks.N` / `single_transformer_blocks.N` (q, k, v
  separate), `controlnet_blocks.N` / `controlnet_single_blocks.N`; Union nets add `controlnet_mode_embedder`
  (Union Pro 2.0 has none, and no single blocks). The control image is the autoencoder's latent mean, packed.
- "xlabs": XLabs' x-flux nets (BFL names): `img_in`, `time_in`, `vector_in`, `guidance_in`, `txt_in`,
  `double_blocks.N` (fused qkv, as our transformer), `controlnet_blocks.N`, `pos_embed_input`, and
  `input_hint_block.{0,2,…,14}`: eight convolutions that turn the control image's pixels in [-1, 1] into 16
  channels at 1/8 of the size, packed 2×2 into 64 per token.

The weights stay in the stored dtype behind `ops` layers (the files are loaded as they are: no renaming, no
fused copies), so the net streams like the transformer (`streamable_blocks`). Its per-block outputs, scaled by
the strength, are spread over the base transformer's actual depth (`spread`) and returned as the
`ControlResiduals` the base adds after each of its blocks.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from engine.contract.request import UNION_MODES
from engine.formats.weights import count_indexed
from engine.models.flux1 import (
    ControlResiduals,
    DoubleStreamBlock,
    FluxParams,
    MLPEmbedder,
    ModulationOut,
    attention,
    fp16_safe,
    pack,
    position_embedding,
    timestep_embedding,
)
from engine.runtime import ops

DIFFUSERS, XLABS = "diffusers", "xlabs"


def layout_of(names) -> str | None:
    """Which ControlNet layout these tensor names are, or None when they are not a FLUX ControlNet."""
    names = set(names)
    if "controlnet_x_embedder.weight" in names:
        return DIFFUSERS
    if "controlnet_blocks.0.weight" in names and "double_blocks.0.img_attn.norm.key_norm.scale" in names:
        return XLABS
    return None


def union_mode(name: str) -> int:
    """A Union mode's index from its name (canny, tile, depth, blur, pose, gray, lq) or its number."""
    key = name.strip().lower()
    if key in UNION_MODES:
        return UNION_MODES[key]
    if key.isdigit():
        return int(key)
    raise ValueError(f"unknown ControlNet mode {name!r}: use one of {', '.join(UNION_MODES)}")


@dataclass(frozen=True)
class ControlNetParams:
    layout: str  # DIFFUSERS or XLABS
    in_channels: int  # 64: the control tokens' width (packed latent, or XLabs' hint encoder output)
    context_in_dim: int
    vec_in_dim: int
    hidden_size: int
    mlp_hidden: int
    num_heads: int
    depth: int  # double-stream blocks (each with a controlnet_blocks projection)
    depth_single: int
    axes_dim: tuple[int, ...]
    guidance_embed: bool
    qkv_bias: bool
    num_modes: int = 0  # Union: rows of controlnet_mode_embedder
    theta: int = 10_000

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def pixel_hint(self) -> bool:
        """XLabs nets take the control image as pixels; the others as the autoencoder's packed latent."""
        return self.layout == XLABS

    @property
    def spread_rule(self) -> str:
        """How the net's residuals cover the base's blocks: "repeat" (XLabs: the list over and over, as x-flux,
        diffusers' `controlnet_blocks_repeat` and ComfyUI do) or "interval" (the others: each residual for
        ceil(base/net) consecutive blocks, as diffusers' FluxTransformer2DModel and ComfyUI's latent nets)."""
        return "repeat" if self.layout == XLABS else "interval"

    def flux_params(self) -> FluxParams:
        """The blocks' shapes as our transformer's parameters (XLabs' double blocks are our blocks)."""
        return FluxParams(
            in_channels=self.in_channels,
            context_in_dim=self.context_in_dim,
            vec_in_dim=self.vec_in_dim,
            hidden_size=self.hidden_size,
            mlp_hidden=self.mlp_hidden,
            num_heads=self.num_heads,
            depth=self.depth,
            depth_single=self.depth_single,
            axes_dim=self.axes_dim,
            guidance_embed=self.guidance_embed,
            qkv_bias=self.qkv_bias,
            theta=self.theta,
        )

    @classmethod
    def from_shapes(cls, shapes: dict[str, tuple[int, ...]]) -> ControlNetParams:
        layout = layout_of(shapes)
        if layout is None:
            if "controlnet_blocks.0.linear.weight" in shapes:
                raise ValueError("a MistoLine ControlNet, whose layout is not supported")
            raise ValueError(
                "no FLUX ControlNet tensors (controlnet_x_embedder, or XLabs' controlnet_blocks)"
            )
        if layout == DIFFUSERS:
            if "input_hint_block.conv_in.weight" in shapes:
                raise ValueError("a diffusers conversion of an XLabs ControlNet: use XLabs' own file")
            hidden, in_channels = shapes["x_embedder.weight"]
            depth = count_indexed(shapes, "transformer_blocks.")
            depth_single = count_indexed(shapes, "single_transformer_blocks.")
            first = "transformer_blocks.0" if depth else "single_transformer_blocks.0"
            head_dim = shapes[f"{first}.attn.norm_q.weight"][0]
            mlp = shapes[f"{first}.ff.net.0.proj.weight" if depth else f"{first}.proj_mlp.weight"][0]
            context, vec = (
                shapes["context_embedder.weight"][1],
                shapes["time_text_embed.text_embedder.linear_1.weight"][1],
            )
            guidance = "time_text_embed.guidance_embedder.linear_1.weight" in shapes
            qkv_bias = f"{first}.attn.to_q.bias" in shapes
            modes = shapes.get("controlnet_mode_embedder.weight", (0,))[0]
            control_in = shapes["controlnet_x_embedder.weight"][1]
        else:
            if count_indexed(shapes, "single_blocks."):
                raise ValueError("an XLabs-layout ControlNet with single blocks, which XLabs never published")
            hidden, in_channels = shapes["img_in.weight"]
            depth, depth_single = count_indexed(shapes, "double_blocks."), 0
            head_dim = shapes["double_blocks.0.img_attn.norm.query_norm.scale"][0]
            mlp = shapes["double_blocks.0.img_mlp.0.weight"][0]
            context, vec = shapes["txt_in.weight"][1], shapes["vector_in.in_layer.weight"][1]
            guidance = "guidance_in.in_layer.weight" in shapes
            qkv_bias = "double_blocks.0.img_attn.qkv.bias" in shapes
            modes = 0
            control_in = shapes["pos_embed_input.weight"][1]
            if count_indexed(shapes, "input_hint_block.") != len(_HINT_STRIDES) * 2 - 1:
                raise ValueError("XLabs' input_hint_block has eight convolutions (input_hint_block.0 to .14)")
            hint_out = shapes[f"input_hint_block.{2 * (len(_HINT_STRIDES) - 1)}.weight"][0]
            if hint_out * 4 != control_in:
                raise ValueError(
                    f"the hint encoder gives {hint_out}×4 channels, pos_embed_input takes {control_in}"
                )
        if control_in != in_channels:
            raise ValueError(
                f"control tokens of {control_in} channels (an inpainting ControlNet with a mask?) are not supported"
            )
        rope = (7 * head_dim // 16) // 2 * 2
        return cls(
            layout=layout,
            in_channels=in_channels,
            context_in_dim=context,
            vec_in_dim=vec,
            hidden_size=hidden,
            mlp_hidden=mlp,
            num_heads=hidden // head_dim,
            depth=depth,
            depth_single=depth_single,
            axes_dim=(head_dim - 2 * rope, rope, rope),
            guidance_embed=guidance,
            qkv_bias=qkv_bias,
            num_modes=modes,
        )

    def check_base(self, base: FluxParams) -> None:
        """The net must share the base transformer's widths; ValueError naming the mismatch otherwise."""
        for name in ("hidden_size", "context_in_dim", "vec_in_dim"):
            ours, theirs = getattr(self, name), getattr(base, name)
            if ours != theirs:
                raise ValueError(f"the ControlNet's {name} is {ours}, the transformer's {theirs}")


# ---- the spread over the base's blocks, gating, stacking: pure functions ----


def spread(samples: Sequence[torch.Tensor], base_blocks: int, rule: str) -> list[torch.Tensor]:
    """One residual per base block from the net's `samples` (shared, not copied).

    "interval" (diffusers' FluxTransformer2DModel: `interval = ceil(base / len(samples))`, block i gets
    `samples[i // interval]`; ComfyUI repeats each residual the same number of times); "repeat" (XLabs: block i
    gets `samples[i % len(samples)]`)."""
    n = len(samples)
    if n == 0:
        return []
    if rule == "repeat":
        return [samples[i % n] for i in range(base_blocks)]
    if rule == "interval":
        interval = math.ceil(base_blocks / n)
        return [samples[i // interval] for i in range(base_blocks)]
    raise ValueError(f"unknown spread rule {rule!r}")


def controlled(step: int, steps: int, start: float, end: float) -> bool:
    """diffusers' rule (FluxControlNetPipeline's `controlnet_keep`): step i of N gets control only when its whole
    span [i/N, (i+1)/N] lies inside [start, end], compared as diffusers compares (the same float divisions).

    ComfyUI's rule is looser: it converts start/end to sigmas of the model's (shifted) schedule and controls a step
    when the sigma the step starts from lies in [sigma(end), sigma(start)], so the step that begins inside the
    range but ends past `end` is controlled too (one step more), and with a shifted schedule the percentages
    are of sigma, not of steps."""
    return not (step / steps < start or (step + 1) / steps > end)


def add_residuals(*parts: ControlResiduals | None) -> ControlResiduals | None:
    """Several ControlNets' residuals summed block by block (None and missing entries add nothing). Pairs of
    shared tensors are added once, so a spread list stays as small as the nets' own outputs."""
    parts = tuple(p for p in parts if p is not None)
    if not parts:
        return None

    def total(lists: list[Sequence[torch.Tensor | None]]) -> list[torch.Tensor | None]:
        out, memo = [], {}
        for i in range(max((len(x) for x in lists), default=0)):
            terms = tuple(x[i] for x in lists if i < len(x) and x[i] is not None)
            key = tuple(id(t) for t in terms)
            if key not in memo:
                memo[key] = None if not terms else terms[0] if len(terms) == 1 else sum(terms[1:], terms[0])
            out.append(memo[key])
        return out

    return ControlResiduals(total([p.double for p in parts]), total([p.single for p in parts]))


# ---- modules in diffusers' names (InstantX / Union) ----


class _RMSNorm(nn.Module):
    """flux1.RMSNorm under diffusers' parameter name `weight`."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)
        return normed.to(x.dtype) * self.weight.to(x.dtype)


class _Embedder(nn.Module):
    """diffusers' TimestepEmbedding / PixArtAlphaTextProjection: linear, SiLU, linear."""

    def __init__(self, in_dim: int, hidden: int):
        super().__init__()
        self.linear_1 = ops.Linear(in_dim, hidden)
        self.linear_2 = ops.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class _TimeTextEmbed(nn.Module):
    def __init__(self, p: ControlNetParams):
        super().__init__()
        self.timestep_embedder = _Embedder(256, p.hidden_size)
        self.guidance_embedder = _Embedder(256, p.hidden_size) if p.guidance_embed else None
        self.text_embedder = _Embedder(p.vec_in_dim, p.hidden_size)


class _AdaNorm(nn.Module):
    """Modulation under diffusers' name (`norm1.linear`, `norm.linear`): shift, scale, gate per part."""

    def __init__(self, hidden: int, parts: int):
        super().__init__()
        self.parts = parts
        self.linear = ops.Linear(hidden, 3 * parts * hidden)

    def forward(self, vec: torch.Tensor) -> list[ModulationOut]:
        chunks = self.linear(F.silu(vec))[:, None, :].chunk(3 * self.parts, dim=-1)
        return [ModulationOut(*chunks[3 * i : 3 * i + 3]) for i in range(self.parts)]


class _Attention(nn.Module):
    """q, k, v as separate layers (diffusers' names); `joint` adds the text stream's projections."""

    def __init__(self, p: ControlNetParams, joint: bool):
        super().__init__()
        h, bias = p.hidden_size, p.qkv_bias
        self.num_heads = p.num_heads
        self.to_q, self.to_k, self.to_v = (ops.Linear(h, h, bias=bias) for _ in range(3))
        self.norm_q, self.norm_k = _RMSNorm(p.head_dim), _RMSNorm(p.head_dim)
        if joint:
            self.add_q_proj, self.add_k_proj, self.add_v_proj = (
                ops.Linear(h, h, bias=bias) for _ in range(3)
            )
            self.norm_added_q, self.norm_added_k = _RMSNorm(p.head_dim), _RMSNorm(p.head_dim)
            self.to_out = nn.ModuleList([ops.Linear(h, h)])
            self.to_add_out = ops.Linear(h, h)

    def _heads(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return layer(x).unflatten(-1, (self.num_heads, -1)).transpose(1, 2)

    def image_qkv(self, x: torch.Tensor):
        q, k, v = (self._heads(layer, x) for layer in (self.to_q, self.to_k, self.to_v))
        return self.norm_q(q), self.norm_k(k), v

    def text_qkv(self, x: torch.Tensor):
        q, k, v = (self._heads(layer, x) for layer in (self.add_q_proj, self.add_k_proj, self.add_v_proj))
        return self.norm_added_q(q), self.norm_added_k(k), v


class _GeluProj(nn.Module):
    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.proj = ops.Linear(d_in, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.proj(x), approximate="tanh")


class _FeedForward(nn.Module):
    def __init__(self, p: ControlNetParams):
        super().__init__()
        gelu = _GeluProj(p.hidden_size, p.mlp_hidden)
        self.net = nn.ModuleList([gelu, nn.Identity(), ops.Linear(p.mlp_hidden, p.hidden_size)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.net:
            x = layer(x)
        return x


class _DiffusersDoubleBlock(nn.Module):
    """flux1.DoubleStreamBlock's math under diffusers' names (FluxTransformerBlock)."""

    def __init__(self, p: ControlNetParams):
        super().__init__()
        self.norm1, self.norm1_context = _AdaNorm(p.hidden_size, 2), _AdaNorm(p.hidden_size, 2)
        self.attn = _Attention(p, joint=True)
        self.ff, self.ff_context = _FeedForward(p), _FeedForward(p)

    def forward(self, img, txt, vec, pe):
        img_attn_mod, img_mlp_mod = self.norm1(vec)
        txt_attn_mod, txt_mlp_mod = self.norm1_context(vec)
        iq, ik, iv = self.attn.image_qkv(img_attn_mod.modulate(img))
        tq, tk, tv = self.attn.text_qkv(txt_attn_mod.modulate(txt))
        attn = attention(torch.cat((tq, iq), 2), torch.cat((tk, ik), 2), torch.cat((tv, iv), 2), pe)
        txt_attn, img_attn = attn[:, : txt.shape[1]], attn[:, txt.shape[1] :]
        img = img_attn_mod.gated_add(img, self.attn.to_out[0](img_attn))
        img = img_mlp_mod.gated_add(img, self.ff(img_mlp_mod.modulate(img)))
        txt = txt_attn_mod.gated_add(txt, self.attn.to_add_out(txt_attn))
        txt = txt_mlp_mod.gated_add(txt, self.ff_context(txt_mlp_mod.modulate(txt)))
        return fp16_safe(img), fp16_safe(txt)


class _DiffusersSingleBlock(nn.Module):
    """flux1.SingleStreamBlock's math under diffusers' names (FluxSingleTransformerBlock)."""

    def __init__(self, p: ControlNetParams):
        super().__init__()
        self.norm = _AdaNorm(p.hidden_size, 1)
        self.proj_mlp = ops.Linear(p.hidden_size, p.mlp_hidden)
        self.attn = _Attention(p, joint=False)
        self.proj_out = ops.Linear(p.hidden_size + p.mlp_hidden, p.hidden_size)

    def forward(self, x, vec, pe):
        (mod,) = self.norm(vec)
        h = mod.modulate(x)
        attn = attention(*self.attn.image_qkv(h), pe)
        out = self.proj_out.forward_concat((attn, F.gelu(self.proj_mlp(h), approximate="tanh")))
        return fp16_safe(mod.gated_add(x, out))


# ---- XLabs' hint encoder ----

_HINT_STRIDES = (
    1,
    1,
    2,
    1,
    2,
    1,
    2,
    1,
)  # x-flux's eight 3×3 convolutions: 3 → 16 → … → 16 at 1/8 of the size


def _hint_block() -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, stride in enumerate(_HINT_STRIDES):
        layers.append(ops.Conv2d(3 if i == 0 else 16, 16, 3, padding=1, stride=stride))
        if i < len(_HINT_STRIDES) - 1:
            layers.append(nn.SiLU())
    return nn.Sequential(*layers)


# ---- the nets ----


class ControlNet(nn.Module):
    """A FLUX.1 ControlNet: `forward` gives the base transformer's `ControlResiduals` for one step."""

    params: ControlNetParams

    # per layout: embeddings, the block lists and their projections
    def _embed(self, img, cond, timesteps, y, guidance, txt):  # -> img, txt, vec
        raise NotImplementedError

    def _double(self) -> Sequence[tuple[nn.Module, nn.Module]]:
        raise NotImplementedError

    def _single(self) -> Sequence[tuple[nn.Module, nn.Module]]:
        return ()

    def streamable_blocks(self) -> list[nn.Module]:
        """Each block followed by its projection, in the order they run: the memory manager streams these."""
        return [m for pair in (*self._double(), *self._single()) for m in pair]

    def condition(self, pixels: torch.Tensor, vae) -> torch.Tensor:
        """The control image (B, 3, H, W) in [-1, 1] as this net takes it: XLabs, the pixels; the others, the
        autoencoder's latent mean (as init images are encoded), packed into tokens."""
        if self.params.pixel_hint:
            return pixels
        return pack(vae.encode(pixels))

    def samples(
        self,
        img: torch.Tensor,  # (B, L_img, 64) packed latent, as the base gets it
        img_ids: torch.Tensor,
        txt: torch.Tensor,
        txt_ids: torch.Tensor,
        timesteps: torch.Tensor,
        y: torch.Tensor,
        guidance: torch.Tensor | None,
        cond: torch.Tensor,  # from `condition`
        mode: int | None = None,  # Union nets: the control type's index
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The net's own outputs (B, L_img, hidden), one per double and one per single block, unscaled."""
        p = self.params
        if cond.shape[0] != img.shape[0]:
            cond = cond.expand(img.shape[0], *cond.shape[1:])
        if p.guidance_embed and guidance is None:
            raise ValueError("this ControlNet has a guidance embedding: pass guidance")
        img, txt, vec = self._embed(img, cond.to(img.dtype), timesteps, y, guidance, txt)
        mode_embedder = getattr(self, "controlnet_mode_embedder", None)  # Union nets only
        if mode_embedder is not None:
            if mode is None:
                raise ValueError("a Union ControlNet needs a mode (canny, tile, depth, blur, pose, gray, lq)")
            if not 0 <= mode < p.num_modes:
                raise ValueError(f"mode {mode} is outside this Union ControlNet's {p.num_modes} modes")
            ids = torch.full((txt.shape[0], 1), mode, dtype=torch.long, device=txt.device)
            txt = torch.cat((mode_embedder(ids).to(txt.dtype), txt), 1)
            txt_ids = torch.cat((txt_ids[:, :1], txt_ids), 1)
        pe = position_embedding(torch.cat((txt_ids, img_ids), 1), p.axes_dim, p.theta)
        double, single = [], []
        for block, projection in self._double():
            img, txt = block(img, txt, vec, pe)
            double.append(projection(img))
        x, n_txt = torch.cat((txt, img), 1), txt.shape[1]
        for block, projection in self._single():
            x = block(x, vec, pe)
            single.append(projection(x[:, n_txt:]))
        return double, single

    def forward(
        self,
        img: torch.Tensor,
        img_ids: torch.Tensor,
        txt: torch.Tensor,
        txt_ids: torch.Tensor,
        timesteps: torch.Tensor,
        y: torch.Tensor,
        guidance: torch.Tensor | None,
        cond: torch.Tensor,
        *,
        base: FluxParams,  # the transformer the residuals are for: its depths
        mode: int | None = None,
        strength: float = 1.0,
    ) -> ControlResiduals:
        double, single = self.samples(img, img_ids, txt, txt_ids, timesteps, y, guidance, cond, mode)
        double = [r * strength for r in double]
        single = [r * strength for r in single]
        # diffusers spreads the single-block residuals by interval for every layout (XLabs nets have none)
        return ControlResiduals(
            spread(double, base.depth, self.params.spread_rule), spread(single, base.depth_single, "interval")
        )


class DiffusersControlNet(ControlNet):
    """InstantX / Shakker-Labs (Union, Union Pro 2.0) nets in diffusers' FluxControlNetModel names."""

    def __init__(self, p: ControlNetParams):
        super().__init__()
        self.params = p
        h = p.hidden_size
        self.x_embedder = ops.Linear(p.in_channels, h)
        self.controlnet_x_embedder = ops.Linear(p.in_channels, h)
        self.context_embedder = ops.Linear(p.context_in_dim, h)
        self.time_text_embed = _TimeTextEmbed(p)
        self.transformer_blocks = nn.ModuleList(_DiffusersDoubleBlock(p) for _ in range(p.depth))
        self.single_transformer_blocks = nn.ModuleList(
            _DiffusersSingleBlock(p) for _ in range(p.depth_single)
        )
        self.controlnet_blocks = nn.ModuleList(ops.Linear(h, h) for _ in range(p.depth))
        self.controlnet_single_blocks = nn.ModuleList(ops.Linear(h, h) for _ in range(p.depth_single))
        if p.num_modes:
            self.controlnet_mode_embedder = ops.Embedding(p.num_modes, h)

    def _double(self):
        return list(zip(self.transformer_blocks, self.controlnet_blocks))

    def _single(self):
        return list(zip(self.single_transformer_blocks, self.controlnet_single_blocks))

    def _embed(self, img, cond, timesteps, y, guidance, txt):
        embed, dtype = self.time_text_embed, img.dtype
        vec = embed.timestep_embedder(timestep_embedding(timesteps).to(dtype))
        if embed.guidance_embedder is not None:
            vec = vec + embed.guidance_embedder(timestep_embedding(guidance).to(dtype))
        vec = vec + embed.text_embedder(y)
        img = self.x_embedder(img) + self.controlnet_x_embedder(cond)
        return img, self.context_embedder(txt), vec


class XLabsControlNet(ControlNet):
    """XLabs' x-flux nets (ControlNetFlux): BFL names, double blocks only, a pixel-space hint encoder."""

    def __init__(self, p: ControlNetParams):
        super().__init__()
        self.params = p
        fp, h = p.flux_params(), p.hidden_size
        self.img_in = ops.Linear(p.in_channels, h)
        self.time_in = MLPEmbedder(256, h)
        self.vector_in = MLPEmbedder(p.vec_in_dim, h)
        self.guidance_in = MLPEmbedder(256, h) if p.guidance_embed else None
        self.txt_in = ops.Linear(p.context_in_dim, h)
        self.double_blocks = nn.ModuleList(DoubleStreamBlock(fp) for _ in range(p.depth))
        self.controlnet_blocks = nn.ModuleList(ops.Linear(h, h) for _ in range(p.depth))
        self.pos_embed_input = ops.Linear(p.in_channels, h)
        self.input_hint_block = _hint_block()

    def _double(self):
        return list(zip(self.double_blocks, self.controlnet_blocks))

    def _embed(self, img, cond, timesteps, y, guidance, txt):
        dtype = img.dtype
        vec = self.time_in(timestep_embedding(timesteps).to(dtype))
        if self.guidance_in is not None:
            vec = vec + self.guidance_in(timestep_embedding(guidance).to(dtype))
        vec = vec + self.vector_in(y)
        hint = pack(self.input_hint_block(cond))
        img = self.img_in(img) + self.pos_embed_input(hint)
        return img, self.txt_in(txt), vec


def controlnet_class(p: ControlNetParams) -> type[ControlNet]:
    return XLabsControlNet if p.layout == XLABS else DiffusersControlNet


def build_controlnet(
    state: dict[str, torch.Tensor], scales: dict[str, torch.Tensor], dtype: torch.dtype
) -> ControlNet:
    """A ControlNet from its file's tensors (kept as stored), built on the meta device."""
    p = ControlNetParams.from_shapes({k: tuple(v.shape) for k, v in state.items()})
    with torch.device("meta"):
        model = controlnet_class(p)(p)
    return ops.load_into(model, state, scales, dtype)
