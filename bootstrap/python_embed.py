"""The official Windows embeddable Python for the portable bundle: pinned (version, URL, SHA-256) in
bootstrap/manifest.toml's [python_embed] table and fetched through the verified, resuming downloader."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser as a package
    import tomli as tomllib  # type: ignore[no-redef]

from bootstrap.errors import BootstrapError
from bootstrap.manifest import DEFAULT_MANIFEST, SHA256_RE, ModelFile

CACHE_FOLDER = "python-embed"


@dataclass(frozen=True)
class EmbedPin:
    version: str
    url: str
    sha256: str

    @property
    def filename(self) -> str:
        return PurePosixPath(urlsplit(self.url).path).name

    def as_file(self) -> ModelFile:
        """What the downloader takes: it lands as <cache>/python-embed/<file name>, checked against sha256."""
        return ModelFile(
            name=f"python-{self.version}-embed",
            repo="",
            path=self.filename,
            folder=CACHE_FOLDER,
            sha256=self.sha256,
            url=self.url,
        )


def load_pin(manifest: Path | None = None) -> EmbedPin:
    path = manifest or DEFAULT_MANIFEST
    try:
        table = tomllib.loads(path.read_text(encoding="utf-8")).get("python_embed") or {}
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise BootstrapError(f"The manifest {path} cannot be read ({exc}).") from None
    try:
        pin = EmbedPin(str(table["version"]), str(table["url"]), str(table["sha256"]).lower())
    except KeyError as exc:
        raise BootstrapError(
            f"The manifest {path} has no [python_embed] {exc.args[0]}: give --python-embed instead."
        ) from None
    if not SHA256_RE.match(pin.sha256) or not pin.url.startswith(("https://", "http://")):
        raise BootstrapError(
            f"The manifest {path} has a malformed [python_embed] table (url, 64-hex sha256)."
        )
    return pin


def fetch(pin: EmbedPin, cache_dir: Path, downloader=None) -> Path:
    """The verified zip in cache_dir (downloaded once, resumed when interrupted)."""
    if downloader is None:
        import sys

        from bootstrap.download import Downloader
        from bootstrap.progress import TerminalProgress

        downloader = Downloader(
            cache_dir, progress=TerminalProgress(), say=lambda text: print(text, file=sys.stderr)
        )
    return downloader.fetch(pin.as_file()).path
