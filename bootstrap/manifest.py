"""The model manifest (bootstrap/manifest.toml): the files, the groups and the presets that name them."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser as a package
    import tomli as tomllib  # type: ignore[no-redef]

from bootstrap.errors import BootstrapError
from bootstrap.untrusted import confine, name_problem, printable, relative_parts

DEFAULT_MANIFEST = Path(__file__).with_name("manifest.toml")
# ComfyUI's models layout (engine/contract/layout.py): where a manifest file may land. The edit, control and
# Redux folders and the Qwen3 tokenizer folder are the engine's extra folders; a Depth Anything model is a
# transformers folder (config.json next to its weights) inside depth/.
FOLDERS = (
    "checkpoints",
    "diffusion_models",
    "unet",
    "text_encoders",
    "clip",
    "vae",
    "loras",
    "controlnet",
    "style_models",
    "clip_vision",
    "depth/depth-anything-v2-small",
    "tokenizers/clip_l",
    "tokenizers/t5xxl",
    "tokenizers/qwen3",
)
FAMILIES = ("flux1", "flux2")  # FLUX.1 (CLIP-L + T5-XXL) or FLUX.2 [klein] (Qwen3)
KINDS = ("txt2img", "edit", "control")  # what a preset is for: the wizard and the TUI group presets by it
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
    save_as: str | None = (
        None  # the name it lands under when the hub's is generic (diffusion_pytorch_model...)
    )

    @property
    def filename(self) -> str:
        return self.save_as or PurePosixPath(self.path).name

    @property
    def relpath(self) -> str:
        """Where it lands under the models folder, with forward slashes (also the key of the verified state)."""
        return f"{self.folder}/{self.filename}"

    def target(self, models_dir: Path) -> Path:
        """<models-dir>/<folder>/<file name>, confined to the models folder (the name comes from outside)."""
        return Path(confine(models_dir, self.relpath, f"The path of {self.name}"))


@dataclass(frozen=True)
class Preset:
    name: str
    title: str
    files: tuple[str, ...]
    disk_gb: float
    rank: int = 0
    steps: int = 0
    note: str = ""
    family: str = "flux1"
    kind: str = "txt2img"


@dataclass
class Manifest:
    files: dict[str, ModelFile]
    presets: dict[str, Preset]
    groups: dict[str, tuple[str, ...]] = field(default_factory=dict)
    source: Path | None = None

    def expand(self, names: list[str], _inside: tuple[str, ...] = ()) -> list[ModelFile]:
        """File names and @groups to files, in order, each once; an unknown name is one clear error."""
        out: dict[str, ModelFile] = {}
        for name in names:
            if name.startswith("@"):
                if name in _inside:
                    raise BootstrapError(f"The group {printable(name)} contains itself.")
                group = self.groups.get(name[1:])
                if group is None:
                    raise BootstrapError(
                        f"Unknown group {printable(name)}: the manifest has {_listing('@' + g for g in self.groups)}."
                    )
                for member in self.expand(list(group), (*_inside, name)):
                    out.setdefault(member.name, member)
                continue
            if name not in self.files:
                raise BootstrapError(
                    f"Unknown file '{printable(name)}': `python -m bootstrap list` shows the names in {self.source or 'the manifest'}."
                )
            out.setdefault(name, self.files[name])
        return list(out.values())

    def preset_files(self, preset: str) -> list[ModelFile]:
        return self.expand(list(self.preset(preset).files))

    def preset(self, name: str) -> Preset:
        if name not in self.presets:
            raise BootstrapError(
                f"Unknown preset '{printable(name)}': choose one of {_listing(self.presets)}."
            )
        return self.presets[name]

    def select(self, names: list[str], presets: list[str]) -> list[ModelFile]:
        chosen: list[str] = []
        for preset in presets:
            chosen += list(self.preset(preset).files)
        return self.expand(chosen + list(names))


def _listing(names) -> str:
    return ", ".join(sorted(printable(n) for n in names))


_TYPE_WORDS = {
    str: "a string",
    int: "a whole number",
    bool: "true or false",
    float: "a number",
    list: "a list",
}
# a repo id as the hub spells it: owner/name, letters, digits, '-', '_' and '.'
REPO_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


def _get(table: dict, key: str, kind: type, where: str, default: object = None) -> object:
    """table[key] if it has the TOML type asked for (a bool is not a number); one sentence otherwise."""
    if key not in table:
        return default
    value = table[key]
    ok = isinstance(value, kind) and not (kind is not bool and isinstance(value, bool))
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        ok, value = True, float(value)
    if not ok:
        raise BootstrapError(
            f"{key} in {where} must be {_TYPE_WORDS[kind]}, not {printable(repr(value))[:60]}."
        )
    if isinstance(value, str) and any(not ch.isprintable() for ch in value):
        raise BootstrapError(f"{key} '{printable(value)}' in {where} holds control characters.")
    if kind is float and not (math.isfinite(value) and value >= 0):
        raise BootstrapError(f"{key} in {where} must be a number 0 or more, not {value}.")
    return value


def _tables(data: dict, key: str, where: str) -> list[dict]:
    value = data.get(key, [])
    if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
        raise BootstrapError(f"{where}: {key} must be [[{key}]] tables.")
    return value


def _file(table: dict, where: str) -> ModelFile:
    missing = [k for k in ("name", "repo", "path", "folder") if not table.get(k)]
    if missing:
        raise BootstrapError(f"A [[file]] in {where} lacks {', '.join(missing)}.")
    name = str(_get(table, "name", str, f"a [[file]] of {where}"))
    at = f"the [[file]] {name} of {where}"
    repo = str(_get(table, "repo", str, at))
    if not REPO_RE.match(repo) or ".." in repo:
        raise BootstrapError(
            f"The repo '{printable(repo)}' of {name} in {where} is not an owner/name repo id."
        )
    path = str(_get(table, "path", str, at))
    relative_parts(path, f"The path of {name} in {where}")  # no '..', drive, UNC, backslash, device name
    sha = _get(table, "sha256", str, at)
    if sha is not None:
        sha = str(sha).lower()
        if not SHA256_RE.match(sha):
            raise BootstrapError(f"The sha256 of {name} in {where} is not 64 hex digits.")
    size = _get(table, "size", int, at)
    if size is not None and size < 0:  # type: ignore[operator]
        raise BootstrapError(f"The size of {name} in {where} is not a whole number of bytes.")
    folder = str(_get(table, "folder", str, at)).strip("/")
    if folder not in FOLDERS:
        raise BootstrapError(
            f"The folder '{printable(folder)}' of {name} in {where} is not one of {', '.join(FOLDERS)}."
        )
    revision = str(_get(table, "revision", str, at, "main") or "main")
    save_as = _get(table, "save_as", str, at)
    if save_as is not None:
        if name_problem(str(save_as)) or "/" in str(save_as) or "\\" in str(save_as):
            raise BootstrapError(f"The save_as of {name} in {where} is not a plain file name.")
    return ModelFile(
        name=name,
        repo=repo,
        path=path,
        folder=folder,
        revision=revision,
        size=size,  # type: ignore[arg-type]
        sha256=sha,
        gated=bool(_get(table, "gated", bool, at, False)),
        save_as=str(save_as) if save_as is not None else None,
    )


def _preset(table: dict, where: str) -> Preset:
    if "name" not in table or "files" not in table:
        raise BootstrapError(f"A [[preset]] in {where} lacks {'name' if 'name' not in table else 'files'}.")
    name = str(_get(table, "name", str, f"a [[preset]] of {where}"))
    at = f"the [[preset]] {printable(name)} of {where}"
    files = _get(table, "files", list, at)
    if not all(isinstance(n, str) for n in files):  # type: ignore[union-attr]
        raise BootstrapError(f"files in {at} must be a list of file names.")
    numbers = {"disk_gb": _get(table, "disk_gb", float, at, 0.0)}
    counts = {key: _get(table, key, int, at, 0) for key in ("rank", "steps")}
    choices = {}
    for key, allowed, default in (("family", FAMILIES, "flux1"), ("kind", KINDS, "txt2img")):
        value = str(_get(table, key, str, at, default))
        if value not in allowed:
            raise BootstrapError(
                f"{key} in {at} must be one of {', '.join(allowed)}, not '{printable(value)}'."
            )
        choices[key] = value
    return Preset(
        name=name,
        title=str(_get(table, "title", str, at, name)),
        files=tuple(files),  # type: ignore[arg-type]
        note=str(_get(table, "note", str, at, "")),
        **numbers,  # type: ignore[arg-type]
        **counts,  # type: ignore[arg-type]
        **choices,
    )


def parse_manifest(text: str, source: Path | None = None) -> Manifest:
    where = printable(source) if source else "the manifest"
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise BootstrapError(f"{where} is not valid TOML: {exc}.") from None
    files: dict[str, ModelFile] = {}
    for table in _tables(data, "file", where):
        model_file = _file(table, where)
        if model_file.name in files:
            raise BootstrapError(f"{where} names {model_file.name} twice.")
        files[model_file.name] = model_file
    raw_groups = data.get("group") or {}
    if not isinstance(raw_groups, dict) or not all(
        isinstance(v, list) and all(isinstance(n, str) for n in v) for v in raw_groups.values()
    ):
        raise BootstrapError(f"{where}: [group] must map each group name to a list of file names.")
    groups = {str(k): tuple(v) for k, v in raw_groups.items()}
    presets: dict[str, Preset] = {}
    for table in _tables(data, "preset", where):
        preset = _preset(table, where)
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
