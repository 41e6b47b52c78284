"""Every file the engine writes goes through `write_atomic`: a temporary name in the same folder, renamed into
place only once it is complete, so an interrupt (Ctrl+C, SIGTERM, a crash, a full disk) never leaves a
half-written file under the final name."""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

PARTIAL_SUFFIX = ".partial"  # never .png: a gallery that lists *.png does not see a file still being written


def partial_name(path: Path) -> Path:
    """A fresh hidden temporary name beside `path` (`.name.<random>.partial`)."""
    return path.with_name(f".{path.name}.{secrets.token_hex(4)}{PARTIAL_SUFFIX}")


def write_atomic(path: str | Path, write: Callable[[BinaryIO], object], *, overwrite: bool = False) -> Path:
    """Call `write(file)` on a new temporary file beside `path`, flush it to disk, then give it the name `path`.

    overwrite=False: an existing `path` is never replaced (FileExistsError; the caller picks another name), and
    two writers racing for one name cannot both get it. On any failure, KeyboardInterrupt included, the
    temporary file is removed and `path` is untouched."""
    path = Path(path)
    while True:
        tmp = partial_name(path)
        try:
            f = tmp.open("xb")  # exclusive create, permissions from the umask as for any new file
        except FileExistsError:
            continue
        break
    try:
        with f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        _place(tmp, path, overwrite)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _place(tmp: Path, path: Path, overwrite: bool) -> None:
    if overwrite:
        os.replace(tmp, path)
        return
    if os.name == "nt":
        os.rename(tmp, path)  # Windows refuses to rename onto an existing file
        return
    try:
        os.link(tmp, path)  # atomic, and fails when `path` exists
    except FileExistsError:
        raise
    except OSError:  # a file system without hard links (FAT, exFAT, some network shares)
        if path.exists():
            raise FileExistsError(path) from None
        os.rename(tmp, path)
        return
    tmp.unlink()
