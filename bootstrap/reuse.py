"""Model folders of an existing ComfyUI or Forge install, so the wizard can point at them instead of copying 20 GB."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from bootstrap.manifest import ModelFile

# Where each of our folders lives in another install's models folder (first match wins).
COMFYUI_FOLDERS = {
    "checkpoints": ("checkpoints",),
    "diffusion_models": ("diffusion_models", "unet"),
    "unet": ("unet", "diffusion_models"),
    "text_encoders": ("text_encoders", "clip"),
    "clip": ("clip", "text_encoders"),
    "vae": ("vae",),
    "loras": ("loras",),
    "controlnet": ("controlnet", "xlabs/controlnets"),  # XLabs' own nodes read xlabs/controlnets
    "style_models": ("style_models",),
    "clip_vision": ("clip_vision",),
}
FORGE_FOLDERS = {
    "checkpoints": ("Stable-diffusion",),
    "diffusion_models": ("Stable-diffusion", "unet"),
    "unet": ("Stable-diffusion", "unet"),
    "text_encoders": ("text_encoder",),
    "clip": ("text_encoder",),
    "vae": ("VAE",),
    "loras": ("Lora",),
    "controlnet": ("ControlNet",),
}
# Install folders people have, relative to a few starting points (home, Desktop, drives, next to FluxDeck).
INSTALL_NAMES = (
    "ComfyUI",
    "ComfyUI_windows_portable/ComfyUI",
    "stable-diffusion-webui-forge",
    "webui_forge/webui",
    "webui_forge_cu121_torch231/webui",
    "sd-webui-forge",
)


@dataclass(frozen=True)
class ExistingFolder:
    path: Path  # the models folder itself
    kind: str  # "ComfyUI" or "Forge"

    @property
    def layout(self) -> dict[str, tuple[str, ...]]:
        return COMFYUI_FOLDERS if self.kind == "ComfyUI" else FORGE_FOLDERS

    def find(self, model_file: ModelFile) -> Path | None:
        """The manifest file inside this install (same file name, same size where the size is known)."""
        for sub in self.layout.get(model_file.folder, ()):
            candidate = self.path / sub / model_file.filename
            if candidate.is_file() and (
                model_file.size is None or candidate.stat().st_size == model_file.size
            ):
                return candidate
        return None

    def config_folders(self) -> dict[str, list[str]]:
        """Our folder name -> the folders of this install that hold such files (for a Forge layout)."""
        out: dict[str, list[str]] = {}
        for ours in ("checkpoints", "diffusion_models", "text_encoders", "vae", "loras"):
            for sub in self.layout[ours]:
                if (self.path / sub).is_dir():
                    out.setdefault(ours, []).append(str(self.path / sub))
        return out


def classify(path: Path) -> ExistingFolder | None:
    """A ComfyUI or Forge models folder at path, or under it (path may be the install folder)."""
    for models in (path, path / "models", path / "ComfyUI" / "models", path / "webui" / "models"):
        if not models.is_dir():
            continue
        names = {p.name for p in models.iterdir() if p.is_dir()}
        if "Stable-diffusion" in names:
            return ExistingFolder(models.resolve(), "Forge")
        if names & {"checkpoints", "diffusion_models", "unet"} and names & {"vae", "clip", "text_encoders"}:
            return ExistingFolder(models.resolve(), "ComfyUI")
    return None


def candidate_places(home: Path, project_root: Path, drives: tuple[str, ...] = ()) -> list[Path]:
    starts = [home, home / "Desktop", home / "Downloads", project_root.parent, *(Path(d) for d in drives)]
    return [start / name for start in starts for name in INSTALL_NAMES]


def find_existing(places: list[Path], own_models: Path | None = None) -> list[ExistingFolder]:
    found: list[ExistingFolder] = []
    own = own_models.resolve() if own_models and own_models.exists() else None
    for place in places:
        try:
            folder = classify(place)
        except OSError:
            continue
        if folder and folder.path != own and folder not in found:
            found.append(folder)
    return found
