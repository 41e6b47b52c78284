"""Tiled autoencoder decode/encode: exact for one tile, close for several, seamless, and the OOM fallback.

How close is close: the tiny random autoencoder's tiles differ from the untiled run mostly through GroupNorm
(each tile normalises with its own statistics; 32 groups of one channel each), and less through the mid-block
attention (global) and the zero padding at tile edges. Measured on the inputs below (max |error| over
max |untiled|, mean |error| over mean |untiled|; torch 2.13, CPU, float32):

    decode, 20×36 latent (160×288 image), 2 × 3 tiles of 16 overlapping by 8:   max 0.078, mean 0.076
    encode, 139×203 image (latent 17×25), 2 × 3 tiles of 128 overlapping by 64: max 0.103, mean 0.089

(With GroupNorm fed the untiled statistics the decode error drops to about a third; the rest is attention
and padding.) The thresholds sit 1.5× above that. Wrong assemblies of the same tile outputs land far above
them: equal weights in the overlaps (no ramp) max 0.39 / 0.36, the second column of tiles placed one image
pixel off max 0.49 (decode), one latent pixel off max 0.72 (encode) / 0.97 (decode), tiles transposed max 1.1.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine.fixtures import TinySpec, ae_state
from engine.generation import vae_tiling as vt
from engine.models.autoencoder import AutoEncoder, AutoEncoderParams
from engine.runtime.ops import load_into

DECODE_MAX, DECODE_MEAN = 0.12, 0.11
ENCODE_MAX, ENCODE_MEAN = 0.15, 0.13


@pytest.fixture(scope="module")
def vae() -> AutoEncoder:
    state = ae_state(TinySpec())
    p = AutoEncoderParams.from_shapes({k: tuple(v.shape) for k, v in state.items()})
    with torch.device("meta"):
        model = AutoEncoder(p)
    return load_into(model, dict(state), {}, torch.float32)


def _randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _image(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _errors(tiled: torch.Tensor, untiled: torch.Tensor) -> tuple[float, float]:
    assert tiled.shape == untiled.shape
    e = (tiled - untiled).abs()
    return float(e.max() / untiled.abs().max()), float(e.mean() / untiled.abs().mean())


@pytest.fixture(scope="module")
def decoded(vae):
    """A 20×36 latent (160×288 image: 2 × 3 tiles of 16 with overlap 8) and its untiled decode."""
    z = _randn(1, 16, 20, 36)
    with torch.inference_mode():
        return z, vae.decode(z)


@pytest.fixture(scope="module")
def encoded(vae):
    """A 139×203 image (not a multiple of 8: latent 17×25; 2 × 3 tiles of 128 with overlap 64), encoded."""
    x = _image(1, 3, 139, 203)
    with torch.inference_mode():
        return x, vae.encode(x)


def _tile_outputs(fn, x, tile, overlap, in_scale, out_scale):
    h, w = x.shape[-2:]
    rows = vt.axis_spans(h, h // in_scale, tile, overlap, in_scale, out_scale)
    cols = vt.axis_spans(w, w // in_scale, tile, overlap, in_scale, out_scale)
    with torch.inference_mode():
        pieces = {
            (i, j): fn(x[..., r.in_start : r.in_stop, q.in_start : q.in_stop])
            for i, r in enumerate(rows)
            for j, q in enumerate(cols)
        }
    return rows, cols, pieces


def _assemble(rows, cols, pieces, out_shape, shift_col1=0, transpose=False):
    """The module's Canvas, optionally given the second column of tiles at a shifted place."""
    cols = [
        vt.Span(q.in_start, q.in_stop, q.out_start + shift_col1, q.out_stop + shift_col1) if j == 1 else q
        for j, q in enumerate(cols)
    ]
    canvas = vt.Canvas(rows, cols, out_shape)
    for (i, j), piece in pieces.items():
        canvas.add(piece.transpose(-1, -2) if transpose else piece, i, j)
    return canvas.result()


# ---- the tiling itself, on functions that tiling cannot change ----


@pytest.mark.parametrize(
    "length, tile, overlap", [(5, 8, 2), (8, 8, 2), (9, 8, 2), (37, 12, 4), (113, 64, 16), (200, 64, 16)]
)
def test_grid_spans_cover_with_enough_overlap(length, tile, overlap):
    spans = vt.grid_spans(length, tile, overlap)
    assert spans[0][0] == 0 and spans[-1][1] == length
    assert all(b - a == min(tile, length) for a, b in spans)
    assert all(prev[1] - nxt[0] >= overlap for prev, nxt in zip(spans, spans[1:]))
    assert all(prev[0] < nxt[0] for prev, nxt in zip(spans, spans[1:]))


def test_bad_tile_sizes_are_refused():
    with pytest.raises(ValueError):
        vt.grid_spans(100, 16, 16)
    with pytest.raises(ValueError):
        vt.grid_spans(100, 16, -1)


def test_ramp_weights_sum_to_one_and_are_exactly_one_outside_overlaps():
    spans = vt.axis_spans(37, 37, 12, 4, 1, 8)
    weights = vt.axis_weights(spans, 37 * 8)
    total = torch.zeros(37 * 8)
    coverage = torch.zeros(37 * 8)
    for s, w in zip(spans, weights):
        total[s.out_start : s.out_stop] += w
        coverage[s.out_start : s.out_stop] += 1
    torch.testing.assert_close(total, torch.ones_like(total), atol=1e-6, rtol=0)
    for s, w in zip(spans, weights):
        alone = coverage[s.out_start : s.out_stop] == 1
        assert bool((w[alone] == 1).all())


@pytest.mark.parametrize("batch, h, w", [(1, 17, 29), (3, 9, 40), (2, 31, 8)])
def test_tiled_map_is_exact_for_a_pointwise_upsampler(batch, h, w):
    """Nearest up-sampling cannot tell tiles apart: any misplaced, swapped or mis-weighted tile shows."""

    def fn(t):
        return F.interpolate(t, scale_factor=8.0, mode="nearest") * 2 + 1

    z = _randn(batch, 4, h, w)
    tiled = vt.tiled_map(fn, z, 12, 4, in_scale=1, out_scale=8)
    torch.testing.assert_close(tiled, fn(z), atol=1e-5, rtol=0)


def test_tiled_map_is_exact_for_a_pooling_downsampler_on_odd_sizes():
    def fn(t):
        h, w = t.shape[-2] // 8 * 8, t.shape[-1] // 8 * 8
        return F.avg_pool2d(t[..., :h, :w], 8)

    x = _randn(2, 3, 131, 203)
    tiled = vt.tiled_map(fn, x, 8, 2, in_scale=8, out_scale=1)
    assert tiled.shape == (2, 3, 16, 25)
    torch.testing.assert_close(tiled, fn(x), atol=1e-6, rtol=0)


def test_per_tile_offsets_are_blended_without_a_seam():
    """Each tile's output shifted by its own constant (what per-tile GroupNorm statistics do): the ramp must
    spread the jump between tiles over the overlap, not cut it at one pixel."""

    def fn(t):
        return F.interpolate(t, scale_factor=8.0, mode="nearest") + t.mean() * 50

    z = _randn(1, 1, 24, 24)
    tiled = vt.tiled_map(fn, z, 16, 8, in_scale=1, out_scale=8)
    offset = tiled - F.interpolate(z, scale_factor=8.0, mode="nearest")
    spread = float(offset.max() - offset.min())
    assert spread > 1  # the tiles' offsets do differ
    steps = max(
        float((offset[..., 1:, :] - offset[..., :-1, :]).abs().max()),
        float((offset[..., :, 1:] - offset[..., :, :-1]).abs().max()),
    )
    # A raised cosine over 64 pixels moves at most pi/128 of the jump per pixel; a hard cut moves all of it.
    assert steps < 0.05 * spread


# ---- the autoencoder ----


def test_one_tile_is_exactly_untiled(vae, decoded, encoded):
    z, image = decoded
    assert torch.equal(vt.decode_tiled(vae, z, tile=64, overlap=16), image)
    assert torch.equal(vt.decode_tiled(vae, z, tile=36, overlap=8), image)  # exactly the size
    x, latent = encoded
    assert torch.equal(vt.encode_tiled(vae, x, tile=512, overlap=64), latent)
    assert torch.equal(
        vt.encode_tiled(vae, x, tile=200, overlap=64), latent
    )  # 25 latent pixels (and the remainder): one tile


def test_tiled_decode_is_close_to_untiled(vae, decoded):
    z, image = decoded
    tiled = vt.decode_tiled(vae, z, tile=16, overlap=8)
    assert tiled.shape == (1, 3, 160, 288)
    max_err, mean_err = _errors(tiled, image)
    assert max_err < DECODE_MAX and mean_err < DECODE_MEAN, (max_err, mean_err)


def test_tiled_encode_is_close_to_untiled_on_odd_sizes(vae, encoded):
    x, latent = encoded
    tiled = vt.encode_tiled(vae, x, tile=128, overlap=64)
    assert tiled.shape == latent.shape == (1, 16, 17, 25)
    max_err, mean_err = _errors(tiled, latent)
    assert max_err < ENCODE_MAX and mean_err < ENCODE_MEAN, (max_err, mean_err)


def test_tiled_encode_reads_the_remainder_as_untiled_does(vae, encoded):
    """139×203 is not a multiple of 8: the untiled encoder's last latent pixels see the 3 leftover pixels,
    so the last tiles must read them too."""
    x, latent = encoded
    spans = vt.axis_spans(203, 25, 16, 8, 8, 1)
    assert spans[-1].in_stop == 203 and spans[-1].out_stop == 25
    changed = x.clone()
    changed[..., 136:, :] = 1.0
    changed[..., :, 200:] = -1.0
    with torch.inference_mode():
        untiled_moved = vae.encode(changed)[..., -1, -1] - latent[..., -1, -1]
    tiled_moved = vt.encode_tiled(vae, changed, 128, 64) - vt.encode_tiled(vae, x, 128, 64)
    assert float(untiled_moved.abs().max()) > 0.01
    torch.testing.assert_close(
        tiled_moved[..., -1, -1], untiled_moved, atol=0.5 * float(untiled_moved.abs().max()), rtol=0
    )


def test_misplaced_tiles_fail_the_tolerance(vae, decoded, encoded):
    """The thresholds above are tight enough to catch a wrong assembly of the same tile outputs."""
    z, image = decoded
    rows, cols, pieces = _tile_outputs(vae.decode, z, 16, 8, 1, 8)
    out_shape = tuple(image.shape[-2:])
    assert _errors(_assemble(rows, cols, pieces, out_shape), image)[0] < DECODE_MAX  # the right assembly
    for shift in (1, -1, 8, -8):
        max_err, _ = _errors(_assemble(rows, cols, pieces, out_shape, shift_col1=shift), image)
        assert max_err > 2 * DECODE_MAX, (shift, max_err)
    # Square tiles written with their axes swapped.
    max_err, _ = _errors(_assemble(rows, cols, pieces, out_shape, transpose=True), image)
    assert max_err > 2 * DECODE_MAX

    x, latent = encoded
    rows, cols, pieces = _tile_outputs(vae.encode, x, 16, 8, 8, 1)
    out_shape = tuple(latent.shape[-2:])
    assert _errors(_assemble(rows, cols, pieces, out_shape), latent)[0] < ENCODE_MAX
    for shift in (1, -1):
        max_err, _ = _errors(_assemble(rows, cols, pieces, out_shape, shift_col1=shift), latent)
        assert max_err > 2 * ENCODE_MAX, (shift, max_err)


def test_no_ramp_fails_the_tolerance(vae, decoded, monkeypatch):
    """Equal weights across the overlaps (no ramp) put the tiles' edges, where they are worst, in the image."""
    z, image = decoded
    monkeypatch.setattr(vt, "ramp", lambda n: torch.ones(n, dtype=torch.float64))
    max_err, _ = _errors(vt.decode_tiled(vae, z, tile=16, overlap=8), image)
    assert max_err > 2 * DECODE_MAX


def test_batch_tiles_like_each_image_alone(vae):
    z = _randn(2, 16, 10, 14, seed=3)
    tiled = vt.decode_tiled(vae, z, tile=8, overlap=4)
    assert tiled.shape == (2, 3, 80, 112)
    alone = torch.cat([vt.decode_tiled(vae, z[i : i + 1], tile=8, overlap=4) for i in range(2)])
    torch.testing.assert_close(tiled, alone, atol=1e-5, rtol=1e-5)
    x = _image(2, 3, 67, 97, seed=4)
    latent = vt.encode_tiled(vae, x, tile=48, overlap=16)
    assert latent.shape == (2, 16, 8, 12)
    alone = torch.cat([vt.encode_tiled(vae, x[i : i + 1], tile=48, overlap=16) for i in range(2)])
    torch.testing.assert_close(latent, alone, atol=1e-5, rtol=1e-5)


# ---- the entry points ----


def _fail_first(monkeypatch, module, calls: int):
    """Make module.forward raise torch.OutOfMemoryError on its first `calls` calls."""
    original = module.forward
    count = {"n": 0}

    def forward(x):
        count["n"] += 1
        if count["n"] <= calls:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return original(x)

    monkeypatch.setattr(module, "forward", forward)
    return count


def test_small_images_go_through_untiled(vae, decoded, encoded):
    z, image = decoded
    messages = []
    assert torch.equal(vt.decode(vae, z, on_message=messages.append), image)
    x, latent = encoded
    assert torch.equal(vt.encode(vae, x, on_message=messages.append), latent)
    assert messages == []


def test_big_images_go_through_tiled(vae):
    z = _randn(1, 16, 12, 20, seed=5)
    messages = []
    out = vt.decode(vae, z, max_pixels=64 * 64, on_message=messages.append, tile=8, overlap=4)
    assert torch.equal(out, vt.decode_tiled(vae, z, 8, 4))
    assert messages == ["decoding 160×96 in tiles"]
    x = _image(1, 3, 72, 104, seed=6)
    out = vt.encode(vae, x, max_pixels=64 * 64, on_message=messages.append, tile=48, overlap=16)
    assert torch.equal(out, vt.encode_tiled(vae, x, 48, 16))


def test_out_of_memory_decodes_in_tiles(vae, monkeypatch):
    z = _randn(1, 16, 12, 20, seed=7)
    expected = vt.decode_tiled(vae, z, 8, 4)
    count = _fail_first(monkeypatch, vae.decoder, 1)
    messages = []
    out = vt.decode(vae, z, on_message=messages.append, tile=8, overlap=4)
    assert torch.equal(out, expected)
    assert messages == ["out of GPU memory while decoding: decoding in tiles"]
    assert count["n"] == 1 + 8  # the failed untiled run, then 2 × 4 tiles


def test_out_of_memory_in_tiles_tries_smaller_tiles(vae, monkeypatch):
    monkeypatch.setattr(vt, "MIN_TILE", 4)
    z = _randn(1, 16, 12, 12, seed=8)
    expected = vt.decode_tiled(vae, z, 4, 2)
    _fail_first(monkeypatch, vae.decoder, 2)  # the untiled run and the first tile of 8
    messages = []
    out = vt.decode(vae, z, on_message=messages.append, tile=8, overlap=4)
    assert torch.equal(out, expected)
    assert messages == [
        "out of GPU memory while decoding: decoding in tiles",
        "out of GPU memory while decoding in tiles: trying smaller tiles (32 pixels)",
    ]


def test_out_of_memory_encodes_in_tiles(vae, monkeypatch):
    x = _image(1, 3, 72, 104, seed=9)
    expected = vt.encode_tiled(vae, x, 48, 16)
    _fail_first(monkeypatch, vae.encoder, 1)
    messages = []
    out = vt.encode(vae, x, on_message=messages.append, tile=48, overlap=16)
    assert torch.equal(out, expected)
    assert messages == ["out of GPU memory while encoding: encoding in tiles"]


def test_out_of_memory_with_the_smallest_tiles_is_raised(vae, monkeypatch):
    z = _randn(1, 16, 40, 40, seed=10)
    _fail_first(monkeypatch, vae.decoder, 10**6)
    messages = []
    with pytest.raises(torch.OutOfMemoryError):
        vt.decode(vae, z, on_message=messages.append)
    assert messages[-1].endswith("(128 pixels)")  # tiles of 64 → 32 → 16 latent pixels, then no smaller


def test_other_errors_are_not_caught(vae, monkeypatch):
    def broken(x):
        raise RuntimeError("not a memory problem")

    monkeypatch.setattr(vae.decoder, "forward", broken)
    with pytest.raises(RuntimeError, match="not a memory problem"):
        vt.decode(vae, _randn(1, 16, 4, 4))


def test_cuda_out_of_memory_is_the_same_class():
    assert torch.cuda.OutOfMemoryError is torch.OutOfMemoryError


# ---- the decision ----

GIB = 1024**3


@pytest.mark.parametrize(
    "height, width, device, free, max_pixels, tiled",
    [
        (1024, 1024, "cuda", 80 * GIB, None, False),  # FLUX's usual size stays untiled on a GPU
        (1024, 1032, "cuda", 80 * GIB, None, True),
        (2048, 2048, "cuda:1", None, None, True),
        (1024, 1024, "cuda", 1 * GIB, None, True),  # needs about 2 GiB in bfloat16
        (768, 768, "cuda", 2 * GIB, None, False),
        (2048, 2048, "cpu", 64 * GIB, None, False),  # the CPU's default is higher
        (2048, 2056, "cpu", 64 * GIB, None, True),
        (2048, 2048, "cpu", 4 * GIB, None, True),  # little RAM
        (1024, 1024, "cpu", None, None, False),  # unknown free memory: the pixel count decides
        (512, 512, "cuda", 80 * GIB, 256 * 256, True),
        (256, 256, "cuda", 80 * GIB, 256 * 256, False),
        (64, 64, "cpu", None, 0, True),  # max_pixels=0: always tile
        (4096, 4096, torch.device("cuda", 0), 80 * GIB, 10**9, True),  # attention alone: 256 GiB
        (2048, 2048, "cuda", 80 * GIB, 10**9, False),  # 8 GiB of activations + 16 GiB of attention
        (2048, 2048, "cpu", 40 * GIB, None, True),  # 24 GiB estimated: more than half of the free RAM
        (2048, 2048, "cpu", 16 * GIB, None, True),  # the machine: untiled, killed at 20.6 GB
    ],
)
def test_should_tile(height, width, device, free, max_pixels, tiled):
    assert vt.should_tile(height, width, device, free, max_pixels=max_pixels) is tiled


def test_memory_estimate_follows_the_model_and_dtype():
    flux = AutoEncoder.__new__(AutoEncoder)
    flux.params = AutoEncoderParams(3, 128, (1, 2, 4, 4), 2, 16, 3)
    # The default bytes_per_pixel of should_tile is FLUX's decoder in bfloat16.
    assert vt._bytes_per_pixel(flux, torch.bfloat16, decoding=True) == 4 * 256 * 2
    assert vt._bytes_per_pixel(flux, torch.float32, decoding=True) == 4 * 256 * 4
    assert vt._bytes_per_pixel(flux, torch.bfloat16, decoding=False) == 4 * 128 * 2
    assert vt.downscale(flux) == 8


def test_free_bytes_on_cpu_is_known_or_none():
    free = vt.free_bytes("cpu")
    assert free is None or free > 0


# ---- issue 10: CPU decodes at 2048² and allocation failures on any device ----


def test_the_estimate_counts_the_mid_block_attention():
    # 2048×2048: 8 GiB of activations (bfloat16 FLUX decoder) and 65,536² float32 attention scores (16 GiB)
    assert vt.estimate_bytes(2048, 2048) == 2048 * 2048 * 2048 + 65536**2 * 4
    assert vt.estimate_bytes(1024, 512, batch=3) == 3 * (1024 * 512 * 2048 + (128 * 64) ** 2 * 4)
    # with 32 GiB free the activations alone (8 GiB) would fit in the CPU's share; the attention does not
    assert vt.should_tile(2048, 2048, "cpu", 32 * GIB) is True
    assert vt.should_tile(1024, 1024, "cpu", 32 * GIB) is False


@pytest.mark.parametrize(
    "error",
    [
        RuntimeError("DefaultCPUAllocator: not enough memory: you tried to allocate 17179869184 bytes."),
        RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory"),
        MemoryError(),
    ],
)
def test_a_cpu_allocation_failure_decodes_in_tiles(vae, monkeypatch, error):
    z = _randn(1, 16, 12, 20, seed=7)
    expected = vt.decode_tiled(vae, z, 8, 4)
    original = vae.decoder.forward
    calls = {"n": 0}

    def forward(x):
        calls["n"] += 1
        if calls["n"] == 1:
            raise error
        return original(x)

    monkeypatch.setattr(vae.decoder, "forward", forward)
    messages = []
    out = vt.decode(vae, z, on_message=messages.append, tile=8, overlap=4)
    assert torch.equal(out, expected)
    assert messages == ["out of memory while decoding: decoding in tiles"]


def test_a_2048_cpu_decode_goes_in_tiles_when_ram_is_short(vae, monkeypatch):
    """The decision as `decode` makes it: a latent of a 2048×2048 image on a machine with 16 GiB free is tiled
    before anything is allocated (the untiled decoder is never called)."""
    monkeypatch.setattr(vt, "free_bytes", lambda device: 16 * GIB)
    flux_like = AutoEncoderParams(3, 128, (1, 2, 4, 4), 2, 16, 3)
    monkeypatch.setattr(vae, "params", flux_like)  # FLUX's widths for the estimate, the tiny weights to run
    seen = []
    monkeypatch.setattr(vt, "_run", lambda verb, untiled, tiled, tile_first, *rest: seen.append(tile_first))
    vt.decode(vae, torch.zeros(1, 16, 256, 256, dtype=torch.bfloat16))
    assert seen == [True]
    seen.clear()
    monkeypatch.setattr(vt, "free_bytes", lambda device: 256 * GIB)
    vt.decode(vae, torch.zeros(1, 16, 256, 256, dtype=torch.bfloat16))
    assert seen == [False]
