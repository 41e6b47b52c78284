"""FLUX.2 [klein] files in the formats people download, end to end through the CLI: the transformer as fp8 e4m3,
legacy scaled fp8 (`scaled_fp8` + `.scale_weight`), ComfyUI's comfy_quant layout (`.weight_scale` + `.comfy_quant`
JSON; its header variant is FLUX.1's test_comfy_quant.py's) and GGUF (Q8_0/Q5_1/Q4_0, general.architecture
"flux" as ComfyUI-GGUF's converter writes klein); the Qwen3 text encoder as fp8, scaled fp8 and comfy_quant
(ComfyUI's `qwen_3_4b_fp8*` layouts: matrices fp8, embeddings and norms bf16). Each image is compared with the engine's own
run of the same weights dequantized to float32 (written as a plain safetensors file), ≥ 45 dB; and the
quantization is shown to matter (the unquantized weights draw a different image) where it does."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from engine import fixtures
from engine.cli import main
from engine.fixtures_flux2 import Flux2Spec, flux2_ae_state, flux2_state, qwen3_state, write_qwen3_tokenizer
from engine.formats.gguf_file import write_gguf
from engine.formats.gguf_quants import QType
from tests.metrics import psnr
from tests.test_gguf_engine import dequantized_back, quantize_state

MIN_PSNR = 45.0
ARGS = ["--prompt", "a dog on a red sky", "--width", "64", "--height", "64", "--steps", "2", "--seed", "5"]


def _save(path, tensors, metadata=None):
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata or None)
    return path


@pytest.fixture(scope="module")
def klein(tmp_path_factory):
    root = tmp_path_factory.mktemp("klein_formats")
    spec = Flux2Spec()
    tokenizer = root / "qwen3_tokenizer"
    vocab = write_qwen3_tokenizer(tokenizer)
    states = {
        "transformer": flux2_state(spec),
        "vae": flux2_ae_state(spec),
        "text_encoder": qwen3_state(spec, vocab),
    }
    paths = {role: _save(root / f"{role}.safetensors", state) for role, state in states.items()}
    return root, tokenizer, states, paths


@pytest.fixture(scope="module")
def original(klein, tmp_path_factory) -> np.ndarray:  # noqa: F811
    """The image of the unquantized files."""
    root, tokenizer, states, paths = klein
    return _png(tmp_path_factory.mktemp("original"), "bf16", paths, tokenizer)


def _png(tmp_path, name: str, paths: dict, tokenizer, *extra: str) -> np.ndarray:
    out = tmp_path / f"{name}.png"
    files = [arg for role, path in paths.items() for arg in (f"--{role.replace('_', '-')}", str(path))]
    code = main(["generate", *files, "--text-tokenizer", str(tokenizer), *ARGS, "--dtype", "fp32",
                 "--device", "cpu", "--out", str(out), *extra])  # fmt: skip
    assert code == 0
    return np.asarray(Image.open(out).convert("RGB"))


def _weights_only(state):
    return {k: v for k, v in state.items() if k != "bn.num_batches_tracked"}


def _transformer_files(state, folder):
    """{format: (quantized file, its dequantized float32 file)}."""
    out = {}
    for name, scaled in (("fp8_e4m3", False), ("scaled_fp8", True)):
        stored = fixtures.to_fp8(state, torch.float8_e4m3fn, scaled=scaled)
        out[name] = (_save(folder / f"klein_{name}.safetensors", stored), fixtures.dequantized(stored))
    tensors, metadata = fixtures.to_comfy_quant(state, torch.float8_e4m3fn)
    legacy = fixtures.dequantized(fixtures.to_fp8(state, torch.float8_e4m3fn, scaled=True))
    out["comfy_quant"] = (_save(folder / "klein_comfy_quant.safetensors", tensors, metadata), legacy)
    arrays, types = quantize_state(state, [QType.Q8_0, QType.Q5_1, QType.Q4_0])
    gguf_path = folder / "flux-2-klein-tiny-Q4_0.gguf"
    write_gguf(gguf_path, arrays, types, "flux")
    out["gguf"] = (gguf_path, dequantized_back(gguf_path))
    return out


def test_quantized_klein_transformers_give_the_image_of_their_dequantized_weights(klein, original, tmp_path):
    root, tokenizer, states, paths = klein
    for name, (quantized, dequantized) in _transformer_files(states["transformer"], tmp_path).items():
        reference = _save(tmp_path / f"{name}_dequantized.safetensors", dequantized)
        ours = _png(tmp_path, name, paths | {"transformer": quantized}, tokenizer)
        theirs = _png(tmp_path, name + "_ref", paths | {"transformer": reference}, tokenizer)
        print(
            f"{name}: {psnr(ours, theirs):.1f} dB vs its dequantized weights, {psnr(ours, original):.1f} vs the original"
        )
        assert theirs.std() > 5
        assert psnr(ours, theirs) >= MIN_PSNR, name
        assert psnr(theirs, original) < 80, name  # the file really was quantized


def _qwen3_fp8(state, layout: str):
    """ComfyUI's fp8 Qwen3 layouts: the layers' matrices fp8 (plain, scaled, or comfy_quant), the embedding table
    and norms bf16; (tensors, header metadata, dequantized float32 weights)."""
    matrices = {k: v for k, v in state.items() if fixtures.is_big_weight(k, v) and "embed_tokens" not in k}
    legacy = fixtures.to_fp8(matrices, torch.float8_e4m3fn, scaled=layout != "fp8")
    stored, metadata = legacy, {}
    if layout == "comfy_quant":
        stored, metadata = fixtures.to_comfy_quant(matrices, torch.float8_e4m3fn)
    rest = {k: v.to(torch.bfloat16) for k, v in state.items() if k not in matrices}
    dequantized = fixtures.dequantized(legacy) | {k: v.float() for k, v in rest.items()}
    return stored | rest, metadata, dequantized


@pytest.mark.parametrize("layout", ["fp8", "scaled_fp8", "comfy_quant"])
def test_fp8_qwen3_gives_the_image_of_its_dequantized_weights(klein, original, tmp_path, layout):
    root, tokenizer, states, paths = klein
    stored, metadata, dequantized = _qwen3_fp8(states["text_encoder"], layout)
    assert any(v.dtype == torch.float8_e4m3fn for v in stored.values())
    quantized = _save(tmp_path / "qwen_3_tiny_fp8.safetensors", stored, metadata)
    reference = _save(tmp_path / "qwen_3_tiny_dequantized.safetensors", dequantized)
    ours = _png(tmp_path, "qwen_fp8", paths | {"text_encoder": quantized}, tokenizer)
    theirs = _png(tmp_path, "qwen_ref", paths | {"text_encoder": reference}, tokenizer)
    print(f"Qwen3 {layout}: {psnr(ours, theirs):.1f} dB, {psnr(ours, original):.1f} vs the original")
    assert psnr(ours, theirs) >= MIN_PSNR
    assert psnr(theirs, original) < 80  # the encoder really was quantized
