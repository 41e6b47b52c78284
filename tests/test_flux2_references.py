"""FLUX.2 [klein] with reference images (--reference) through Engine.generate against diffusers'
Flux2KleinPipeline(image=...) on the same tiny random models, same seed, ≥ 45 dB; that the comparison catches a
dropped reference; the position ids against the pipeline's own; the pipeline's reference sizing (scale above 1024², floor
to 16 by a centre crop) against its own image processor; and the flags klein does not take refused in one
sentence (exit 2, no PNG)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers.pipelines.flux2.image_processor import Flux2ImageProcessor
from PIL import Image

from engine.contract.request import GenerateRequest, ModelFiles
from engine.generation import flux2_references
from engine.generation.pipeline import Engine, EngineOptions
from engine.models import flux2
from tests.metrics import psnr
from tests.test_flux2_engine import _run, klein  # noqa: F401 (the fixture)

MIN_PSNR = 45.0
SEED = 11
PROMPT = "the cat, now in a hat"
STEPS = 3
SMALL = 64


def _picture(width: int, height: int, seed: int = 0) -> Image.Image:
    """A smooth random picture (low-frequency noise upsampled), so the tiny VAE sees structure."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 3, height // 8 + 1, width // 8 + 1, generator=g)
    fine = torch.nn.functional.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)
    array = (fine[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    return Image.fromarray(array)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    path = tmp_path_factory.mktemp("ref") / "reference.png"
    _picture(250, 200).save(path)  # floored to 240×192 by a centre crop
    return path


def _theirs(pipe, image: Image.Image, size: int | None = None) -> np.ndarray:
    with torch.inference_mode():
        out = pipe(
            prompt=PROMPT,
            image=[image],
            width=size,
            height=size,
            num_inference_steps=STEPS,
            guidance_scale=1.0,
            generator=torch.Generator("cpu").manual_seed(SEED),
            output_type="np",
            max_sequence_length=512,
        ).images[0]
    return (out * 255).round().astype(np.uint8)


def _ours(root, out_dir, **overrides) -> np.ndarray:
    request = GenerateRequest(
        prompt=PROMPT,
        seed=SEED,
        steps=STEPS,
        device="cpu",
        dtype="fp32",
        out=str(out_dir / "klein.png"),
        files=ModelFiles(models_dir=str(root)),
        **overrides,
    )
    (path,) = Engine(EngineOptions(keep_models="never")).generate(request)
    return np.asarray(Image.open(path).convert("RGB"))


def test_one_reference_matches_the_pipeline(klein, reference, tmp_path):  # noqa: F811
    root, pipe = klein
    theirs = _theirs(pipe, Image.open(reference))
    ours = _ours(root, tmp_path, references=[str(reference)])  # size: the reference's, 240×192
    assert ours.shape == theirs.shape == (192, 240, 3)
    assert psnr(ours, theirs) >= MIN_PSNR
    # the tiny random transformer attends weakly: a small image beside a large reference shows its effect
    theirs = _theirs(pipe, Image.open(reference), SMALL)
    ours = _ours(root, tmp_path, references=[str(reference)], width=SMALL, height=SMALL)
    dropped = _ours(root, tmp_path / "d", width=SMALL, height=SMALL)
    print(f"PSNR {psnr(ours, theirs):.1f} dB; dropped reference {psnr(dropped, theirs):.1f}")
    assert theirs.std() > 5
    assert psnr(ours, theirs) >= MIN_PSNR
    assert psnr(dropped, theirs) < MIN_PSNR - 5


def test_two_references_match_the_pipeline(klein, reference, tmp_path):  # noqa: F811
    """Repeated --reference: both encoded, at t = 10 and 20, in the order given; dropping the second is caught.
    (Their order, t = 10 against 20, moves this tiny random model too little to be caught: ~53 dB.)"""
    root, pipe = klein
    second = tmp_path / "second.png"
    _picture(390, 420, seed=5).save(second)  # floored to 384×416
    with torch.inference_mode():
        out = pipe(
            prompt=PROMPT,
            image=[Image.open(reference), Image.open(second)],
            width=SMALL,
            height=SMALL,
            num_inference_steps=STEPS,
            guidance_scale=1.0,
            generator=torch.Generator("cpu").manual_seed(SEED),
            output_type="np",
            max_sequence_length=512,
        ).images[0]
    theirs = (out * 255).round().astype(np.uint8)
    ours = _ours(root, tmp_path / "o", references=[str(reference), str(second)], width=SMALL, height=SMALL)
    first_only = _ours(root, tmp_path / "f", references=[str(reference)], width=SMALL, height=SMALL)
    print(f"two references: {psnr(ours, theirs):.1f} dB, the second dropped {psnr(first_only, theirs):.1f}")
    assert psnr(ours, theirs) >= MIN_PSNR
    assert psnr(first_only, theirs) < MIN_PSNR - 3


@pytest.mark.parametrize("size", [(1100, 1000), (1500, 700), (90, 70), (64, 64), (300, 1000)])
def test_reference_sizing_is_the_pipelines(size):
    image = _picture(*size, seed=1)
    processor = Flux2ImageProcessor(vae_scale_factor=16)
    theirs = image
    if size[0] * size[1] > 1024 * 1024:
        theirs = processor._resize_to_target_area(theirs, 1024 * 1024)
    width, height = theirs.size[0] // 16 * 16, theirs.size[1] // 16 * 16
    theirs = processor.preprocess(theirs, height=height, width=width, resize_mode="crop")
    ours = flux2_references.to_pixels(flux2_references.prepare(image))
    assert ours.shape == theirs.shape
    assert flux2_references.reference_size(*size) == (width, height)
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)


def test_reference_ids_are_the_pipelines():
    from diffusers import Flux2KleinPipeline

    latents = [torch.zeros(1, 128, 3, 4), torch.zeros(1, 128, 2, 5)]
    theirs = Flux2KleinPipeline._prepare_image_ids(latents)
    assert torch.equal(flux2.reference_ids(1, [(3, 4), (2, 5)]), theirs)


# ---- bad input: exit 2, one sentence, no PNG ----


def test_bad_references_and_flags_are_refused(klein, reference, tmp_path, capsys):  # noqa: F811
    root, _ = klein
    base = ["--models-dir", str(root), "--device", "cpu"]
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    text = inputs / "notes.png"
    text.write_text("not a picture")
    err = _run(tmp_path, capsys, [*base, "--reference", str(text)])
    assert "--reference" in err and str(text) in err
    small = inputs / "small.png"
    _picture(48, 80).save(small)
    err = _run(tmp_path, capsys, [*base, "--reference", str(small)])
    assert str(small) in err and "64" in err
    for flags in (
        ["--init-image", str(reference), "--mask", str(reference)],
        ["--control-image", str(reference)],
        ["--controlnet", f"net.safetensors,image={reference}"],
    ):
        err = _run(tmp_path, capsys, [*base, *flags])
        assert flags[-2] in err or flags[0] in err
        assert "FLUX.2" in err
