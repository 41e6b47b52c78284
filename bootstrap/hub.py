"""How the Hugging Face hub is addressed: endpoint, token lookup, file URLs, and what its answers mean."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urlsplit

from bootstrap.errors import BootstrapError
from bootstrap.manifest import ModelFile

DEFAULT_ENDPOINT = "https://huggingface.co"
TOKEN_SETTINGS_PAGE = "https://huggingface.co/settings/tokens"
HEX64 = re.compile(r"^[0-9a-f]{64}$")
HEX40 = re.compile(r"^[0-9a-f]{40}$")


def endpoint(env: Mapping[str, str] | None = None) -> str:
    env = os.environ if env is None else env
    return (env.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def token_file(env: Mapping[str, str], home: Path) -> Path:
    if env.get("HF_TOKEN_PATH"):
        return Path(env["HF_TOKEN_PATH"]).expanduser()
    if env.get("HF_HOME"):
        return Path(env["HF_HOME"]).expanduser() / "token"
    return home / ".cache" / "huggingface" / "token"


def find_token(env: Mapping[str, str] | None = None, home: Path | None = None) -> str | None:
    """HF_TOKEN, then HUGGING_FACE_HUB_TOKEN, then the token file ($HF_TOKEN_PATH, $HF_HOME/token, ~/.cache/...)."""
    env = os.environ if env is None else env
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        value = (env.get(name) or "").strip()
        if value:
            return value
    path = token_file(env, home or Path.home())
    try:
        value = path.read_text(encoding="utf-8").strip()
    except OSError:
        return None
    return value or None


def file_url(base: str, model_file: ModelFile) -> str:
    return f"{base}/{model_file.repo}/resolve/{quote(model_file.revision, safe='')}/{quote(model_file.path)}"


def repo_page(base: str, repo: str) -> str:
    return f"{base}/{repo}"


def origin(url: str) -> tuple[str, str, int | None]:
    """(scheme, host, port) with the default port filled in: two URLs are the same host only if all three match."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    port = parts.port or {"http": 80, "https": 443}.get(scheme)
    return scheme, (parts.hostname or "").lower(), port


def same_origin(a: str, b: str) -> bool:
    return origin(a) == origin(b)


@dataclass(frozen=True)
class Digest:
    """What a file's bytes must hash to: a SHA-256 (LFS files) or a git blob SHA-1 (small git files)."""

    kind: str  # "sha256" or "git-sha1"
    value: str
    source: str  # "manifest", "X-Linked-Etag", "ETag"


def etag_value(header: str | None) -> str | None:
    if not header:
        return None
    value = header.strip()
    if value.startswith("W/"):
        value = value[2:]
    return value.strip('"').lower() or None


def digest_from_headers(headers: Mapping[str, str]) -> Digest | None:
    """The hub's X-Linked-Etag is the SHA-256 of an LFS file; a plain file's ETag is its git blob SHA-1."""
    linked = etag_value(headers.get("X-Linked-Etag"))
    if linked and HEX64.match(linked):
        return Digest("sha256", linked, "X-Linked-Etag")
    plain = etag_value(headers.get("ETag"))
    if plain and HEX64.match(plain):
        return Digest("sha256", plain, "ETag")
    if plain and HEX40.match(plain):
        return Digest("git-sha1", plain, "ETag")
    return None


def hub_error(
    status: int, headers: Mapping[str, str], model_file: ModelFile, base: str, has_token: bool
) -> BootstrapError:
    """One sentence for a 4xx from the hub that says what to do about it."""
    code = headers.get("X-Error-Code", "")
    message = (headers.get("X-Error-Message") or "").strip().rstrip(".")
    page = repo_page(base, model_file.repo)
    if code == "GatedRepo" or (status in (401, 403) and model_file.gated):
        if status == 403 or has_token:
            detail = f" (the hub says: {message})" if message else ""
            return BootstrapError(
                f"{model_file.name} is in the gated repo {model_file.repo} and your token's account has not been "
                f"granted access{detail}: open {page} while logged in, accept the licence, wait for access, "
                f"then run this again (the token needs read access; see {TOKEN_SETTINGS_PAGE})."
            )
        return BootstrapError(
            f"{model_file.name} is in the gated repo {model_file.repo}: open {page}, log in and accept the licence, "
            f"create a read token at {TOKEN_SETTINGS_PAGE}, then save it with the wizard (run_gpu/run_cpu offer "
            "it) or set HF_TOKEN to it (on Windows `setx HF_TOKEN hf_...` and open a new window, since a "
            "double-clicked .bat sees only saved variables; `export HF_TOKEN=hf_...` elsewhere) and run this again."
        )
    if code == "RepoNotFound" or (status == 401 and not code):
        hint = "" if has_token else " (if it is private or gated, set HF_TOKEN)"
        return BootstrapError(
            f"The hub has no repo {model_file.repo} at {base}{hint}: check the manifest and HF_ENDPOINT."
        )
    if code == "EntryNotFound" or status == 404:
        return BootstrapError(
            f"The hub has no file {model_file.path} in {model_file.repo} at revision {model_file.revision}: "
            "check the manifest."
        )
    if code == "RevisionNotFound":
        return BootstrapError(
            f"The repo {model_file.repo} has no revision {model_file.revision}: check the manifest."
        )
    if status == 401:
        return BootstrapError(
            f"The hub refused the token for {model_file.repo} (401): check HF_TOKEN at {TOKEN_SETTINGS_PAGE}."
        )
    detail = f": {message}" if message else ""
    return BootstrapError(f"The hub answered {status} for {model_file.name} ({model_file.repo}){detail}.")
