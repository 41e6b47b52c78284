"""Our transformer and autoencoder against diffusers' on the same weights and inputs, at float32 tolerance.

Tighter than the image tests: a 1% error in RoPE or a norm scale is far below what 8-bit PNGs can show.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL

from engine.fixtures import TinySpec, ae_state, flux_state
from engine.generation.sampling import image_ids
from engine.models.autoencoder import AutoEncoder, AutoEncoderParams
from engine.models.flux1 import Flux, FluxParams
from engine.runtime.ops import load_into
from tests.oracle import diffusers_transformer, transformer_to_diffusers, vae_to_diffusers

TOLERANCE = 2e-5  # relative to the output's scale


def _ours(model_class, params, state):
    with torch.device("meta"):
        model = model_class(params)
    return load_into(model, dict(state), {}, torch.float32)


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def test_transformer_matches_diffusers():
    for spec in (TinySpec(), TinySpec(guidance=False, depth=2, depth_single=1, seed=5)):
        state = flux_state(spec)
        p = FluxParams.from_shapes({k: tuple(v.shape) for k, v in state.items()})
        assert p == spec.flux_params()  # every dimension read back off the tensors
        ours = _ours(Flux, p, state)
        theirs = diffusers_transformer(p).eval()
        theirs.load_state_dict(transformer_to_diffusers(state, p), strict=True)

        g = torch.Generator().manual_seed(0)
        batch, height, width, txt_len = 2, 64, 96, 7
        img = torch.randn(batch, (height // 16) * (width // 16), 64, generator=g)
        txt = torch.randn(batch, txt_len, p.context_in_dim, generator=g)
        y = torch.randn(batch, p.vec_in_dim, generator=g)
        t = torch.tensor([0.9, 0.35])
        guidance = torch.tensor([3.5, 2.0]) if p.guidance_embed else None
        ids = image_ids(batch, height, width)
        txt_ids = torch.zeros(batch, txt_len, 3)
        with torch.inference_mode():
            a = ours(img, ids, txt, txt_ids, t, y, guidance)
            b = theirs(
                hidden_states=img,
                encoder_hidden_states=txt,
                pooled_projections=y,
                timestep=t,
                img_ids=ids[0],
                txt_ids=txt_ids[0],
                guidance=guidance,
                return_dict=False,
            )[0]
        assert a.shape == b.shape
        assert _rel_err(a, b) < TOLERANCE


def test_autoencoder_matches_diffusers():
    spec = TinySpec()
    state = ae_state(spec)
    p = AutoEncoderParams.from_shapes({k: tuple(v.shape) for k, v in state.items()})
    assert p == AutoEncoderParams(3, spec.vae_ch, (1,) * spec.vae_levels, 1, 16, 3)
    ours = _ours(AutoEncoder, p, state)
    theirs = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(spec.vae_ch,) * 4,
        layers_per_block=1,
        latent_channels=16,
        norm_num_groups=32,
        use_quant_conv=False,
        use_post_quant_conv=False,
    ).eval()
    theirs.load_state_dict(vae_to_diffusers(state, p), strict=True)

    g = torch.Generator().manual_seed(1)
    z = torch.randn(1, 16, 8, 12, generator=g)
    x = torch.rand(1, 3, 64, 96, generator=g) * 2 - 1
    with torch.inference_mode():
        decoded, expected = ours.decoder(z), theirs.decode(z).sample
        encoded, expected_mean = ours.encoder(x).chunk(2, 1)[0], theirs.encode(x).latent_dist.mean
    assert decoded.shape == (1, 3, 64, 96)
    assert _rel_err(decoded, expected) < TOLERANCE
    assert _rel_err(encoded, expected_mean) < TOLERANCE
