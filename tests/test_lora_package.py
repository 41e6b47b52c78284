"""engine/formats/lora/ as plug-in points: every registered layout's example lands on a layer of our models, a
layout added to the registry is looked up, and the read files and hashes are objects with owners (two owners
share nothing)."""

from __future__ import annotations

import os

import pytest
import torch

from engine.contract.errors import UserError
from engine.contract.request import LoraSpec
from engine.formats.lora import (
    CLIP_LAYOUTS,
    TRANSFORMER_LAYOUTS,
    FileHashes,
    Layout,
    LoraFiles,
    LoraLibrary,
    LoraPatch,
    layer_index,
    layouts,
)
from engine.formats.lora.files import PAIR_ENDINGS
from engine.models.flux1 import Flux, FluxParams
from engine.models.text_encoders import build_clip
from engine.runtime import ops
from tests import lora_layouts


def _flux(dev_set) -> Flux:
    state = dev_set.stored_as_float()["transformer"]
    with torch.device("meta"):
        model = Flux(FluxParams.from_shapes({k: tuple(v.shape) for k, v in state.items()}))
    return ops.load_into(model, dict(state), {}, torch.float32)


def _pair_key(name: str) -> str:
    for ending, _ in PAIR_ENDINGS:
        if name.endswith(ending):
            return name[: -len(ending)]
    raise AssertionError(f"{name} has no pair ending")


def test_every_registered_layout_names_layers_of_our_models(dev_set):
    flux = _flux(dev_set)
    transformer = layer_index.index(flux, "transformer")
    clip = layer_index.index(build_clip(dict(dev_set.stored_as_float()["clip"]), {}, torch.float32), "clip")
    for registry, index, part in (
        (TRANSFORMER_LAYOUTS, transformer, "transformer"),
        (CLIP_LAYOUTS, clip, "clip"),
    ):
        for layout in registry:
            key = _pair_key(layout.example)
            assert layouts.part_of(key) == part, layout.title
            targets = index.targets(key)
            assert targets and all(t.layer in index.layers for t in targets), layout.title
    # each layout contributes names no other one has: none of them is dead weight
    for layout in TRANSFORMER_LAYOUTS:
        others = {
            k
            for other in TRANSFORMER_LAYOUTS
            if other is not layout
            for k in other.names(list(transformer.layers), flux.params)
        }
        assert set(layout.names(list(transformer.layers), flux.params)) - others, layout.title


class _Renamed(Layout):
    """A made-up trainer that calls the first double block's image qkv `first_block_qkv`."""

    title = "made up"
    example = "first_block_qkv.lora_down.weight"

    def names(self, layers, params):
        return {"first_block_qkv": [layouts.Target("double_blocks.0.img_attn.qkv")]}


def test_a_layout_added_to_the_registry_is_applied(dev_set, tmp_path, monkeypatch):
    model = _flux(dev_set)
    qkv = model.double_blocks[0].img_attn.qkv
    down = torch.randn(2, qkv.in_features)
    up = torch.randn(qkv.out_features, 2)
    path = lora_layouts.write_raw(
        tmp_path / "renamed.safetensors",
        {"first_block_qkv.lora_down.weight": down, "first_block_qkv.lora_up.weight": up},
    )
    spec = [LoraSpec(str(path), 0.5)]
    library = LoraLibrary()
    with pytest.raises(UserError, match="none of its 1 layers match"):  # nobody registered this layout yet
        library.apply(model, None, spec)
    monkeypatch.setattr(layouts, "TRANSFORMER_LAYOUTS", (*TRANSFORMER_LAYOUTS, _Renamed()))
    assert library.apply(model, None, spec) == ["LoRA renamed at strength 0.5: 1 transformer layers"]
    (patch,) = [p for p in qkv.patches if isinstance(p, LoraPatch)]
    torch.testing.assert_close(patch(qkv.weight), qkv.weight + 0.5 * up @ down)


def test_two_libraries_share_nothing(dev_set, tmp_path):
    path = lora_layouts.xlabs(tmp_path / "x.safetensors", dev_set.spec.flux_params()).path
    first, second = LoraLibrary(), LoraLibrary()
    a = first.load(path)
    assert first.load(path) is a and second.load(path) is not a
    pair = next(iter(a.pairs.values()))
    pair.tensors(torch.device("cpu"), torch.float64)
    second.files.release_unused([])  # the other owner's housekeeping leaves this one's device copies alone
    assert pair._on
    first.files.release_unused([])
    assert not pair._on


def test_files_beyond_capacity_are_dropped_with_their_device_copies(dev_set, tmp_path):
    files = LoraFiles(capacity=1)
    params = dev_set.spec.flux_params()
    one = files.load(lora_layouts.xlabs(tmp_path / "one.safetensors", params).path)
    pair = next(iter(one.pairs.values()))
    pair.tensors(torch.device("cpu"), torch.float64)
    files.load(lora_layouts.xlabs(tmp_path / "two.safetensors", params).path)
    assert not pair._on
    assert files.load(one.path) is not one  # read again


def test_hashes_follow_the_file_and_stay_bounded(tmp_path):
    import hashlib

    hashes = FileHashes(capacity=2)
    path = tmp_path / "f.bin"
    path.write_bytes(b"one")
    assert hashes.sha256(path) == hashlib.sha256(b"one").hexdigest()
    path.write_bytes(b"two!")
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert hashes.sha256(path) == hashlib.sha256(b"two!").hexdigest()
    for i in range(3):
        (tmp_path / f"{i}").write_bytes(bytes([i]))
        hashes.sha256(tmp_path / f"{i}")
    assert len(hashes._digests) == 2
