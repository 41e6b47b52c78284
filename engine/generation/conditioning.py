"""What the edit models condition on, as pure functions the pipeline's `prepare` stage calls (issue 14).

Each builds exactly what diffusers' pipeline (and BFL's `prepare_*`) hands the transformer, from PIL images
and the autoencoder; tests/test_conditioning.py checks each against diffusers' own helper on the same weights.

- FLUX.1 Fill: `load_mask`, `fill_conditioning` → `img_cond` (B, L, 320): the masked image's packed latents
  (64) then the 8×8-folded, packed mask (256); 64 + 320 = Fill's 384 input features. `outpaint_canvas` grows an
  image and builds the mask of the new border.
- Latent-blend inpainting (any other transformer): `latent_mask` and `InpaintBlend`, which the denoise loop
  applies after every step as diffusers' `FluxInpaintPipeline` does.
- FLUX.1 Kontext: `kontext_size`, `reference_tokens` → `ref_img`/`ref_ids` (first id 1; several references
  placed as ComfyUI places them, `reference_ids`).
- FLUX.1 Canny/Depth [dev]: `control_conditioning` → `img_cond` (B, L, 64); `--control-preprocess canny` is
  engine/generation/control_preprocess.py.

Sizes and pixels: `edit_size` (an edit's size without --width/--height), `to_pixels`.
Every image encode takes the autoencoder's posterior mean (`AutoEncoder.encode`), through `vae_tiling.encode`
so that big images encode in tiles. Batch 1 in, batch `batch` out (rows repeated).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from engine.generation import vae_tiling
from engine.generation.sampling import LATENT_CHANNELS, image_ids, pack
from engine.models.autoencoder import AutoEncoder

Notify = Callable[[str], None]

# ---- images to tensors ----


def to_pixels(image: Image.Image, width: int, height: int) -> torch.Tensor:
    """An RGB image resized (Lanczos, only when its size differs) to width × height → (1, 3, H, W) in [-1, 1],
    as the engine's img2img encode and BFL's `prepare_*` scale it (x / 127.5 − 1)."""
    image = image.convert("RGB")
    if image.size != (width, height):
        image = image.resize((width, height), Image.Resampling.LANCZOS)
    return (
        torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0)
        .permute(2, 0, 1)[None]
        .contiguous()
    )


def edit_size(image: Image.Image) -> tuple[int, int]:
    """An edit's (width, height) without --width/--height: the init (or control) image's size floored to 16,
    as diffusers' image processor floors it (`get_default_height_width`, vae_scale_factor × 2); the image and
    its mask are then resized to it. (Kontext takes `References.output_size` instead.)"""
    width, height = image.size
    return max(16, width // 16 * 16), max(16, height // 16 * 16)


def load_mask(mask: Image.Image, width: int, height: int) -> torch.Tensor:
    """A mask image → (1, 1, H, W) of 0 (keep) and 1 (repaint), as diffusers' Fill/Inpaint `mask_processor`:
    resized to width × height (Lanczos) before its luminance is taken, scaled to [0, 1] and binarised at 0.5
    (a luminance of 128 or more repaints). Modes other than L and RGB are made RGB first."""
    if mask.mode not in ("L", "RGB"):
        mask = mask.convert("RGB")
    if mask.size != (width, height):
        mask = mask.resize((width, height), Image.Resampling.LANCZOS)
    values = np.asarray(mask.convert("L"), dtype=np.float32) / 255.0
    return torch.from_numpy((values >= 0.5).astype(np.float32))[None, None]


def encode(vae: AutoEncoder, pixels: torch.Tensor, on_message: Notify | None = None) -> torch.Tensor:
    """Pixels (B, 3, H, W) in [-1, 1] → scaled latents (posterior mean), in tiles when big."""
    param = next(vae.parameters())
    return vae_tiling.encode(vae, pixels.to(device=param.device, dtype=param.dtype), on_message=on_message)


def _repeat(tokens: torch.Tensor, batch: int) -> torch.Tensor:
    return tokens if batch == tokens.shape[0] else tokens.repeat(batch // tokens.shape[0], 1, 1)


# ---- FLUX.1 Fill ----


def fold_mask(mask: torch.Tensor, factor: int = 8) -> torch.Tensor:
    """(B, 1, H, W) pixel mask → (B, factor², H/factor, W/factor): each latent pixel's factor × factor block of
    mask pixels as channels, row-major within the block (BFL's "b (h ph) (w pw) -> b (ph pw) h w")."""
    b, _, h, w = mask.shape
    m = mask[:, 0].reshape(b, h // factor, factor, w // factor, factor)
    return m.permute(0, 2, 4, 1, 3).reshape(b, factor * factor, h // factor, w // factor)


def fill_conditioning(
    vae: AutoEncoder,
    pixels: torch.Tensor,  # (1, 3, H, W) in [-1, 1]: `to_pixels`
    mask: torch.Tensor,  # (1, 1, H, W) of 0/1: `load_mask`
    batch: int = 1,
    on_message: Notify | None = None,
) -> torch.Tensor:
    """FLUX.1 Fill's `img_cond`, (batch, L, 320): the packed latents of image × (1 − mask) (64 features), then
    the packed 8×8-folded mask (256): diffusers' `FluxFillPipeline.prepare_mask_latents` + its concatenation,
    BFL's `prepare_fill`."""
    latents = encode(vae, pixels * (1 - mask.to(pixels.dtype)), on_message)
    folded = fold_mask(mask.to(latents.device, latents.dtype), vae_tiling.downscale(vae))
    return _repeat(torch.cat((pack(latents), pack(folded)), dim=-1), batch)


def outpaint_canvas(
    image: Image.Image, left: int, top: int, right: int, bottom: int, multiple: int = 16
) -> tuple[Image.Image, Image.Image]:
    """The image on a canvas grown by left/top/right/bottom pixels → (canvas RGB, mask L): the new border white
    (repaint), the original black (keep). The right and bottom margins grow by up to multiple − 1 more pixels so
    that the canvas is a multiple of `multiple` (FLUX sizes are multiples of 16): the kept pixels are never
    resampled. The border is mid-gray in the canvas; Fill never sees it (it encodes image × (1 − mask))."""
    if min(left, top, right, bottom) < 0:
        raise ValueError("outpaint margins must not be negative")
    width, height = image.size
    full_w, full_h = width + left + right, height + top + bottom
    full_w += -full_w % multiple
    full_h += -full_h % multiple
    canvas = Image.new("RGB", (full_w, full_h), (128, 128, 128))
    canvas.paste(image.convert("RGB"), (left, top))
    mask = Image.new("L", (full_w, full_h), 255)
    mask.paste(0, (left, top, left + width, top + height))
    return canvas, mask


# ---- latent-blend inpainting (transformers without Fill's channels) ----


def latent_mask(mask: torch.Tensor, factor: int = 8) -> torch.Tensor:
    """(1, 1, H, W) pixel mask → packed (1, L, 64), as diffusers' `FluxInpaintPipeline.prepare_mask_latents`:
    nearest-neighbour down to the latent grid (`F.interpolate`'s default), repeated over the 16 latent channels."""
    b, _, h, w = mask.shape
    small = torch.nn.functional.interpolate(mask, size=(h // factor, w // factor))
    return pack(small.repeat(1, LATENT_CHANNELS, 1, 1))


@dataclass(frozen=True)
class InpaintBlend:
    """The per-step blend of latent-blend inpainting (diffusers' `FluxInpaintPipeline`): after the step to
    t_next, the latents outside the mask are replaced by the init latents noised to t_next with the run's own
    starting noise, t_next·noise + (1 − t_next)·x0 (x0 itself after the last step, where t_next = 0).
    All packed (B, L, 64); mask 1 = repaint (keep the model's latents), 0 = keep the init image."""

    x0: torch.Tensor  # packed init latents
    noise: torch.Tensor  # packed noise the run started from (img2img_start's)
    mask: torch.Tensor  # `latent_mask`

    def __call__(self, x: torch.Tensor, t_next: float) -> torch.Tensor:
        known = t_next * self.noise + (1.0 - t_next) * self.x0
        return (1 - self.mask) * known + self.mask * x


# ---- FLUX.1 Kontext ----

# (width, height), the sizes Kontext was trained at: BFL's PREFERED_KONTEXT_RESOLUTIONS in flux/util.py,
# diffusers' PREFERRED_KONTEXT_RESOLUTIONS in pipeline_flux_kontext.py (the same list).
KONTEXT_RESOLUTIONS: tuple[tuple[int, int], ...] = (
    (672, 1568),
    (688, 1504),
    (720, 1456),
    (752, 1392),
    (800, 1328),
    (832, 1248),
    (880, 1184),
    (944, 1104),
    (1024, 1024),
    (1104, 944),
    (1184, 880),
    (1248, 832),
    (1328, 800),
    (1392, 752),
    (1456, 720),
    (1504, 688),
    (1568, 672),
)


def kontext_size(
    width: int, height: int, resolutions: Sequence[tuple[int, int]] = KONTEXT_RESOLUTIONS
) -> tuple[int, int]:
    """The preferred Kontext resolution (width, height) nearest the image's aspect ratio; on a tie the
    narrower (BFL's `prepare_kontext`: min over (|ratio − w/h|, w, h)). The ratio is the image's own, as BFL;
    diffusers floors the size to 16 first, which can only matter within a hair of a midpoint. `resolutions`:
    the table (the tests pass a small one)."""
    ratio = width / height
    _, w, h = min((abs(ratio - w / h), w, h) for w, h in resolutions)
    return w // 16 * 16, h // 16 * 16


def reference_ids(latent_sizes: Sequence[tuple[int, int]], batch: int = 1) -> torch.Tensor:
    """Position ids of the reference tokens, (batch, Σ tokens, 3), for references of latent size (h, w) each
    (H/8, W/8), in order: (1, row + row_offset, col + col_offset) per 2×2 patch.

    The first reference sits at offset (0, 0): BFL's `prepare_kontext` and diffusers' `FluxKontextPipeline`
    (one reference, ids (1, row, col)). Further references follow ComfyUI's default for FLUX.1 Kontext
    (comfy/ldm/flux/model.py, ref_latents_method "offset"): all at index 1, each placed beside the bounding box
    (h, w) of those before it, in latent pixels — to its right (col offset w) when the new one stacked below
    would make the box taller than wide (ref_h + h > ref_w + w), else below it (row offset h); the box grows to
    cover it. Offsets become patch units as ComfyUI rounds them, (offset + 1) // 2."""
    parts = []
    box_h = box_w = 0
    for h, w in latent_sizes:
        row_offset = col_offset = 0
        if h + box_h > w + box_w:
            col_offset = box_w
        else:
            row_offset = box_h
        box_h = max(box_h, h + row_offset)
        box_w = max(box_w, w + col_offset)
        ids = image_ids(1, h * 8, w * 8).clone()
        ids[..., 0] = 1
        ids[..., 1] += (row_offset + 1) // 2
        ids[..., 2] += (col_offset + 1) // 2
        parts.append(ids)
    return torch.cat(parts, dim=1).expand(batch, -1, -1)


@dataclass(frozen=True)
class References:
    """Kontext's inputs: `tokens` → the transformer's `ref_img`, `ids` → `ref_ids`, `sizes` each reference's
    (width, height) after resizing; `output_size` the image size without --width/--height (the first's)."""

    tokens: torch.Tensor  # (B, L_ref, 64)
    ids: torch.Tensor  # (B, L_ref, 3)
    sizes: tuple[tuple[int, int], ...]

    @property
    def output_size(self) -> tuple[int, int]:
        return self.sizes[0]


def reference_tokens(
    vae: AutoEncoder,
    images: Sequence[Image.Image],
    batch: int = 1,
    on_message: Notify | None = None,
    resolutions: Sequence[tuple[int, int]] = KONTEXT_RESOLUTIONS,
) -> References:
    """Each reference resized (Lanczos) to `kontext_size` of its own aspect ratio, encoded, packed; the token
    runs concatenated in order, with `reference_ids`. BFL's `prepare_kontext`, diffusers' `FluxKontextPipeline`
    (`_auto_resize`, `prepare_latents`)."""
    if not images:
        raise ValueError("no reference images")
    tokens, sizes, latent_sizes = [], [], []
    for image in images:
        width, height = kontext_size(*image.size, resolutions)
        latents = encode(vae, to_pixels(image, width, height), on_message)
        tokens.append(pack(latents))
        sizes.append((width, height))
        latent_sizes.append(tuple(latents.shape[-2:]))
    return References(
        _repeat(torch.cat(tokens, dim=1), batch),
        reference_ids(latent_sizes, batch).to(tokens[0].device),
        tuple(sizes),
    )


# ---- FLUX.1 Canny/Depth [dev] ----


def control_conditioning(
    vae: AutoEncoder,
    image: Image.Image,  # the control map (already preprocessed: edges, depth)
    width: int,
    height: int,
    batch: int = 1,
    on_message: Notify | None = None,
) -> torch.Tensor:
    """Canny/Depth [dev]'s `img_cond`, (batch, L, 64): the control map resized (Lanczos) to the output size,
    encoded (posterior mean) and packed; 64 + 64 = their 128 input features. diffusers' `FluxControlPipeline`
    (`prepare_image`, then the encode and `_pack_latents` in `__call__`), BFL's `prepare_control`."""
    return _repeat(pack(encode(vae, to_pixels(image, width, height), on_message)), batch)
