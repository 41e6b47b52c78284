"""`python -m engine selftest`: the whole generation path on a tiny random model, to prove an install."""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import torch

from engine.contract.request import GenerateRequest, ModelFiles
from engine.fixtures import write_tiny_model_set
from engine.generation.pipeline import Engine
from engine.progress import StderrProgress
from engine.runtime import speed
from engine.runtime.devices import pick_device


def run_selftest(device: str = "auto", speed_file: Path | None = speed.DEFAULT_FILE) -> int:
    """The tiny generation, then this machine's speed for the wizard's estimates (saved to `speed_file`)."""
    dev, precision = pick_device(device, "auto")
    print(f"torch {torch.__version__}, device {dev}, dtype {precision}", file=sys.stderr)
    if dev.type == "cuda":
        print(f"GPU: {torch.cuda.get_device_name(dev)}", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="fluxdeck-selftest-") as tmp:
        models = Path(tmp) / "models"
        start = time.perf_counter()
        write_tiny_model_set(models)
        print(f"wrote a tiny model set in {time.perf_counter() - start:.2f} s", file=sys.stderr)
        request = GenerateRequest(
            prompt="a photo of a cat",
            width=64,
            height=64,
            steps=2,
            seed=1,
            device=device,
            files=ModelFiles(models_dir=str(models)),
            out=str(Path(tmp) / "selftest.png"),
        )
        paths = Engine().generate(request, StderrProgress())
        size = Path(paths[0]).stat().st_size
        print(f"selftest passed: wrote {paths[0]} ({size} bytes) on {dev}", file=sys.stderr)
    if speed_file is not None:
        figures = speed.measure(dev, precision.transformer)
        speed.save(figures, speed_file)
        print(f"speed: {speed.summary(figures)} (saved in {speed_file})", file=sys.stderr)
    return 0
