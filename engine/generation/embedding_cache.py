"""Text embeddings on disk, keyed by encoder file, prompt and length: a seed hunt never loads T5 twice."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save

from engine.atomic_write import write_atomic
from engine.formats.weights import Component

DEFAULT_LIMIT = 1024**3  # bytes on disk; the least recently used entries go first


class EmbeddingCache:
    def __init__(self, folder: str | Path | None, limit_bytes: int = DEFAULT_LIMIT):
        self.folder = Path(folder) if folder else None
        self.limit = limit_bytes

    def key(self, component: Component, prompt: str, length: int, dtype: torch.dtype, tokenizer: str) -> str:
        """The encoder file's identity (path, size, modification time, prefix), the tokenizer's identity
        (text_encoders.tokenizer_identity: another tokenizer makes other tokens of the same prompt), the prompt
        and the length."""
        path = component.file.path.resolve()
        stat = path.stat()
        ident = [
            str(path),
            stat.st_size,
            stat.st_mtime_ns,
            component.prefix,
            component.role,
            prompt,
            length,
            str(dtype),
            tokenizer,
        ]
        return hashlib.sha256(json.dumps(ident).encode()).hexdigest()[:32]

    def get(self, key: str) -> torch.Tensor | None:
        if self.folder is None:
            return None
        path = self.folder / f"{key}.safetensors"
        try:
            tensor = load_file(str(path))["embedding"]
        except Exception:  # missing or damaged: encode again
            return None
        os.utime(path)  # recently used
        return tensor

    def put(self, key: str, tensor: torch.Tensor) -> None:
        if self.folder is None:
            return
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            data = save({"embedding": tensor.detach().cpu().contiguous()})
            write_atomic(self.folder / f"{key}.safetensors", lambda f: f.write(data), overwrite=True)
            self._prune()
        except OSError:
            pass  # a cache that cannot be written only costs time

    def _prune(self) -> None:
        entries = sorted(self.folder.glob("*.safetensors"), key=lambda p: p.stat().st_mtime)
        total = sum(p.stat().st_size for p in entries)
        for path in entries:
            if total <= self.limit:
                break
            total -= path.stat().st_size
            path.unlink(missing_ok=True)
