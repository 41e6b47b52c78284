"""The TUI's Redux mode and depth preprocessor: Redux images with strengths (checked with one sentence) reach the
request the fake engine gets, the PNG records them by name and SHA-256, reuse restores them; a missing Redux or
depth file fails the job with the real engine's sentence, shown on the Edit screen; depth is sent as
--control-preprocess depth without a preview in the TUI; the ControlNet panel offers none/canny/depth, depth
sent as the photo with preprocess="depth" (no preview), and reuse restores it;
the panel's ControlNets apply to Edit-screen jobs too and reuse restores them with the edit.
Driven by keys through Pilot, with the fake engine (tests/launcher_fake_engine.py)."""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import save_file
from textual.widgets import Checkbox, Input, Select, TextArea

from engine.contract.request import GenerateRequest
from launcher.config import Settings
from launcher.edits import (
    DEPTH_NOTE,
    EditMode,
    EditValues,
    edit_from_request,
    parse_redux_images,
)
from launcher.form import FormValues, build_requests
from launcher.jobs import JobState
from launcher.metadata import read_png_params
from tests.launcher_helpers import FAKE_ENGINE, SIZE, make_app, wait_for
from tests.test_launcher_edit import open_edit, source_image


def redux_files(models: Path, siglip_width: int = 8) -> None:
    """The Redux embedder and a SigLIP vision tower as tiny real safetensors files, named as the real ones (the
    engine recognises them by their tensor names and checks that their widths agree)."""
    zeros = lambda *shape: np.zeros(shape, np.float32)  # noqa: E731
    (models / "style_models").mkdir(parents=True, exist_ok=True)
    (models / "clip_vision").mkdir(parents=True, exist_ok=True)
    save_file(
        {"redux_up.weight": zeros(12, 8), "redux_down.weight": zeros(4, 12)},
        str(models / "style_models" / "flux1-redux-dev.safetensors"),
    )
    save_file(
        {"vision_model.embeddings.patch_embedding.weight": zeros(siglip_width, 3, 2, 2)},
        str(models / "clip_vision" / "sigclip_vision_patch14_384.safetensors"),
    )


# -- plain data ----------------------------------------------------------------------------------------
def test_more_redux_images_parse_with_strengths_checked_in_one_sentence(tmp_path):
    a, b = source_image(tmp_path / "a.png"), source_image(tmp_path / "b.png")
    assert parse_redux_images(f"{a}:0.5; {b}") == [(str(a), 0.5), (str(b), 1.0)]
    assert parse_redux_images(f' "{a}":10 ;; ') == [(str(a), 10.0)]
    assert parse_redux_images("") == []
    colon = source_image(tmp_path / "x:2.png")  # a file whose name has a colon is a file, not a strength
    assert parse_redux_images(str(colon)) == [(str(colon), 1.0)]
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    for typed, words in (
        (f"{a}:nan", "finite number from 0 to 10"),
        (f"{a}:inf", "finite number from 0 to 10"),
        (f"{a}:11", "finite number from 0 to 10"),
        (f"{a}:-0.5", "finite number from 0 to 10"),
        (f"{a}:strong", "must be a number from 0 to 10, not 'strong'"),
        (f"{tmp_path / 'gone.png'}:0.5", "does not exist"),
        (str(text), "is not an image"),
        ("C:\\styles\\a.png:0.5", "C:\\styles\\a.png does not exist"),  # a drive letter is no strength
        ("C:\\styles\\a.png", "C:\\styles\\a.png does not exist"),
    ):
        with pytest.raises(ValueError) as caught:  # EditError, or UnreadableImage for a file that is not one
            parse_redux_images(typed)
        message = str(caught.value)
        assert words in message and message.endswith(".") and "\n" not in message, (typed, message)


def test_a_redux_edit_is_the_engines_redux_images_and_reads_back(tmp_path):
    a, b = str(source_image(tmp_path / "a.png")), str(source_image(tmp_path / "b.png"))
    edit = EditValues(EditMode.REDUX, a, strength=0.7, redux=[(b, 2.5)])
    values = FormValues(prompt="", steps=3, seed=5, width=512, height=384, edit=edit, edit_guidance=None)
    made = build_requests(values, Settings(), tmp_path / "out", tmp_path / "models", random.Random(0))[0]
    GenerateRequest.from_dict(made).validate()  # the engine accepts it (paths, strengths, an empty prompt)
    assert made["redux_images"] == [{"path": a, "strength": 0.7}, {"path": b, "strength": 2.5}]
    # Redux prompts a new picture: the size asked for, no edit image
    assert (made["width"], made["height"], made["init_image"], made["control_image"]) == (
        512,
        384,
        None,
        None,
    )
    again = edit_from_request(made)
    assert (again.mode, again.source, again.strength, again.redux) == (EditMode.REDUX, a, 0.7, [(b, 2.5)])
    # other modes send no Redux images
    control = EditValues(EditMode.CONTROL, a, preprocess="depth", strength=0.7, redux=[(b, 2.5)])
    made = build_requests(
        FormValues(prompt="p", edit=control), Settings(), tmp_path / "out", tmp_path / "m", random.Random(0)
    )[0]
    assert (made["redux_images"], made["control_preprocess"]) == ([], "depth")
    assert edit_from_request(made).preprocess == "depth"


def test_redux_images_read_from_a_hostile_png_are_checked_not_trusted():
    request = {
        "redux_images": [
            {"path": "a\x1b[31m.png", "strength": 0.5},
            {"path": "nan.png", "strength": float("nan")},
            {"path": "big.png", "strength": 11},
            {"path": "bool.png", "strength": True},
            {"path": 5, "strength": 1},
            "x.png",
            {"path": "b.png"},
        ]
    }
    edit = edit_from_request(request)
    assert (edit.mode, edit.source, edit.strength, edit.redux) == (
        EditMode.REDUX,
        "a[31m.png",
        0.5,
        [("b.png", 1.0)],
    )
    assert edit_from_request({"redux_images": "a.png"}) is None
    assert edit_from_request({"redux_images": [{"path": "a.png", "strength": -1}]}) is None


# -- the screen, driven by keys ------------------------------------------------------------------------
async def test_redux_mode_sends_images_with_strengths_records_them_and_reuse_restores_them(tmp_path):
    src = source_image(tmp_path / "outputs" / "photo.png")
    style = source_image(tmp_path / "style.png")
    style.write_bytes(style.read_bytes() + b"-")  # another file, another hash
    redux_files(tmp_path / "models")
    app = make_app(tmp_path, engine=FAKE_ENGINE)
    async with app.run_test(size=SIZE) as pilot:
        await open_edit(app, pilot, src)
        edit = app._edit
        for _ in range(4):  # F9: inpaint -> outpaint -> kontext -> control -> redux
            await pilot.press("f9")
        assert edit.mode is EditMode.REDUX
        edit.query_one("#edit_prompt", TextArea).text = ""  # Redux alone: the images are the prompt
        edit.query_one("#redux_width", Input).value = "128"
        edit.query_one("#redux_height", Input).value = "96"
        # a strength out of range or not finite: one sentence, no job
        for field, typed, words in (
            ("#redux_strength", "12", "finite number from 0 to 10"),
            ("#redux_strength", "nan", "finite number from 0 to 10"),
            ("#redux_more", f"{style}:-1", "finite number from 0 to 10"),
            ("#redux_width", "100", "not a multiple of 16"),
        ):
            before = edit.query_one(field, Input).value
            edit.query_one(field, Input).value = typed
            await pilot.press("ctrl+g")
            assert not app.jobs.jobs and words in edit.error_text(), (typed, edit.error_text())
            edit.query_one(field, Input).value = before
        edit.query_one("#redux_strength", Input).value = "0.6"
        edit.query_one("#redux_more", Input).value = f"{style}:2.5"
        await pilot.press("ctrl+g")
        await wait_for(pilot, lambda: app.jobs.jobs and app.jobs.jobs[0].finished, 60)
        job = app.jobs.jobs[0]
        assert job.state is JobState.DONE, job.error
        assert job.request["redux_images"] == [
            {"path": str(src), "strength": 0.6},
            {"path": str(style), "strength": 2.5},
        ]
        assert (job.request["width"], job.request["height"], job.request["prompt"]) == (128, 96, "")
        with Image.open(job.paths[0]) as result:
            assert result.size == (128, 96)
        # the PNG records each Redux image's name and SHA-256
        request = read_png_params(Path(job.paths[0])).request
        recorded = [(i["name"], i["sha256"]) for i in request["inputs"] if i["role"] == "redux_image"]
        assert recorded == [(p.name, hashlib.sha256(p.read_bytes()).hexdigest()) for p in (src, style)]
        # reuse: another mode and other values, then the image's Redux edit comes back whole
        edit.query_one("#mode", Select).value = EditMode.KONTEXT.value
        for field, value in (("#redux_strength", "1"), ("#redux_more", ""), ("#redux_width", "1024")):
            edit.query_one(field, Input).value = value
        await pilot.press("f3")
        gallery = app.get_screen("gallery")
        await wait_for(pilot, lambda: gallery.selected() == job.paths[0], 5)
        await pilot.press("u")
        await wait_for(pilot, lambda: app.screen is edit and edit.mode is EditMode.REDUX, 5)
        assert edit.source == str(src)
        assert edit.query_one("#redux_strength", Input).value == "0.6"
        assert edit.query_one("#redux_more", Input).value == f"{style}:2.5"
        assert (
            edit.query_one("#redux_width", Input).value,
            edit.query_one("#redux_height", Input).value,
        ) == (
            "128",
            "96",
        )


async def test_a_missing_redux_file_fails_the_job_with_the_engines_sentence_on_the_edit_screen(tmp_path):
    src = source_image(tmp_path / "outputs" / "photo.png")
    app = make_app(tmp_path, engine=FAKE_ENGINE)  # no style_models/ nor clip_vision/
    async with app.run_test(size=SIZE) as pilot:
        await open_edit(app, pilot, src)
        edit = app._edit
        edit.query_one("#mode", Select).value = EditMode.REDUX.value
        await pilot.press("ctrl+g")
        await wait_for(pilot, lambda: app.jobs.jobs and app.jobs.jobs[0].finished, 60)
        job = app.jobs.jobs[0]
        assert job.state is JobState.FAILED and not job.paths
        assert "needs the FLUX.1 Redux embedder" in job.error and "flux1-redux-dev" in job.error
        await wait_for(pilot, lambda: edit.error_text() == job.error, 5)  # on the screen, not only a toast
        # with the embedder there, the SigLIP file is the one named
        redux_files(tmp_path / "models")
        (tmp_path / "models" / "clip_vision" / "sigclip_vision_patch14_384.safetensors").unlink()
        await pilot.press("ctrl+g")
        await wait_for(pilot, lambda: len(app.jobs.jobs) == 2 and app.jobs.jobs[1].finished, 60)
        assert "needs the SigLIP image encoder" in app.jobs.jobs[1].error
        await wait_for(pilot, lambda: "SigLIP" in edit.error_text(), 5)


async def test_depth_is_sent_to_the_engine_without_a_preview_and_reuse_restores_it(tmp_path):
    src = source_image(tmp_path / "outputs" / "photo.png")
    app = make_app(tmp_path, engine=FAKE_ENGINE)
    async with app.run_test(size=SIZE) as pilot:
        await open_edit(app, pilot, src)
        edit = app._edit
        edit.query_one("#mode", Select).value = EditMode.CONTROL.value
        edit.query_one("#preprocess", Select).value = "canny"
        await wait_for(pilot, lambda: edit.preview is not None, 10)
        edit.query_one("#preprocess", Select).value = "depth"
        await pilot.pause()
        assert edit.preview is None  # no map: the photo itself, and the one line saying why
        caption = str(edit.query_one("#edit-image").query_one("#caption").render())
        assert DEPTH_NOTE in caption and "photo.png" in caption
        edit.query_one("#edit_prompt", TextArea).text = "a house"
        await pilot.press("ctrl+g")  # no models/depth/: the engine's sentence
        await wait_for(pilot, lambda: app.jobs.jobs and app.jobs.jobs[0].finished, 60)
        failed = app.jobs.jobs[0]
        assert (failed.request["control_image"], failed.request["control_preprocess"]) == (str(src), "depth")
        assert failed.state is JobState.FAILED and "needs Depth Anything V2 Small" in failed.error
        await wait_for(pilot, lambda: edit.error_text() == failed.error, 5)
        depth = tmp_path / "models" / "depth" / "depth-anything-v2-small"
        depth.mkdir(parents=True)
        for name in ("config.json", "model.safetensors"):
            (depth / name).write_text("{}")  # found where the manifest puts them (the fake does not run it)
        await pilot.press("ctrl+g")
        await wait_for(pilot, lambda: len(app.jobs.jobs) == 2 and app.jobs.jobs[1].finished, 60)
        job = app.jobs.jobs[1]
        assert job.state is JobState.DONE, job.error
        edit.query_one("#preprocess", Select).value = "none"
        edit.query_one("#mode", Select).value = EditMode.INPAINT.value
        await pilot.press("f3")
        gallery = app.get_screen("gallery")
        await wait_for(pilot, lambda: gallery.selected() == job.paths[0], 5)
        await pilot.press("u")
        await wait_for(pilot, lambda: app.screen is edit and edit.mode is EditMode.CONTROL, 5)
        assert edit.query_one("#preprocess", Select).value == "depth" and edit.source == str(src)


async def test_the_controlnet_panel_offers_none_canny_and_depth_and_says_who_computes_depth(tmp_path):
    from launcher.screens.controlnets import ControlNetScreen
    from tests.test_launcher_edit import controlnet_files

    controlnet_files(tmp_path / "models")
    app = make_app(tmp_path, start_engine=False)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("ctrl+t")
        panel = app.screen
        assert isinstance(panel, ControlNetScreen)
        options = [value for _, value in panel.query_one("#pre-0", Select)._options]
        assert options == ["none", "canny", "depth"]
        note = str(panel.query_one("#cn-depth-note").render())
        assert "canny or depth" in note and "computed by the engine" in note and "models/depth/" in note


async def test_a_depth_controlnet_sends_the_photo_for_the_engine_to_preprocess_and_reuse_restores_it(
    tmp_path,
):
    from launcher.screens.controlnets import ControlNetScreen
    from tests.test_launcher_edit import controlnet_files

    union, _ = controlnet_files(tmp_path / "models")
    photo = source_image(tmp_path / "photo.png")
    app = make_app(tmp_path, engine=FAKE_ENGINE)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("ctrl+t")
        panel = app.screen
        assert isinstance(panel, ControlNetScreen)
        panel.query_one("#on-0", Checkbox).value = True
        panel.query_one("#image-0", Input).value = str(photo)
        panel.query_one("#pre-0", Select).value = "canny"
        await wait_for(pilot, lambda: panel.preview is not None, 10)  # canny still previewed here
        panel.query_one("#pre-0", Select).value = "depth"
        await pilot.pause()
        caption = str(panel.query_one("#cn-preview").query_one("#caption").render())
        assert panel.preview is None and "depth map is computed by the engine" in caption
        panel.query_one("#mode-0", Select).value = "depth"
        await pilot.press("escape")
        assert app.screen is app.get_screen("generate")
        await pilot.press("ctrl+g")  # no models/depth/: the engine's sentence, naming the ControlNet
        await wait_for(pilot, lambda: app.jobs.jobs and app.jobs.jobs[0].finished, 60)
        failed = app.jobs.jobs[0]
        assert failed.state is JobState.FAILED and "needs Depth Anything V2 Small" in failed.error
        assert "preprocess=depth" in failed.error
        depth = tmp_path / "models" / "depth" / "depth-anything-v2-small"
        depth.mkdir(parents=True)
        for name in ("config.json", "model.safetensors"):
            (depth / name).write_text("{}")  # found where the manifest puts them (the fake does not run it)
        await pilot.press("ctrl+g")
        await wait_for(pilot, lambda: len(app.jobs.jobs) == 2 and app.jobs.jobs[1].finished, 60)
        job = app.jobs.jobs[1]
        assert job.state is JobState.DONE, job.error
        (net,) = job.request["controlnets"]
        # the photo itself with the engine's preprocessor, no map made by the TUI
        assert (net["path"], net["image"], net["preprocess"], net["mode"]) == (
            str(union),
            str(photo),
            "depth",
            "depth",
        )
        assert not (tmp_path / "outputs" / "inputs").exists()
        GenerateRequest.from_dict(job.request).validate()
        recorded = read_png_params(Path(job.paths[0])).request
        assert recorded["controlnets"] == job.request["controlnets"]
        # reuse: the ControlNet off and changed, then back with the photo and depth
        choices = app._generate.form.controlnet_choices
        choices[str(union)].enabled, choices[str(union)].preprocess = False, "canny"
        choices[str(union)].image = ""
        await pilot.press("f3")
        gallery = app.get_screen("gallery")
        await wait_for(pilot, lambda: gallery.selected() == job.paths[0], 5)
        await pilot.press("u")
        await wait_for(pilot, lambda: choices[str(union)].enabled, 5)
        choice = choices[str(union)]
        assert (choice.image, choice.preprocess, choice.mode) == (str(photo), "depth", "depth")
        await pilot.press("ctrl+t")  # the panel shows it so
        panel = app.screen
        assert isinstance(panel, ControlNetScreen)
        assert panel.query_one("#pre-0", Select).value == "depth"
        assert panel.query_one("#image-0", Input).value == str(photo)


async def test_controlnets_chosen_in_the_panel_apply_to_edits_and_reuse_restores_both(tmp_path):
    from engine.generation.control_preprocess import canny
    from launcher.screens.controlnets import ControlNetScreen
    from launcher.widgets.mask_canvas import MaskCanvas
    from tests.test_launcher_edit import H, W, controlnet_files

    union, _ = controlnet_files(tmp_path / "models")
    src = source_image(tmp_path / "outputs" / "photo.png")
    photo = source_image(tmp_path / "pose-photo.png")
    app = make_app(tmp_path, engine=FAKE_ENGINE)
    async with app.run_test(size=SIZE) as pilot:
        await open_edit(app, pilot, src)
        edit = app._edit
        assert "ControlNets: none" in str(edit.query_one("#edit-controlnets").render())
        edit.query_one("#edit_prompt", TextArea).focus()
        await pilot.press("ctrl+t")  # the generate screen's panel, over the Edit screen
        panel = app.screen
        assert isinstance(panel, ControlNetScreen)
        panel.query_one("#on-0", Checkbox).value = True
        panel.query_one("#image-0", Input).value = str(photo)
        panel.query_one("#pre-0", Select).value = "canny"
        panel.query_one("#strength-0", Input).value = "0.5"
        await pilot.press("escape")
        assert app.screen is edit
        assert "ControlNets: union-pro2 0.5" in str(edit.query_one("#edit-controlnets").render())
        edit.query_one(MaskCanvas).painter.rectangle((10, 10), (40, 30))
        edit.query_one("#edit_prompt", TextArea).text = "a window"
        await pilot.press("ctrl+g")
        await wait_for(pilot, lambda: app.jobs.jobs and app.jobs.jobs[0].finished, 60)
        job = app.jobs.jobs[0]
        assert job.state is JobState.DONE, job.error
        assert job.request["init_image"] == str(src) and job.request["mask"]  # still the inpaint edit
        (net,) = job.request["controlnets"]
        assert (net["path"], net["strength"]) == (str(union), 0.5)
        # an edit's size is the engine's to work out: the Canny map is made at the photo's own size
        with Image.open(photo) as image, Image.open(net["image"]) as made:
            assert made.size == (W, H) and made.convert("RGB").tobytes() == canny(image, W, H).tobytes()
        recorded = read_png_params(Path(job.paths[0])).request
        assert recorded["controlnets"] == job.request["controlnets"]
        # reuse: the ControlNet off, then back on with its photo and preprocessor, and the edit with it
        choice = app._generate.form.controlnet_choices[str(union)]
        choice.enabled, choice.strength = False, "1"
        await pilot.press("f3")
        gallery = app.get_screen("gallery")
        await wait_for(pilot, lambda: gallery.selected() == job.paths[0], 5)
        await pilot.press("u")
        choices = app._generate.form.controlnet_choices
        await wait_for(pilot, lambda: app.screen is edit and choices[str(union)].enabled, 5)
        choice = choices[str(union)]  # the panel's choice as the image had it (a new one)
        assert edit.mode is EditMode.INPAINT and edit.source == str(src)
        assert (choice.image, choice.preprocess, choice.strength) == (str(photo), "canny", "0.5")


async def test_reusing_a_request_that_combines_redux_with_another_edit_says_what_is_left_off(tmp_path):
    """A command-line request may combine Redux with an inpaint (or start Redux from an init image); one Edit mode
    cannot send both, so reuse restores the edit and says what it left off."""
    import json

    from tests.launcher_helpers import write_png

    src, style = source_image(tmp_path / "src.png"), source_image(tmp_path / "style.png")
    mask = tmp_path / "mask.png"
    Image.new("L", (64, 48), 255).save(mask)
    combined = {
        "prompt": "a door",
        "out": "x.png",
        "steps": 2,
        "seed": 3,
        "init_image": str(src),
        "mask": str(mask),
        "redux_images": [{"path": str(style), "strength": 0.5}],
    }
    write_png(tmp_path / "outputs" / "combined.png", fluxdeck=json.dumps(combined))
    app = make_app(tmp_path, start_engine=False)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("f3")
        gallery = app.get_screen("gallery")
        await wait_for(pilot, lambda: gallery.selected() is not None, 5)
        await pilot.press("u")
        edit = app._edit
        await wait_for(pilot, lambda: app.screen is edit and edit.source == str(src), 5)
        assert edit.mode is EditMode.INPAINT
        notes = [str(n.message) for n in app._notifications]
        assert any("Redux images" in n and "left off" in n for n in notes), notes
