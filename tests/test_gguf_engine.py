"""GGUF files through the engine: city96-style FLUX and T5 quantizations give the image of their dequantized
weights, stay quantized in memory, and stream as quantized bytes."""

from __future__ import annotations

import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from PIL import Image

from engine.cli import main
from engine.contract.request import GenerateRequest, ModelFiles
from engine.formats.gguf_file import read_gguf, t5_gguf_to_hf_names, write_gguf
from engine.formats.gguf_quants import QType
from engine.generation.pipeline import Engine
from engine.generation.sampling import make_noise
from tests.oracle import build_pipeline, psnr, run_pipeline

ARGS = [
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
    "--dtype",
    "fp32",
]


def quantize_state(state: dict[str, torch.Tensor], qtypes: list[QType]) -> tuple[dict, dict]:
    """Matrices quantized (cycling through `qtypes`), everything else F32, as city96's files keep norms."""
    arrays, types = {}, {}
    i = 0
    for name, tensor in state.items():
        arrays[name] = tensor.float().numpy()
        if tensor.ndim == 2 and tensor.shape[1] % 32 == 0 and tensor.shape[0] > 2:
            types[name] = qtypes[i % len(qtypes)]
            i += 1
    return arrays, types


def dequantized_back(path: Path, rename=lambda n: n) -> dict[str, torch.Tensor]:
    """The oracle's weights: the gguf package's own dequantization of every tensor in the file."""
    reader = gguf.GGUFReader(path)
    out = {}
    for t in reader.tensors:
        values = gguf.quants.dequantize(t.data, t.tensor_type)
        out[rename(t.name)] = torch.from_numpy(np.array(values, dtype=np.float32)).reshape(
            tuple(reversed([int(d) for d in t.shape]))
        )
    return out


def hf_to_gguf_t5_names(names) -> dict[str, str]:
    candidates = ["token_embd.weight", "enc.output_norm.weight"]
    parts = [
        "attn_norm",
        "attn_q",
        "attn_k",
        "attn_v",
        "attn_o",
        "attn_rel_b",
        "ffn_norm",
        "ffn_gate",
        "ffn_up",
        "ffn_down",
    ]
    candidates += [f"enc.blk.{i}.{part}.weight" for i in range(64) for part in parts]
    inverse = {t5_gguf_to_hf_names(c): c for c in candidates}
    return {name: inverse[name] for name in names}


def oracle(tiny, states) -> np.ndarray:
    pipe = build_pipeline(states, tiny.clip_tokenizer, tiny.t5_tokenizer)
    kwargs = dict(width=64, height=64, num_inference_steps=2, guidance_scale=3.5, max_sequence_length=512)
    return run_pipeline(pipe, make_noise(4, 1, 64, 64), prompt="glass robot", **kwargs)[0]


def png(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


@pytest.fixture(scope="module")
def gguf_models(dev_set, tmp_path_factory) -> Path:
    """A models folder like a GGUF user's: Q8_0/Q5_1/Q4_0 transformer in unet/, a Q8_0 T5 in clip/."""
    models = tmp_path_factory.mktemp("gguf") / "models"
    shutil.copytree(dev_set.models_dir / "tokenizers", models / "tokenizers")
    for role, folder in (("clip", "clip"), ("vae", "vae")):
        (models / folder).mkdir(parents=True, exist_ok=True)
        shutil.copy(dev_set.paths[role], models / folder)
    (models / "unet").mkdir()
    arrays, types = quantize_state(dev_set.states.transformer, [QType.Q8_0, QType.Q5_1, QType.Q4_0])
    write_gguf(models / "unet" / "flux1-dev-tiny-Q4_0.gguf", arrays, types, "flux")
    t5 = {k: v for k, v in dev_set.stored_as_float()["t5"].items()}
    names = hf_to_gguf_t5_names(t5)
    arrays, types = quantize_state(t5, [QType.Q8_0])
    write_gguf(
        models / "clip" / "t5-v1_1-xxl-encoder-Q8_0.gguf",
        {names[k]: v for k, v in arrays.items()},
        {names[k]: v for k, v in types.items()},
        "t5encoder",
    )
    return models


def test_gguf_transformer_and_t5_give_the_image_of_their_dequantized_weights(dev_set, gguf_models, tmp_path):
    out = tmp_path / "gguf.png"
    assert main(["generate", "--models-dir", str(gguf_models), *ARGS, "--out", str(out)]) == 0
    states = dev_set.stored_as_float() | {
        "transformer": dequantized_back(gguf_models / "unet" / "flux1-dev-tiny-Q4_0.gguf"),
        "t5": dequantized_back(gguf_models / "clip" / "t5-v1_1-xxl-encoder-Q8_0.gguf", t5_gguf_to_hf_names),
    }
    theirs = oracle(dev_set, states)
    ours = png(out)
    assert theirs.std() > 2.0
    assert psnr(ours, theirs) >= 45.0
    # and the quantization was real: the unquantized model draws something else
    assert psnr(ours, oracle(dev_set, dev_set.stored_as_float())) < 45.0


def test_gguf_weights_stay_quantized_and_stream_as_quantized_bytes(dev_set, gguf_models, tmp_path):
    engine = Engine()
    request = GenerateRequest(
        prompt="glass robot", width=64, height=64, steps=2, seed=4, vram_budget=0.0,
        files=ModelFiles(models_dir=str(gguf_models)), out=str(tmp_path / "s.png"),
    )  # fmt: skip
    streamed = png(engine.generate(request)[0])
    transformer = engine.models.loaded("transformer")
    qkv = transformer.double_blocks[0].img_attn.qkv
    assert qkv.weight.dtype == torch.uint8  # raw blocks in RAM, expanded per layer when it runs
    raw, _ = read_gguf(gguf_models / "unet" / "flux1-dev-tiny-Q4_0.gguf")
    blocks = ("double_blocks.", "single_blocks.")
    # what crosses the bus: the blocks' layer tensors (the tiny QK-norm scales live on the device for good)
    block_bytes = sum(w.nbytes for name, w in raw.items() if name.startswith(blocks) and "_norm." not in name)
    assert engine.memory.stats_of(transformer).bytes_streamed == 2 * block_bytes  # two steps, quantized bytes
    request.vram_budget, request.out = None, str(tmp_path / "r.png")
    assert np.array_equal(streamed, png(Engine().generate(request)[0]))
