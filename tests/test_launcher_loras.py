"""LoRAs in the TUI (the folder list, the request, the panel driven by keys, reuse from a PNG) and the
[dev] / [schnell] defaults read from a model file's safetensors header."""

from __future__ import annotations

import json
import random
import struct
from pathlib import Path

from PIL import Image
from textual.widgets import Checkbox, DataTable, Input, Label

from engine.contract import layout
from launcher.config import Settings
from launcher.form import FormValues, build_requests
from launcher.jobs import JobState
from launcher.loras import LORA_FOLDERS, LORA_SUFFIXES, LoraChoice, match_loras, scan_loras, summary
from launcher.metadata import params_from_request, parse_a1111
from launcher.models import DEV, SCHNELL, defaults_for_file, is_dev_transformer, safetensors_names
from launcher.screens.loras import LoraScreen
from tests.launcher_helpers import FAKE_ENGINE, SIZE, fluxdeck_png, make_app, wait_for, write_png


def touch(path: Path, data: bytes = b"lora") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def header_only(path: Path, names: list[str], metadata: dict | None = None) -> Path:
    """A valid safetensors file: the 8-byte header length, the JSON header, then 4 bytes per F32 tensor."""
    header: dict = {"__metadata__": metadata} if metadata else {}
    for i, name in enumerate(names):
        header[name] = {"dtype": "F32", "shape": [1], "data_offsets": [4 * i, 4 * i + 4]}
    raw = json.dumps(header).encode()
    return touch(path, struct.pack("<Q", len(raw)) + raw + b"\0" * 4 * len(names))


# -- the LoRA list, the request, reuse (plain data) ------------------------------------------------------
def test_scan_loras_lists_safetensors_in_lora_folders_and_subfolders(tmp_path):
    models, extra = tmp_path / "models", tmp_path / "forge" / "models"
    touch(models / "loras" / "zeta.safetensors")
    touch(models / "loras" / "styles" / "Ink.safetensors")
    touch(models / "loras" / "styles" / "deep" / "a.safetensors")
    touch(models / "loras" / "notes.txt")
    touch(models / "loras" / "old.ckpt")
    touch(models / "checkpoints" / "flux.safetensors")  # not a LoRA folder
    touch(extra / "Lora" / "forge-style.safetensors")
    found = scan_loras([models, extra, models])  # a root given twice lists its files once
    assert [(f.name, f.path.parent.name) for f in found] == [
        ("styles/deep/a", "deep"),
        ("styles/Ink", "styles"),
        ("zeta", "loras"),
        ("forge-style", "Lora"),
    ]
    assert found[-1].path == extra / "Lora" / "forge-style.safetensors" and found[-1].size == 4
    assert scan_loras([tmp_path / "nowhere"]) == []


def test_the_panel_lists_the_folders_and_suffixes_the_engines_tags_search(tmp_path):
    """A LoRA the panel lists must be one a `<lora:name>` tag finds too: both read the contract's layout."""
    from engine.formats.lora import LORA_SUFFIXES as ENGINE_SUFFIXES
    from engine.generation.pipeline import _loras_folder

    assert LORA_SUFFIXES == ENGINE_SUFFIXES == layout.LORA_SUFFIXES and LORA_FOLDERS == layout.LORA_FOLDERS
    for name in LORA_FOLDERS:
        models = tmp_path / name / "models"
        touch(models / name / "style.sft")
        assert _loras_folder(str(models)) == models / name
        assert [f.name for f in scan_loras([models])] == ["style"]
    for name in ("lora", "Loras", "LoRA"):  # folders the engine never searches: not listed
        models = tmp_path / f"not-{name}" / "models"
        touch(models / name / "style.safetensors")
        if not (models / "loras").is_dir():  # a case-sensitive disk
            assert not _loras_folder(str(models)).is_dir()
            assert scan_loras([models]) == []


def test_request_with_two_loras_at_strengths(tmp_path):
    a, b = str(tmp_path / "loras" / "a.safetensors"), str(tmp_path / "loras" / "b.safetensors")
    values = FormValues(
        prompt="p", width=64, height=64, steps=2, seed=3, batch=2, loras=[(a, 0.8), (b, -1.5)]
    )
    requests = build_requests(values, Settings(), tmp_path / "out", tmp_path / "models", random.Random(0))
    expected = [{"path": a, "strength": 0.8}, {"path": b, "strength": -1.5}]
    assert [r["loras"] for r in requests] == [expected, expected]
    from engine.contract.request import GenerateRequest, LoraSpec  # the engine accepts what the form builds

    request = GenerateRequest.from_dict(requests[0])
    request.validate()
    assert request.loras == [LoraSpec(a, 0.8), LoraSpec(b, -1.5)]
    assert (
        build_requests(FormValues(prompt="p"), Settings(), tmp_path, tmp_path, random.Random(0))[0]["loras"]
        == []
    )


def test_reuse_takes_loras_from_our_request_only(tmp_path):
    request = {
        "prompt": "p",
        "seed": 1,
        "loras": [{"path": "/x/a.safetensors", "strength": 0.5}, {"path": "/x/b.safetensors"}, {"bad": 1}],
    }
    values = FormValues(loras=[("/old.safetensors", 1.0)]).with_params(params_from_request(request))
    assert values.loras == [("/x/a.safetensors", 0.5), ("/x/b.safetensors", 1.0)]
    # A1111/Forge images carry LoRAs as <lora:...> tags in the prompt (the engine reads them): panel off
    forge = FormValues(loras=[("/old.safetensors", 1.0)]).with_params(parse_a1111("cat <lora:ink:0.7>"))
    assert forge.loras == [] and forge.prompt == "cat <lora:ink:0.7>"


def test_match_loras_by_path_then_by_name(tmp_path):
    here = touch(tmp_path / "models" / "loras" / "here.safetensors")
    moved = touch(tmp_path / "models" / "loras" / "sub" / "Moved.safetensors")
    available = scan_loras([tmp_path / "models"])
    found, missing = match_loras(
        [(str(here), 0.5), ("/elsewhere/moved.safetensors", -1.0), ("/elsewhere/gone.safetensors", 1.0)],
        available,
    )
    assert found == [(str(here), 0.5), (str(moved), -1.0)] and missing == ["gone"]


def test_summary_of_choices():
    choices = {"/l/a.safetensors": LoraChoice(True, "0.8"), "/l/b.safetensors": LoraChoice(False, "2")}
    assert summary(choices) == "a 0.8"
    assert summary({}) == "none"


# -- [dev] / [schnell] from the file ---------------------------------------------------------------------
def test_dev_or_schnell_from_the_safetensors_header(tmp_path):
    common = ["img_in.weight", "double_blocks.0.img_attn.qkv.weight", "time_in.in_layer.weight"]
    dev = header_only(tmp_path / "my-model.safetensors", [*common, "guidance_in.in_layer.weight"])
    schnell = header_only(tmp_path / "my-other-model.safetensors", common, {"format": "pt"})
    assert safetensors_names(schnell) == set(common)
    assert (is_dev_transformer(dev), is_dev_transformer(schnell)) == (True, False)
    assert (defaults_for_file(dev), defaults_for_file(schnell)) == (DEV, SCHNELL)
    # the header wins over the name
    named_wrong = header_only(tmp_path / "flux1-schnell-merge.safetensors", ["guidance_in.in_layer.weight"])
    assert defaults_for_file(named_wrong) == DEV
    named_dev = header_only(tmp_path / "flux1-dev.sft", common)
    assert defaults_for_file(named_dev) == SCHNELL
    # all-in-one checkpoints prefix the transformer's tensors
    for prefix in ("model.diffusion_model.", "diffusion_model."):
        names = [prefix + n for n in common] + [prefix + "guidance_in.in_layer.weight", "vae.decoder.w"]
        assert defaults_for_file(header_only(tmp_path / f"ckpt-{prefix}safetensors", names)) == DEV
        names = [prefix + n for n in common] + ["text_encoders.clip_l.guidance_in.in_layer.weight"]
        assert defaults_for_file(header_only(tmp_path / f"ckpt2-{prefix}safetensors", names)) == SCHNELL


def test_dev_or_schnell_from_numpy_safetensors(tmp_path):
    import numpy as np
    from safetensors.numpy import save_file

    tiny = np.zeros((2, 2), dtype=np.float32)
    save_file({"img_in.weight": tiny, "guidance_in.in_layer.weight": tiny}, str(tmp_path / "d.safetensors"))
    save_file({"img_in.weight": tiny}, str(tmp_path / "s.safetensors"))
    assert defaults_for_file(tmp_path / "d.safetensors") == DEV
    assert defaults_for_file(tmp_path / "s.safetensors") == SCHNELL


def test_dev_or_schnell_falls_back_to_the_name(tmp_path):
    # GGUF files, and files whose header cannot be read, are judged by name
    assert defaults_for_file(touch(tmp_path / "flux1-schnell-Q4_0.gguf", b"GGUF" + b"\0" * 64)) == SCHNELL
    assert defaults_for_file(touch(tmp_path / "flux1-dev-Q8_0.gguf", b"GGUF" + b"\0" * 64)) == DEV
    assert defaults_for_file(touch(tmp_path / "flux1-schnell-fp8.safetensors", b"0" * 4096)) == SCHNELL
    assert defaults_for_file(touch(tmp_path / "short-schnell.safetensors", b"\x05")) == SCHNELL
    truncated = struct.pack("<Q", 1000) + b'{"a": 1'
    assert safetensors_names(touch(tmp_path / "cut.safetensors", truncated)) is None
    not_json = struct.pack("<Q", 4) + b"\xff\xfe\x00["
    assert safetensors_names(touch(tmp_path / "bad.safetensors", not_json)) is None
    assert safetensors_names(touch(tmp_path / "list.safetensors", struct.pack("<Q", 2) + b"[]")) is None
    assert defaults_for_file(tmp_path / "missing-schnell.safetensors") == SCHNELL
    assert defaults_for_file("auto") == DEV


# -- the panel, by keys, through to the engine's request ------------------------------------------------
async def test_lora_panel_by_keys_reaches_the_request_and_reuse_restores_it(tmp_path):
    loras = tmp_path / "models" / "loras"
    ink = touch(loras / "ink.safetensors")
    grain = touch(loras / "styles" / "grain.safetensors")
    gone = str(tmp_path / "elsewhere" / "gone.safetensors")
    app = make_app(tmp_path, engine=FAKE_ENGINE)
    async with app.run_test(size=SIZE) as pilot:
        form = app.get_screen("generate").form
        shown = [b.binding.description for b in app.screen.active_bindings.values() if b.binding.show]
        assert "LoRAs" in shown  # in the footer, and in the command palette
        assert "LoRAs (ctrl+l)" in [c.help for c in app.get_system_commands(app.screen)]
        assert str(form.query_one("#loras").render()) == "none · ctrl+l: choose"

        await pilot.press("ctrl+l")
        panel = app.screen
        assert isinstance(panel, LoraScreen)
        assert [str(c.label) for c in panel.query(Checkbox)] == ["ink", "styles/grain"]
        assert panel.focused is panel.query_one("#on-0")
        await pilot.press("space", "tab", *"0.8")  # ink on, strength 0.8 (the field's text is selected)
        await pilot.press("down", *"20", "shift+tab", "enter")  # grain: 20, then on
        assert app.screen is panel  # 20 is out of range: the panel stays open and says so
        await pilot.press("escape")
        assert app.screen is panel and "out of range" in str(panel.query_one("#lora-error", Label).render())
        assert panel.focused is panel.query_one("#strength-1")
        await pilot.press(*"-1.5", "enter")  # its text is selected on focus; enter in a strength closes
        assert app.screen is app.get_screen("generate")
        assert str(form.query_one("#loras").render()) == "ink 0.8, grain -1.5 · ctrl+l: choose"

        await pilot.press("ctrl+g")
        await wait_for(pilot, lambda: app.jobs.jobs and app.jobs.jobs[0].finished)
        job = app.jobs.jobs[0]
        assert job.state is JobState.DONE, job.error
        expected = [{"path": str(ink), "strength": 0.8}, {"path": str(grain), "strength": -1.5}]
        assert job.request["loras"] == expected
        assert json.loads(Image.open(job.paths[0]).text["fluxdeck"])["loras"] == expected

        # the panel keeps the choices for the session; ctrl+n turns them all off
        await pilot.press("ctrl+l")
        assert [c.value for c in app.screen.query(Checkbox)] == [True, True]
        assert app.screen.query_one("#strength-0", Input).value == "0.8"
        await pilot.press("ctrl+n", "ctrl+l")  # the same key closes it
        assert app.screen is app.get_screen("generate") and form.values().loras == []

        # reuse our PNG: its LoRAs come back (the one whose file is missing is left off, with a warning)
        other = fluxdeck_png(tmp_path / "outputs" / "0-older.png", "older", 5)
        record = json.loads(Image.open(other).text["fluxdeck"])
        record["loras"] = [{"path": str(grain), "strength": 0.3}, {"path": gone, "strength": 1.0}]
        write_png(other, fluxdeck=json.dumps(record))
        await pilot.press("f3")
        table = app.screen.query_one(DataTable)
        rows = [table.coordinate_to_cell_key((i, 0)).row_key.value for i in range(table.row_count)]
        table.move_cursor(row=rows.index(job.paths[0]))
        await pilot.press("u")
        assert app.screen is app.get_screen("generate")
        assert form.values().loras == [(str(ink), 0.8), (str(grain), -1.5)]
        await pilot.press("f3")
        table = app.screen.query_one(DataTable)
        table.move_cursor(row=rows.index(str(other)))
        await pilot.press("u")
        assert form.values().loras == [(str(grain), 0.3)]
        assert any("left off: gone" in str(n.message) for n in app._notifications)
        assert str(form.query_one("#loras").render()) == "grain 0.3 · ctrl+l: choose"

        # ctrl+o works over the panel: the panel closes, the generate screen is not stacked twice
        await pilot.press("ctrl+l", "ctrl+n", "ctrl+o")  # all off, then load our first PNG
        assert form.values().loras == [] and "none" in str(form.query_one("#loras").render())
        app.screen.query_one(Input).value = job.paths[0]
        await pilot.press("enter")
        await pilot.pause()
        assert [type(s).__name__ for s in app.screen_stack] == ["Screen", "GenerateScreen"]
        assert form.values().loras == [(str(ink), 0.8), (str(grain), -1.5)]
    app.engine.stop()
