"""Shared helpers for the launcher tests: PNGs with each kind of metadata, apps wired to test folders."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from PIL import Image, PngImagePlugin

from launcher.app import FluxDeckApp
from launcher.cli import LaunchOptions
from launcher.config import ConfigFile

ROOT = Path(__file__).resolve().parent.parent
FAKE_ENGINE = [sys.executable, str(Path(__file__).with_name("launcher_fake_engine.py"))]
FAKE_BOOTSTRAP = [sys.executable, str(Path(__file__).with_name("launcher_fake_bootstrap.py"))]
SIZE = (150, 42)

A1111_TEXT = (
    "a lighthouse at dusk, oil painting\nwith thick brush strokes\n"
    "Negative prompt: blurry, text\n"
    "Steps: 20, Sampler: Euler, Schedule type: Simple, CFG scale: 1.5, Distilled CFG Scale: 3, Seed: 1234, "
    'Size: 832x1216, Model: flux1-dev-fp8, Lora hashes: "a: 1, b: 2", Version: f2.0.1'
)

COMFY_PROMPT = {
    "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red fox in snow", "clip": ["11", 0]}},
    "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["11", 0]}},
    "26": {"class_type": "FluxGuidance", "inputs": {"guidance": 2.5, "conditioning": ["6", 0]}},
    "27": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 768, "height": 512, "batch_size": 1}},
    "31": {
        "class_type": "KSampler",
        "inputs": {
            "seed": 987654,
            "steps": 12,
            "cfg": 1.0,
            "sampler_name": "euler",
            "scheduler": "simple",
            "denoise": 1.0,
            "model": ["12", 0],
            "positive": ["26", 0],
            "negative": ["7", 0],
            "latent_image": ["27", 0],
        },
    },
    "12": {
        "class_type": "UNETLoader",
        "inputs": {"unet_name": "flux1-schnell.safetensors", "weight_dtype": "default"},
    },
}


def write_png(
    path: Path, color: tuple[int, int, int] = (40, 90, 160), size: tuple[int, int] = (64, 64), **text: str
) -> Path:
    info = PngImagePlugin.PngInfo()
    for key, value in text.items():
        info.add_text(key, value)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path, pnginfo=info)
    return path


def fluxdeck_png(path: Path, prompt: str, seed: int, color: tuple[int, int, int] = (40, 90, 160)) -> Path:
    request = {
        "prompt": prompt,
        "out": str(path),
        "width": 64,
        "height": 64,
        "steps": 2,
        "guidance": 3.5,
        "cfg": 1.0,
        "seed": seed,
        "files": {"models_dir": "models"},
    }
    return write_png(
        path, color, fluxdeck=json.dumps(request), parameters=f"{prompt}\nSteps: 2, Seed: {seed}, Size: 64x64"
    )


def make_app(tmp: Path, engine: list[str] | None = None, start_engine: bool = True, **options) -> FluxDeckApp:
    """An app on tmp/models and tmp/outputs, config in tmp, half-cell images, no cursor blink."""
    defaults = dict(
        models_dir=str(tmp / "models"),
        output_dir=str(tmp / "outputs"),
        width=64,
        height=64,
        steps=2,
        seed=7,
        prompt="a tiny test image",
        renderer="halfcell",
        no_wizard=True,
        config=tmp / "config.toml",
    )
    defaults.update(options)
    opts = LaunchOptions(**defaults)
    return FluxDeckApp(
        opts,
        ConfigFile.load(opts.config),
        engine_command=engine,
        bootstrap_command=FAKE_BOOTSTRAP,
        root=tmp,
        start_engine=start_engine,
        cursor_blink=False,
        seed=0,
    )


async def wait_for(pilot, condition, timeout: float = 30.0, step: float = 0.05) -> None:
    """Let the app run until condition() holds; fail with the app's log when it does not."""
    waited = 0.0
    while not condition():
        if waited >= timeout:
            log = "\n".join(list(pilot.app.log_lines)[-30:])
            raise AssertionError(f"timed out after {timeout} s waiting for {condition}; app log:\n{log}")
        await pilot.pause(step)
        waited += step
