"""Free disk space where a file will land (the folder may not exist yet)."""

from __future__ import annotations

import shutil
from pathlib import Path


def existing_parent(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path.parent != path:
        path = path.parent
    return path


def free_bytes(path: Path) -> int:
    return shutil.disk_usage(existing_parent(path)).free
