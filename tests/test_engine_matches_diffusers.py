"""The CLI's images against diffusers' FluxPipeline on the same tiny weights and the same initial noise."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from engine import fixtures
from engine.cli import main
from engine.sampling import make_noise
from tests.oracle import build_pipeline, psnr, run_pipeline

MIN_PSNR = 45.0


def cli_image(tmp_path: Path, *args: str) -> np.ndarray:
    out = tmp_path / "out.png"
    assert main(["generate", *args, "--out", str(out)]) == 0
    return np.asarray(Image.open(out).convert("RGB"))


def oracle_image(tiny, states=None, *, seed: int, width: int, height: int, **kwargs) -> np.ndarray:
    pipe = build_pipeline(states or tiny.stored_as_float(), tiny.clip_tokenizer, tiny.t5_tokenizer)
    noise = make_noise(seed, 1, height, width)
    return run_pipeline(pipe, noise, width=width, height=height, **kwargs)[0]


def assert_close(ours: np.ndarray, theirs: np.ndarray) -> None:
    assert ours.shape == theirs.shape
    assert theirs.std() > 2.0, "the oracle's image is flat: the tiny model draws nothing to compare"
    print(f"PSNR {psnr(ours, theirs):.1f} dB, oracle std {theirs.std():.1f}")
    assert psnr(ours, theirs) >= MIN_PSNR


def test_dev_matches_diffusers(dev_set, tmp_path):
    ours = cli_image(
        tmp_path,
        "--models-dir",
        str(dev_set.models_dir),
        "--prompt",
        "a photo of a cat",
        "--width",
        "64",
        "--height",
        "64",
        "--steps",
        "3",
        "--seed",
        "7",
        "--guidance",
        "3.5",
    )
    theirs = oracle_image(
        dev_set,
        prompt="a photo of a cat",
        seed=7,
        width=64,
        height=64,
        num_inference_steps=3,
        guidance_scale=3.5,
        max_sequence_length=512,
    )
    assert_close(ours, theirs)


def test_a_wrong_seed_is_caught(dev_set, tmp_path):
    """The comparison discriminates: another seed's image is far below the threshold."""
    ours = cli_image(
        tmp_path,
        "--models-dir",
        str(dev_set.models_dir),
        "--prompt",
        "a photo of a cat",
        "--width",
        "64",
        "--height",
        "64",
        "--steps",
        "3",
        "--seed",
        "8",
    )
    theirs = oracle_image(
        dev_set,
        prompt="a photo of a cat",
        seed=7,
        width=64,
        height=64,
        num_inference_steps=3,
        guidance_scale=3.5,
        max_sequence_length=512,
    )
    assert psnr(ours, theirs) < 35.0


def test_schnell_matches_diffusers(schnell_set, tmp_path):
    """No guidance embedding, no shift, T5 padded to 256: all chosen by the engine from the file."""
    ours = cli_image(
        tmp_path,
        "--models-dir",
        str(schnell_set.models_dir),
        "--prompt",
        "a red house",
        "--width",
        "64",
        "--height",
        "64",
        "--steps",
        "2",
        "--seed",
        "3",
    )
    theirs = oracle_image(
        schnell_set,
        prompt="a red house",
        seed=3,
        width=64,
        height=64,
        num_inference_steps=2,
        max_sequence_length=256,
    )
    assert_close(ours, theirs)


def test_true_cfg_with_negative_prompt(dev_set, tmp_path):
    ours = cli_image(
        tmp_path,
        "--models-dir",
        str(dev_set.models_dir),
        "--prompt",
        "a photo of a cat",
        "--negative",
        "a dog in the night",
        "--cfg",
        "2.5",
        "--width",
        "64",
        "--height",
        "64",
        "--steps",
        "2",
        "--seed",
        "11",
    )
    theirs = oracle_image(
        dev_set,
        prompt="a photo of a cat",
        negative_prompt="a dog in the night",
        true_cfg_scale=2.5,
        seed=11,
        width=64,
        height=64,
        num_inference_steps=2,
        guidance_scale=3.5,
        max_sequence_length=512,
    )
    assert_close(ours, theirs)


def test_separate_clip_prompt(dev_set, tmp_path):
    ours = cli_image(
        tmp_path,
        "--models-dir",
        str(dev_set.models_dir),
        "--prompt",
        "a photo of a cat",
        "--clip-prompt",
        "old painting",
        "--width",
        "64",
        "--height",
        "64",
        "--steps",
        "2",
        "--seed",
        "5",
    )
    # diffusers: `prompt` feeds CLIP, `prompt_2` feeds T5
    theirs = oracle_image(
        dev_set,
        prompt="old painting",
        prompt_2="a photo of a cat",
        seed=5,
        width=64,
        height=64,
        num_inference_steps=2,
        guidance_scale=3.5,
        max_sequence_length=512,
    )
    assert_close(ours, theirs)


def test_non_square_size(dev_set, tmp_path):
    ours = cli_image(
        tmp_path,
        "--models-dir",
        str(dev_set.models_dir),
        "--prompt",
        "a city river",
        "--width",
        "128",
        "--height",
        "64",
        "--steps",
        "2",
        "--seed",
        "2",
    )
    theirs = oracle_image(
        dev_set,
        prompt="a city river",
        seed=2,
        width=128,
        height=64,
        num_inference_steps=2,
        guidance_scale=3.5,
        max_sequence_length=512,
    )
    assert ours.shape == (64, 128, 3)
    assert_close(ours, theirs)


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
@pytest.mark.parametrize("scaled", [False, True])
def test_fp8_transformer_equals_dequantized_weights(dev_set, tmp_path, dtype, scaled):
    fp8 = fixtures.to_fp8(dev_set.states.transformer, dtype, scaled=scaled)
    path = tmp_path / "flux-fp8.safetensors"
    from safetensors.torch import save_file

    save_file(fp8, str(path))
    ours = cli_image(
        tmp_path,
        "--transformer",
        str(path),
        "--clip",
        str(dev_set.paths["clip"]),
        "--t5",
        str(dev_set.paths["t5"]),
        "--vae",
        str(dev_set.paths["vae"]),
        "--clip-tokenizer",
        str(dev_set.clip_tokenizer),
        "--t5-tokenizer",
        str(dev_set.t5_tokenizer),
        "--prompt",
        "glass robot",
        "--width",
        "64",
        "--height",
        "64",
        "--steps",
        "2",
        "--seed",
        "4",
    )
    states = dev_set.stored_as_float() | {"transformer": fixtures.dequantized(fp8)}
    theirs = oracle_image(
        dev_set,
        states,
        prompt="glass robot",
        seed=4,
        width=64,
        height=64,
        num_inference_steps=2,
        guidance_scale=3.5,
        max_sequence_length=512,
    )
    assert_close(ours, theirs)
