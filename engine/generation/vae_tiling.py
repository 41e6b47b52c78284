"""Tiled decode and encode for the autoencoder: big images on small GPUs and in little RAM.

The image is cut into overlapping tiles on the latent grid (so encoder tiles start on multiples of the
8× down-sampling and stay aligned with the untiled grid), each tile runs through the autoencoder on its own,
and the overlaps are blended with a raised-cosine ramp. The weights of all tiles sum to one everywhere, and
where only one tile covers a pixel its weight is exactly 1, so that pixel is that tile's output, bit for bit.

A tiled result is not the untiled one: GroupNorm statistics and the mid-block attention see one tile, not the
whole image, and convolutions see zero padding at tile edges. The differences are small and the ramp hides
the seams; when one tile covers the whole input the result is the untiled one exactly.

`decode` and `encode` are the pipeline's entry points: untiled for small images, tiled for big ones or when
the memory estimate (activations plus the mid-block attention's tokens × tokens matrix) exceeds a share of the
free memory (see `should_tile`), and tiled again, with smaller and smaller tiles, when a run fails to allocate
memory on any device (torch.OutOfMemoryError on a GPU; MemoryError or the CPU allocator's RuntimeError).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from engine.models.autoencoder import AutoEncoder

# Images up to this many pixels go through untiled (bit-identical to a plain vae.decode), unless the memory
# estimate says they will not fit. FLUX's usual 1024×1024 stays untiled on a GPU.
GPU_MAX_PIXELS = 1024 * 1024
CPU_MAX_PIXELS = 2048 * 2048
# Full-resolution activations alive at once in the untiled decoder/encoder (input, norm, activation, conv out).
LIVE_TENSORS = 4
# The mid-block attention runs over every latent pixel: its tokens × tokens scores, in float32 (4 bytes), are
# 17 GB for a 2048×2048 image (65,536 tokens) and dominate the estimate above about 1024×1024.
ATTENTION_BYTES = 4
# Shares of the free memory an untiled run may plan to use: on the CPU the estimate competes with the model's
# own pages and everything else in RAM (and running out there is the OOM killer, not an exception); a GPU's
# free figure already counts torch's unused cache.
CPU_FREE_SHARE = 0.5
GPU_FREE_SHARE = 0.9
# Texts of allocation failures that torch raises as plain RuntimeErrors (the CPU allocator, cuDNN, MPS).
_ALLOCATION_FAILURES = ("out of memory", "not enough memory", "defaultcpuallocator", "can't allocate memory")

DECODE_TILE, DECODE_OVERLAP = 64, 16  # latent pixels (512 and 128 image pixels)
ENCODE_TILE, ENCODE_OVERLAP = 512, 64  # image pixels
MIN_TILE = 16  # latent pixels: below this the tiles are mostly overlap and edge

Notify = Callable[[str], None]


# ---- the decision ----


def estimate_bytes(
    height: int,
    width: int,
    *,
    bytes_per_pixel: int = LIVE_TENSORS * 256 * 2,
    downscale: int = 8,
    batch: int = 1,
) -> int:
    """The untiled run's estimated peak for `batch` images of height × width pixels: `bytes_per_pixel` per
    image pixel (the default is FLUX's decoder in bfloat16) plus the mid-block attention's scores,
    (latent pixels)² × ATTENTION_BYTES."""
    tokens = (height // downscale) * (width // downscale)
    return batch * (height * width * bytes_per_pixel + tokens * tokens * ATTENTION_BYTES)


def should_tile(
    height: int,
    width: int,
    device: torch.device | str,
    free_bytes: int | None,
    *,
    max_pixels: int | None = None,
    bytes_per_pixel: int = LIVE_TENSORS * 256 * 2,
    downscale: int = 8,
    batch: int = 1,
) -> bool:
    """Whether an image of height × width pixels (the decoder's output, the encoder's input) goes in tiles.

    Tiled when it has more than `max_pixels` pixels (default: GPU_MAX_PIXELS on an accelerator,
    CPU_MAX_PIXELS on the CPU), or when `estimate_bytes` is more than the device's share (CPU_FREE_SHARE,
    GPU_FREE_SHARE) of `free_bytes` (None: unknown, not checked).
    """
    cpu = torch.device(device).type == "cpu"
    if max_pixels is None:
        max_pixels = CPU_MAX_PIXELS if cpu else GPU_MAX_PIXELS
    if height * width > max_pixels:
        return True
    if free_bytes is None:
        return False
    needed = estimate_bytes(height, width, bytes_per_pixel=bytes_per_pixel, downscale=downscale, batch=batch)
    return needed > (CPU_FREE_SHARE if cpu else GPU_FREE_SHARE) * free_bytes


def is_allocation_failure(error: BaseException) -> bool:
    """Whether `error` says memory ran out, on any device: torch.OutOfMemoryError (CUDA's), MemoryError, or
    the RuntimeError the CPU allocator raises ("DefaultCPUAllocator: not enough memory: you tried to allocate")."""
    if isinstance(error, torch.OutOfMemoryError | MemoryError):
        return True
    return isinstance(error, RuntimeError) and any(t in str(error).lower() for t in _ALLOCATION_FAILURES)


def _failure_text(error: BaseException) -> str:
    return "out of GPU memory" if isinstance(error, torch.OutOfMemoryError) else "out of memory"


def free_bytes(device: torch.device | str) -> int | None:
    """Memory a run on `device` can still get: CUDA's free memory plus what torch's cache holds unused;
    the CPU's available RAM; None where unknown."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    if device.type == "cpu":
        import psutil  # every OS, not only Linux

        return int(psutil.virtual_memory().available)
    return None


def downscale(vae: AutoEncoder) -> int:
    """Image pixels per latent pixel along each axis (8 for FLUX.1; 16 for FLUX.2, whose autoencoder takes and
    gives its latent 2×2-patched: its `downscale`)."""
    own = getattr(vae, "downscale", None)
    return own if isinstance(own, int) else _attention_downscale(vae)


def _attention_downscale(vae: AutoEncoder) -> int:
    """Image pixels per pixel of the autoencoder's own (unpatched) latent, where its mid-block attention runs."""
    return 2 ** (len(vae.params.ch_mult) - 1)


def _bytes_per_pixel(vae: AutoEncoder, dtype: torch.dtype, decoding: bool) -> int:
    """Peak bytes per full-resolution pixel of an untiled run: the widest full-resolution activation
    (the decoder up-samples its second level's width to full resolution) times the live tensors."""
    widths = [vae.params.ch * m for m in vae.params.ch_mult]
    channels = max(widths[:2]) if decoding else widths[0]
    return LIVE_TENSORS * channels * torch.empty((), dtype=dtype).element_size()


# ---- the entry points ----


@torch.inference_mode()
def decode(
    vae: AutoEncoder,
    z: torch.Tensor,
    *,
    max_pixels: int | None = None,
    on_message: Notify | None = None,
    tile: int = DECODE_TILE,
    overlap: int = DECODE_OVERLAP,
) -> torch.Tensor:
    """vae.decode(z), in tiles when the image is big or the untiled run runs out of memory."""
    f = downscale(vae)
    height, width = z.shape[-2] * f, z.shape[-1] * f
    return _run(
        "decoding",
        lambda: vae.decode(z),
        lambda t, o: decode_tiled(vae, z, t, o),
        should_tile(
            height,
            width,
            z.device,
            free_bytes(z.device),
            max_pixels=max_pixels,
            bytes_per_pixel=_bytes_per_pixel(vae, z.dtype, decoding=True),
            downscale=_attention_downscale(vae),
            batch=z.shape[0],
        ),
        (height, width),
        tile,
        overlap,
        MIN_TILE,
        f,
        on_message,
    )


@torch.inference_mode()
def encode(
    vae: AutoEncoder,
    x: torch.Tensor,
    *,
    max_pixels: int | None = None,
    on_message: Notify | None = None,
    tile: int = ENCODE_TILE,
    overlap: int = ENCODE_OVERLAP,
) -> torch.Tensor:
    """vae.encode(x), in tiles when the image is big or the untiled run runs out of memory."""
    height, width = x.shape[-2:]
    return _run(
        "encoding",
        lambda: vae.encode(x),
        lambda t, o: encode_tiled(vae, x, t, o),
        should_tile(
            height,
            width,
            x.device,
            free_bytes(x.device),
            max_pixels=max_pixels,
            bytes_per_pixel=_bytes_per_pixel(vae, x.dtype, decoding=False),
            downscale=_attention_downscale(vae),
            batch=x.shape[0],
        ),
        (height, width),
        tile,
        overlap,
        MIN_TILE * downscale(vae),
        1,
        on_message,
    )


def _run(
    verb: str,
    untiled: Callable[[], torch.Tensor],
    tiled: Callable[[int, int], torch.Tensor],
    tile_first: bool,
    size: tuple[int, int],
    tile: int,
    overlap: int,
    min_tile: int,
    tile_pixels: int,
    on_message: Notify | None,
) -> torch.Tensor:
    """The untiled run unless `tile_first`; tiled after an allocation failure (`is_allocation_failure`), halving
    the tiles (in units of `tile_pixels` image pixels) after each further one down to `min_tile`."""
    notify = on_message or (lambda _text: None)
    if tile_first:
        notify(f"{verb} {size[1]}×{size[0]} in tiles")
    else:
        try:
            return untiled()
        except Exception as error:
            if not is_allocation_failure(error):
                raise
            failure = _failure_text(error)
        # retried outside the handler: the traceback holds the failed run's activations
        _free_cache()
        notify(f"{failure} while {verb}: {verb} in tiles")
    while True:
        try:
            return tiled(tile, overlap)
        except Exception as error:
            if not is_allocation_failure(error) or tile // 2 < min_tile:
                raise
            failure = _failure_text(error)
        _free_cache()
        tile = tile // 2
        overlap = min(overlap // 2, tile - 1)
        notify(f"{failure} while {verb} in tiles: trying smaller tiles ({tile * tile_pixels} pixels)")


def _free_cache() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---- tiled runs ----


@torch.inference_mode()
def decode_tiled(
    vae: AutoEncoder, z: torch.Tensor, tile: int = DECODE_TILE, overlap: int = DECODE_OVERLAP
) -> torch.Tensor:
    """vae.decode in tiles of `tile` latent pixels that overlap by `overlap` latent pixels."""
    return tiled_map(vae.decode, z, tile, overlap, in_scale=1, out_scale=downscale(vae))


@torch.inference_mode()
def encode_tiled(
    vae: AutoEncoder, x: torch.Tensor, tile: int = ENCODE_TILE, overlap: int = ENCODE_OVERLAP
) -> torch.Tensor:
    """vae.encode in tiles of `tile` image pixels that overlap by `overlap` image pixels (both rounded down
    to the down-sampling, 8, so that every tile starts on the untiled run's latent grid)."""
    f = downscale(vae)
    return tiled_map(vae.encode, x, tile // f, overlap // f, in_scale=f, out_scale=1)


@dataclass(frozen=True)
class Span:
    """One tile along one axis: the slice of the input it reads and where its output goes."""

    in_start: int
    in_stop: int
    out_start: int
    out_stop: int


def grid_spans(length: int, tile: int, overlap: int) -> list[tuple[int, int]]:
    """[start, stop) of tiles of `tile` grid pixels covering `length`, evenly spaced, each overlapping the
    next by at least `overlap`; one tile (the whole length) when it fits."""
    if not 0 <= overlap < tile:
        raise ValueError(f"tiles need 0 <= overlap < tile, got tile {tile} and overlap {overlap}")
    if length <= tile:
        return [(0, length)]
    gaps = math.ceil((length - tile) / (tile - overlap))
    # Consecutive starts differ by at most ceil((length - tile) / gaps) <= tile - overlap.
    return [(i * (length - tile) // gaps, i * (length - tile) // gaps + tile) for i in range(gaps + 1)]


def axis_spans(
    in_length: int, grid_length: int, tile: int, overlap: int, in_scale: int, out_scale: int
) -> list[Span]:
    """Tiles along one axis. The grid is the coarser side (the latent); the last tile reads to the input's end
    (an encoder input that is not a multiple of 8 has a remainder that the untiled run sees too)."""
    spans = grid_spans(grid_length, tile, overlap)
    return [
        Span(
            a * in_scale,
            in_length if b == grid_length else b * in_scale,
            a * out_scale,
            b * out_scale,
        )
        for a, b in spans
    ]


def ramp(n: int) -> torch.Tensor:
    """n weights rising from near 0 to near 1 (a raised cosine sampled at pixel centres); ramp(n) + its
    reverse is 1."""
    t = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    return 0.5 - 0.5 * torch.cos(math.pi * t)


def axis_weights(spans: list[Span], out_length: int) -> list[torch.Tensor]:
    """Each tile's weights along one axis (length out_stop - out_start): ramps over its overlaps with the
    previous and next tile, normalised so that the weights at every output pixel sum to 1; exactly 1 where a
    single tile covers the pixel."""
    weights = []
    for i, s in enumerate(spans):
        w = torch.ones(s.out_stop - s.out_start, dtype=torch.float64)
        if i > 0 and (n := spans[i - 1].out_stop - s.out_start) > 0:
            w[:n] *= ramp(n)
        if i + 1 < len(spans) and (n := s.out_stop - spans[i + 1].out_start) > 0:
            w[-n:] *= ramp(n).flip(0)
        weights.append(w)
    total = torch.zeros(out_length, dtype=torch.float64)
    for s, w in zip(spans, weights):
        total[s.out_start : s.out_stop] += w
    if not bool((total > 0).all()):
        raise ValueError("the tiles do not cover the output")
    return [(w / total[s.out_start : s.out_stop]).float() for s, w in zip(spans, weights)]


class Canvas:
    """The blended output, built tile by tile (only one tile's output is alive besides it)."""

    def __init__(self, rows: list[Span], cols: list[Span], out_shape: tuple[int, int]):
        self.rows, self.cols, self.out_shape = rows, cols, out_shape
        self.row_weights = axis_weights(rows, out_shape[0])
        self.col_weights = axis_weights(cols, out_shape[1])
        self.out: torch.Tensor | None = None
        self.dtype: torch.dtype | None = None

    def add(self, piece: torch.Tensor, row: int, col: int) -> None:
        """Blend in the output of tile (row, col), indices into rows and cols."""
        r, q = self.rows[row], self.cols[col]
        if self.out is None:
            self.out = piece.new_zeros(*piece.shape[:2], *self.out_shape, dtype=torch.float32)
            self.dtype = piece.dtype
        weight = self.row_weights[row].to(piece.device)[:, None] * self.col_weights[col].to(piece.device)
        self.out[:, :, r.out_start : r.out_stop, q.out_start : q.out_stop] += piece.float() * weight

    def result(self) -> torch.Tensor:
        assert self.out is not None and self.dtype is not None, "no tile was added"
        return self.out.to(self.dtype)


def tiled_map(
    fn: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    tile: int,
    overlap: int,
    *,
    in_scale: int,
    out_scale: int,
) -> torch.Tensor:
    """fn(x) computed in overlapping tiles, for an fn that maps (B, C, H, W) to (B, C', H', W') with
    H / in_scale == H' / out_scale (rounded down). `tile` and `overlap` count pixels of that common grid."""
    in_h, in_w = x.shape[-2:]
    grid_h, grid_w = in_h // in_scale, in_w // in_scale
    if grid_h < 1 or grid_w < 1:
        raise ValueError(f"input {in_h}×{in_w} is smaller than one latent pixel ({in_scale})")
    rows = axis_spans(in_h, grid_h, tile, overlap, in_scale, out_scale)
    cols = axis_spans(in_w, grid_w, tile, overlap, in_scale, out_scale)
    if len(rows) == 1 and len(cols) == 1:
        return fn(x)
    canvas = Canvas(rows, cols, (grid_h * out_scale, grid_w * out_scale))
    for i, r in enumerate(rows):
        for j, q in enumerate(cols):
            piece = fn(x[..., r.in_start : r.in_stop, q.in_start : q.in_stop])
            expected = (r.out_stop - r.out_start, q.out_stop - q.out_start)
            if tuple(piece.shape[-2:]) != expected:
                raise ValueError(f"a tile came out {tuple(piece.shape[-2:])}, expected {expected}")
            canvas.add(piece, i, j)
            del piece
    return canvas.result()
