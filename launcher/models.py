"""What is installed in the models folders, and the defaults that suit FLUX.1 [dev] and [schnell]."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# ComfyUI layout: the folders we read, and which of them hold a model to pick (the others are its parts).
FOLDERS = ("checkpoints", "diffusion_models", "unet", "text_encoders", "clip", "vae", "loras")
MODEL_FOLDERS = ("checkpoints", "diffusion_models", "unet")
WEIGHT_SUFFIXES = (".safetensors", ".sft", ".gguf")


@dataclass(frozen=True)
class ModelDefaults:
    variant: str
    steps: int
    guidance: float
    shift: str = "auto"


DEV = ModelDefaults("dev", steps=28, guidance=3.5)
SCHNELL = ModelDefaults("schnell", steps=4, guidance=0.0)


def defaults_for(name: str) -> ModelDefaults:
    """[schnell] when the file says so, else [dev] (the distilled-guidance model most files are)."""
    return SCHNELL if "schnell" in name.lower() else DEV


@dataclass(frozen=True)
class ModelFile:
    folder: str  # e.g. "diffusion_models"
    path: Path
    size: int

    @property
    def is_model(self) -> bool:
        return self.folder in MODEL_FOLDERS


def scan_models(roots: list[Path]) -> list[ModelFile]:
    """Weight files under each root's ComfyUI folders, sorted by folder then name."""
    found: list[ModelFile] = []
    seen: set[Path] = set()
    for root in roots:
        for folder in FOLDERS:
            base = root / folder
            if not base.is_dir():
                continue
            for path in sorted(base.rglob("*")):
                if path.suffix.lower() not in WEIGHT_SUFFIXES or not path.is_file():
                    continue
                resolved = path.resolve()
                if resolved in seen:
                    continue
                seen.add(resolved)
                found.append(ModelFile(folder, path, path.stat().st_size))
    return found


def has_any_model(roots: list[Path]) -> bool:
    return any(f.is_model for f in scan_models(roots))


def human_size(size: int) -> str:
    value = float(size)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1024 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GB"
