"""The FLUX.2 autoencoder through vae_tiling (16 image pixels a latent token, 2×2-patched latents) and klein's
live previews.

Tiled ≈ untiled as tests/test_vae_tiling.py measures FLUX.1's (the same geometry in image pixels: a 160×288 image
in tiles of 128 pixels overlapping by 64; encode 144×208 in tiles of 128 overlapping by 64): the encode within
FLUX.1's tolerances, the decode within 1.5× its measured gap, which is this tiny random decoder's own (FLUX.1's
tiling of the same decoder shows the same); exactly equal with one tile; FLUX.1's 8 pixels a token refused. Previews: one per step, one pixel per token, from a 129 × 3 map."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from engine.contract.events import Message, Preview
from engine.contract.request import GenerateRequest, ModelFiles
from engine.fixtures_flux2 import Flux2Spec, flux2_ae_state
from engine.generation import vae_tiling as vt
from engine.generation.pipeline import Engine, EngineOptions
from engine.generation.preview import fit_projection, latent_preview
from engine.models.autoencoder import AutoEncoderParams
from engine.models.flux2_autoencoder import Flux2AutoEncoder, canonical_names, unpatch
from engine.runtime.ops import load_into
from tests.test_flux2_formats import klein  # noqa: F401 (the fixture)
from tests.test_vae_tiling import ENCODE_MAX, ENCODE_MEAN, _errors


@pytest.fixture(scope="module")
def vae() -> Flux2AutoEncoder:
    state = canonical_names(flux2_ae_state(Flux2Spec()))
    p = AutoEncoderParams.from_shapes({k: tuple(v.shape) for k, v in state.items()})
    with torch.device("meta"):
        model = Flux2AutoEncoder(p)
    return load_into(model, state, {}, torch.float32)


def _randn(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(0))


def test_the_downscale_is_sixteen(vae):
    assert vt.downscale(vae) == 16


def test_tiled_decode_is_flux1_tiling_of_the_same_decoder(vae):
    """The patched FLUX.2 latent in tiles of 8 tokens overlapping by 4 (128 and 64 pixels) against FLUX.1's
    tiling (16 latent pixels, 8 overlap: the same sizes in pixels) of the same decoder on the unpatched,
    denormalised latent: about the same gap to the untiled decode, so the gap is the tiny random decoder's own
    (per-tile GroupNorm statistics: max 0.205, mean 0.194 of the untiled run's scale here; FLUX.1's tiny decoder
    0.078 / 0.076), checked at 1.5× measured as tests/test_vae_tiling.py checks FLUX.1's."""
    z = _randn(1, 128, 10, 18)  # 160×288 pixels
    with torch.inference_mode():
        untiled = vae.decode(z)
        tiled = vt.decode_tiled(vae, z, 8, 4)
        inner = unpatch(vae.bn.denormalize(z))
        flux1_way = vt.tiled_map(vae.decoder, inner, 16, 8, in_scale=1, out_scale=8)
        whole = vt.decode_tiled(vae, z, 32, 4)
    worst, mean = _errors(tiled, untiled)
    print(f"decode: max {worst:.3f}, mean {mean:.3f}")
    assert tiled.shape == (1, 3, 160, 288)
    flux1_worst, flux1_mean = _errors(flux1_way, untiled)
    print(f"FLUX.1's tiling of the same decoder: max {flux1_worst:.3f}, mean {flux1_mean:.3f}")
    assert worst < 1.25 * flux1_worst and mean < 1.25 * flux1_mean
    assert worst < 1.5 * 0.205 and mean < 1.5 * 0.194
    assert torch.equal(whole, untiled)


def test_tiled_encode_is_close_to_untiled(vae):
    x = torch.rand(1, 3, 144, 208, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.inference_mode():
        untiled = vae.encode(x)
        tiled = vt.encode_tiled(vae, x, 128, 64)
    worst, mean = _errors(tiled, untiled)
    print(f"encode: max {worst:.3f}, mean {mean:.3f}")
    assert tiled.shape == untiled.shape == (1, 128, 9, 13)
    assert worst < ENCODE_MAX and mean < ENCODE_MEAN


def test_flux1_geometry_would_be_caught(vae, monkeypatch):
    """Tiles placed as if a token were 8 pixels (FLUX.1's): the assembly fails or lands far off."""
    z = _randn(1, 128, 10, 18)
    monkeypatch.setattr(vt, "downscale", lambda v: 8)
    with torch.inference_mode(), pytest.raises(ValueError):
        vt.decode_tiled(vae, z, 8, 4)


def test_a_big_klein_image_decodes_in_tiles(klein, tmp_path, monkeypatch):  # noqa: F811
    """Through Engine.generate: a decode the size rule tiles says so, and the image is close to the untiled one."""
    root, tokenizer, states, paths = klein

    def run(name: str, events: list) -> np.ndarray:
        request = GenerateRequest(
            prompt="a cat", width=256, height=128, steps=2, seed=1, device="cpu", dtype="fp32",
            out=str(tmp_path / f"{name}.png"),
            files=ModelFiles(transformer=str(paths["transformer"]), text_encoder=str(paths["text_encoder"]),
                             vae=str(paths["vae"]), text_tokenizer=str(tokenizer)),
        )  # fmt: skip
        (path,) = Engine(EngineOptions(keep_models="never", previews=True)).generate(request, events.append)
        return np.asarray(Image.open(path).convert("RGB"), dtype=np.float32)

    untiled_events, tiled_events = [], []
    untiled = run("untiled", untiled_events)
    monkeypatch.setattr(vt, "CPU_MAX_PIXELS", 128 * 128)
    from engine.generation import flux2_stages

    monkeypatch.setattr(flux2_stages, "DECODE_TILE", 8)
    monkeypatch.setattr(flux2_stages, "DECODE_OVERLAP", 4)
    tiled = run("tiled", tiled_events)
    assert any(isinstance(e, Message) and "in tiles" in e.text for e in tiled_events)
    assert not any(isinstance(e, Message) and "in tiles" in e.text for e in untiled_events)
    error = np.abs(tiled - untiled)
    print(
        f"engine decode: max {error.max() / 255:.3f}, mean {error.mean() / np.abs(untiled - 127.5).mean():.3f}"
    )
    assert error.mean() / np.abs(untiled - 127.5).mean() < 1.5 * 0.194

    previews = [e for e in untiled_events if isinstance(e, Preview)]
    assert [p.step for p in previews] == [1, 2]
    assert all((p.width, p.height, len(p.rgb)) == (16, 8, 16 * 8 * 3) for p in previews)
    assert previews[0].rgb != previews[-1].rgb


def test_the_preview_projection_takes_the_patched_latent(vae):
    """(128 + 1) × 3, fitted on 16 latents of 8×8 tokens against their decodes' 16×16 averages. (How well a
    linear map previews can only be judged on real weights: on tiny random decoders, FLUX.1's as well, it does
    no better than the mean colour.)"""
    projection = fit_projection(vae, torch.device("cpu"), torch.float32)
    assert projection.shape == (129, 3) and torch.isfinite(projection).all()
    preview = latent_preview(2, torch.zeros(128, 6, 7), projection)
    assert (preview.step, preview.width, preview.height, len(preview.rgb)) == (2, 7, 6, 7 * 6 * 3)
