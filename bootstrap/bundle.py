"""`python -m bootstrap bundle`: <out>/<name>-windows-portable.7z with the code, the launchers, README and, when
given, the official embeddable Python. Never models, a venv, caches or the user's config."""

from __future__ import annotations

import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser as a package
    import tomli as tomllib  # type: ignore[no-redef]

from bootstrap.environment import EMBEDDED_DIR, patch_pth
from bootstrap.errors import BootstrapError

PROJECT_ROOT = Path(__file__).resolve().parent.parent
CODE_DIRS = ("bootstrap", "engine", "launcher", "docs")
TOP_FILES = (
    "run_gpu.bat",
    "run_cpu.bat",
    "run_gpu.sh",
    "run_cpu.sh",
    "README.md",
    "DESIGN.md",
    "LICENSE",
    "LICENSE.txt",
    "requirements.txt",
    "pyproject.toml",
)
SKIP_DIRS = {"__pycache__", ".pytest_cache", ".ruff_cache", ".mypy_cache", ".git", "site-packages", "Scripts"}
SKIP_SUFFIXES = (".pyc", ".pyo", ".part", ".tmp", ".7z")
SKIP_NAMES = {"config.toml", ".fluxdeck-verified.json", "fluxdeck-env.json", ".DS_Store", "get-pip.py"}


@dataclass
class BundleOptions:
    root: Path = PROJECT_ROOT
    out_dir: Path = field(default_factory=lambda: PROJECT_ROOT / "dist")
    python_embed: Path | None = None  # the official embeddable Python: its .zip or an unpacked folder
    name: str | None = None  # default: [project].name of pyproject.toml


def project_name(root: Path) -> str:
    try:
        with (root / "pyproject.toml").open("rb") as handle:
            return str(tomllib.load(handle)["project"]["name"])
    except (OSError, KeyError, tomllib.TOMLDecodeError):
        return "fluxdeck"


def _wanted(relative: PurePosixPath) -> bool:
    return not (
        any(part in SKIP_DIRS for part in relative.parts[:-1])
        or relative.name in SKIP_NAMES
        or relative.name.endswith(SKIP_SUFFIXES)
    )


def code_files(root: Path) -> list[tuple[Path, str]]:
    """(file, path in the bundle) for the code and top-level files, sorted, caches left out."""
    found = [(root / name, name) for name in TOP_FILES if (root / name).is_file()]
    for folder in CODE_DIRS:
        for path in sorted((root / folder).rglob("*")):
            relative = PurePosixPath(path.relative_to(root).as_posix())
            if path.is_file() and _wanted(relative):
                found.append((path, str(relative)))
    return found


def embed_files(source: Path) -> list[tuple[str, bytes]]:
    """(path under python_embeded/, bytes) from the official zip or a folder; ._pth patched, no site-packages."""
    items: list[tuple[str, bytes]] = []
    if source.is_file() and zipfile.is_zipfile(source):
        with zipfile.ZipFile(source) as archive:
            for info in archive.infolist():
                if not info.is_dir() and _wanted(PurePosixPath(info.filename)):
                    items.append((info.filename, archive.read(info)))
    elif source.is_dir():
        for path in sorted(source.rglob("*")):
            relative = PurePosixPath(path.relative_to(source).as_posix())
            if path.is_file() and _wanted(relative):
                items.append((str(relative), path.read_bytes()))
    else:
        raise BootstrapError(f"--python-embed {source} is neither the embeddable Python's .zip nor a folder.")
    if not any(name == "python.exe" for name, _ in items):
        raise BootstrapError(
            f"--python-embed {source} has no python.exe: give the official Windows embeddable package."
        )
    out = []
    for name, data in items:
        if name.endswith("._pth") and "/" not in name:
            data = patch_pth(data.decode("utf-8")).encode("utf-8")
        out.append((f"{EMBEDDED_DIR}/{name}", data))
    return out


def build_bundle(options: BundleOptions) -> Path:
    import py7zr

    name = options.name or project_name(options.root)
    top = PurePosixPath(name)
    files = code_files(options.root)
    if not any(arc == "bootstrap/manifest.toml" for _, arc in files):
        raise BootstrapError(
            f"{options.root} does not look like FluxDeck's folder: bootstrap/manifest.toml is missing."
        )
    embedded = embed_files(options.python_embed) if options.python_embed else []
    options.out_dir.mkdir(parents=True, exist_ok=True)
    target = options.out_dir / f"{name}-windows-portable.7z"
    partial = target.with_name(target.name + ".tmp")
    with py7zr.SevenZipFile(partial, "w") as archive:
        for path, arcname in files:
            archive.write(path, str(top / arcname))
        for arcname, data in embedded:
            archive.writestr(data, str(top / arcname))
    partial.replace(target)
    return target
