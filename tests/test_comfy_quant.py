"""ComfyUI's current quantized layout (`.weight_scale` + `.comfy_quant`, or `_quantization_metadata` in the header):
the same scaled-fp8 values as the legacy layout, so the same pixels; formats the engine does not compute are named."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from engine import fixtures
from engine.cli import main
from engine.contract.request import ModelFiles
from engine.formats.model_files import resolve
from engine.formats.weights import SafetensorsFile, component_from
from engine.models.build import build_model
from engine.runtime.ops import fetch
from tests.test_engine_matches_diffusers import assert_close, both

BASE = ["--prompt", "glass robot", "--width", "64", "--height", "64", "--steps", "2", "--seed", "4"]


def split_with(tiny, **paths) -> list[str]:
    files = {role: tiny.paths[role] for role in ("transformer", "clip", "t5", "vae")} | paths
    args = [arg for role, path in files.items() for arg in (f"--{role}", str(path))]
    return args + ["--clip-tokenizer", str(tiny.clip_tokenizer), "--t5-tokenizer", str(tiny.t5_tokenizer)]


def image(tmp_path, name: str, *args: str) -> np.ndarray:
    out = tmp_path / f"{name}.png"
    assert main(["generate", *args, *BASE, "--out", str(out)]) == 0
    return np.asarray(Image.open(out).convert("RGB"))


def write(path, tensors, metadata=None):
    save_file(tensors, str(path), metadata=metadata or None)
    return path


LAYOUTS = {
    "comfy_quant tensors": {},
    "header metadata": {"in_header": True},
    "uint8 container": {"uint8_container": True},
}


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_each_layout_gives_the_legacy_scaled_fp8_pixels(dev_set, tmp_path, dtype):
    state = dev_set.states.transformer
    legacy = write(tmp_path / "legacy.safetensors", fixtures.to_fp8(state, dtype, scaled=True))
    reference = image(tmp_path, "legacy", *split_with(dev_set, transformer=legacy))
    for i, (layout, options) in enumerate(LAYOUTS.items()):
        path = write(tmp_path / f"comfy{i}.safetensors", *fixtures.to_comfy_quant(state, dtype, **options))
        ours = image(tmp_path, f"comfy{i}", *split_with(dev_set, transformer=path))
        assert np.array_equal(ours, reference), layout


def test_comfy_quant_matches_diffusers_on_the_dequantized_weights(dev_set, tmp_path):
    """weight = q × weight_scale: a loader that dropped the scale (here ~1/300) would be far off."""
    tensors, _ = fixtures.to_comfy_quant(dev_set.states.transformer)
    path = write(tmp_path / "flux-comfy.safetensors", tensors)
    legacy = fixtures.to_fp8(dev_set.states.transformer, scaled=True)
    scales = [t for n, t in legacy.items() if n.endswith(".scale_weight")]
    assert max(float(s) for s in scales) < 0.05
    states = dev_set.stored_as_float() | {"transformer": fixtures.dequantized(legacy)}
    model = ("--transformer", str(path), *split_with(dev_set)[2:])
    assert_close(*both(dev_set, tmp_path, prompt="glass robot", seed=4, model=model, states=states))


def test_weights_stay_fp8_with_their_scale(dev_set, tmp_path):
    tensors, metadata = fixtures.to_comfy_quant(
        dev_set.states.transformer, in_header=True, uint8_container=True
    )
    path = write(tmp_path / "flux-comfy.safetensors", tensors, metadata)
    model = build_model(component_from(path, "transformer", "--transformer"), torch.float32)
    qkv = model.double_blocks[0].img_attn.qkv
    assert qkv.weight.dtype == torch.float8_e4m3fn
    scale = tensors["double_blocks.0.img_attn.qkv.weight_scale"]
    assert torch.equal(qkv.scale_weight, scale)
    q = tensors["double_blocks.0.img_attn.qkv.weight"].view(torch.float8_e4m3fn)
    weight, _ = fetch(qkv, torch.float32, torch.device("cpu"))
    assert torch.equal(weight, q.float() * scale)
    assert all(p.dtype == torch.float8_e4m3fn for p in model.parameters() if p.ndim == 2)


def test_t5_in_comfy_quant_layout(dev_set, tmp_path):
    """Not only transformers: a T5 encoder ComfyUI saved in its current layout (`shared` included)."""
    legacy = write(tmp_path / "t5-legacy.safetensors", fixtures.to_fp8(dev_set.states.t5, scaled=True))
    path = write(
        tmp_path / "t5-comfy.safetensors", *fixtures.to_comfy_quant(dev_set.states.t5, in_header=True)
    )
    reference = image(tmp_path, "legacy", *split_with(dev_set, t5=legacy))
    assert np.array_equal(image(tmp_path, "comfy", *split_with(dev_set, t5=path)), reference)


def test_all_in_one_checkpoint_with_prefixed_header_names(dev_set, tmp_path):
    prefix = "model.diffusion_model."
    legacy = {prefix + k: v for k, v in fixtures.to_fp8(dev_set.states.transformer, scaled=True).items()}
    prefixes = {
        "clip": "text_encoders.clip_l.transformer.",
        "t5": "text_encoders.t5xxl.transformer.",
        "vae": "vae.",
    }
    rest = {prefixes[role] + k: v for role in prefixes for k, v in stored(dev_set.paths[role]).items()}
    tokenizers = (
        "--clip-tokenizer",
        str(dev_set.clip_tokenizer),
        "--t5-tokenizer",
        str(dev_set.t5_tokenizer),
    )
    old = write(tmp_path / "old.safetensors", legacy | rest)
    tensors, metadata = fixtures.to_comfy_quant(dev_set.states.transformer, in_header=True, prefix=prefix)
    new = write(tmp_path / "new.safetensors", tensors | rest, metadata)
    assert "model.diffusion_model.double_blocks.0.img_attn.qkv" in metadata["_quantization_metadata"]
    reference = image(tmp_path, "old", "--checkpoint", str(old), *tokenizers)
    assert np.array_equal(image(tmp_path, "new", "--checkpoint", str(new), *tokenizers), reference)


def stored(path) -> dict[str, torch.Tensor]:
    file = SafetensorsFile(path)
    return {name: tensor.clone() for name, tensor in file.load(file.names()).items()}


def nvfp4(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """ComfyUI's nvfp4 layout: two 4-bit values per uint8, fp8 block scales per 16, a global fp32 scale."""
    out: dict[str, torch.Tensor] = {}
    generator = torch.Generator().manual_seed(0)
    for name, tensor in state.items():
        if not fixtures.is_big_weight(name, tensor) or tensor.ndim != 2:
            out[name] = tensor.to(torch.bfloat16)
            continue
        layer, (rows, cols) = name[: -len(".weight")], tensor.shape
        out[name] = torch.randint(0, 256, (rows, cols // 2), dtype=torch.uint8, generator=generator)
        out[layer + ".weight_scale"] = torch.ones(rows, cols // 16).to(torch.float8_e4m3fn)
        out[layer + ".weight_scale_2"] = torch.tensor(0.01)
        out[layer + ".comfy_quant"] = torch.tensor(
            list(json.dumps({"format": "nvfp4"}).encode()), dtype=torch.uint8
        )
    return out


def test_nvfp4_is_refused_by_name(dev_set, tmp_path, capsys):
    path = write(tmp_path / "flux-nvfp4.safetensors", nvfp4(dev_set.states.transformer))
    code = main(["generate", *split_with(dev_set, transformer=path), *BASE, "--out", str(tmp_path / "o.png")])
    err = capsys.readouterr().err
    assert code == 2
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "'nvfp4'" in lines[0], err
    assert "does not have the tensors" not in err
    assert not (tmp_path / "o.png").exists()


def test_models_folder_scan_prefers_what_it_computes(dev_set, tmp_path):
    """Both files are transformers to the scan; the comfy_quant fp8 one is taken over the nvfp4 one, which,
    left alone in the folder, is refused by name."""
    models = tmp_path / "models"
    shutil.copytree(dev_set.models_dir, models)
    (models / "diffusion_models" / "flux-tiny.safetensors").unlink()
    write(models / "diffusion_models" / "a-nvfp4.safetensors", nvfp4(dev_set.states.transformer))
    tensors, _ = fixtures.to_comfy_quant(dev_set.states.transformer)
    fp8 = write(models / "diffusion_models" / "b-fp8.safetensors", tensors)
    assert resolve(ModelFiles(models_dir=str(models))).components["transformer"].file.path == fp8
    fp8.unlink()
    assert main(["generate", "--models-dir", str(models), *BASE, "--out", str(tmp_path / "o.png")]) == 2
