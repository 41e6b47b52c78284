"""Checks before anything is installed, each a plain function that returns one sentence or None: the Python
version, Windows' 260-character path limit, a folder that cannot be written. Standard library only, and
syntax an old Python still parses, so that an unsupported version gets the sentence instead of a traceback."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

# The Pythons the pins install on (numpy 2.4 needs 3.11; the portable bundle ships 3.12).
PYTHONS = ((3, 11), (3, 12), (3, 13))
PYTHON_PAGE = "https://www.python.org/downloads/"
MAX_PATH = 260  # Windows' limit without LongPathsEnabled, the terminating NUL included
# The longest path inside torch's Windows wheel, below site-packages (torch 2.13: 167 characters).
WHEEL_PATH_CHARS = 167
SITE_PACKAGES = ("Lib", "site-packages")


def python_problem(version: tuple[int, ...] | None = None) -> str | None:
    """One sentence when this Python cannot run FluxDeck's pinned packages."""
    major_minor = tuple((version or sys.version_info)[:2])
    if major_minor in PYTHONS:
        return None
    have = ".".join(map(str, major_minor))
    return (
        f"Python {have} cannot install FluxDeck's packages (it needs 3.11, 3.12 or 3.13): install Python 3.12 from "
        f'{PYTHON_PAGE} (tick "Add python.exe to PATH") and run this again, or use the portable bundle.'
    )


def long_path_problem(env_dir: str, long_paths_enabled: bool) -> str | None:
    """Windows: pip fails deep inside torch's wheel when <env_dir>\\Lib\\site-packages\\<its longest path> passes
    260 characters and LongPathsEnabled is off."""
    if long_paths_enabled:
        return None
    site = env_dir.rstrip("\\/") + "\\" + "\\".join(SITE_PACKAGES) + "\\"
    if len(site) + WHEEL_PATH_CHARS < MAX_PATH:
        return None
    return (
        f"The folder path {env_dir} is too long for Windows' 260-character limit (torch's files go "
        f"{WHEEL_PATH_CHARS} characters deeper): move the folder to C:\\FluxDeck, or enable long "
        "paths (LongPathsEnabled) and run this again."
    )


def windows_long_paths_enabled() -> bool:
    """HKLM\\SYSTEM\\CurrentControlSet\\Control\\FileSystem\\LongPathsEnabled == 1 (False off Windows or unreadable)."""
    try:
        import winreg  # type: ignore[import-not-found]
    except ImportError:
        return False
    try:
        key = winreg.OpenKey(winreg.HKEY_LOCAL_MACHINE, r"SYSTEM\CurrentControlSet\Control\FileSystem")
        with key:
            value, _ = winreg.QueryValueEx(key, "LongPathsEnabled")
    except OSError:
        return False
    return value == 1


def folder_writable(folder: Path) -> bool:
    """Whether a file can be created in the folder (or in its nearest existing parent)."""
    probe = folder
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    try:
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError:
        return False
    return True


def writable_problem(folder: Path, writable: bool) -> str | None:
    if writable:
        return None
    where = "Program Files and other system folders are not" if os.name == "nt" else "you cannot write there"
    return (
        f"FluxDeck's folder {folder} is not writable ({where}): move the folder to one you own, such as "
        "C:\\FluxDeck, and run this again."
    )
