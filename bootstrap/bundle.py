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
from bootstrap.untrusted import printable, relative_parts

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
SKIP_DIRS = {
    "__pycache__",
    ".pytest_cache",
    ".ruff_cache",
    ".mypy_cache",
    ".git",
    "site-packages",
    "Scripts",
    # an environment, a cache or user data left inside a code folder
    ".venv",
    "venv",
    "cache",
    ".cache",
    "models",
    "outputs",
    "dist",
    "node_modules",
}
SKIP_SUFFIXES = (
    ".pyc",
    ".pyo",
    ".part",
    ".tmp",
    ".7z",
    ".pem",
    ".key",
    ".safetensors",
    ".sft",
    ".gguf",
    ".ckpt",
)
SKIP_NAMES = {"config.toml", ".fluxdeck-verified.json", "fluxdeck-env.json", ".DS_Store", "get-pip.py"}
# secrets: never shipped, wherever they are
SECRET_NAMES = {".env", "hf_token", "token", ".netrc", ".pypirc", ".git-credentials", "id_rsa", "id_ed25519"}


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


def _wanted(relative: PurePosixPath, packages: frozenset[PurePosixPath] = frozenset()) -> bool:
    """Whether a file goes into the bundle; `packages`: the folders that are Python packages (an __init__.py), whose
    name is never taken for data (engine/models is code, a models/ of weights left in a code folder is not)."""
    name = relative.name.lower()
    folders = [PurePosixPath(*relative.parts[: i + 1]) for i in range(len(relative.parts) - 1)]
    return not (
        any(folder.name.lower() in SKIP_DIRS and folder not in packages for folder in folders)
        or relative.name in SKIP_NAMES
        or name in SECRET_NAMES
        or name.startswith(".env.")
        or name.endswith(SKIP_SUFFIXES)
    )


def member_name(relative: str, where: object) -> str:
    """A name inside the archive that unpacks inside its folder on Windows too: no '..', no absolute path, drive
    or backslash (a zip written on Windows may carry those), no device name."""
    try:
        relative_parts(relative, f"A member of {printable(where)}:")
    except BootstrapError as exc:
        raise BootstrapError(f"{exc} The bundle is not written.") from None
    return relative


def regular_files(folder: Path, root: Path) -> list[tuple[Path, PurePosixPath]]:
    """(file, path relative to root) under folder, sorted. A symlink to a file is followed and stored as that
    file's bytes (a link unpacks badly on Windows), but only when it leads to a file inside root: a link out
    of the project could carry a private file into the bundle, so it stops the bundle."""
    found = []
    top = root.resolve()
    packages = frozenset(
        PurePosixPath(init.parent.relative_to(root).as_posix()) for init in folder.rglob("__init__.py")
    )
    for path in sorted(folder.rglob("*")):
        relative = PurePosixPath(path.relative_to(root).as_posix())
        if not path.is_file() or not _wanted(relative, packages):
            continue
        if path.is_symlink() and not path.resolve().is_relative_to(top):
            raise BootstrapError(
                f"{path} is a link to {path.resolve()}, outside {root}: replace it with the file itself or "
                "remove it, then build the bundle again."
            )
        found.append((path, relative))
    return found


def code_files(root: Path) -> list[tuple[Path, str]]:
    """(file, path in the bundle) for the code and top-level files, sorted, caches and secrets left out."""
    found = [(root / name, name) for name in TOP_FILES if (root / name).is_file()]
    for folder in CODE_DIRS:
        for path, relative in regular_files(root / folder, root):
            found.append((path, member_name(str(relative), root)))
    return found


def embed_files(source: Path) -> list[tuple[str, bytes]]:
    """(path under python_embeded/, bytes) from the official zip or a folder; ._pth patched, no site-packages."""
    items: list[tuple[str, bytes]] = []
    if source.is_file() and zipfile.is_zipfile(source):
        with zipfile.ZipFile(source) as archive:
            for info in archive.infolist():
                if not info.is_dir() and _wanted(PurePosixPath(info.filename)):
                    items.append((member_name(info.filename, source), archive.read(info)))
    elif source.is_dir():
        for path, relative in regular_files(source, source):
            items.append((member_name(str(relative), source), path.read_bytes()))
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
            archive.write(path.resolve(), str(top / arcname))  # a symlink is stored as the file it leads to
        for arcname, data in embedded:
            archive.writestr(data, str(top / arcname))
    partial.replace(target)
    return target
