"""Hashing, and the small JSON state that remembers which files were verified (so a start does not rehash 20 GB)."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from bootstrap.hub import Digest

STATE_NAME = ".fluxdeck-verified.json"
READ_CHUNK = 4 * 1024 * 1024


class StreamHash:
    """SHA-256 of every byte, plus the git blob SHA-1 when the total size is known up front."""

    def __init__(self, git_size: int | None = None) -> None:
        self.sha256 = hashlib.sha256()
        self.git = None
        if git_size is not None:
            self.git = hashlib.sha1(usedforsecurity=False)
            self.git.update(f"blob {git_size}\0".encode())
        self.count = 0

    def update(self, data: bytes) -> None:
        self.sha256.update(data)
        if self.git is not None:
            self.git.update(data)
        self.count += len(data)

    def hexdigest(self, kind: str) -> str | None:
        if kind == "sha256":
            return self.sha256.hexdigest()
        if kind == "git-sha1" and self.git is not None:
            return self.git.hexdigest()
        return None


def hash_file(
    path: Path, git_size: int | None = None, on_bytes: Callable[[int], None] | None = None
) -> StreamHash:
    digest = StreamHash(git_size)
    with path.open("rb") as handle:
        while chunk := handle.read(READ_CHUNK):
            digest.update(chunk)
            if on_bytes:
                on_bytes(len(chunk))
    return digest


@dataclass
class Record:
    size: int
    mtime_ns: int
    sha256: str
    git_sha1: str | None = None

    def matches(self, stat: os.stat_result) -> bool:
        return self.size == stat.st_size and self.mtime_ns == stat.st_mtime_ns

    def satisfies(self, digest: Digest | None) -> bool:
        if digest is None:
            return True
        return digest.value == (self.sha256 if digest.kind == "sha256" else self.git_sha1)


@dataclass
class VerifiedState:
    """<models-dir>/.fluxdeck-verified.json: relpath -> size, mtime and hashes of a file that passed its check,
    and relpath -> the digest a .part file was started for (a part for other bytes is not resumed)."""

    path: Path
    files: dict[str, Record] = field(default_factory=dict)
    partial: dict[str, dict[str, str]] = field(default_factory=dict)

    @classmethod
    def load(cls, models_dir: Path) -> VerifiedState:
        path = models_dir / STATE_NAME
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            files = {k: Record(**v) for k, v in data.get("files", {}).items()}
            partial = {k: dict(v) for k, v in data.get("partial", {}).items()}
        except (OSError, ValueError, TypeError, AttributeError):
            return cls(path)  # missing or damaged: files are simply checked again
        return cls(path, files, partial)

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        data = {
            "files": {k: vars(v) for k, v in sorted(self.files.items())},
            "partial": dict(sorted(self.partial.items())),
        }
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
        os.replace(tmp, self.path)

    def known_good(self, relpath: str, target: Path, digest: Digest | None) -> bool:
        """True when the file is the one recorded as verified (same size and mtime) and fits the digest."""
        record = self.files.get(relpath)
        if record is None:
            return False
        try:
            stat = target.stat()
        except OSError:
            return False
        return record.matches(stat) and record.satisfies(digest)

    def remember(self, relpath: str, target: Path, digest: StreamHash) -> None:
        stat = target.stat()
        self.files[relpath] = Record(
            stat.st_size, stat.st_mtime_ns, digest.hexdigest("sha256") or "", digest.hexdigest("git-sha1")
        )
        self.partial.pop(relpath, None)

    def forget(self, relpath: str) -> None:
        self.files.pop(relpath, None)
