"""The TUI's Edit screen: a mask painted with the keyboard and the mouse becomes the PNG the engine reads,
outpaint margins and Kontext/Control fields reach the request, the PNG records every input with its SHA-256,
and reusing an edited image restores the edit. Driven by keys through Pilot, with the fake engine."""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

from PIL import Image
from textual.widgets import Checkbox, Input, Select, TextArea

from engine.contract.request import GenerateRequest
from launcher.config import Settings
from launcher.edits import (
    EditError,
    EditMode,
    EditValues,
    MaskPainter,
    check_margins,
    edit_from_request,
    find_input,
)
from launcher.form import FormValues, build_requests
from launcher.jobs import JobState
from launcher.metadata import read_png_params
from launcher.widgets.mask_canvas import MaskCanvas
from tests.launcher_helpers import FAKE_ENGINE, SIZE, make_app, wait_for

W, H = 96, 64  # the source image; the canvas shows it with half blocks


def source_image(path: Path) -> Path:
    """A picture with a gradient and a white square, so that it has edges for Canny."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGB", (W, H))
    image.putdata([(x * 255 // W, y * 255 // H, 90) for y in range(H) for x in range(W)])
    image.paste((255, 255, 255), (30, 20, 60, 44))
    image.save(path)
    return path


def mask_of(path: str | Path) -> Image.Image:
    with Image.open(path) as image:
        return image.convert("L")


# -- plain data ----------------------------------------------------------------------------------------
def test_mask_painter_paints_rectangles_inverts_and_loads(tmp_path):
    painter = MaskPainter((W, H))
    painter.rectangle((10, 5), (29, 14))
    assert painter.coverage() == 20 * 10 / (W * H)
    painter.dab(60, 40, 4, paint=True)
    assert painter.image.getpixel((60, 40)) == 255 and painter.image.getpixel((60, 46)) == 0
    painter.dab(60, 40, 4, paint=False)
    assert painter.image.getpixel((60, 40)) == 0
    painter.invert()
    assert painter.image.getpixel((0, 0)) == 255 and painter.image.getpixel((15, 10)) == 0
    painter.clear()
    assert painter.coverage() == 0
    # a mask PNG of another size is resized to the image's, and the note says so
    other = tmp_path / "other.png"
    Image.new("L", (W * 2, H * 2), 255).save(other)
    note = painter.load(other)
    assert painter.image.size == (W, H) and painter.coverage() == 1 and "resized" in note


def test_margins_are_checked_per_side_with_one_sentence():
    assert check_margins({"left": "16", "top": "", "right": "32", "bottom": "0"}, (W, H)) == (16, 0, 32, 0)
    for texts, words in (
        ({"left": "x"}, "whole number"),
        ({"left": "-1"}, "out of range"),
        ({"left": "2049"}, "out of range"),
        ({"left": "nan"}, "whole number"),
        ({}, "All four margins are 0"),
        ({"left": "2048", "right": "2048"}, "within 4096x4096"),
    ):
        try:
            check_margins(texts, (W, H))
        except EditError as error:
            assert words in str(error) and str(error).count(".") >= 1
        else:
            raise AssertionError(f"{texts} was accepted")


def test_each_edit_becomes_the_engines_request_fields(tmp_path):
    src = str(source_image(tmp_path / "src.png"))
    base = FormValues(prompt="p", steps=3, seed=5, width=512, height=512, guidance=3.5)

    def request(edit: EditValues, **changes) -> dict:
        values = FormValues(**{**base.__dict__, "edit": edit, **changes})
        made = build_requests(values, Settings(), tmp_path / "out", tmp_path / "models", random.Random(0))[0]
        GenerateRequest.from_dict(made).validate()  # the engine accepts what the screen builds
        return made

    mask = tmp_path / "m.png"
    Image.new("L", (W, H), 255).save(mask)
    inpaint = request(EditValues(EditMode.INPAINT, src, mask=str(mask)), denoise=0.8)
    assert (inpaint["init_image"], inpaint["mask"], inpaint["denoise"]) == (src, str(mask), 0.8)
    # the edit image gives the size, the model its own guidance (Fill 30, Kontext 2.5...)
    assert (inpaint["width"], inpaint["height"], inpaint["guidance"]) == (None, None, None)
    out = request(EditValues(EditMode.OUTPAINT, src, margins=(16, 0, 32, 48)), edit_guidance=12.0)
    assert (out["outpaint"], out["mask"], out["denoise"], out["guidance"]) == ("16,0,32,48", None, 1.0, 12.0)
    kontext = request(EditValues(EditMode.KONTEXT, src, references=[str(mask)]))
    assert (kontext["references"], kontext["init_image"]) == ([src, str(mask)], None)
    control = request(EditValues(EditMode.CONTROL, src, preprocess="canny"))
    assert (control["control_image"], control["control_preprocess"]) == (src, "canny")
    # each request reads back as the edit it was
    for made, mode in ((inpaint, "inpaint"), (out, "outpaint"), (kontext, "kontext"), (control, "control")):
        assert edit_from_request(made).mode.value == mode
    assert edit_from_request(request(None)) is None  # plain txt2img is no edit


def test_find_input_by_path_then_name_and_says_when_it_changed(tmp_path):
    first = source_image(tmp_path / "a" / "src.png")
    digest = hashlib.sha256(first.read_bytes()).hexdigest()
    assert find_input(str(first), digest, []) == (str(first), None)
    moved = tmp_path / "b" / "src.png"
    moved.parent.mkdir()
    first.rename(moved)
    assert find_input(str(first), digest, [moved.parent]) == (str(moved), None)
    moved.write_bytes(moved.read_bytes() + b"x")  # changed since
    where, note = find_input(str(first), digest, [moved.parent])
    assert where == str(moved) and "changed" in note
    assert find_input(str(tmp_path / "gone.png"), digest, [])[0] is None


# -- the screen, driven by keys ------------------------------------------------------------------------
async def open_edit(app, pilot, path: Path) -> None:
    """From the gallery: select the image (the only one) and press e."""
    await pilot.press("f3")
    gallery = app.get_screen("gallery")
    await wait_for(pilot, lambda: gallery.selected() is not None, 5)
    await pilot.press("e")
    await wait_for(pilot, lambda: app.screen is app.get_screen("edit") and app._edit.source, 5)


async def test_inpaint_mask_painted_with_keys_and_mouse_is_the_png_the_engine_gets(tmp_path):
    src = source_image(tmp_path / "outputs" / "photo.png")
    app = make_app(tmp_path, engine=FAKE_ENGINE)
    async with app.run_test(size=SIZE) as pilot:
        await open_edit(app, pilot, src)
        edit = app._edit
        assert edit.error_text() == "" and edit.source == str(src)
        canvas = edit.query_one(MaskCanvas)
        canvas.focus()
        # the keyboard: the brush down to its smallest, a rectangle from one corner to the other
        for _ in range(3):  # 3 px -> 2 -> 1 -> 1
            await pilot.press("minus")
        assert canvas.radius == 1
        canvas.cursor = (0.0, 0.0)
        await pilot.press("r")
        for _ in range(9):
            await pilot.press("right")
        for _ in range(4):
            await pilot.press("down")
        await pilot.press("r")
        expected = Image.new("L", (W, H), 0)
        from PIL import ImageDraw

        ImageDraw.Draw(expected).rectangle((0, 0, 9, 4), fill=255)
        assert canvas.painter.image.tobytes() == expected.tobytes()
        # the mouse: a click paints a dab at the image pixel under the cell
        x, y = 40, 10
        point = canvas.image_point(x, y)
        assert point is not None
        await pilot.click(MaskCanvas, offset=(x, y))
        assert canvas.painter.image.getpixel((int(point[0]), int(point[1]))) == 255
        ImageDraw.Draw(expected).ellipse((point[0] - 1, point[1] - 1, point[0] + 1, point[1] + 1), fill=255)
        assert canvas.painter.image.tobytes() == expected.tobytes()
        edit.query_one("#edit_prompt", TextArea).text = "a red door"
        await pilot.press("ctrl+g")
        await wait_for(pilot, lambda: app.jobs.jobs and app.jobs.jobs[0].finished, 30)
        job = app.jobs.jobs[0]
        assert job.state is JobState.DONE, job.error
        mask_path = Path(job.request["mask"])
        assert mask_path.parent == tmp_path / "outputs" / "inputs"  # beside the outputs, not in the gallery
        assert mask_of(mask_path).tobytes() == expected.tobytes()
        assert job.request["init_image"] == str(src) and job.request["prompt"] == "a red door"
        # the PNG records every input: name and SHA-256 of the source and the mask
        request = read_png_params(Path(job.paths[0])).request
        recorded = {item["role"]: item for item in request["inputs"]}
        assert recorded["mask"]["sha256"] == hashlib.sha256(mask_path.read_bytes()).hexdigest()
        assert recorded["init_image"]["name"] == "photo.png"
        await pilot.press("f3")
        gallery = app.get_screen("gallery")
        await wait_for(pilot, lambda: gallery.query_one("DataTable").row_count == 2, 5)  # no mask listed


async def test_outpaint_margins_reach_the_request_and_bad_ones_are_refused(tmp_path):
    src = source_image(tmp_path / "outputs" / "photo.png")
    app = make_app(tmp_path, engine=FAKE_ENGINE)
    async with app.run_test(size=SIZE) as pilot:
        await open_edit(app, pilot, src)
        edit = app._edit
        await pilot.press("f9")  # the next mode: outpaint
        assert edit.mode is EditMode.OUTPAINT
        edit.query_one("#margin_left", Input).value = "5000"
        await pilot.press("ctrl+g")
        assert not app.jobs.jobs and "left margin 5000 is out of range" in edit.error_text()
        edit.query_one("#margin_left", Input).value = "32"
        edit.query_one("#margin_bottom", Input).value = "16"
        await pilot.press("ctrl+g")
        await wait_for(pilot, lambda: app.jobs.jobs and app.jobs.jobs[0].finished, 30)
        job = app.jobs.jobs[0]
        assert job.state is JobState.DONE, job.error
        assert (job.request["outpaint"], job.request["init_image"]) == ("32,0,0,16", str(src))
        with Image.open(job.paths[0]) as result:
            assert result.size == (W + 32, H + 16)
        # reuse restores the outpaint: mode, source and each margin
        edit.query_one("#mode", Select).value = EditMode.KONTEXT.value
        for side in ("left", "bottom"):
            edit.query_one(f"#margin_{side}", Input).value = "0"
        await pilot.press("f3")
        gallery = app.get_screen("gallery")
        await wait_for(pilot, lambda: gallery.selected() == job.paths[0], 5)
        await pilot.press("u")
        await wait_for(pilot, lambda: app.screen is edit and edit.mode is EditMode.OUTPAINT, 5)
        margins = [
            edit.query_one(f"#margin_{side}", Input).value for side in ("left", "top", "right", "bottom")
        ]
        assert margins == ["32", "0", "0", "16"] and edit.source == str(src)


async def test_kontext_chain_makes_the_result_the_next_source(tmp_path):
    src = source_image(tmp_path / "outputs" / "photo.png")
    app = make_app(tmp_path, engine=FAKE_ENGINE)
    async with app.run_test(size=SIZE) as pilot:
        await open_edit(app, pilot, src)
        edit = app._edit
        edit.query_one("#mode", Select).value = EditMode.KONTEXT.value
        await pilot.pause()
        edit.query_one("#chain", Checkbox).value = True
        edit.query_one("#edit_prompt", TextArea).text = "make it night"
        await pilot.press("ctrl+g")
        await wait_for(pilot, lambda: app.jobs.jobs and app.jobs.jobs[0].finished, 30)
        first = app.jobs.jobs[0]
        assert first.request["references"] == [str(src)] and first.request["prompt"] == "make it night"
        await wait_for(pilot, lambda: edit.source == first.paths[0], 5)
        await pilot.press("ctrl+g")
        await wait_for(pilot, lambda: len(app.jobs.jobs) == 2 and app.jobs.jobs[1].finished, 30)
        assert app.jobs.jobs[1].request["references"] == [first.paths[0]]


async def test_control_preview_is_the_engines_canny(tmp_path):
    from engine.generation.control_preprocess import canny

    src = source_image(tmp_path / "photo.png")
    app = make_app(tmp_path, start_engine=False)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("f8")
        edit = app._edit
        edit.query_one("#source", Input).value = str(src)
        edit.query_one("#source", Input).focus()
        await pilot.press("enter")
        edit.query_one("#mode", Select).value = EditMode.CONTROL.value
        edit.query_one("#preprocess", Select).value = "canny"
        await wait_for(pilot, lambda: edit.preview is not None, 10)
        with Image.open(src) as image:
            engine_map = canny(image, W, H)
        assert edit.preview.tobytes() == engine_map.tobytes() and engine_map.getextrema() != ((0, 0),) * 3


async def test_reuse_restores_an_inpaint_edit_with_its_mask(tmp_path):
    src = source_image(tmp_path / "outputs" / "photo.png")
    app = make_app(tmp_path, engine=FAKE_ENGINE)
    async with app.run_test(size=SIZE) as pilot:
        await open_edit(app, pilot, src)
        edit = app._edit
        canvas = edit.query_one(MaskCanvas)
        canvas.painter.rectangle((20, 10), (50, 30))
        edit.query_one("#edit_prompt", TextArea).text = "a window"
        edit.query_one("#edit_seed", Input).value = "99"
        edit.query_one("#edit_denoise", Input).value = "0.75"
        await pilot.press("ctrl+g")
        await wait_for(pilot, lambda: app.jobs.jobs and app.jobs.jobs[0].finished, 30)
        job = app.jobs.jobs[0]
        painted = canvas.painter.image.tobytes()
        # start over: another mode, an empty mask, other fields
        canvas.painter.clear()
        edit.query_one("#mode", Select).value = EditMode.OUTPAINT.value
        edit.query_one("#edit_prompt", TextArea).text = "something else"
        await pilot.press("f3")
        gallery = app.get_screen("gallery")
        await wait_for(pilot, lambda: gallery.query_one("DataTable").row_count == 2, 5)
        assert gallery.selected() == job.paths[0]  # newest first
        await pilot.press("u")
        await wait_for(pilot, lambda: app.screen is edit, 5)
        assert edit.mode is EditMode.INPAINT and edit.source == str(src)
        assert edit.query_one("#edit_prompt", TextArea).text == "a window"
        assert edit.query_one("#edit_seed", Input).value == "99"
        assert edit.query_one("#edit_denoise", Input).value == "0.75"
        assert canvas.painter.image.tobytes() == painted


# -- the ControlNet panel ----------------------------------------------------------------------------------
def controlnet_files(models: Path) -> tuple[Path, Path]:
    folder = models / "controlnet"
    folder.mkdir(parents=True, exist_ok=True)
    union, xlabs = folder / "union-pro2.safetensors", folder / "xlabs-canny.safetensors"
    union.write_bytes(b"net")
    xlabs.write_bytes(b"net")
    return union, xlabs


async def test_controlnet_panel_values_reach_the_request_and_metadata_and_reuse_restores_them(tmp_path):
    from engine.generation.control_preprocess import canny
    from launcher.screens.controlnets import ControlNetScreen

    union, xlabs = controlnet_files(tmp_path / "models")
    photo = source_image(tmp_path / "photo.png")
    depth = source_image(tmp_path / "depth.png")
    app = make_app(tmp_path, engine=FAKE_ENGINE)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("ctrl+t")
        panel = app.screen
        assert isinstance(panel, ControlNetScreen) and [r[1] for r in panel.rows] == [
            "union-pro2",
            "xlabs-canny",
        ]
        await pilot.press("space")  # the first row on
        panel.query_one("#image-0", Input).value = str(photo)
        panel.query_one("#pre-0", Select).value = "canny"
        panel.query_one("#mode-0", Select).value = "depth"
        await wait_for(pilot, lambda: panel.preview is not None, 10)  # the engine's Canny, shown in the panel
        with Image.open(photo) as image:
            assert panel.preview.tobytes() == canny(image, W, H).tobytes()
        # every number is checked for range and finiteness, one sentence, and the panel stays open
        for field, text, words in (
            ("strength", "nan", "finite"),
            ("strength", "11", "out of range"),
            ("start", "-0.1", "out of range"),
            ("end", "inf", "finite"),
        ):
            panel.query_one(f"#{field}-0", Input).value = text
            await pilot.press("escape")
            assert app.screen is panel and words in panel.error_text(), (field, text, panel.error_text())
            panel.query_one(f"#{field}-0", Input).value = {"strength": "0.7", "start": "0.1", "end": "0.8"}[
                field
            ]
        panel.query_one("#start-0", Input).value = "0.9"
        await pilot.press("escape")
        assert app.screen is panel and "is not before end" in panel.error_text()
        panel.query_one("#start-0", Input).value = "0.1"
        # a second net, stacked, its image already a map
        panel.query_one("#on-1", Checkbox).value = True
        panel.query_one("#image-1", Input).value = str(depth)
        panel.query_one("#strength-1", Input).value = "0.4"
        await pilot.press("escape")
        assert app.screen is app.get_screen("generate")
        assert "union-pro2 0.7 depth, xlabs-canny 0.4" in str(
            app._generate.form.query_one("#controlnets").render()
        )
        await pilot.press("ctrl+g")
        await wait_for(pilot, lambda: app.jobs.jobs and app.jobs.jobs[0].finished, 30)
        job = app.jobs.jobs[0]
        assert job.state is JobState.DONE, job.error
        nets = job.request["controlnets"]
        map_path = Path(nets[0]["image"])
        assert nets == [
            {
                "path": str(union),
                "image": str(map_path),
                "strength": 0.7,
                "start": 0.1,
                "end": 0.8,
                "mode": "depth",
                "preprocess": "none",  # the TUI made the Canny map: the engine gets the map
            },
            {
                "path": str(xlabs),
                "image": str(depth),
                "strength": 0.4,
                "start": 0.0,
                "end": 1.0,
                "mode": None,
                "preprocess": "none",
            },
        ]
        # the map is the engine's Canny at the job's size (64x64), written beside the outputs
        assert map_path.parent == tmp_path / "outputs" / "inputs"
        with Image.open(photo) as image, Image.open(map_path) as made:
            assert made.convert("RGB").tobytes() == canny(image, 64, 64).tobytes()
        GenerateRequest.from_dict(job.request).validate()  # the engine takes what the panel built
        request = read_png_params(Path(job.paths[0])).request
        assert request["controlnets"] == nets
        hashes = {
            item["path"]: item["sha256"] for item in request["inputs"] if item["role"] == "controlnet_image"
        }
        assert hashes == {str(p): hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in (map_path, depth)}
        # reuse: everything off and changed, then the image's ControlNets come back, the photo and Canny too
        choices = app._generate.form.controlnet_choices
        for choice in choices.values():
            choice.enabled, choice.strength, choice.image = False, "1", ""
        await pilot.press("f3")
        gallery = app.get_screen("gallery")
        await wait_for(pilot, lambda: gallery.selected() == job.paths[0], 5)
        await pilot.press("u")
        await wait_for(pilot, lambda: choices[str(union)].enabled, 5)
        first, second = choices[str(union)], choices[str(xlabs)]
        assert (first.image, first.preprocess, first.strength, first.start, first.end, first.mode) == (
            str(photo),
            "canny",
            "0.7",
            "0.1",
            "0.8",
            "depth",
        )
        assert (second.enabled, second.image, second.preprocess, second.strength) == (
            True,
            str(depth),
            "none",
            "0.4",
        )


def test_controlnets_read_back_keep_the_engines_preprocessor_and_skip_an_unknown_one(tmp_path):
    """A request's ControlNets (ours, or a command line's) come back with the photo and its preprocessor: depth
    and canny as the request says (the TUI makes the Canny map again, depth is the engine's), a map with none;
    an unknown preprocessor skips the entry, as an unknown mode does."""
    from launcher.controlnets import ControlNetValue, controlnets_in_request

    photo = source_image(tmp_path / "photo.png")
    entry = {"path": "net.safetensors", "image": str(photo), "strength": 0.5}
    request = {
        "controlnets": [
            entry | {"preprocess": "depth"},
            entry | {"preprocess": "Canny"},
            entry,  # written before the key existed: none
            entry | {"preprocess": "sobel"},
            entry | {"preprocess": "depth", "mode": "glow"},
        ]
    }
    found = [(c.image, c.preprocess, c.strength) for _, c in controlnets_in_request(request)]
    assert found == [(str(photo), "depth", "0.5"), (str(photo), "canny", "0.5"), (str(photo), "none", "0.5")]
    # what the request gets: the engine runs depth; a Canny map the TUI made goes as a map
    sent = [
        ControlNetValue("n", str(photo), preprocess=p).engine_preprocess for p in ("none", "canny", "depth")
    ]
    assert sent == ["none", "none", "depth"]


# -- the model family ------------------------------------------------------------------------------------
def test_the_tui_reads_the_family_the_engine_reads_from_tiny_real_files(tmp_path):
    """Tiny random transformers in the real layouts (FLUX.1 [dev] and [schnell], FLUX.2 [klein], an all-in-one
    checkpoint's prefix): the TUI's header read and the engine's own detection agree on each."""
    from safetensors.torch import save_file

    from engine.contract import families
    from engine.fixtures import SCHNELL as TINY_SCHNELL
    from engine.fixtures import TinySpec, flux_state
    from engine.fixtures_flux2 import Flux2Spec, flux2_state
    from engine.formats.model_files import family_of
    from engine.formats.weights import component_from
    from engine.models import flux2
    from launcher.models import DEV, KLEIN, SCHNELL, family_for_file

    assert flux2.is_flux2 is families.is_flux2  # one detection, imported by both sides
    files = {
        "dev": (flux_state(TinySpec()), "FLUX.1 [dev]", DEV, "flux1"),
        "schnell": (flux_state(TINY_SCHNELL), "FLUX.1 [schnell]", SCHNELL, "flux1"),
        "klein": (flux2_state(Flux2Spec()), "FLUX.2 [klein]", KLEIN, "flux2"),
    }
    for name, (state, shown, defaults, engine_family) in files.items():
        path = tmp_path / f"model-{name}.safetensors"  # names that say nothing: the tensors decide
        save_file({k: v.contiguous() for k, v in state.items()}, path)
        family = family_for_file(path)
        assert (family.name, family.defaults, family.known) == (shown, defaults, True)
        assert family_of(component_from(str(path), "transformer", "--transformer")) == engine_family
    prefixed = tmp_path / "checkpoint.safetensors"
    save_file({f"model.diffusion_model.{k}": v.contiguous() for k, v in files["klein"][0].items()}, prefixed)
    assert family_for_file(prefixed).name == "FLUX.2 [klein]"
    gguf = tmp_path / "flux-2-klein-4b-Q4_K_M.gguf"  # no safetensors header: by the name, and it says so
    gguf.write_bytes(b"GGUF")
    assert family_for_file(gguf).name == "FLUX.2 [klein]" and "guessed" in family_for_file(gguf).describe()


async def test_choosing_a_klein_file_shows_its_family_and_applies_its_defaults(tmp_path):
    from tests.test_launcher_loras import header_only

    klein = header_only(
        tmp_path / "models" / "diffusion_models" / "k.safetensors", ["single_stream_modulation.lin.weight"]
    )
    dev = header_only(
        tmp_path / "models" / "diffusion_models" / "d.safetensors", ["guidance_in.in_layer.weight"]
    )
    app = make_app(tmp_path, start_engine=False)
    async with app.run_test(size=SIZE) as pilot:
        form = app._generate.form
        form.query_one("#model", Select).value = str(klein)
        await pilot.pause()
        assert "FLUX.2 [klein]: 4 steps" in str(form.query_one("#family").render())
        assert form.query_one("#steps", Input).value == "4"
        form.query_one("#model", Select).value = str(dev)
        await pilot.pause()
        assert "FLUX.1 [dev]: 28 steps, guidance 3.5" in str(form.query_one("#family").render())
        assert (form.query_one("#steps", Input).value, form.query_one("#guidance", Input).value) == (
            "28",
            "3.5",
        )
        await pilot.press("f8")
        edit = app._edit
        edit.query_one("#edit_model", Select).value = str(klein)
        await pilot.pause()
        assert "FLUX.2 [klein]" in str(edit.query_one("#family").render())
        assert edit.query_one("#edit_steps", Input).value == "4"


def test_the_engine_records_every_input_image_by_name_and_sha256(tmp_path):
    from engine.contract.request import ControlNetSpec, ReduxSpec
    from engine.generation.png_output import input_records

    src, mask, ref, net_image, style = (
        source_image(tmp_path / f"{n}.png") for n in ("src", "mask", "ref", "map", "style")
    )
    mask.write_bytes(mask.read_bytes() + b"-")  # another file, another hash
    request = GenerateRequest(
        prompt="p",
        out=str(tmp_path / "o.png"),
        init_image=str(src),
        mask=str(mask),
        references=[str(ref)],
        controlnets=[
            ControlNetSpec("net.safetensors", str(net_image)),
            ControlNetSpec("n2", str(tmp_path / "gone.png")),
        ],
        redux_images=[ReduxSpec(str(style), 0.5)],
    )
    records = input_records(request)
    digest = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in (src, mask, ref, net_image, style)}
    assert records == [
        {"role": "init_image", "name": "src.png", "path": str(src), "sha256": digest[src]},
        {"role": "mask", "name": "mask.png", "path": str(mask), "sha256": digest[mask]},
        {"role": "reference", "name": "ref.png", "path": str(ref), "sha256": digest[ref]},
        {"role": "controlnet_image", "name": "map.png", "path": str(net_image), "sha256": digest[net_image]},
        {
            "role": "controlnet_image",
            "name": "gone.png",
            "path": str(tmp_path / "gone.png"),
        },  # unreadable: no hash
        {"role": "redux_image", "name": "style.png", "path": str(style), "sha256": digest[style]},
    ]
    # the PNG's record reads back as the same request (the inputs are not a request field)
    again = GenerateRequest.from_dict(request.to_dict() | {"inputs": records, "batch_index": 0})
    assert again == request


async def test_an_engine_crash_during_an_edit_leaves_the_ui_standing(tmp_path):
    src = source_image(tmp_path / "outputs" / "photo.png")
    app = make_app(tmp_path, engine=FAKE_ENGINE)
    async with app.run_test(size=SIZE) as pilot:
        await open_edit(app, pilot, src)
        edit = app._edit
        edit.query_one(MaskCanvas).painter.rectangle((0, 0), (10, 10))
        edit.query_one("#edit_prompt", TextArea).text = "crash"  # the fake engine exits with 137
        await pilot.press("ctrl+g")
        await wait_for(pilot, lambda: app.jobs.jobs and app.jobs.jobs[0].finished, 30)
        assert app.jobs.jobs[0].state is JobState.FAILED and "signal 9" in app.jobs.jobs[0].error
        assert app.is_running and app.screen is edit
        edit.query_one("#edit_prompt", TextArea).text = "a door"  # the next edit restarts the engine
        await pilot.press("ctrl+g")
        await wait_for(pilot, lambda: len(app.jobs.jobs) == 2 and app.jobs.jobs[1].finished, 30)
        assert app.jobs.jobs[1].state is JobState.DONE, app.jobs.jobs[1].error


def test_an_edit_read_from_a_hostile_png_is_checked_not_trusted():
    assert edit_from_request({"init_image": 5, "mask": ["x"]}) is None
    assert edit_from_request({"init_image": "a.png", "outpaint": "1,2,3"}) is None
    assert edit_from_request({"init_image": "a.png", "outpaint": "1,2,3,99999"}) is None
    assert edit_from_request({"init_image": "a.png", "outpaint": "1," * 10**6}) is None
    kontext = edit_from_request({"references": [1, None, "", "a\x1b[31m.png", "b.png"]})
    assert (kontext.mode, kontext.source, kontext.references) == (EditMode.KONTEXT, "a[31m.png", ["b.png"])
    control = edit_from_request({"control_image": "c.png", "control_preprocess": "rm -rf"})
    assert (control.mode, control.preprocess) == (EditMode.CONTROL, "none")
    from launcher.edits import recorded_inputs

    assert recorded_inputs(
        {"inputs": [{"path": "a.png", "sha256": 3}, "x", {"path": "b.png", "sha256": "ab"}]}
    ) == {"b.png": "ab"}
    assert recorded_inputs({"inputs": "nope"}) == {} and recorded_inputs(None) == {}
