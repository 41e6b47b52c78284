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
from engine.sampling import make_noise
from tests.oracle import build_pipeline, psnr, run_pipeline

MIN_PSNR = 45.0


def cli_image(tmp_path: Path, *args: str) -> np.ndarray:
    out = tmp_path / "out.png"
    assert main(["generate", *args, "--out", str(out)]) == 0
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
