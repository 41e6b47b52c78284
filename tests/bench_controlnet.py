"""Benchmark: the CPU step time with and without a ControlNet, same weights, same process.

    .venv/bin/python -m tests.bench_controlnet [--width 768] [--size 512] [--steps 3]

A wide random FLUX.1 (hidden 768: 4 double + 8 single blocks) and an InstantX-layout ControlNet a quarter of its
depth (1 double + 2 single blocks: InstantX's real net has 5 + 10 against the base's 19 + 38), written in the
real file formats and run through `Engine.generate`; the mean s/step after a warm-up generation of each. Random
weights: only the shapes matter for time.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image
from safetensors.torch import save_file

from engine import fixtures
from engine.contract.events import Done
from engine.contract.request import ControlNetSpec, GenerateRequest, ModelFiles
from engine.fixtures_controlnet import diffusers_controlnet_state
from engine.generation.pipeline import Engine


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--width", type=int, default=768)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp())
    models = root / "models"
    spec = fixtures.wide_spec(args.width, depth=4, depth_single=8)
    fixtures.write_split(models, fixtures.tiny_states(spec, fixtures.write_tokenizers(models)))
    (models / "controlnet").mkdir()
    save_file(diffusers_controlnet_state(spec, 1, 2, seed=31), str(models / "controlnet" / "net.safetensors"))
    rgb = (np.random.default_rng(0).random((args.size, args.size, 3)) * 255).astype(np.uint8)
    Image.fromarray(rgb).save(root / "control.png")
    engine = Engine()

    def step_seconds(controlnets: list[ControlNetSpec], name: str) -> float:
        done: list[Done] = []
        request = GenerateRequest(
            prompt="a cat", width=args.size, height=args.size, steps=args.steps, seed=1, dtype="fp32",
            files=ModelFiles(models_dir=str(models)), controlnets=controlnets, out=str(root / f"{name}.png"),
        )  # fmt: skip
        engine.generate(request, on_event=lambda e: done.append(e) if isinstance(e, Done) else None)
        return done[-1].mean_seconds_per_it

    net = [ControlNetSpec(path="net", image=str(root / "control.png"))]
    step_seconds([], "warm-a"), step_seconds(net, "warm-b")
    plain, controlled = step_seconds([], "a"), step_seconds(net, "b")
    print(f"hidden {args.width}, 4+8 blocks, ControlNet 1+2 blocks, {args.size}x{args.size}, fp32 on the CPU")
    print(f"without {plain:.3f} s/step, with {controlled:.3f} s/step: {controlled / plain:.2f} x")


if __name__ == "__main__":
    main()
