"""On a CUDA machine: the streamed paths (side stream, pinned memory, staged copies) give the resident image.
Skipped where torch has no CUDA (our CI); run by the first session lent a GPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from engine.contract.request import GenerateRequest, ModelFiles
from engine.generation.pipeline import Engine
from engine.runtime.placement import LOOKAHEAD
from tests.metrics import psnr

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def generate(engine, tiny, out, **kw) -> np.ndarray:
    request = GenerateRequest(
        prompt="a photo of a cat", width=64, height=64, steps=2, seed=3, device="cuda",
        files=ModelFiles(models_dir=str(tiny.models_dir)), out=str(out), **kw,
    )  # fmt: skip
    return np.asarray(Image.open(engine.generate(request)[0]))


def test_every_budget_gives_the_resident_image_on_cuda(deep_set, tmp_path):
    engine = Engine()
    resident = generate(engine, deep_set, tmp_path / "r.png", dtype="fp32")
    transformer = engine.models.loaded("transformer")
    managed = engine.memory._models[id(transformer)]
    block = max(managed.block_bytes)
    for i, budget in enumerate([managed.rest_bytes + (LOOKAHEAD + 2) * block, 0]):
        streamed = generate(
            engine, deep_set, tmp_path / f"s{i}.png", dtype="fp32", vram_budget=budget / 1024**3
        )
        assert np.array_equal(resident, streamed)
        assert engine.memory.stats_of(engine.models.loaded("transformer")).bytes_streamed > 0


def test_cuda_bf16_is_close_to_the_cpu_image(dev_set, tmp_path):
    cpu = np.asarray(
        Image.open(
            Engine().generate(
                GenerateRequest(prompt="a photo of a cat", width=64, height=64, steps=2, seed=3,
                                files=ModelFiles(models_dir=str(dev_set.models_dir)), out=str(tmp_path / "c.png"))
            )[0]
        )
    )  # fmt: skip
    gpu = generate(Engine(), dev_set, tmp_path / "g.png", vram_budget=0.0)
    assert psnr(cpu, gpu) > 30
