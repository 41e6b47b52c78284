"""Free disk space where a file will land (the folder may not exist yet)."""

from __future__ import annotations

import shutil
from pathlib import Path

from bootstrap.errors import BootstrapError
from bootstrap.untrusted import printable


def existing_parent(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path.parent != path:
        path = path.parent
    return path


def free_bytes(path: Path) -> int:
    return shutil.disk_usage(existing_parent(path)).free


def usable_folder(path: Path, what: str = "--models-dir") -> Path:
    """The path, when it is a folder or can become one; one sentence when a file stands where a folder must be."""
    for place in (path, *path.absolute().parents):
        if place.exists():
            if not place.is_dir():
                where = "is a file" if place == path else f"is inside {place}, which is a file"
                raise BootstrapError(f"{what} {printable(path)} {where}, not a folder: give a folder.")
            break
    return path
