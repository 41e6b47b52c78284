"""PNGs from anyone: crafted metadata and pixel counts never crash the TUI, and never reach the form unchecked."""

from __future__ import annotations

import io
import json
import struct
import zlib
from pathlib import Path

import pytest
from PIL import Image
from textual.widgets import DataTable, Input

from launcher.form import FormValues
from launcher.loras import loras_in_request, match_loras, scan_loras
from launcher.metadata import (
    MAX_PIXELS,
    UnreadableImage,
    load_picture,
    parse_comfyui,
    read_png_params,
)
from tests.launcher_helpers import SIZE, make_app, write_png

INF_A1111 = "a cat\nSteps: inf, CFG scale: nan, Seed: 1e999, Size: 1e999x64, Distilled CFG Scale: -inf"


def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bomb_png(path: Path, width: int, height: int, **text: str) -> Path:
    """A valid-looking PNG header claiming width x height 1-bit pixels, with text chunks, a few bytes on disk."""
    body = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
    for key, value in text.items():
        body += chunk(b"tEXt", key.encode("latin-1") + b"\0" + value.encode("latin-1"))
    row = b"\0" + b"\0" * ((width + 7) // 8)
    body += chunk(b"IDAT", zlib.compress(row * 16)) + chunk(b"IEND", b"")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(body)
    return path


def hostile_outputs(folder: Path) -> dict[str, Path]:
    lora_request = {
        "prompt": 42,
        "steps": float("inf"),
        "seed": "x",
        "width": [1],
        "height": 64,
        "guidance": float("nan"),
        "cfg": 1e308,
        "loras": [
            {"path": "/etc/passwd", "strength": 1.0},
            {"path": "/x/ink.safetensors", "strength": float("inf")},
            {"path": ["x"], "strength": 1},
        ],
    }
    comfy = {
        "3": {"class_type": "KSampler"},  # no inputs
        "4": {"class_type": "CLIPTextEncode", "inputs": [1, 2]},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 1e400, "height": "64"}},
        "6": {"class_type": "UNETLoader", "inputs": {"unet_name": {"a": 1}}},
        "7": {"class_type": "KSamplerAdvanced", "inputs": {"positive": [[[]]], "noise_seed": [None, 0]}},
    }
    return {
        "inf": write_png(folder / "inf.png", parameters=INF_A1111),
        "fluxdeck": write_png(folder / "fluxdeck.png", fluxdeck=json.dumps(lora_request)),
        "comfy": write_png(folder / "comfy.png", prompt=json.dumps(comfy).replace("Infinity", "1e400")),
        "comfy_list": write_png(folder / "comfy-list.png", prompt="[1, 2, 3]"),
        "nested": write_png(folder / "nested.png", fluxdeck="[" * 100_000, prompt="{" * 100_000),
        "escape": write_png(folder / "esc\x1b[2J.png", parameters="\x1b]0;owned\x07a dog\nSteps: 4, Seed: 5"),
        "bomb": bomb_png(folder / "bomb.png", 100_000, 100_000, parameters="a bomb\nSteps: 4"),
        "big": bomb_png(folder / "big.png", 9000, 9000, parameters="big\nSteps: 4, Seed: 9"),
        "garbage": _write(folder / "garbage.png", b"\x89PNG\r\n\x1a\n" + b"\xff" * 100),
        "truncated": _write(folder / "truncated.png", _png_bytes()[:60]),
    }


def _png_bytes() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (64, 64), (1, 2, 3)).save(out, format="PNG")
    return out.getvalue()


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_numbers_that_are_not_finite_or_in_range_are_left_out(tmp_path):
    files = hostile_outputs(tmp_path)
    inf = read_png_params(files["inf"])
    assert inf is not None and inf.prompt == "a cat"
    assert (inf.steps, inf.cfg, inf.seed, inf.width, inf.height, inf.guidance) == (None,) * 6
    assert {i.split()[0] for i in inf.ignored} >= {"steps", "cfg", "seed", "width", "guidance"}
    assert "Ignored: " in inf.describe()

    ours = read_png_params(files["fluxdeck"])
    assert ours is not None and ours.source == "fluxdeck"
    assert ours.prompt == "" and (ours.steps, ours.seed, ours.width, ours.guidance, ours.cfg) == (None,) * 5
    assert loras_in_request(ours.request) == [("/etc/passwd", 1.0)]  # the infinite and the malformed dropped
    # filled into the form: nothing out of range, and the form's own values stay where the image had none
    values = FormValues(steps=20, seed=3).with_params(ours)
    assert (values.steps, values.seed, values.width, values.cfg) == (20, 3, 1024, 1.0)


def test_whole_numbers_are_read_exactly_and_judged_by_range():
    from launcher.metadata import parse_a1111

    assert parse_a1111("a\nSteps: 4, Seed: 18446744073709551615").seed == 2**64 - 1  # not rounded via float
    too_big = parse_a1111("a\nSteps: 4.5, Seed: 18446744073709551616")
    assert (too_big.seed, too_big.steps) == (None, None) and len(too_big.ignored) == 2
    assert (
        parse_comfyui(
            {"1": {"class_type": "RandomNoise", "inputs": {"noise_seed": "18446744073709551615"}}}
        ).seed
        == 2**64 - 1
    )


def test_comfyui_nodes_without_inputs_or_of_the_wrong_shape(tmp_path):
    files = hostile_outputs(tmp_path)
    comfy = read_png_params(files["comfy"])
    assert comfy is not None and comfy.source == "comfyui"
    assert (comfy.width, comfy.height, comfy.model, comfy.steps) == (None, None, None, None)
    assert read_png_params(files["comfy_list"]) is None
    assert parse_comfyui({"1": {"class_type": "SamplerCustomAdvanced", "inputs": {"guider": ["2", 0]}},
                          "2": {"class_type": "CFGGuider", "inputs": None}}).cfg is None  # fmt: skip


def test_deep_nesting_escape_codes_and_broken_files(tmp_path):
    files = hostile_outputs(tmp_path)
    assert (
        read_png_params(files["nested"]) is None
    )  # RecursionError inside json is not understood, not raised
    escaped = read_png_params(files["escape"])
    assert escaped is not None and escaped.prompt == "]0;owneda dog" and "\x1b" not in escaped.describe()
    for name in ("garbage", "truncated"):
        with pytest.raises(UnreadableImage):
            read_png_params(files[name])


def test_a_decompression_bomb_is_never_decoded(tmp_path):
    files = hostile_outputs(tmp_path)
    with pytest.raises(UnreadableImage, match="decompression bomb"):
        read_png_params(files["bomb"], full=True)
    big = read_png_params(files["big"], full=True)  # 81 MP: the text is read, the pixels are not decoded
    assert big is not None and big.seed == 9 and 9000 * 9000 > MAX_PIXELS
    with pytest.raises(UnreadableImage, match="too large to show"):
        load_picture(files["big"])


def test_lora_paths_from_an_image_are_taken_only_inside_the_lora_folders(tmp_path):
    loras = tmp_path / "models" / "loras"
    loras.mkdir(parents=True)
    (loras / "ink.safetensors").write_bytes(b"{}")
    outside = tmp_path / "secret.safetensors"
    outside.write_bytes(b"{}")
    found, missing = match_loras(
        [
            (str(outside), 1.0),
            (str(loras / "ink.safetensors"), 0.5),
            ("C:\\models\\loras\\ink.safetensors", 2.0),
        ],
        scan_loras([tmp_path / "models"]),
    )
    assert found == [(str(loras / "ink.safetensors"), 0.5), (str(loras / "ink.safetensors"), 2.0)]
    assert missing == ["secret"]


async def test_the_gallery_and_load_png_survive_every_crafted_png(tmp_path):
    outputs = tmp_path / "outputs"
    files = hostile_outputs(outputs)
    app = make_app(tmp_path, start_engine=False)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("f3")
        table = app.screen.query_one(DataTable)
        assert table.row_count == len(files)
        names = [str(table.get_row_at(i)[0]) for i in range(table.row_count)]
        assert not any("\x1b" in name for name in names)
        for row in range(table.row_count):
            table.move_cursor(row=row)
            await pilot.pause()
            shown = str(app.screen.query_one("#params").render())
            assert "\x1b" not in shown
            await pilot.press("u")  # reuse: the parameters that passed reach the form, nothing else
            await pilot.pause()
            form = app.get_screen("generate").form
            values = form.values()  # raises FormError if a value out of range got into the form
            assert 1 <= values.steps <= 1000 and 64 <= values.width <= 4096
            await pilot.press("f3")
            table = app.screen.query_one(DataTable)
        bomb_row = names.index("bomb.png")
        table.move_cursor(row=bomb_row)
        await pilot.pause()
        assert "decompression bomb" in str(app.screen.query_one("#params").render())
        # ctrl+o of a bomb or garbage: one sentence in the dialog
        for name in ("bomb", "garbage"):
            await pilot.press("ctrl+o")
            app.screen.query_one(Input).value = str(files[name])
            await pilot.press("enter")
            await pilot.pause()
            assert "cannot be read" in str(app.screen.query_one("#error").render())
            await pilot.press("escape")
        assert app.is_running
