"""Shared fixtures: tiny random FLUX model sets written once per session in the real file formats."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from engine import fixtures


@dataclass
class TinySet:
    """A models folder (ComfyUI layout) plus the float32 weights the files were made from."""

    models_dir: Path
    paths: dict[str, Path]
    states: fixtures.TinyStates
    spec: fixtures.TinySpec

    def stored_as_float(self) -> dict[str, dict[str, torch.Tensor]]:
        """The weights as the files store them, read back in float32: what the oracle must get."""
        from engine.formats.weights import SafetensorsFile

        out = {}
        for role, path in self.paths.items():
            state = SafetensorsFile(path).load(SafetensorsFile(path).names())
            out[role] = fixtures.dequantized(state)
        return out

    @property
    def clip_tokenizer(self) -> Path:
        return self.models_dir / "tokenizers" / "clip_l"

    @property
    def t5_tokenizer(self) -> Path:
        return self.models_dir / "tokenizers" / "t5xxl"


def _make_set(root: Path, spec: fixtures.TinySpec) -> TinySet:
    models = root / "models"
    clip_vocab = fixtures.write_tokenizers(models)
    states = fixtures.tiny_states(spec, clip_vocab)
    paths = fixtures.write_split(models, states)
    return TinySet(models, paths, states, spec)


@pytest.fixture(scope="session")
def dev_set(tmp_path_factory) -> TinySet:
    return _make_set(tmp_path_factory.mktemp("dev"), fixtures.TinySpec())


@pytest.fixture(scope="session")
def schnell_set(tmp_path_factory) -> TinySet:
    return _make_set(tmp_path_factory.mktemp("schnell"), fixtures.SCHNELL)


@pytest.fixture(scope="session", autouse=True)
def _private_embedding_cache(tmp_path_factory):
    """The CLI caches text embeddings under the project's cache/ by default: keep the tests' apart."""
    import os

    os.environ["FLUXDECK_CACHE"] = str(tmp_path_factory.mktemp("fluxdeck-cache"))


@pytest.fixture(scope="session")
def deep_set(tmp_path_factory) -> TinySet:
    """Eleven blocks: enough for a budget to keep some resident and stream the rest."""
    from dataclasses import replace

    return _make_set(tmp_path_factory.mktemp("deep"), replace(fixtures.TinySpec(), depth=1, depth_single=10))
