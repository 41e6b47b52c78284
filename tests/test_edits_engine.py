"""Issue 14's edits through the CLI (--mask, --outpaint, --control-image, --reference) against diffusers'
FluxFillPipeline, FluxInpaintPipeline, FluxControlPipeline and FluxKontextPipeline on the same tiny weights
(written in the real formats) and the same noise; and each edit's bad input refused in one sentence.
diffusers samples the autoencoder's posterior where the engine takes its mean: the oracle takes the mean too."""

from __future__ import annotations

import inspect
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import FluxControlPipeline, FluxFillPipeline, FluxInpaintPipeline, FluxKontextPipeline
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from PIL import Image

from engine import fixtures
from engine.cli import main
from engine.generation import conditioning
from engine.generation.png_output import read_request
from engine.generation.sampling import make_noise, pack
from tests.conftest import _make_set
from tests.oracle import build_pipeline, run_img2img
from tests.test_engine_matches_diffusers import FP32, assert_close, psnr

PROMPT = "a red door"


@pytest.fixture(scope="module")
def fill_set(tmp_path_factory):
    return _make_set(tmp_path_factory.mktemp("fill"), replace(fixtures.TinySpec(), in_channels=384))


@pytest.fixture(scope="module")
def canny_set(tmp_path_factory):
    return _make_set(tmp_path_factory.mktemp("canny"), replace(fixtures.TinySpec(), in_channels=128))


@pytest.fixture(autouse=True)
def posterior_mean(monkeypatch):
    monkeypatch.setattr(DiagonalGaussianDistribution, "sample", lambda self, generator=None: self.mean)


def _photo(width: int, height: int, seed: int = 0) -> Image.Image:
    g = np.random.default_rng(seed)
    small = g.integers(0, 256, (max(height // 8, 2), max(width // 8, 2), 3), dtype=np.uint8)
    return Image.fromarray(small).resize((width, height), Image.Resampling.BICUBIC)


def _mask(width: int, height: int) -> Image.Image:
    a = np.zeros((height, width), dtype=np.uint8)
    a[height // 4 : 3 * height // 4, width // 3 :] = 255
    return Image.fromarray(a)


def _save(image: Image.Image, path: Path) -> str:
    image.save(path)
    return str(path)


def _ours(tiny, tmp_path: Path, *args: str) -> tuple[np.ndarray, dict]:
    out = tmp_path / f"out{len(list(tmp_path.glob('out*.png')))}.png"
    model = ("--models-dir", str(tiny.models_dir))
    assert main(["generate", *model, "--prompt", PROMPT, "--seed", "5", "--steps", "2", *args, *FP32,
                 "--out", str(out)]) == 0  # fmt: skip
    return np.asarray(Image.open(out).convert("RGB")), read_request(out)


def _oracle(cls, tiny):
    base = build_pipeline(tiny.stored_as_float(), tiny.clip_tokenizer, tiny.t5_tokenizer)
    wanted = inspect.signature(cls.__init__).parameters
    pipe = cls(**{k: v for k, v in base.components.items() if k in wanted})
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _run(pipe, width: int, height: int, steps: int = 2, **kwargs) -> np.ndarray:
    if "strength" in kwargs:  # the pipeline noises the image itself: our seed's noise through its generator
        kwargs["generator"] = torch.Generator("cpu").manual_seed(
            5
        )  # (B, 16, H/8, W/8) float32, as make_noise
    else:
        kwargs["latents"] = pack(make_noise(5, 1, height, width))
    with torch.inference_mode():
        result = pipe(prompt=PROMPT, width=width, height=height, num_inference_steps=steps,
                      max_sequence_length=512, output_type="np", **kwargs).images  # fmt: skip
    return (result * 255).round().astype(np.uint8)[0]


def test_fill_matches_diffusers(fill_set, tmp_path):
    init, mask = _photo(96, 64), _mask(96, 64)
    ours, record = _ours(fill_set, tmp_path, "--init-image", _save(init, tmp_path / "i.png"),
                         "--mask", _save(mask, tmp_path / "m.png"))  # fmt: skip
    assert (record["width"], record["height"], record["guidance"]) == (96, 64, 30.0)  # the edit's; Fill's
    pipe = _oracle(FluxFillPipeline, fill_set)
    theirs = _run(pipe, 96, 64, image=init, mask_image=mask, guidance_scale=30.0)
    assert_close(ours, theirs)


def test_outpaint_matches_diffusers_fill_on_the_canvas(fill_set, tmp_path):
    init = _photo(64, 48)
    path = _save(init, tmp_path / "i.png")
    ours, record = _ours(fill_set, tmp_path, "--init-image", path, "--outpaint", "16,0,8,10")
    canvas, mask = conditioning.outpaint_canvas(init, 16, 0, 8, 10)
    assert canvas.size == (96, 64) and (record["width"], record["height"]) == (96, 64)
    pipe = _oracle(FluxFillPipeline, fill_set)
    theirs = _run(pipe, 96, 64, image=canvas, mask_image=mask, guidance_scale=30.0)
    assert_close(ours, theirs)


def test_outpaint_and_fill_below_denoise_1_match_diffusers_strength(fill_set, tmp_path):
    """--denoise < 1 with Fill starts from the (canvas) image noised to the first kept time, as FluxFillPipeline's
    strength does; at denoise 1 the start would be pure noise, far from it."""
    init = _photo(64, 48)
    path = _save(init, tmp_path / "i.png")
    ours, _ = _ours(fill_set, tmp_path, "--init-image", path, "--outpaint", "16,0,8,10", "--denoise", "0.6",
                    "--steps", "3")  # fmt: skip
    canvas, mask = conditioning.outpaint_canvas(init, 16, 0, 8, 10)
    pipe = _oracle(FluxFillPipeline, fill_set)
    theirs = _run(pipe, 96, 64, image=canvas, mask_image=mask, guidance_scale=30.0, strength=0.6, steps=3)
    assert_close(ours, theirs)
    from_noise, _ = _ours(fill_set, tmp_path, "--init-image", path, "--outpaint", "16,0,8,10", "--steps", "3")
    assert psnr(from_noise, theirs) < 35.0
    photo, hole = _photo(96, 64, seed=1), _mask(96, 64)
    ours, _ = _ours(fill_set, tmp_path, "--init-image", _save(photo, tmp_path / "p.png"), "--mask",
                    _save(hole, tmp_path / "h.png"), "--denoise", "0.6", "--steps", "3")  # fmt: skip
    theirs = _run(pipe, 96, 64, image=photo, mask_image=hole, guidance_scale=30.0, strength=0.6, steps=3)
    assert_close(ours, theirs)


def test_control_matches_diffusers(canny_set, tmp_path):
    control = _photo(80, 64, seed=3)
    ours, record = _ours(canny_set, tmp_path, "--control-image", _save(control, tmp_path / "c.png"))
    assert record["guidance"] == 30.0
    theirs = _run(_oracle(FluxControlPipeline, canny_set), 80, 64, control_image=control, guidance_scale=30.0)
    assert_close(ours, theirs)


def test_kontext_matches_diffusers(dev_set, tmp_path, monkeypatch):
    from diffusers.pipelines.flux import pipeline_flux_kontext

    table = ((64, 64), (96, 64), (64, 96))  # the real table's sizes would be too slow on tiny CPU models
    monkeypatch.setattr(conditioning, "KONTEXT_RESOLUTIONS", table)
    monkeypatch.setattr(pipeline_flux_kontext, "PREFERRED_KONTEXT_RESOLUTIONS", table)
    ref = _photo(100, 62, seed=4)
    ours, record = _ours(dev_set, tmp_path, "--reference", _save(ref, tmp_path / "r.png"))
    assert (record["width"], record["height"], record["guidance"]) == (96, 64, 2.5)
    theirs = _run(
        _oracle(FluxKontextPipeline, dev_set), 96, 64, image=ref, guidance_scale=2.5, max_area=96 * 64
    )
    assert_close(ours, theirs)
    plain, _ = _ours(dev_set, tmp_path, "--width", "96", "--height", "64", "--guidance", "2.5")
    assert psnr(plain, theirs) + 20 < psnr(ours, theirs)  # without the reference: far from diffusers' image


@pytest.mark.parametrize("denoise", [1.0, 0.75])
def test_latent_blend_inpainting_matches_diffusers(dev_set, tmp_path, denoise):
    init, mask = _photo(80, 64, seed=6), _mask(80, 64)
    ours, record = _ours(dev_set, tmp_path, "--init-image", _save(init, tmp_path / "i.png"),
                         "--mask", _save(mask, tmp_path / "m.png"), "--denoise", str(denoise))  # fmt: skip
    assert (record["width"], record["height"], record["guidance"]) == (80, 64, 3.5)
    pipe = _oracle(FluxInpaintPipeline, dev_set)
    theirs = run_img2img(pipe, 5, prompt=PROMPT, image=init, mask_image=mask, strength=denoise, width=80,
                         height=64, num_inference_steps=2, guidance_scale=3.5, max_sequence_length=512)[0]  # fmt: skip
    assert_close(ours, theirs)
    plain, _ = _ours(dev_set, tmp_path, "--init-image", str(tmp_path / "i.png"), "--denoise", str(denoise),
                     "--width", "80", "--height", "64")  # fmt: skip
    assert psnr(plain, theirs) < psnr(ours, theirs)


# ---- bad input: exit 2, one sentence, no PNG ----


def _refused(capsys, tmp_path: Path, *args: str) -> str:
    out = tmp_path / "o.png"
    code = main(["generate", "--prompt", "a cat", "--steps", "1", *args, "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    assert not out.exists()
    return lines[0]


def test_bad_edit_requests(dev_set, fill_set, canny_set, tmp_path, capsys):
    image = _save(_photo(80, 64), tmp_path / "i.png")
    text = tmp_path / "t.png"
    text.write_text("not an image")
    dev, fill, canny = (("--models-dir", str(s.models_dir)) for s in (dev_set, fill_set, canny_set))
    cases = [
        ((*dev, "--mask", image), "--mask needs --init-image"),
        ((*dev, "--init-image", image, "--mask", str(text)), "--mask"),
        ((*dev, "--init-image", image, "--mask", str(tmp_path / "no.png")), "does not exist"),
        ((*fill, "--init-image", image, "--outpaint", "8,8"), "--outpaint"),
        ((*fill, "--init-image", image, "--outpaint", "0,0,0,0"), "not all 0"),
        ((*fill, "--init-image", image, "--outpaint", "0,0,4096,0"), "--outpaint"),
        ((*fill, "--init-image", image, "--outpaint", "0,-8,8,0"), "--outpaint"),
        ((*fill, "--outpaint", "8,8,8,8"), "--outpaint needs --init-image"),
        ((*fill, "--init-image", image, "--outpaint", "8,8,8,8", "--mask", image), "cannot go together"),
        ((*dev, "--init-image", image, "--outpaint", "8,8,8,8"), "needs a FLUX.1 Fill"),
        ((*dev, "--control-image", image), "no control inputs"),
        (
            (*canny, "--control-image", image, "--control-preprocess", "depth"),
            "needs Depth Anything V2 Small in",
        ),
        ((*canny, "--control-preprocess", "canny"), "needs --control-image"),
        ((*canny, "--control-image", str(text)), "not an image file"),
        ((*canny,), "give --control-image"),
        ((*fill,), "FLUX.1 Fill"),
        ((*dev, "--reference", str(text)), "--reference"),
        ((*canny, "--control-image", image, "--reference", image), "cannot go with"),
    ]
    for args, wanted in cases:
        line = _refused(capsys, tmp_path, *args)
        assert wanted in line, (args, line)
        assert line.endswith("."), line


def test_canny_preprocess_without_opencv_is_one_sentence(canny_set, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "cv2", None)  # import cv2 raises ImportError
    image = _save(_photo(80, 64), tmp_path / "c.png")
    line = _refused(capsys, tmp_path, "--models-dir", str(canny_set.models_dir), "--control-image", image,
                    "--control-preprocess", "canny")  # fmt: skip
    assert "opencv-python-headless" in line


def test_canny_preprocess_matches_diffusers_on_the_edge_map(canny_set, tmp_path):
    pytest.importorskip("cv2")
    from engine.generation.control_preprocess import canny

    photo = _photo(80, 64, seed=8)
    ours, _ = _ours(canny_set, tmp_path, "--control-image", _save(photo, tmp_path / "c.png"),
                    "--control-preprocess", "canny")  # fmt: skip
    pipe = _oracle(FluxControlPipeline, canny_set)
    theirs = _run(pipe, 80, 64, control_image=canny(photo, 80, 64), guidance_scale=30.0)
    assert_close(ours, theirs)
