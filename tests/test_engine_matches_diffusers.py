"""The CLI's images against diffusers' FluxPipeline on the same tiny weights and the same initial noise."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from engine import fixtures
from engine.cli import main
from engine.generation.png_output import read_request
from engine.generation.sampling import img2img_skip, make_noise
from tests.oracle import build_pipeline, img2img_pipeline, psnr, run_img2img, run_pipeline

MIN_PSNR = 45.0
FP32 = (
    "--dtype",
    "fp32",
)  # the oracle computes in fp32; on a CPU with bf16 the engine's default would be bf16


def cli_image(tmp_path: Path, *args: str) -> np.ndarray:
    out = tmp_path / "out.png"
    assert main(["generate", *args, *FP32, "--out", str(out)]) == 0
    return np.asarray(Image.open(out).convert("RGB"))


def both(
    tiny,
    tmp_path: Path,
    *,
    prompt: str,
    seed: int,
    width: int = 64,
    height: int = 64,
    steps: int = 2,
    cli: tuple[str, ...] = (),
    model: tuple[str, ...] | None = None,
    states: dict | None = None,
    t5_length: int = 512,
    clip_prompt: str | None = None,
    **oracle_kwargs,
) -> tuple[np.ndarray, np.ndarray]:
    """The CLI's image (from the models folder unless `model` names files) and the oracle's, same request."""
    model = model if model is not None else ("--models-dir", str(tiny.models_dir))
    size = ("--width", str(width), "--height", str(height), "--steps", str(steps), "--seed", str(seed))
    clip = ("--clip-prompt", clip_prompt) if clip_prompt else ()
    ours = cli_image(tmp_path, *model, "--prompt", prompt, *size, *clip, *cli)
    pipe = build_pipeline(states or tiny.stored_as_float(), tiny.clip_tokenizer, tiny.t5_tokenizer)
    # diffusers: `prompt` feeds CLIP, `prompt_2` feeds T5
    oracle_kwargs |= {"prompt": clip_prompt, "prompt_2": prompt} if clip_prompt else {"prompt": prompt}
    if tiny.spec.guidance:
        oracle_kwargs.setdefault("guidance_scale", 3.5)
    theirs = run_pipeline(
        pipe, make_noise(seed, 1, height, width), width=width, height=height, num_inference_steps=steps,
        max_sequence_length=t5_length, **oracle_kwargs,
    )[0]  # fmt: skip
    return ours, theirs


def assert_close(ours: np.ndarray, theirs: np.ndarray) -> None:
    assert ours.shape == theirs.shape
    assert theirs.std() > 2.0, "the oracle's image is flat: the tiny model draws nothing to compare"
    print(f"PSNR {psnr(ours, theirs):.1f} dB, oracle std {theirs.std():.1f}")
    assert psnr(ours, theirs) >= MIN_PSNR


def test_dev_matches_diffusers(dev_set, tmp_path):
    assert_close(
        *both(dev_set, tmp_path, prompt="a photo of a cat", seed=7, steps=3, cli=("--guidance", "3.5"))
    )


def test_a_wrong_seed_is_caught(dev_set, tmp_path):
    """The comparison discriminates: another seed's image is far below the threshold."""
    ours, _ = both(dev_set, tmp_path, prompt="a photo of a cat", seed=8, steps=3)
    _, theirs = both(dev_set, tmp_path, prompt="a photo of a cat", seed=7, steps=3)
    assert psnr(ours, theirs) < 35.0


def test_schnell_matches_diffusers(schnell_set, tmp_path):
    """No guidance embedding, no shift, T5 padded to 256: all chosen by the engine from the file."""
    assert_close(*both(schnell_set, tmp_path, prompt="a red house", seed=3, t5_length=256))


def test_true_cfg_with_negative_prompt(dev_set, tmp_path):
    ours, theirs = both(
        dev_set, tmp_path, prompt="a photo of a cat", seed=11, cli=("--negative", "a dog in the night", "--cfg", "2.5"),
        negative_prompt="a dog in the night", true_cfg_scale=2.5,
    )  # fmt: skip
    assert_close(ours, theirs)


def test_separate_clip_prompt(dev_set, tmp_path):
    assert_close(*both(dev_set, tmp_path, prompt="a photo of a cat", clip_prompt="old painting", seed=5))


def test_non_square_size(dev_set, tmp_path):
    ours, theirs = both(dev_set, tmp_path, prompt="a city river", seed=2, width=128, height=64)
    assert ours.shape == (64, 128, 3)
    assert_close(ours, theirs)


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
@pytest.mark.parametrize("scaled", [False, True])
def test_fp8_transformer_equals_dequantized_weights(dev_set, tmp_path, dtype, scaled):
    fp8 = fixtures.to_fp8(dev_set.states.transformer, dtype, scaled=scaled)
    path = tmp_path / "flux-fp8.safetensors"
    save_file(fp8, str(path))
    split = (
        "--transformer", str(path), "--clip", str(dev_set.paths["clip"]), "--t5", str(dev_set.paths["t5"]),
        "--vae", str(dev_set.paths["vae"]), "--clip-tokenizer", str(dev_set.clip_tokenizer),
        "--t5-tokenizer", str(dev_set.t5_tokenizer),
    )  # fmt: skip
    states = dev_set.stored_as_float() | {"transformer": fixtures.dequantized(fp8)}
    assert_close(*both(dev_set, tmp_path, prompt="glass robot", seed=4, model=split, states=states))


# ---- img2img against diffusers' FluxImg2ImgPipeline ----


def init_image(path: Path, size: int = 64) -> Path:
    """A smooth gradient with some texture: something the tiny autoencoder's latent keeps."""
    rows, cols = np.mgrid[0:size, 0:size] * (255 / (size - 1))
    rgb = np.stack([cols, rows, np.full_like(rows, 128.0)], -1) + np.random.default_rng(3).normal(
        0, 25, (size, size, 3)
    )
    rgb = np.clip(rgb, 0, 255).astype(np.uint8)
    Image.fromarray(rgb).save(path)
    return path


def img2img_pair(tiny, tmp_path: Path, steps: int, denoise: float, ours_denoise: float | None = None):
    """(our image, diffusers' image, our PNG) for the same img2img request; `ours_denoise` changes ours only."""
    init = init_image(tmp_path / "init.png")
    out = tmp_path / "img2img.png"
    args = ("--models-dir", str(tiny.models_dir), "--prompt", "a red house", "--width", "64", "--height", "64",
            "--steps", str(steps), "--seed", "5", "--guidance", "3.5", "--init-image", str(init),
            "--denoise", str(ours_denoise if ours_denoise is not None else denoise), "--out", str(out))  # fmt: skip
    assert main(["generate", *args, *FP32]) == 0
    ours = np.asarray(Image.open(out).convert("RGB"))
    pipe = img2img_pipeline(build_pipeline(tiny.stored_as_float(), tiny.clip_tokenizer, tiny.t5_tokenizer))
    theirs = run_img2img(
        pipe, 5, prompt="a red house", image=Image.open(init), strength=denoise, num_inference_steps=steps,
        width=64, height=64, guidance_scale=3.5, max_sequence_length=512,
    )[0]  # fmt: skip
    return ours, theirs, out


@pytest.mark.parametrize(("steps", "denoise"), [(20, 0.8), (6, 0.5)])
def test_img2img_matches_diffusers(dev_set, tmp_path, steps, denoise):
    ours, theirs, out = img2img_pair(dev_set, tmp_path, steps, denoise)
    assert_close(ours, theirs)
    record = read_request(out)  # the PNG keeps what was asked for, not the steps that ran
    assert (record["denoise"], record["steps"]) == (denoise, steps)
    assert f"Denoising strength: {denoise:g}" in Image.open(out).text["parameters"]


def test_img2img_comparison_catches_a_skip_one_short(dev_set, tmp_path):
    """Our image at denoise 0.85 skips 3 of 20 steps, the old int(steps·(1−denoise)) rule's count at 0.8;
    against diffusers at 0.8 (4 skipped) the comparison must fail, with room to spare."""
    assert img2img_skip(20, 0.85) == int(20 * (1 - 0.8)) == img2img_skip(20, 0.8) - 1
    ours, theirs, _ = img2img_pair(dev_set, tmp_path, 20, 0.8, ours_denoise=0.85)
    print(f"PSNR one step short: {psnr(ours, theirs):.1f} dB")
    assert psnr(ours, theirs) < MIN_PSNR - 3


def test_img2img_skips_as_many_steps_as_diffusers():
    """The rule itself over the settings people use, against diffusers' own step count."""
    from types import SimpleNamespace

    from diffusers import FlowMatchEulerDiscreteScheduler, FluxImg2ImgPipeline

    for steps in (1, 2, 4, 6, 8, 10, 20, 25, 28, 30, 50):
        for denoise in (0.05, 0.1, 0.25, 0.3, 0.33, 0.5, 0.55, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95, 1.0):
            scheduler = FlowMatchEulerDiscreteScheduler()
            scheduler.set_timesteps(steps)
            pipe = SimpleNamespace(scheduler=scheduler)
            _, kept = FluxImg2ImgPipeline.get_timesteps(pipe, steps, denoise, "cpu")
            if kept >= 1:  # diffusers refuses the rest; the engine runs one step there
                assert img2img_skip(steps, denoise) == steps - kept, (steps, denoise)
