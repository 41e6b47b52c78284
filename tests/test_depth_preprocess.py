"""--control-preprocess depth: Depth Anything V2 through transformers from <models-dir>/depth/ (a tiny random model
saved as the hub has it: config.json, model.safetensors, preprocessor_config.json). The map against transformers'
own depth-estimation pipeline on the same files, normalised as image_gen_aux's DepthPreprocessor (diffusers'
FluxControlPipeline example) and ComfyUI's DepthAnythingV2 node do: bicubic to the output size, min-max to 0..255.
Then the whole CLI run on a Canny/Depth-width model equals the run on the map given with --control-preprocess
none; a missing model is one sentence."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation, Dinov2Config, pipeline

from engine import fixtures
from engine.cli import main
from engine.contract import layout
from engine.generation import control_preprocess
from tests.conftest import _make_set
from tests.test_engine_matches_diffusers import FP32

WIDTH, HEIGHT = 80, 64
PROCESSOR = {
    "image_processor_type": "DPTImageProcessor",
    "do_resize": True,
    "size": {"height": 56, "width": 56},  # the hub's 518, made small for a tiny model
    "keep_aspect_ratio": True,
    "ensure_multiple_of": 14,
    "resample": 3,
    "do_rescale": True,
    "rescale_factor": 1 / 255,
    "do_normalize": True,
    "image_mean": [0.485, 0.456, 0.406],
    "image_std": [0.229, 0.224, 0.225],
    "do_pad": False,
}


@pytest.fixture(scope="module")
def depth_set(tmp_path_factory):
    tiny = _make_set(tmp_path_factory.mktemp("depth"), replace(fixtures.TinySpec(), in_channels=128))
    backbone = Dinov2Config(
        hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64, image_size=56,
        patch_size=14, out_indices=[1, 2, 3, 4], reshape_hidden_states=False, apply_layernorm=True,
    )  # fmt: skip
    config = DepthAnythingConfig(
        backbone_config=backbone, reassemble_hidden_size=32, neck_hidden_sizes=[8, 16, 32, 32],
        fusion_hidden_size=16, head_hidden_size=8, patch_size=14,
    )  # fmt: skip
    torch.manual_seed(1)
    model = DepthAnythingForDepthEstimation(config).eval()
    for p in model.parameters():
        p.data += 0.05 * torch.randn_like(p)
    model.head.conv2.bias.data.fill_(0.5)  # the head ends in ReLUs: keep a random init above zero
    model.head.conv3.bias.data.fill_(1.0)
    folder = tiny.models_dir / layout.DEPTH / "depth-anything-v2-small"  # where the manifest puts it
    model.save_pretrained(str(folder))
    (folder / "preprocessor_config.json").write_text(json.dumps(PROCESSOR))
    assert {"config.json", "model.safetensors"} <= {p.name for p in folder.iterdir()}
    g = np.random.default_rng(2)
    photo = Image.fromarray(g.integers(0, 256, (8, 10, 3), dtype=np.uint8)).resize(
        (WIDTH, HEIGHT), Image.BICUBIC
    )
    photo.save(tiny.models_dir.parent / "photo.png")
    return tiny, folder, photo, str(tiny.models_dir.parent / "photo.png")


def test_depth_map_matches_transformers_pipeline_normalised_min_max(depth_set):
    tiny, folder, photo, _ = depth_set
    ours = control_preprocess.depth(photo, WIDTH, HEIGHT, str(tiny.models_dir), torch.device("cpu"))
    estimator = pipeline("depth-estimation", model=str(folder), device="cpu")
    predicted = estimator(photo)["predicted_depth"].float()
    predicted = predicted if predicted.ndim == 3 else predicted[None]
    resized = F.interpolate(predicted[:, None], size=(HEIGHT, WIDTH), mode="bicubic", align_corners=False)[
        0, 0
    ]
    expected = ((resized - resized.min()) / (resized.max() - resized.min()) * 255).round().numpy()
    got = np.asarray(ours)
    assert got.shape == (HEIGHT, WIDTH, 3) and (got[..., 0] == got[..., 2]).all()
    assert got.min() == 0 and got.max() == 255  # min-max normalised
    assert np.abs(got[..., 0].astype(float) - expected).max() <= 1.0
    assert np.asarray(photo.convert("L")).std() > 5 and got.std() > 5  # neither side is a flat image


def _generate(tiny, tmp_path: Path, *args: str) -> np.ndarray:
    out = tmp_path / f"out{len(list(tmp_path.glob('out*.png')))}.png"
    assert main(["generate", "--models-dir", str(tiny.models_dir), "--prompt", "a red door", "--seed", "3",
                 "--steps", "2", *args, *FP32, "--out", str(out)]) == 0  # fmt: skip
    return np.asarray(Image.open(out).convert("RGB"))


def test_depth_preprocess_through_the_cli_equals_the_map_given_directly(depth_set, tmp_path):
    tiny, _, photo, photo_path = depth_set
    via_depth = _generate(tiny, tmp_path, "--control-image", photo_path, "--control-preprocess", "depth")
    depth_map = control_preprocess.depth(photo, WIDTH, HEIGHT, str(tiny.models_dir), torch.device("cpu"))
    depth_map.save(tmp_path / "map.png")
    direct = _generate(tiny, tmp_path, "--control-image", str(tmp_path / "map.png"))
    raw = _generate(tiny, tmp_path, "--control-image", photo_path)
    assert np.array_equal(via_depth, direct)
    assert not np.array_equal(via_depth, raw)  # the preprocessing did something


def test_missing_depth_model_is_one_sentence(depth_set, tmp_path, tmp_path_factory, capsys):
    tiny, folder, _, photo_path = depth_set
    bare = _make_set(tmp_path_factory.mktemp("bare"), replace(fixtures.TinySpec(), in_channels=128))
    (bare.models_dir / layout.DEPTH / "v2").mkdir(parents=True)
    (bare.models_dir / layout.DEPTH / "v2" / "config.json").write_bytes((folder / "config.json").read_bytes())
    out = tmp_path / "x.png"
    code = main(["generate", "--models-dir", str(bare.models_dir), "--prompt", "p", "--control-image", photo_path,
                 "--control-preprocess", "depth", "--out", str(out)])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code == 2 and not out.exists() and err.count("\n") == 0 and "Traceback" not in err
    assert "lacks model.safetensors" in err and str(bare.models_dir / layout.DEPTH / "v2") in err, err
