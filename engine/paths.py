"""Paths built from outside data (a prompt's `<lora:...>` tag, a PNG's metadata) stay inside their folder."""

from __future__ import annotations

import re
from pathlib import Path, PurePosixPath, PureWindowsPath

from engine.contract.errors import UserError

_PARTS = re.compile(r"[\\/]+")


def confined(folder: str | Path, name: str, what: str) -> Path:
    """`folder / name`, refused in one sentence (`what` says where the name came from) when the name is absolute,
    carries a drive or UNC prefix, climbs with `..`, or resolves (links followed) to a place outside `folder`.
    Both kinds of slash count as separators, whatever the OS, so a name means the same everywhere."""
    folder = Path(folder)
    parts = [p for p in _PARTS.split(name) if p not in ("", ".")]
    absolute = PurePosixPath(name).is_absolute() or bool(
        PureWindowsPath(name).drive or PureWindowsPath(name).root
    )
    if absolute or "\0" in name or not parts or ".." in parts:
        raise UserError(
            f"{what} names {name!r}, which is not a plain name inside {folder}: use a file name there."
        )
    path = folder.joinpath(*parts)
    base = folder.resolve()
    resolved = path.resolve()
    if resolved != base and base not in resolved.parents:
        raise UserError(
            f"{what} names {name!r}, which leads outside {folder}: use a file inside that folder."
        )
    return path
