"""The edit models' conditioning (engine/generation/conditioning.py) against diffusers' own pipeline helpers on
the same tiny autoencoder: FluxFillPipeline, FluxInpaintPipeline, FluxKontextPipeline, FluxControlPipeline
(built with only a VAE and a scheduler; their helpers are called directly). Every encode takes the posterior
mean (the engine's rule; diffusers samples where a generator is passed, so its `retrieve_latents` is pointed
at the mode)."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    FluxControlPipeline,
    FluxFillPipeline,
    FluxInpaintPipeline,
    FluxKontextPipeline,
)
from diffusers.pipelines.flux import pipeline_flux_fill, pipeline_flux_inpaint, pipeline_flux_kontext
from PIL import Image

from engine.contract.errors import UserError
from engine.fixtures import TinySpec, ae_state, flux_state
from engine.generation import conditioning as cond
from engine.generation import control_preprocess
from engine.generation.sampling import image_ids, img2img_start, pack, schedule, shift_mu
from engine.models.autoencoder import SCALE_FACTOR, SHIFT_FACTOR, AutoEncoder, AutoEncoderParams
from engine.models.flux1 import Flux, FluxParams
from engine.runtime.ops import load_into
from tests.oracle import diffusers_transformer, transformer_to_diffusers, vae_to_diffusers

W, H = 48, 32  # pixels: a 6 × 4 latent, 3 × 2 tokens
TOL = 1e-5


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.fixture(scope="module")
def vaes():
    state = ae_state(TinySpec())
    p = AutoEncoderParams.from_shapes({k: tuple(v.shape) for k, v in state.items()})
    with torch.device("meta"):
        ours = AutoEncoder(p)
    load_into(ours, dict(state), {}, torch.float32)
    theirs = AutoencoderKL(
        in_channels=p.in_channels,
        out_channels=p.out_ch,
        down_block_types=("DownEncoderBlock2D",) * len(p.ch_mult),
        up_block_types=("UpDecoderBlock2D",) * len(p.ch_mult),
        block_out_channels=tuple(p.ch * m for m in p.ch_mult),
        layers_per_block=p.num_res_blocks,
        latent_channels=p.z_channels,
        norm_num_groups=32,
        use_quant_conv=False,
        use_post_quant_conv=False,
        scaling_factor=SCALE_FACTOR,
        shift_factor=SHIFT_FACTOR,
    )
    theirs.load_state_dict(vae_to_diffusers(state, p), strict=True)
    return ours.eval(), theirs.eval()


def _pipe(cls, vae, scheduler=None):
    return cls(scheduler=scheduler or FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=None, tokenizer=None,
               text_encoder_2=None, tokenizer_2=None, transformer=None)  # fmt: skip


@pytest.fixture
def posterior_mean(monkeypatch):
    """diffusers' Fill/Inpaint helpers encode through `retrieve_latents` (a sample): take the mean instead."""
    mode = lambda encoded, generator=None, sample_mode="sample": encoded.latent_dist.mode()  # noqa: E731
    for module in (pipeline_flux_fill, pipeline_flux_inpaint, pipeline_flux_kontext):
        monkeypatch.setattr(module, "retrieve_latents", mode)


def _photo(width: int, height: int, seed: int = 0) -> Image.Image:
    """A smooth random image (noise blurred by up-sampling) so the resizes have something to do."""
    g = np.random.default_rng(seed)
    small = g.integers(0, 256, (max(height // 8, 2), max(width // 8, 2), 3), dtype=np.uint8)
    return Image.fromarray(small).resize((width, height), Image.Resampling.BICUBIC)


def _mask_image(width: int, height: int, mode: str = "L", seed: int = 1) -> Image.Image:
    """A mask with a white rectangle, a black band and levels around 128 (where binarisation decides); RGB
    masks get different channels, so that taking the luminance before or after resizing shows."""
    g = np.random.default_rng(seed)
    a = g.integers(100, 156, (height, width, 3), dtype=np.uint8)
    a[height // 4 : height // 2, width // 3 : width // 2] = 255
    a[: height // 8] = 0
    image = Image.fromarray(a)
    return image if mode == "RGB" else image.convert(mode)


# ---- images and masks ----


@pytest.mark.parametrize("mode", ["L", "RGB"])
def test_mask_is_binarised_as_diffusers(vaes, mode):
    pipe = _pipe(FluxFillPipeline, vaes[1])
    mask = _mask_image(40, 24, mode)  # another size: resized first, as diffusers does
    ours = cond.load_mask(mask, W, H)
    theirs = pipe.mask_processor.preprocess(mask, height=H, width=W)
    assert ours.shape == (1, 1, H, W)
    assert set(ours.unique().tolist()) == {0.0, 1.0}
    assert torch.equal(ours, theirs)


def test_pixels_as_diffusers(vaes):
    pipe = _pipe(FluxFillPipeline, vaes[1])
    image = _photo(40, 24)
    ours = cond.to_pixels(image, W, H)
    theirs = pipe.image_processor.preprocess(image, height=H, width=W)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)


def test_edit_size_floors_to_16_as_diffusers(vaes):
    pipe = _pipe(FluxFillPipeline, vaes[1])
    for size in [(48, 32), (50, 47), (1000, 667), (17, 31)]:
        image = Image.new("RGB", size)
        height, width = pipe.image_processor.get_default_height_width(image)
        assert cond.edit_size(image) == (width, height)
    assert cond.edit_size(Image.new("RGB", (10, 40))) == (16, 32)  # never below one 16-pixel patch


# ---- FLUX.1 Fill ----


def _fill_theirs(pipe, image, mask_image, batch):
    init = pipe.image_processor.preprocess(image, height=H, width=W)
    mask = pipe.mask_processor.preprocess(mask_image, height=H, width=W)
    with torch.inference_mode():
        mask_tokens, latents = pipe.prepare_mask_latents(
            mask, init * (1 - mask), batch, 16, 1, H, W, torch.float32, torch.device("cpu"), None
        )
    return torch.cat((latents, mask_tokens), dim=-1)


def test_fill_conditioning_matches_diffusers_and_bfl(vaes, posterior_mean):
    ours_vae, theirs_vae = vaes
    image, mask_image = _photo(W, H), _mask_image(W, H)
    pixels, mask = cond.to_pixels(image, W, H), cond.load_mask(mask_image, W, H)
    with torch.inference_mode():
        ours = cond.fill_conditioning(ours_vae, pixels, mask, batch=2)
    theirs = _fill_theirs(_pipe(FluxFillPipeline, theirs_vae), image, mask_image, 2)
    assert ours.shape == (2, (H // 16) * (W // 16), 320)
    assert _rel(ours, theirs) < TOL
    # BFL's prepare_fill: the mask folded with "b (h ph) (w pw) -> b (ph pw) h w" (8 × 8), which is
    # pixel_unshuffle for one channel, then packed; the masked image encoded and packed before it
    assert torch.equal(ours[..., 64:], pack(torch.nn.functional.pixel_unshuffle(mask, 8)).repeat(2, 1, 1))
    with torch.inference_mode():
        unmasked = pack(ours_vae.encode(pixels))
    assert _rel(ours[:1, :, :64], unmasked) > 1e-2  # the image was masked before encoding


def test_outpaint_canvas():
    image = _photo(40, 24)
    canvas, mask = cond.outpaint_canvas(image, 8, 4, 16, 0)
    assert canvas.size == (64, 32)  # 40 + 8 + 16 = 64; 24 + 4 = 28 → 32 (bottom margin grows to 16s)
    a, m = np.asarray(canvas), np.asarray(mask)
    assert np.array_equal(a[4:28, 8:48], np.asarray(image))  # the kept pixels, untouched
    assert (m[4:28, 8:48] == 0).all()
    keep = np.zeros_like(m, dtype=bool)
    keep[4:28, 8:48] = True
    assert (m[~keep] == 255).all()  # every new pixel is repaint
    with pytest.raises(ValueError):
        cond.outpaint_canvas(image, -1, 0, 0, 0)


def test_outpaint_through_fill_matches_diffusers(vaes, posterior_mean):
    canvas, mask_image = cond.outpaint_canvas(_photo(32, 16), 16, 0, 0, 16)
    assert canvas.size == (W, H)
    with torch.inference_mode():
        ours = cond.fill_conditioning(vaes[0], cond.to_pixels(canvas, W, H), cond.load_mask(mask_image, W, H))
    assert _rel(ours, _fill_theirs(_pipe(FluxFillPipeline, vaes[1]), canvas, mask_image, 1)) < TOL


# ---- the conditioned transformer (Fill 384, Canny/Depth 128 input features) ----


def _model_pair(in_channels: int):
    state = flux_state(TinySpec(in_channels=in_channels, depth=1, depth_single=1))
    p = FluxParams.from_shapes({k: tuple(v.shape) for k, v in state.items()})
    with torch.device("meta"):
        ours = Flux(p)
    load_into(ours, dict(state), {}, torch.float32)
    theirs = diffusers_transformer(p).eval()
    theirs.load_state_dict(transformer_to_diffusers(state, p), strict=True)
    return p, ours.eval(), theirs


def _model_inputs(p: FluxParams):
    g = torch.Generator().manual_seed(5)
    img = torch.randn(1, (H // 16) * (W // 16), 64, generator=g)
    txt = torch.randn(1, 4, p.context_in_dim, generator=g)
    y = torch.randn(1, p.vec_in_dim, generator=g)
    return img, txt, y, torch.tensor([0.6]), torch.tensor([3.5])


@pytest.mark.parametrize("kind", ["fill", "control"])
def test_conditioned_transformer_matches_diffusers(vaes, posterior_mean, kind):
    """Our img_cond through engine.models.flux1.Flux gives what diffusers' transformer gives for its own
    pipeline's conditioning concatenated to the hidden states; a missing conditioning would show."""
    image = _photo(W, H)
    if kind == "fill":
        p, ours_model, theirs_model = _model_pair(384)
        mask_image = _mask_image(W, H)
        with torch.inference_mode():
            ours_cond = cond.fill_conditioning(
                vaes[0], cond.to_pixels(image, W, H), cond.load_mask(mask_image, W, H)
            )
        theirs_cond = _fill_theirs(_pipe(FluxFillPipeline, vaes[1]), image, mask_image, 1)
    else:
        p, ours_model, theirs_model = _model_pair(128)
        with torch.inference_mode():
            ours_cond = cond.control_conditioning(vaes[0], image, W, H)
        theirs_cond = _control_theirs(_pipe(FluxControlPipeline, vaes[1]), image, 1)
    img, txt, y, t, guidance = _model_inputs(p)
    ids, txt_ids = image_ids(1, H, W), torch.zeros(1, txt.shape[1], 3)
    with torch.inference_mode():
        ours = ours_model(img, ids, txt, txt_ids, t, y, guidance, img_cond=ours_cond)
        blank = ours_model(img, ids, txt, txt_ids, t, y, guidance, img_cond=torch.zeros_like(ours_cond))
        theirs = theirs_model(hidden_states=torch.cat((img, theirs_cond), -1), encoder_hidden_states=txt,
                              pooled_projections=y, timestep=t, img_ids=ids[0], txt_ids=txt_ids[0],
                              guidance=guidance, return_dict=False)[0]  # fmt: skip
    assert ours.shape == img.shape
    assert _rel(ours, theirs) < 2e-5
    assert _rel(blank, theirs) > 1e-3


# ---- latent-blend inpainting ----


def test_latent_mask_matches_diffusers(vaes):
    pipe = _pipe(FluxInpaintPipeline, vaes[1])
    mask_image = _mask_image(40, 24, "RGB")
    mask = pipe.mask_processor.preprocess(mask_image, height=H, width=W)
    latents = torch.zeros(1, 16, H // 8, W // 8)  # 16 channels: the helper takes them as latents, no encode
    theirs, _ = pipe.prepare_mask_latents(
        mask, latents, 1, 16, 1, H, W, torch.float32, torch.device("cpu"), None
    )
    ours = cond.latent_mask(cond.load_mask(mask_image, W, H))
    assert ours.shape == (1, (H // 16) * (W // 16), 64)
    assert torch.equal(ours, theirs)
    assert 0 < float(ours.mean()) < 1


def test_inpaint_blend_follows_diffusers_loop(vaes):
    """The whole latent-blend loop without a transformer (a fixed velocity field): our schedule, img2img start
    and `InpaintBlend` after each Euler step against FluxInpaintPipeline's scheduler calls, step for step."""
    steps, denoise, tokens = 6, 0.7, (H // 16) * (W // 16)
    g = torch.Generator().manual_seed(3)
    x0, noise = torch.randn(1, tokens, 64, generator=g), torch.randn(1, tokens, 64, generator=g)
    mask = (torch.rand(1, tokens, 64, generator=g) > 0.5).float()
    field = torch.randn(1, tokens, 64, generator=g)
    velocity = lambda x, t: 0.5 * x + t * field  # noqa: E731

    mu = shift_mu(tokens)
    x, times = img2img_start(noise, x0, schedule(steps, mu), denoise)
    blend = cond.InpaintBlend(x0, noise, mask)
    for t, t_next in zip(times[:-1], times[1:]):
        x = blend(x + (t_next - t) * velocity(x, t), t_next)

    sched = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    timesteps, _ = _pipe(FluxInpaintPipeline, vaes[1], sched).get_timesteps(steps, denoise, "cpu")
    latents = sched.scale_noise(x0, timesteps[:1], noise)
    for i, t in enumerate(timesteps):
        latents = sched.step(velocity(latents, float(t) / 1000), t, latents, return_dict=False)[0]
        proper = x0
        if i < len(timesteps) - 1:
            proper = sched.scale_noise(x0, torch.tensor([timesteps[i + 1]]), noise)
        latents = (1 - mask) * proper + mask * latents
    assert len(times) - 1 == len(timesteps)
    assert _rel(x, latents) < 1e-5
    assert _rel(x, latents * mask + (1 - mask) * x0) < 1e-5  # what is kept is the init image at the end
    assert _rel(x * mask, x0 * mask) > 1e-2  # and what is masked was repainted


# ---- FLUX.1 Kontext ----


def test_kontext_table_and_choice():
    assert list(cond.KONTEXT_RESOLUTIONS) == list(pipeline_flux_kontext.PREFERRED_KONTEXT_RESOLUTIONS)
    assert cond.kontext_size(1000, 1000) == (1024, 1024)
    assert cond.kontext_size(1920, 1080) == (1392, 752)  # 16:9 = 1.78: 1392/752 = 1.85 beats 1328/800 = 1.66
    assert cond.kontext_size(1080, 1920) == (752, 1392)
    assert cond.kontext_size(6000, 100) == (1568, 672)  # beyond the table: its widest
    assert cond.kontext_size(100, 6000) == (672, 1568)
    for w, h in cond.KONTEXT_RESOLUTIONS:
        assert cond.kontext_size(w * 3, h * 3) == (w, h)  # every entry is its own nearest
    # the nearest by aspect ratio, checked against every entry
    for w, h in [(640, 480), (500, 333), (333, 500), (1200, 1000)]:
        chosen = cond.kontext_size(w, h)
        best = min(abs(w / h - a / b) for a, b in cond.KONTEXT_RESOLUTIONS)
        assert abs(w / h - chosen[0] / chosen[1]) == best


SMALL_TABLE = ((32, 64), (48, 48), (64, 32), (96, 32))  # sizes the tiny VAE encodes in a blink


def test_reference_tokens_match_diffusers_kontext(vaes):
    pipe = _pipe(FluxKontextPipeline, vaes[1])
    image = _photo(70, 40)  # 1.75: nearest (64, 32) in the small table
    with torch.inference_mode():
        refs = cond.reference_tokens(vaes[0], [image], batch=2, resolutions=SMALL_TABLE)
    assert refs.sizes == ((64, 32),) and refs.output_size == (64, 32)
    w, h = refs.output_size
    resized = pipe.image_processor.preprocess(pipe.image_processor.resize(image, h, w), h, w)
    with torch.inference_mode():
        _, theirs, _, theirs_ids = pipe.prepare_latents(
            resized, 2, 16, H, W, torch.float32, torch.device("cpu")
        )
    assert refs.tokens.shape == theirs.shape == (2, (h // 16) * (w // 16), 64)
    assert _rel(refs.tokens, theirs) < TOL
    assert torch.equal(refs.ids[0], theirs_ids) and torch.equal(refs.ids[1], theirs_ids)
    assert (refs.ids[..., 0] == 1).all()


def test_several_references_are_placed_as_comfyui():
    """ComfyUI's "offset" placement (latent sizes (h, w); the box of those before grows as each lands):
    (4, 6) at the origin → box (4, 6); (4, 4): 4+4 > 4+6 is false → below, row offset 4 (2 patches) → box (8, 6);
    (6, 2): 6+8 > 2+6 → to the right, col offset 6 (3 patches) → box (8, 8)."""
    sizes = [(4, 6), (4, 4), (6, 2)]
    ids = cond.reference_ids(sizes)
    runs = ids[0].split([h * w // 4 for h, w in sizes])
    offsets = [(0, 0), (2, 0), (0, 3)]
    for run, (h, w), (dr, dc) in zip(runs, sizes, offsets):
        expected = image_ids(1, h * 8, w * 8)[0].clone()
        expected[:, 0] = 1
        expected[:, 1] += dr
        expected[:, 2] += dc
        assert torch.equal(run, expected)


def test_several_references_concatenate_in_order(vaes):
    images = [_photo(70, 40, seed=1), _photo(40, 40, seed=2)]
    with torch.inference_mode():
        both = cond.reference_tokens(vaes[0], images, resolutions=SMALL_TABLE)
        first = cond.reference_tokens(vaes[0], images[:1], resolutions=SMALL_TABLE)
        second = cond.reference_tokens(vaes[0], images[1:], resolutions=SMALL_TABLE)
    assert both.sizes == ((64, 32), (48, 48)) and both.output_size == (64, 32)
    n = first.tokens.shape[1]
    assert torch.equal(both.tokens, torch.cat((first.tokens, second.tokens), 1))
    assert torch.equal(both.ids[:, :n], first.ids)
    assert torch.equal(both.ids, cond.reference_ids([(4, 8), (6, 6)]))
    assert not torch.equal(both.ids[:, n:], second.ids)  # the second one is offset, not on top of the first


# ---- FLUX.1 Canny/Depth [dev] ----


def _control_theirs(pipe, image, batch):
    """FluxControlPipeline's control path: prepare_image, the VAE encode (the mean, not `.sample()`), scaled and
    shifted, then _pack_latents, as its __call__ does inline."""
    control = pipe.prepare_image(image, W, H, batch, 1, torch.device("cpu"), torch.float32)
    with torch.inference_mode():
        latents = pipe.vae.encode(control).latent_dist.mode()
    latents = (latents - pipe.vae.config.shift_factor) * pipe.vae.config.scaling_factor
    return pipe._pack_latents(latents, batch, 16, *latents.shape[2:])


def test_control_conditioning_matches_diffusers(vaes):
    image = _photo(40, 24)  # resized to the output size
    with torch.inference_mode():
        ours = cond.control_conditioning(vaes[0], image, W, H, batch=2)
    theirs = _control_theirs(_pipe(FluxControlPipeline, vaes[1]), image, 2)
    assert ours.shape == (2, (H // 16) * (W // 16), 64)
    assert _rel(ours, theirs) < TOL


def test_canny_preprocessor():
    cv2 = pytest.importorskip("cv2")
    a = np.zeros((H, W, 3), dtype=np.uint8)
    a[:, W // 2 :] = 255  # one vertical edge
    edges = control_preprocess.canny(Image.fromarray(a), W, H)
    e = np.asarray(edges)
    assert edges.mode == "RGB" and edges.size == (W, H)
    assert (e[..., 0] == e[..., 1]).all() and (e[..., 0] == e[..., 2]).all()
    assert set(np.unique(e).tolist()) == {0, 255}
    columns = np.nonzero(e[..., 0].any(axis=0))[0]
    assert set(columns.tolist()) <= {W // 2 - 1, W // 2}  # the edge, nowhere else
    assert np.array_equal(e[..., 0], cv2.Canny(a, 50, 200))


def test_canny_without_opencv_says_so(monkeypatch):
    monkeypatch.setitem(sys.modules, "cv2", None)  # import cv2 raises ImportError
    with pytest.raises(UserError, match="opencv-python-headless"):
        control_preprocess.canny(Image.new("RGB", (W, H)), W, H)


# ---- whole pipelines: our conditioning, transformer and Euler loop against diffusers' __call__ ----


def _euler(model, x, cond_kwargs, txt, y, steps, guidance):
    tokens = x.shape[1]
    times = schedule(steps, shift_mu(tokens))
    ids, txt_ids = image_ids(1, H, W), torch.zeros(1, txt.shape[1], 3)
    g = torch.tensor([guidance])
    with torch.inference_mode():
        for t, t_next in zip(times[:-1], times[1:]):
            v = model(x, ids, txt, txt_ids, torch.tensor([t]), y, g, **cond_kwargs)
            x = x + (t_next - t) * v
    return x


def _scheduler():
    return FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                           base_image_seq_len=256, max_image_seq_len=4096)  # fmt: skip


@pytest.mark.parametrize("kind", ["fill", "kontext"])
def test_pipeline_end_to_end(vaes, posterior_mean, kind):
    """FluxFillPipeline / FluxKontextPipeline run whole (given text embeddings and our noise, latents out)
    against our conditioning fed to engine.models.flux1.Flux in the engine's Euler loop; the same run without
    the conditioning lands far away, so the comparison would catch a missing one."""
    steps, guidance = 3, 3.5
    p, ours_model, theirs_model = _model_pair(384 if kind == "fill" else 64)
    noise = pack(torch.randn(1, 16, H // 8, W // 8, generator=torch.Generator().manual_seed(7)))
    g = torch.Generator().manual_seed(8)
    txt, y = torch.randn(1, 4, p.context_in_dim, generator=g), torch.randn(1, p.vec_in_dim, generator=g)
    image = _photo(W, H)
    common = dict(prompt_embeds=txt, pooled_prompt_embeds=y, latents=noise, height=H, width=W,
                  num_inference_steps=steps, guidance_scale=guidance, output_type="latent")  # fmt: skip
    if kind == "fill":
        mask_image = _mask_image(W, H)
        pipe = FluxFillPipeline(scheduler=_scheduler(), vae=vaes[1], text_encoder=None, tokenizer=None,
                                text_encoder_2=None, tokenizer_2=None, transformer=theirs_model)  # fmt: skip
        with torch.inference_mode():
            cond_kwargs = {"img_cond": cond.fill_conditioning(vaes[0], cond.to_pixels(image, W, H),
                                                              cond.load_mask(mask_image, W, H))}  # fmt: skip
        blank = {"img_cond": torch.zeros_like(cond_kwargs["img_cond"])}
        call = dict(image=image, mask_image=mask_image)
    else:
        pipe = FluxKontextPipeline(scheduler=_scheduler(), vae=vaes[1], text_encoder=None, tokenizer=None,
                                   text_encoder_2=None, tokenizer_2=None, transformer=theirs_model)  # fmt: skip
        reference = _photo(64, 32, seed=4)
        with torch.inference_mode():
            refs = cond.reference_tokens(vaes[0], [reference], resolutions=((64, 32),))
        cond_kwargs = {"ref_img": refs.tokens, "ref_ids": refs.ids}
        blank = {}
        call = dict(image=reference, _auto_resize=False, max_area=W * H)
    pipe.set_progress_bar_config(disable=True)
    with torch.inference_mode():
        theirs = pipe(**common, **call).images
    ours = _euler(ours_model, noise, cond_kwargs, txt, y, steps, guidance)
    without = _euler(ours_model, noise, blank, txt, y, steps, guidance)
    assert ours.shape == theirs.shape == noise.shape
    assert _rel(ours, theirs) < 1e-4
    assert _rel(without, theirs) > 1e-2


def test_canny_hands_opencv_the_resized_rgb_image(monkeypatch):
    """Without OpenCV installed, the plumbing around it: the image resized (Lanczos) to the output size, as
    8-bit RGB, BFL's thresholds, the edge map back as three equal channels."""
    seen = {}

    class FakeCv2:
        @staticmethod
        def Canny(array, low, high):  # noqa: N802  (OpenCV's name)
            seen.update(array=array.copy(), low=low, high=high)
            return np.where(array[..., 0] > 127, 255, 0).astype(np.uint8)

    monkeypatch.setitem(sys.modules, "cv2", FakeCv2)
    image = _photo(40, 24)
    edges = control_preprocess.canny(image, W, H)
    resized = np.asarray(image.resize((W, H), Image.Resampling.LANCZOS))
    assert seen["array"].dtype == np.uint8 and np.array_equal(seen["array"], resized)
    assert (seen["low"], seen["high"]) == (50, 200)
    e = np.asarray(edges)
    assert edges.mode == "RGB" and edges.size == (W, H)
    assert np.array_equal(e[..., 0], np.where(resized[..., 0] > 127, 255, 0))
    assert (e[..., 0] == e[..., 1]).all() and (e[..., 0] == e[..., 2]).all()
