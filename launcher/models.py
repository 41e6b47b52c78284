"""What is installed in the models folders, and the defaults that suit FLUX.1 [dev] and [schnell]."""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

from engine.contract import families, layout
from engine.contract.request import DEV, SCHNELL, ModelDefaults


def defaults_for(name: str) -> ModelDefaults:
    """By the file name: [schnell] when it says so, else [dev] (the distilled-guidance model most files are)."""
    return SCHNELL if "schnell" in name.lower() else DEV


# all-in-one checkpoints prefix the transformer's names
TRANSFORMER_PREFIXES = ("", "model.diffusion_model.", "diffusion_model.")
MAX_HEADER_BYTES = 100 * 2**20  # FLUX's headers are ~100 KB; more than this is not a safetensors file
# FLUX.2 [klein]: no guidance embedding, so the engine runs it with [schnell]'s step count (its distilled
# models are made for 4 steps); guidance is not used, true CFG (--cfg above 1 with a negative) is.
KLEIN = ModelDefaults("klein", steps=SCHNELL.steps, guidance=0.0, t5_max_length=SCHNELL.t5_max_length)


@dataclass(frozen=True)
class ModelFamily:
    """What the TUI shows for a chosen model file, and the defaults it applies."""

    name: str  # "FLUX.1 [dev]", "FLUX.1 [schnell]", "FLUX.2 [klein]"
    defaults: ModelDefaults
    known: bool = True  # False: guessed from the file name (GGUF, unreadable header)

    @property
    def flux2(self) -> bool:
        return self.defaults is KLEIN

    def describe(self) -> str:
        how = "" if self.known else " (guessed from the file name)"
        if self.flux2:
            return (
                f"{self.name}{how}: {self.defaults.steps} steps, no guidance (CFG above 1 uses the negative)"
            )
        guidance = f"guidance {self.defaults.guidance:g}" if self.defaults.guidance else "no guidance"
        return f"{self.name}{how}: {self.defaults.steps} steps, {guidance}"


def safetensors_names(path: Path) -> set[str] | None:
    """The tensor names in a safetensors file's JSON header, or None when it is not one (or unreadable).

    The file starts with the header's length (8 bytes, little-endian) and the header: {name: {dtype, shape,
    data_offsets}, "__metadata__": {...}}. Only the header is read, however large the file.
    """
    try:
        with Path(path).open("rb") as handle:
            start = handle.read(8)
            if len(start) < 8:
                return None
            (length,) = struct.unpack("<Q", start)
            if not 2 <= length <= MAX_HEADER_BYTES:
                return None
            raw = handle.read(length)
        if len(raw) < length:
            return None
        header = json.loads(raw.decode("utf-8"))
    except (OSError, ValueError):  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        return None
    if not isinstance(header, dict):
        return None
    return {name for name in header if name != "__metadata__"}


def transformer_names(path: Path) -> set[str] | None:
    """The transformer's tensor names in a safetensors file, its checkpoint prefix taken off (None when the file
    cannot tell: GGUF, not a safetensors file, unreadable)."""
    if Path(path).suffix.lower() not in layout.SAFETENSORS_SUFFIXES:
        return None
    names = safetensors_names(path)
    if names is None:
        return None
    for prefix in TRANSFORMER_PREFIXES[1:]:
        if any(name.startswith(prefix) for name in names):
            return {name[len(prefix) :] for name in names if name.startswith(prefix)}
    return names


def is_dev_transformer(path: Path) -> bool | None:
    """True for [dev] (a guidance embedder), False for [schnell], None when the file cannot tell (GGUF, not
    a safetensors file, unreadable)."""
    names = transformer_names(Path(path))
    return None if names is None else families.has_guidance_embedding(names)


def family_for_file(path: Path | str) -> ModelFamily:
    """The family of a model file from its tensor names, asked the engine's way (engine/contract/families.py);
    by its name when the header cannot tell."""
    names = transformer_names(Path(path))
    if names is None:
        lowered = Path(path).name.lower()
        if "klein" in lowered or "flux2" in lowered or "flux.2" in lowered or "flux-2" in lowered:
            return ModelFamily("FLUX.2 [klein]", KLEIN, known=False)
        defaults = defaults_for(lowered)
        return ModelFamily(f"FLUX.1 [{defaults.variant}]", defaults, known=False)
    if families.is_flux2(names):
        return ModelFamily("FLUX.2 [klein]", KLEIN)
    if families.has_guidance_embedding(names):
        return ModelFamily("FLUX.1 [dev]", DEV)
    return ModelFamily("FLUX.1 [schnell]", SCHNELL)


def defaults_for_file(path: Path | str) -> ModelDefaults:
    """The defaults of the file's family (see family_for_file)."""
    return family_for_file(path).defaults


@dataclass(frozen=True)
class InstalledFile:
    """A weight file found in one of the models folders (bootstrap.manifest.ModelFile is one to download)."""

    folder: str  # e.g. "diffusion_models"
    path: Path
    size: int

    @property
    def is_model(self) -> bool:
        return self.folder in layout.MODEL_FOLDERS


def scan_models(roots: list[Path]) -> list[InstalledFile]:
    """Weight files under each root's ComfyUI and Forge folders, sorted by folder then name."""
    found: list[InstalledFile] = []
    seen: set[Path] = set()
    for root in roots:
        for folder in layout.LISTED_FOLDERS:
            base = root / folder
            if not base.is_dir():
                continue
            for path in sorted(base.rglob("*")):
                if path.suffix.lower() not in layout.WEIGHT_SUFFIXES or not path.is_file():
                    continue
                resolved = path.resolve()
                if resolved in seen:
                    continue
                seen.add(resolved)
                found.append(InstalledFile(folder, path, path.stat().st_size))
    return found


def root_of(path: str | Path, roots: list[Path]) -> Path:
    """The models folder a chosen file lives in (its text encoders and VAE are looked for there too)."""
    resolved = Path(path).resolve()
    for root in roots:
        if resolved.is_relative_to(root.resolve()):
            return root
    return roots[0]


def is_all_in_one(path: str | Path) -> bool:
    """A checkpoint that carries text encoders or a VAE beside the transformer (read from the header only)."""
    names = safetensors_names(Path(path)) or set()
    return any(
        name.startswith(("text_encoders.", "vae.", "first_stage_model.", "cond_stage_model."))
        for name in names
    )


def has_any_model(roots: list[Path]) -> bool:
    return any(f.is_model for f in scan_models(roots))


def human_size(size: int) -> str:
    value = float(size)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1024 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GB"
