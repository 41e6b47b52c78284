"""The model manifest (bootstrap/manifest.toml): the files, the groups and the presets that name them."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser as a package
    import tomli as tomllib  # type: ignore[no-redef]

from bootstrap.errors import BootstrapError

DEFAULT_MANIFEST = Path(__file__).with_name("manifest.toml")
# ComfyUI's models layout: where a manifest file may land.
FOLDERS = (
    "checkpoints",
    "diffusion_models",
    "unet",
    "text_encoders",
    "clip",
    "vae",
    "loras",
    "tokenizers/clip_l",
    "tokenizers/t5xxl",
)
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
GB = 1_000_000_000  # sizes shown and presets' figures are decimal gigabytes, as the hub shows them


@dataclass(frozen=True)
class ModelFile:
    name: str
    repo: str
    path: str
    folder: str
    revision: str = "main"
    size: int | None = None
    sha256: str | None = None
    gated: bool = False
    url: str | None = None  # a file outside the hub (the embeddable Python): fetched from here, no token

    @property
    def filename(self) -> str:
        return PurePosixPath(self.path).name

    @property
    def relpath(self) -> str:
        """Where it lands under the models folder, with forward slashes (also the key of the verified state)."""
        return f"{self.folder}/{self.filename}"

    def target(self, models_dir: Path) -> Path:
        return models_dir / self.folder / self.filename


@dataclass(frozen=True)
class Preset:
    name: str
    title: str
    files: tuple[str, ...]
    vram_gb: float
    ram_gb: float
    disk_gb: float
    rank: int = 0
    steps: int = 0
    note: str = ""


@dataclass
class Manifest:
    files: dict[str, ModelFile]
    presets: dict[str, Preset]
    groups: dict[str, tuple[str, ...]] = field(default_factory=dict)
    source: Path | None = None

    def expand(self, names: list[str]) -> list[ModelFile]:
        """File names and @groups to files, in order, each once; an unknown name is one clear error."""
        out: dict[str, ModelFile] = {}
        for name in names:
            if name.startswith("@"):
                group = self.groups.get(name[1:])
                if group is None:
                    raise BootstrapError(
                        f"Unknown group {name}: the manifest has {_listing('@' + g for g in self.groups)}."
                    )
                for member in self.expand(list(group)):
                    out.setdefault(member.name, member)
                continue
            if name not in self.files:
                raise BootstrapError(
                    f"Unknown file {name!r}: `python -m bootstrap list` shows the names in {self.source or 'the manifest'}."
                )
            out.setdefault(name, self.files[name])
        return list(out.values())

    def preset_files(self, preset: str) -> list[ModelFile]:
        return self.expand(list(self.preset(preset).files))

    def preset(self, name: str) -> Preset:
        if name not in self.presets:
            raise BootstrapError(f"Unknown preset {name!r}: choose one of {_listing(self.presets)}.")
        return self.presets[name]

    def select(self, names: list[str], presets: list[str]) -> list[ModelFile]:
        chosen: list[str] = []
        for preset in presets:
            chosen += list(self.preset(preset).files)
        return self.expand(chosen + list(names))


def _listing(names) -> str:
    return ", ".join(sorted(names))


def _file(table: dict, where: str) -> ModelFile:
    missing = [k for k in ("name", "repo", "path", "folder") if not table.get(k)]
    if missing:
        raise BootstrapError(f"A [[file]] in {where} lacks {', '.join(missing)}.")
    name = str(table["name"])
    sha = table.get("sha256")
    if sha is not None:
        sha = str(sha).lower()
        if not SHA256_RE.match(sha):
            raise BootstrapError(f"The sha256 of {name} in {where} is not 64 hex digits.")
    size = table.get("size")
    if size is not None and (not isinstance(size, int) or size < 0):
        raise BootstrapError(f"The size of {name} in {where} is not a whole number of bytes.")
    folder = str(table["folder"]).strip("/")
    if folder not in FOLDERS:
        raise BootstrapError(
            f"The folder {folder!r} of {name} in {where} is not one of {', '.join(FOLDERS)}."
        )
    return ModelFile(
        name=name,
        repo=str(table["repo"]),
        path=str(table["path"]),
        folder=folder,
        revision=str(table.get("revision") or "main"),
        size=size,
        sha256=sha,
        gated=bool(table.get("gated", False)),
    )


def parse_manifest(text: str, source: Path | None = None) -> Manifest:
    where = str(source) if source else "the manifest"
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise BootstrapError(f"{where} is not valid TOML: {exc}.") from None
    files: dict[str, ModelFile] = {}
    for table in data.get("file", []):
        model_file = _file(table, where)
        if model_file.name in files:
            raise BootstrapError(f"{where} names {model_file.name} twice.")
        files[model_file.name] = model_file
    groups = {str(k): tuple(str(n) for n in v) for k, v in (data.get("group") or {}).items()}
    presets: dict[str, Preset] = {}
    for table in data.get("preset", []):
        try:
            preset = Preset(
                name=str(table["name"]),
                title=str(table.get("title", table["name"])),
                files=tuple(str(n) for n in table["files"]),
                vram_gb=float(table.get("vram_gb", 0)),
                ram_gb=float(table.get("ram_gb", 0)),
                disk_gb=float(table.get("disk_gb", 0)),
                rank=int(table.get("rank", 0)),
                steps=int(table.get("steps", 0)),
                note=str(table.get("note", "")),
            )
        except KeyError as exc:
            raise BootstrapError(f"A [[preset]] in {where} lacks {exc.args[0]}.") from None
        presets[preset.name] = preset
    manifest = Manifest(files, presets, groups, source)
    for preset in presets.values():
        manifest.expand(list(preset.files))  # every name a preset uses exists
    return manifest


def load_manifest(path: Path | None = None) -> Manifest:
    path = path or DEFAULT_MANIFEST
    try:
        text = path.read_text(encoding="utf-8")
    except OSError:
        raise BootstrapError(f"The manifest {path} cannot be read: check --manifest.") from None
    return parse_manifest(text, path)
