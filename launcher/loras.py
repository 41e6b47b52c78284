"""LoRA files in the models folders, the session's choice of them, and LoRAs read back from an image.

Plain data (no widgets, no torch): the LoRA panel (launcher/screens/loras.py) shows `scan_loras`, the form
keeps a `LoraChoice` per file for the whole session, and the enabled ones become the request's `loras`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path, PureWindowsPath

from engine.contract.layout import LORA_FOLDERS, LORA_SUFFIXES
from engine.contract.request import MAX_LORA_STRENGTH

# <models>/loras is ComfyUI's folder; A1111/Forge installs (often given as extra model paths) use `Lora`: the
# same folders and suffixes the engine's `<lora:name>` tags search (engine/contract/layout.py).
STRENGTH_RANGE = (-MAX_LORA_STRENGTH, MAX_LORA_STRENGTH)  # what the engine takes (usual values are -2..2)


@dataclass(frozen=True)
class LoraFile:
    path: Path
    name: str  # relative to its LoRA folder, without the suffix, e.g. "styles/ink"
    size: int


@dataclass
class LoraChoice:
    """One file's state in the panel: on or off, and the strength as typed (checked when generating)."""

    enabled: bool = False
    strength: str = "1"


def lora_folders(roots: list[Path]) -> list[Path]:
    """The LoRA folders that exist under the model roots, each once (case-insensitive disks alias them)."""
    folders: list[Path] = []
    seen: set[Path] = set()
    for root in roots:
        for name in LORA_FOLDERS:
            folder = root / name
            if not folder.is_dir():
                continue
            resolved = folder.resolve()
            if resolved in seen:
                continue
            seen.add(resolved)
            folders.append(folder)
    return folders


def scan_loras(roots: list[Path]) -> list[LoraFile]:
    """.safetensors files in the LoRA folders and their subfolders, by folder then name, each file once."""
    found: list[LoraFile] = []
    seen: set[Path] = set()
    for folder in lora_folders(roots):
        files = [p for p in folder.rglob("*") if p.suffix.lower() in LORA_SUFFIXES and p.is_file()]
        for path in sorted(files, key=lambda p: p.relative_to(folder).as_posix().lower()):
            resolved = path.resolve()
            if resolved in seen:
                continue
            seen.add(resolved)
            name = path.relative_to(folder).with_suffix("").as_posix()
            found.append(LoraFile(path, name, path.stat().st_size))
    return found


def lora_label(path: str | Path) -> str:
    """A short name for a LoRA path: the file name without its suffix."""
    return Path(path).stem


def format_strength(strength: float) -> str:
    return f"{strength:g}"


def loras_in_request(request: dict | None) -> list[tuple[str, float]]:
    """(path, strength) of each LoRA in a request read back from one of our PNGs; entries that are malformed
    (a path that is not text, a strength that is not a finite number in STRENGTH_RANGE) are skipped."""
    items = request.get("loras") if isinstance(request, dict) else None
    result: list[tuple[str, float]] = []
    low, high = STRENGTH_RANGE
    for item in items if isinstance(items, list) else []:
        if not isinstance(item, dict) or not isinstance(item.get("path"), str) or not item["path"]:
            continue
        strength = item.get("strength", 1.0)
        if isinstance(strength, bool) or not isinstance(strength, int | float):
            continue
        if not (math.isfinite(strength) and low <= strength <= high):
            continue
        result.append((item["path"], float(strength)))
    return result


def match_loras(
    wanted: list[tuple[str, float]], available: list[LoraFile]
) -> tuple[list[tuple[str, float]], list[str]]:
    """The wanted LoRAs that are listed here: the same file, else a listed file of the same name (the models
    folder moved, or the image came from another machine). Paths come from images, so only files in the LoRA
    folders are taken: a path elsewhere is matched by its name only. Returns (found, names of the missing)."""
    by_name: dict[str, Path] = {}
    listed: set[Path] = set()
    for lora in available:
        by_name.setdefault(lora.path.name.lower(), lora.path)
        listed.add(lora.path.resolve())
    found: list[tuple[str, float]] = []
    missing: list[str] = []
    for path, strength in wanted:
        name = PureWindowsPath(path).name  # the last part, whether the image was made on Windows or not
        if _resolved(path) in listed:
            found.append((path, strength))
        elif (match := by_name.get(name.lower())) is not None:
            found.append((str(match), strength))
        else:
            missing.append("".join(ch for ch in lora_label(name) if ch.isprintable()))  # no terminal codes
    return found, missing


def _resolved(path: str) -> Path | None:
    try:
        return Path(path).resolve()
    except (OSError, ValueError, RuntimeError):  # a NUL byte, a symlink loop
        return None


def choose(choices: dict[str, LoraChoice], loras: list[tuple[str, float]]) -> None:
    """Turn on exactly these LoRAs at these strengths; the others are turned off (their strengths stay)."""
    for choice in choices.values():
        choice.enabled = False
    for path, strength in loras:
        choices[path] = LoraChoice(True, format_strength(strength))


def summary(choices: dict[str, LoraChoice]) -> str:
    """What the form shows: `none`, or the enabled LoRAs with their strengths."""
    enabled = [
        f"{lora_label(path)} {choice.strength.strip()}" for path, choice in choices.items() if choice.enabled
    ]
    return ", ".join(enabled) if enabled else "none"
