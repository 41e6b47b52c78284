"""GPU check (on a CUDA machine: `python -m tests.gpu_controlnet_check`; falls back to the CPU elsewhere): two
ControlNets and the transformer streamed under a one-byte VRAM budget give the same pixels as everything
resident, and each of the three streams bytes."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

from engine import fixtures
from engine.contract.request import ControlNetSpec, GenerateRequest, ModelFiles
from engine.fixtures_controlnet import diffusers_controlnet_state, xlabs_controlnet_state
from engine.generation.pipeline import Engine


def main() -> None:
    root = Path(tempfile.mkdtemp())
    models = root / "models"
    spec = fixtures.TinySpec()
    fixtures.write_split(models, fixtures.tiny_states(spec, fixtures.write_tokenizers(models)))
    (models / "controlnet").mkdir()
    save_file(diffusers_controlnet_state(spec, 2, 1, seed=31), str(models / "controlnet/a.safetensors"))
    save_file(xlabs_controlnet_state(spec, 2, seed=34), str(models / "controlnet/b.safetensors"))
    rgb = (np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)
    Image.fromarray(rgb).save(root / "c.png")
    specs = [ControlNetSpec("a", str(root / "c.png")), ControlNetSpec("b", str(root / "c.png"), end=0.6)]
    device = "cuda" if torch.cuda.is_available() else "cpu"

    def generate(engine: Engine, **kw) -> np.ndarray:
        request = GenerateRequest(
            prompt="x", width=64, height=64, steps=3, seed=1, dtype="fp32", device=device,
            files=ModelFiles(models_dir=str(models)), controlnets=specs, out=str(root / "o.png"), **kw,
        )  # fmt: skip
        return np.asarray(Image.open(engine.generate(request)[0]))

    whole = generate(Engine())
    engine = Engine()
    streamed = generate(engine, vram_budget=1e-9)
    print(device, "identical:", np.array_equal(whole, streamed))
    for role in ("transformer", "controlnet:0", "controlnet:1"):
        print(role, "bytes streamed:", engine.memory.stats_of(engine.models.loaded(role)).bytes_streamed)
    assert np.array_equal(whole, streamed)


if __name__ == "__main__":
    main()
