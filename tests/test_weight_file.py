"""The weight-file registry: a file is opened by the format its first bytes or its name say, and every format
offers the same face (`WeightFile`)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from engine.contract.errors import UserError
from engine.formats import weight_file
from engine.formats.gguf_file import GGUFFile, write_gguf
from engine.formats.safetensors_file import SafetensorsFile
from engine.formats.weight_file import Opener, TensorInfo, WeightFile, open_weights, opener_for
from engine.formats.weights import component_from

NAME = "double_blocks.0.img_attn.qkv.weight"


def _safetensors(path):
    save_file({NAME: torch.arange(12, dtype=torch.float32).reshape(3, 4)}, str(path), metadata={"k": "v"})
    return path


def _gguf(path):
    write_gguf(path, {NAME: np.arange(12, dtype=np.float32).reshape(3, 4)}, {}, "flux")
    return path


def _face(file: WeightFile) -> tuple:
    """What the engine asks of any weight file, as plain values."""
    info = file.tensors[NAME]
    assert isinstance(info, TensorInfo)
    loaded = file.load([NAME])[NAME]
    return file.names(), info.shape, loaded.float().tolist(), file.path.name


def test_each_format_opens_by_its_name_with_the_same_face(tmp_path):
    st = open_weights(_safetensors(tmp_path / "a.safetensors"))
    gg = open_weights(_gguf(tmp_path / "a.gguf"))
    assert type(st) is SafetensorsFile and type(gg) is GGUFFile
    expected = torch.arange(12, dtype=torch.float32).reshape(3, 4).tolist()
    assert _face(st) == ([NAME], (3, 4), expected, "a.safetensors")
    assert _face(gg) == ([NAME], (3, 4), expected, "a.gguf")
    assert st.metadata["k"] == "v" and "general.architecture" in gg.metadata


def test_the_first_bytes_win_over_the_name(tmp_path):
    """A GGUF file saved under a safetensors name (a renamed download) is read as what it is."""
    misnamed = _gguf(tmp_path / "flux-Q8_0.safetensors")
    assert opener_for(misnamed) is weight_file.GGUF
    assert type(open_weights(misnamed)) is GGUFFile
    assert component_from(misnamed, "transformer", "--transformer").file.tensors[NAME].shape == (3, 4)


def test_an_unknown_name_is_read_as_safetensors_and_told_what_it_is_not(tmp_path):
    path = _safetensors(tmp_path / "weights.bin")
    assert type(open_weights(path)) is SafetensorsFile
    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(b"\x80\x02}q\x00" + b"\x00" * 64)  # a pickle, not a safetensors header
    with pytest.raises(UserError, match="not a safetensors file"):
        open_weights(junk)
    with pytest.raises(UserError, match="does not exist"):
        open_weights(tmp_path / "missing.gguf")


class _Tiny:
    """A made-up format: magic, then one float32 tensor's values."""

    def __init__(self, path):
        self.path = path
        self.values = np.frombuffer(path.read_bytes()[4:], dtype=np.float32)
        self.tensors = {NAME: TensorInfo("F32", (len(self.values),), 0, self.values.nbytes)}
        self.metadata = {}

    def names(self):
        return list(self.tensors)

    def load(self, names):
        return {name: torch.from_numpy(self.values.copy()) for name in names}


def test_a_new_format_is_one_opener(tmp_path, monkeypatch):
    """The registry is the one place a format is known: an opener for it makes `open_weights` and everything built
    on it (role detection, component loading) read its files."""
    monkeypatch.setitem(globals(), "_Tiny", _Tiny)
    tiny = Opener("tiny", (".tiny",), b"TINY", __name__, "_Tiny")
    monkeypatch.setattr(weight_file, "OPENERS", (tiny, *weight_file.OPENERS))
    path = tmp_path / "w.bin"  # found by its magic, whatever its name
    path.write_bytes(b"TINY" + np.arange(3, dtype=np.float32).tobytes())
    component = component_from(path, "transformer", "--transformer")
    assert type(component.file) is _Tiny
    assert component.load()[NAME.removeprefix(component.prefix)].tolist() == [0.0, 1.0, 2.0]
    assert opener_for(tmp_path / "absent.tiny") is tiny  # and by its name when the file cannot be read
