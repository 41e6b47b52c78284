"""Settings saved in config.toml at the project root (shared with the bootstrap's wizard)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser as a package
    import tomli as tomllib  # type: ignore[no-redef]

from bootstrap.config_file import (
    dump_toml,  # one TOML writer for the file both sides write
    toml_problem,
)

__all__ = ["ConfigError", "ConfigFile", "Settings", "dump_toml"]


class ConfigError(ValueError):
    """config.toml cannot be read: the message is the one sentence to show."""


PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEVICES = ("auto", "cuda", "cpu")
DTYPES = ("auto", "bf16", "fp16", "fp32")


@dataclass
class Settings:
    models_dir: str = "models"
    output_dir: str = "outputs"
    extra_model_paths: list[str] = field(default_factory=list)
    device: str = "auto"
    dtype: str = "auto"
    vram_budget: float | None = None  # GB of weights kept on the GPU; None: automatic
    live_preview: bool = True
    cache: str = (
        "none"  # step caching for every job: "none" or "first-block[:THRESHOLD]" (the engine's --cache)
    )

    def resolve(self, value: str, root: Path = PROJECT_ROOT) -> Path:
        path = Path(value).expanduser()
        return path if path.is_absolute() else root / path

    def model_roots(self, root: Path = PROJECT_ROOT) -> list[Path]:
        return [self.resolve(self.models_dir, root)] + [self.resolve(p, root) for p in self.extra_model_paths]


@dataclass
class ConfigFile:
    """The file, its settings, and whatever else it holds (other tools' keys survive a save)."""

    path: Path
    settings: Settings = field(default_factory=Settings)
    other: dict = field(default_factory=dict)
    keys: dict[str, str] = field(default_factory=dict)  # [keys] table: binding id -> key

    @classmethod
    def load(cls, path: Path) -> ConfigFile:
        if not path.is_file():
            return cls(path)
        try:
            with path.open("rb") as handle:
                data = tomllib.load(handle)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(toml_problem(path, exc)) from None
        names = {f.name for f in dataclasses.fields(Settings)}
        known = {k: v for k, v in data.items() if k in names}
        if known.get("vram_budget") in ("", "auto", 0):
            known["vram_budget"] = None
        if isinstance(known.get("extra_model_paths"), str):
            known["extra_model_paths"] = [known["extra_model_paths"]]
        other = {k: v for k, v in data.items() if k not in names and k != "keys"}
        keys = {str(k): str(v) for k, v in (data.get("keys") or {}).items()}
        return cls(path, Settings(**known), other, keys)

    def save(self) -> None:
        data = {k: v for k, v in dataclasses.asdict(self.settings).items() if v is not None}
        data.update(self.other)
        if self.keys:
            data["keys"] = self.keys
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".toml.tmp")
        tmp.write_text(dump_toml(data), encoding="utf-8")
        tmp.replace(self.path)
