"""Launch flags (DESIGN.md): python -m launcher [--cpu] [--models-dir D] [--output-dir O] [--prompt T] ..."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from launcher.config import PROJECT_ROOT


@dataclass
class LaunchOptions:
    cpu: bool = False
    models_dir: str | None = None
    output_dir: str | None = None
    prompt: str | None = None
    width: int | None = None
    height: int | None = None
    steps: int | None = None
    seed: int | None = None
    config: Path = PROJECT_ROOT / "config.toml"
    renderer: str = "auto"
    no_wizard: bool = False
    check_models: bool = False


def parse_args(argv: list[str] | None = None) -> LaunchOptions:
    parser = argparse.ArgumentParser(
        prog="python -m launcher", description="FluxDeck: FLUX.1 in the terminal."
    )
    parser.add_argument("--cpu", action="store_true", help="run the engine on the CPU")
    parser.add_argument("--models-dir", help="models folder in the ComfyUI layout (default: models/)")
    parser.add_argument("--output-dir", help="where images are written (default: outputs/)")
    parser.add_argument("--prompt", help="start with this prompt in the form")
    parser.add_argument("--width", type=int)
    parser.add_argument("--height", type=int)
    parser.add_argument("--steps", type=int)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--config", type=Path, default=PROJECT_ROOT / "config.toml", help="settings file")
    parser.add_argument(
        "--images",
        dest="renderer",
        choices=("auto", "halfcell", "unicode"),
        default="auto",
        help="how images are drawn: auto (kitty/sixel where the terminal has them), halfcell, unicode",
    )
    parser.add_argument(
        "--no-wizard", action="store_true", help="do not offer the wizard when no model is found"
    )
    parser.add_argument(
        "--check-models",
        action="store_true",
        help="exit 0 when a model is installed, 3 when none is (the launch scripts use it), without starting the TUI",
    )
    return LaunchOptions(**vars(parser.parse_args(argv)))
