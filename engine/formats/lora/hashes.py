"""File hashes for A1111's `Lora hashes` PNG field: SHA-256 of the whole file, computed once per file version."""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from pathlib import Path


class FileHashes:
    """SHA-256 digests by path, modification time and size (the `capacity` most recently asked for are kept)."""

    def __init__(self, capacity: int = 256):
        self.capacity = capacity
        self._digests: OrderedDict[tuple[str, int, int], str] = OrderedDict()

    def sha256(self, path: str | Path) -> str:
        """The SHA-256 of the whole file (hex)."""
        p = Path(path)
        stat = p.stat()
        key = (str(p.resolve()), stat.st_mtime_ns, stat.st_size)
        digest = self._digests.get(key)
        if digest is None:
            hasher = hashlib.sha256()
            with p.open("rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    hasher.update(block)
            digest = hasher.hexdigest()
        self._digests[key] = digest
        self._digests.move_to_end(key)
        while len(self._digests) > self.capacity:
            self._digests.popitem(last=False)
        return digest
