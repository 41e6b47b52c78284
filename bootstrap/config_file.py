"""config.toml at the project root: the keys the wizard writes and the TUI reads (models_dir, extra_model_paths,
device, vram_budget, ...). Keys the bootstrap does not know are kept as they were."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser as a package
    import tomli as tomllib  # type: ignore[no-redef]

from bootstrap.errors import BootstrapError

PROJECT_ROOT = Path(__file__).resolve().parent.parent
CONFIG_NAME = "config.toml"


def _value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_key(k)} = {_value(v)}" for k, v in value.items()) + "}"
    text = str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{text}"'


def _key(key: str) -> str:
    return key if key.replace("_", "").replace("-", "").isalnum() else _value(key)


def dump_toml(data: dict, prefix: str = "") -> str:
    """Scalars and lists first, then tables as [name] (nested as [a.b])."""
    lines = [f"{_key(k)} = {_value(v)}" for k, v in data.items() if not isinstance(v, dict)]
    for key, table in data.items():
        if isinstance(table, dict):
            name = f"{prefix}.{_key(key)}" if prefix else _key(key)
            lines += ["", f"[{name}]", dump_toml(table, name).rstrip("\n")]
    return "\n".join(lines).lstrip("\n") + "\n"


def toml_problem(path: Path, exc: ValueError) -> str:
    """One sentence for a config.toml TOML cannot read; a hand-written Windows path in double quotes (where a
    backslash starts an escape) is the usual cause and gets the fix."""
    where = str(exc)
    if "\\" in where or "escape" in where.lower():
        return (
            f"{path} has a backslash in double quotes ({where}): write Windows paths in single quotes, "
            "like models_dir = 'D:\\ComfyUI\\models', or with forward slashes, like \"D:/ComfyUI/models\"."
        )
    return f"{path} is not valid TOML ({where}): fix or delete it."


@dataclass
class ProjectConfig:
    path: Path
    data: dict = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path | None = None) -> ProjectConfig:
        path = path or PROJECT_ROOT / CONFIG_NAME
        if not path.is_file():
            return cls(path)
        try:
            with path.open("rb") as handle:
                return cls(path, tomllib.load(handle))
        except tomllib.TOMLDecodeError as exc:
            raise BootstrapError(toml_problem(path, exc)) from None
        except OSError as exc:
            raise BootstrapError(f"{path} cannot be read ({exc}): fix or delete it.") from None

    def resolve(self, value: str) -> Path:
        """A path from the config: relative ones are relative to the folder config.toml is in."""
        path = Path(value).expanduser()
        return path if path.is_absolute() else self.path.parent / path

    @property
    def models_dir(self) -> Path:
        return self.resolve(str(self.data.get("models_dir") or "models"))

    @property
    def extra_model_paths(self) -> list[Path]:
        value = self.data.get("extra_model_paths") or []
        return [self.resolve(str(v)) for v in ([value] if isinstance(value, str) else value)]

    def update(self, **values: object) -> None:
        for key, value in values.items():
            if value is None:
                self.data.pop(key, None)
            else:
                self.data[key] = value

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(dump_toml(self.data), encoding="utf-8")
        tmp.replace(self.path)
