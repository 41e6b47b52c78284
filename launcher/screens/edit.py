"""The Edit screen: one image edited as Inpaint (a painted mask), Outpaint (margins), Kontext (an instruction),
Control (a control image, optionally through Canny or depth) or Redux (the image, and more, as an image prompt,
each with a strength). ctrl+g sends it (the app asks `submit`) with the LoRAs and ControlNets chosen in their
panels; results land in the gallery like every other image, and the last one shows here; a job the engine
refuses shows its sentence under the form.

Reached from the gallery (e: the selected image), by F8, or by typing a path into Source and pressing enter.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from PIL import Image
from textual import on, work
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.message import Message
from textual.reactive import var
from textual.screen import Screen
from textual.widgets import Checkbox, Footer, Input, Label, Select, Static, TextArea

from launcher.controlnets import control_map
from launcher.controlnets import summary as controlnet_summary
from launcher.edits import (
    DEPTH_NOTE,
    MODE_HELP,
    PREPROCESSORS,
    PREVIEWED,
    SIDES,
    EditError,
    EditMode,
    EditValues,
    check_margins,
    check_redux_strength,
    image_size,
    parse_redux_images,
)
from launcher.form import AUTO_MODEL, FormValues, output_path
from launcher.keymap import KEYS
from launcher.limits import RANGES, FormError, parse_number
from launcher.loras import summary as lora_summary
from launcher.messages import JobFinished
from launcher.metadata import UnreadableImage, load_picture, plain_text
from launcher.models import InstalledFile, family_for_file
from launcher.seeds import SeedMode
from launcher.sizes import MULTIPLE as SIZE_MULTIPLE
from launcher.widgets.image_pane import ImagePane
from launcher.widgets.mask_canvas import MaskCanvas

MODE_NAMES = {
    EditMode.INPAINT: "Inpaint",
    EditMode.OUTPAINT: "Outpaint",
    EditMode.KONTEXT: "Kontext",
    EditMode.CONTROL: "Control",
    EditMode.REDUX: "Redux",
}


@dataclass
class PreviewReady(Message):
    """A control map computed off the UI thread (or why it could not be)."""

    source: str
    preprocess: str
    image: Image.Image | None
    error: str | None = None


class EditScreen(Screen):
    BINDINGS = [
        KEYS.binding("edit_mode", "next_mode", "Mode"),
        KEYS.binding("loras", "loras", "LoRAs"),
        KEYS.binding("controlnets", "controlnets", "ControlNets"),
    ]
    DEFAULT_CSS = """
    EditScreen #edit-form { width: 64; min-width: 48; border-right: tall $panel; padding: 0 1; }
    EditScreen #edit_prompt { height: 4; margin-bottom: 1; }
    EditScreen .row { height: 1; margin-bottom: 1; }
    EditScreen .row > Label { width: 12; color: $text-muted; }
    EditScreen .row > .gap { width: auto; padding: 0 1; color: $text-muted; }
    EditScreen .row > Input, EditScreen .row > Select { width: 1fr; background: $boost; }
    EditScreen .row > .short { width: 8; }
    EditScreen .row > Checkbox { width: auto; }
    EditScreen .title, EditScreen .help { color: $text-muted; }
    EditScreen .help { width: 100%; }
    EditScreen .box { height: auto; }
    EditScreen #edit-error { color: $error; height: auto; }
    EditScreen #right { width: 1fr; }
    EditScreen #canvas-caption { height: 1; color: $text-muted; text-align: center; }
    """

    models: var[list[InstalledFile]] = var(list, init=False)

    def __init__(
        self,
        models: list[InstalledFile],
        renderer: str,
        key_for: Callable[[str], str] = KEYS.key_for,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.set_reactive(EditScreen.models, models)
        self._renderer = renderer
        self._key_for = key_for
        self.source: str = ""  # the image loaded (its path)
        self.source_size: tuple[int, int] | None = None
        self.preview: Image.Image | None = None  # the last control map shown
        self._pending: Callable[[], object] | None = None  # asked before the screen was first shown

    # -- layout ------------------------------------------------------------------------------------------
    def compose(self) -> ComposeResult:
        modes = [(MODE_NAMES[m], m.value) for m in EditMode]
        with Horizontal():
            with VerticalScroll(id="edit-form"):
                with Horizontal(classes="row"):
                    yield Label("Source")
                    yield Input(id="source", placeholder="an image path, then enter", compact=True)
                with Horizontal(classes="row"):
                    yield Label("Mode")
                    yield Select(
                        modes, value=EditMode.INPAINT.value, allow_blank=False, id="mode", compact=True
                    )
                yield Label(MODE_HELP[EditMode.INPAINT], id="mode-help", classes="help", markup=False)
                yield Label("Prompt", id="prompt-title", classes="title")
                yield TextArea(
                    "", id="edit_prompt", soft_wrap=True, show_line_numbers=False, tab_behavior="focus"
                )
                with Horizontal(classes="row"):
                    yield Label("Model")
                    yield Select(
                        self._model_options(),
                        value=AUTO_MODEL,
                        allow_blank=False,
                        id="edit_model",
                        compact=True,
                    )
                yield Label("", id="family", classes="help", markup=False)
                with Horizontal(classes="row"):
                    yield Label("Steps")
                    yield Input("28", id="edit_steps", type="integer", classes="short", compact=True)
                    yield Label("Guidance", classes="gap")
                    yield Input("", id="edit_guidance", placeholder="model's", compact=True)
                with Horizontal(classes="row"):
                    yield Label("Seed")
                    yield Input("0", id="edit_seed", type="integer", compact=True)
                yield Label("", id="edit-loras", classes="help", markup=False)
                yield Label("", id="edit-controlnets", classes="help", markup=False)
                with Vertical(id="inpaint-box", classes="box"):
                    with Horizontal(classes="row"):
                        yield Label("Denoise")
                        yield Input("1", id="edit_denoise", type="number", classes="short", compact=True)
                        yield Label("(1 with a Fill model)", classes="gap")
                    with Horizontal(classes="row"):
                        yield Label("Mask file")
                        yield Input(
                            id="mask_file", placeholder="load a mask PNG: path, then enter", compact=True
                        )
                    yield Label(
                        "On the picture: arrows move, space paints, x paint/erase, + - brush, r rectangle "
                        "(twice), i invert, c clear; mouse: left paints, right erases.",
                        classes="help",
                        markup=False,
                    )
                with Vertical(id="outpaint-box", classes="box"):
                    with Horizontal(classes="row"):
                        for side in SIDES:
                            yield Label(side.capitalize(), classes="gap")
                            yield Input(
                                "0", id=f"margin_{side}", type="integer", classes="short", compact=True
                            )
                with Vertical(id="kontext-box", classes="box"):
                    with Horizontal(classes="row"):
                        yield Checkbox(
                            "chain: the result becomes the next source", False, id="chain", compact=True
                        )
                    with Horizontal(classes="row"):
                        yield Label("More refs")
                        yield Input(
                            id="more_refs", placeholder="other reference images, separated by ;", compact=True
                        )
                with Vertical(id="control-box", classes="box"):
                    with Horizontal(classes="row"):
                        yield Label("Preprocess")
                        options = [(p, p) for p in PREPROCESSORS]
                        yield Select(options, value="none", allow_blank=False, id="preprocess", compact=True)
                    yield Label(
                        "canny is previewed here; " + DEPTH_NOTE + " (Depth Anything V2 in models/depth/)",
                        classes="help",
                        markup=False,
                    )
                with Vertical(id="redux-box", classes="box"):
                    with Horizontal(classes="row"):
                        yield Label("Strength")
                        yield Input("1", id="redux_strength", type="number", classes="short", compact=True)
                        yield Label("of the source (0-10, 1 as trained)", classes="gap")
                    with Horizontal(classes="row"):
                        yield Label("More images")
                        yield Input(
                            id="redux_more",
                            placeholder="IMG[:STRENGTH]; IMG[:STRENGTH] ...",
                            compact=True,
                        )
                    with Horizontal(classes="row"):
                        yield Label("Width")
                        yield Input("1024", id="redux_width", type="integer", classes="short", compact=True)
                        yield Label("Height", classes="gap")
                        yield Input("1024", id="redux_height", type="integer", classes="short", compact=True)
                    yield Label(
                        "The prompt may be empty. Needs models/style_models/ (flux1-redux-dev) and "
                        "models/clip_vision/ (sigclip_vision_patch14_384).",
                        classes="help",
                        markup=False,
                    )
                yield Label("", id="edit-error", markup=False)
            with Vertical(id="right"):
                yield MaskCanvas(id="canvas")
                yield Static("", id="canvas-caption", markup=False)
                yield ImagePane(self._renderer, id="edit-image")
        yield Footer()

    def on_mount(self) -> None:
        self._show_mode()
        self._show_loras()
        if self._pending is not None:
            pending, self._pending = self._pending, None
            self.call_after_refresh(pending)

    def on_screen_resume(self) -> None:
        self._show_loras()  # the LoRA or ControlNet panel may have changed them

    def _show_loras(self) -> None:
        """The LoRAs and ControlNets chosen on the generate screen's panels, which edits use too."""
        try:
            form = self.app.get_screen("generate").form  # type: ignore[attr-defined]
            loras, nets = form.lora_choices, form.controlnet_choices
        except Exception:  # noqa: BLE001 - a screen used on its own (tests): no LoRAs to show
            loras, nets = {}, {}
        self.query_one("#edit-loras", Label).update(
            f"LoRAs: {lora_summary(loras)} · {self._key_for('loras')}: choose (e.g. a Canny/Depth LoRA for Control)"
        )
        self.query_one("#edit-controlnets", Label).update(
            f"ControlNets: {controlnet_summary(nets)} · {self._key_for('controlnets')}: choose"
        )

    # -- models ------------------------------------------------------------------------------------------
    def _model_options(self) -> list[tuple[str, str]]:
        options = [("auto: the model in the models folder", AUTO_MODEL)]
        options += [(f"{m.path.name} ({m.folder})", str(m.path)) for m in self.models if m.is_model]
        return options

    def watch_models(self) -> None:
        if not self.is_mounted:
            return
        select = self.query_one("#edit_model", Select)
        current = str(select.value)
        with self.prevent(Select.Changed):
            select.set_options(self._model_options())
            known = {value for _, value in self._model_options()}
            select.value = current if current in known else AUTO_MODEL

    @on(Select.Changed, "#edit_model")
    def _model_changed(self, event: Select.Changed) -> None:
        self._show_family(str(event.value), apply=True)

    def _show_family(self, model: str, apply: bool) -> None:
        family = family_for_file(model) if model != AUTO_MODEL else None
        label = self.query_one("#family", Label)
        if family is None:
            label.update("family: read by the engine from the models folder")
            return
        label.update(family.describe())
        if apply:
            self.query_one("#edit_steps", Input).value = str(family.defaults.steps)

    # -- modes -------------------------------------------------------------------------------------------
    @property
    def mode(self) -> EditMode:
        return EditMode(self.query_one("#mode", Select).value)

    def action_next_mode(self) -> None:
        modes = list(EditMode)
        self.query_one("#mode", Select).value = modes[(modes.index(self.mode) + 1) % len(modes)].value

    @on(Select.Changed, "#mode")
    def _mode_changed(self) -> None:
        self._show_mode()

    def _show_mode(self) -> None:
        mode = self.mode
        self.query_one("#mode-help", Label).update(MODE_HELP[mode])
        self.query_one("#prompt-title", Label).update(
            "Instruction (what to change)" if mode is EditMode.KONTEXT else "Prompt"
        )
        for name, box_mode in (
            ("inpaint", EditMode.INPAINT),
            ("outpaint", EditMode.OUTPAINT),
            ("kontext", EditMode.KONTEXT),
            ("control", EditMode.CONTROL),
            ("redux", EditMode.REDUX),
        ):
            self.query_one(f"#{name}-box").display = mode is box_mode
        painting = mode is EditMode.INPAINT
        self.query_one(MaskCanvas).display = painting
        self.query_one("#canvas-caption").display = painting
        self.query_one("#edit-image").display = not painting
        self._refresh_picture()

    def _refresh_picture(self) -> None:
        if not self.source or self.mode is EditMode.INPAINT:
            return
        preprocess = str(self.query_one("#preprocess", Select).value)
        caption = Path(self.source).name
        if self.mode is EditMode.CONTROL and preprocess in PREVIEWED and preprocess != "none":
            self.query_one("#edit-image", ImagePane).show(None, "computing the control map…")
            self._compute_preview(self.source, preprocess)
            return
        if self.mode is EditMode.CONTROL and preprocess not in PREVIEWED:
            caption = f"{caption} · {DEPTH_NOTE}"  # the photo itself, and why there is no map
            self.preview = None
        try:
            self.query_one("#edit-image", ImagePane).show(load_picture(Path(self.source)), caption)
        except UnreadableImage as error:
            self._error(str(error))

    @on(Select.Changed, "#preprocess")
    def _preprocess_changed(self) -> None:
        self._refresh_picture()

    @work(thread=True, exclusive=True, group="preview")
    def _compute_preview(self, source: str, preprocess: str) -> None:
        try:
            image = control_map(source, preprocess)
        except Exception as error:  # noqa: BLE001 - OpenCV missing (a UserError), an unreadable file: said, not raised
            self.post_message(PreviewReady(source, preprocess, None, plain_text(str(error), 300)))
            return
        self.post_message(PreviewReady(source, preprocess, image))

    @on(PreviewReady)
    def _preview_ready(self, message: PreviewReady) -> None:
        wanted = str(self.query_one("#preprocess", Select).value)
        if message.source != self.source or self.mode is not EditMode.CONTROL or message.preprocess != wanted:
            return  # an older preview: another image, mode or preprocessor since
        pane = self.query_one("#edit-image", ImagePane)
        if message.image is None:
            pane.show(None, "")
            self._error(message.error or "The control map could not be computed.")
        else:
            pane.show(message.image, f"{message.preprocess} preview of {Path(message.source).name}")
            self.preview = message.image

    # -- the source and the mask -------------------------------------------------------------------------
    def open(self, path: str, values: FormValues | None = None) -> bool:
        """Edit this image; `values` (the generate form's) give the prompt, model, steps and seed. False (and
        the reason shown) when the file is not an image we can open."""
        if not self.is_mounted:
            self._pending = lambda: self.open(path, values)
            return True
        self.query_one("#source", Input).value = path
        if values is not None:
            self.query_one("#edit_prompt", TextArea).text = values.prompt
            self._set_model(values.model)
            self.query_one("#edit_steps", Input).value = str(values.steps)
            self.query_one("#edit_seed", Input).value = str(values.seed)
            self.query_one("#redux_width", Input).value = str(values.width)
            self.query_one("#redux_height", Input).value = str(values.height)
        return self._load(path)

    def _set_model(self, model: str) -> None:
        known = {value for _, value in self._model_options()}
        select = self.query_one("#edit_model", Select)
        with self.prevent(Select.Changed):
            select.value = model if model in known else AUTO_MODEL
        self._show_family(str(select.value), apply=False)

    def _load(self, path: str) -> bool:
        path = str(Path(path.strip().strip('"')).expanduser()) if path.strip() else ""
        if not path:
            self._error("Give the path of the image to edit.")
            return False
        try:
            picture = load_picture(Path(path))
        except UnreadableImage as error:
            self._error(str(error))
            return False
        if not Path(path).is_file():
            self._error(f"{path} does not exist: give the path of a PNG or JPEG.")
            return False
        self.source, self.source_size = path, picture.size
        canvas = self.query_one(MaskCanvas)
        canvas.set_image(picture)
        self._error("")
        self._refresh_picture()
        if self.mode is EditMode.INPAINT:
            canvas.focus()  # ready to paint; tab goes on to the fields
        return True

    @on(Input.Submitted, "#source")
    def _source_submitted(self, event: Input.Submitted) -> None:
        self._load(event.value)

    @on(Input.Submitted, "#mask_file")
    def _mask_submitted(self, event: Input.Submitted) -> None:
        self.load_mask(event.value.strip().strip('"'))

    def load_mask(self, path: str) -> bool:
        canvas = self.query_one(MaskCanvas)
        if canvas.painter is None:
            self._error("Open the image first (Source), then its mask.")
            return False
        try:
            note = canvas.painter.load(Path(path).expanduser())
        except UnreadableImage as error:
            self._error(str(error))
            return False
        canvas.set_image(canvas.source, canvas.painter)
        self._error("")
        if note:
            self.notify(note, markup=False)
        return True

    @on(MaskCanvas.Changed)
    def _mask_changed(self, message: MaskCanvas.Changed) -> None:
        canvas = message.canvas
        if canvas.painter is None:
            self.query_one("#canvas-caption", Static).update("no image: type its path into Source")
            return
        tool = "erase" if canvas.erase else "paint"
        corner = " · rectangle: r again at the other corner" if canvas.anchor is not None else ""
        self.query_one("#canvas-caption", Static).update(
            f"mask {100 * canvas.painter.coverage():.0f}% · {tool} · brush {canvas.radius:g} px{corner}"
        )

    def _error(self, text: str) -> None:
        self.query_one("#edit-error", Label).update(text)

    def error_text(self) -> str:
        """What the screen says is wrong ("" when nothing is)."""
        return str(self.query_one("#edit-error", Label).render())

    # -- sending -----------------------------------------------------------------------------------------
    def values(self, inputs_dir: Path) -> FormValues:
        """The edit as FormValues (with `edit` set); FormError/EditError name what to fix. Inpaint writes the
        mask PNG into `inputs_dir` (next to the outputs) for the engine to read."""
        if not self.source or not Path(self.source).is_file():
            raise EditError("Open an image to edit first: type its path into Source and press enter.")
        text = {field.id: field.value for field in self.query(Input) if field.id}
        prompt = self.query_one("#edit_prompt", TextArea).text.strip()
        mode = self.mode

        def number(name: str, field_id: str, label: str) -> float:
            kind, low, high = RANGES[name]
            return parse_number(text[field_id], kind, label, low, high)

        steps, seed = int(number("steps", "edit_steps", "Steps")), int(number("seed", "edit_seed", "Seed"))
        guidance = None
        if text["edit_guidance"].strip():
            guidance = float(number("guidance", "edit_guidance", "Guidance"))
        denoise = float(number("denoise", "edit_denoise", "Denoise")) if mode is EditMode.INPAINT else 1.0
        width, height = 1024, 1024
        if mode is EditMode.REDUX:
            width = int(number("width", "redux_width", "Width"))
            height = int(number("height", "redux_height", "Height"))
            for name, value in (("Width", width), ("Height", height)):
                if value % SIZE_MULTIPLE:
                    raise EditError(
                        f"{name} {value} is not a multiple of {SIZE_MULTIPLE}: "
                        f"try {round(value / SIZE_MULTIPLE) * SIZE_MULTIPLE}."
                    )
        if not prompt and mode is not EditMode.REDUX:  # Redux alone: the images are the prompt
            raise EditError(
                "Write the instruction first." if mode is EditMode.KONTEXT else "Write a prompt first."
            )
        edit = EditValues(mode, self.source)
        if mode is EditMode.INPAINT:
            canvas = self.query_one(MaskCanvas)
            if canvas.painter is None or canvas.painter.coverage() == 0:
                raise EditError(
                    "The mask is empty: paint where to repaint (space, or the mouse), or load a mask."
                )
            out = output_path(inputs_dir, seed)
            edit.mask = str(canvas.painter.save(_free(out.with_name(out.stem + "-mask.png"))))
        elif mode is EditMode.OUTPAINT:
            assert self.source_size is not None
            edit.margins = check_margins({side: text[f"margin_{side}"] for side in SIDES}, self.source_size)
        elif mode is EditMode.KONTEXT:
            edit.chain = self.query_one("#chain", Checkbox).value
            for ref in (r.strip().strip('"') for r in text["more_refs"].split(";")):
                if not ref:
                    continue
                image_size(Path(ref).expanduser())  # an image, not too large (UnreadableImage)
                edit.references.append(str(Path(ref).expanduser()))
        elif mode is EditMode.REDUX:
            edit.strength = check_redux_strength(text["redux_strength"], Path(self.source).name)
            edit.redux = parse_redux_images(text["redux_more"])
        else:
            edit.preprocess = str(self.query_one("#preprocess", Select).value)
        return FormValues(
            prompt=prompt,
            model=str(self.query_one("#edit_model", Select).value),
            width=width,
            height=height,
            steps=steps,
            seed=seed,
            seed_mode=SeedMode.FIXED,
            denoise=denoise,
            edit=edit,
            edit_guidance=guidance,
        )

    def submit(self, inputs_dir: Path) -> FormValues | None:
        try:
            values = self.values(inputs_dir)
        except (FormError, EditError, UnreadableImage) as error:
            self._error(str(error))
            self.notify(str(error), severity="error", markup=False)
            return None
        except OSError as error:
            message = f"Could not write the mask to {inputs_dir}: {error.strerror or error}."
            self._error(message)
            self.notify(message, severity="error", markup=False)
            return None
        self._error("")
        return values

    # -- restoring an edit from an image -----------------------------------------------------------------
    def restore(self, values: FormValues, edit: EditValues, mask: str | None, guidance: float | None) -> None:
        """Fill the screen with an edit read back from an image (its inputs already found again)."""
        if not self.is_mounted:
            self._pending = lambda: self.restore(values, edit, mask, guidance)
            return
        self.query_one("#mode", Select).value = edit.mode.value
        self.open(edit.source, values)
        self.query_one("#edit_guidance", Input).value = f"{guidance:g}" if guidance is not None else ""
        self.query_one("#edit_denoise", Input).value = f"{values.denoise:g}"
        for side, margin in zip(SIDES, edit.margins, strict=True):
            self.query_one(f"#margin_{side}", Input).value = str(margin)
        self.query_one("#more_refs", Input).value = "; ".join(edit.references)
        self.query_one("#preprocess", Select).value = edit.preprocess
        self.query_one("#redux_strength", Input).value = f"{edit.strength:g}"
        self.query_one("#redux_more", Input).value = "; ".join(f"{p}:{s:g}" for p, s in edit.redux)
        if mask:
            self.query_one("#mask_file", Input).value = mask
            self.load_mask(mask)
        self._show_mode()

    # -- results -----------------------------------------------------------------------------------------
    @on(JobFinished)
    def _job_finished(self, message: JobFinished) -> None:
        """A result of this screen's source: shown here (Inpaint: named), or, with chain, the next source."""
        job, request = message.job, message.job.request
        references = request.get("references") or []
        redux = [item.get("path") for item in request.get("redux_images") or [] if isinstance(item, dict)]
        sources = (request.get("init_image"), request.get("control_image"), *references[:1], *redux[:1])
        if not self.source or self.source not in sources:
            return  # not an edit of this image (a job from the generate screen, an older source)
        if job.error:
            # the engine's sentence (a Redux, SigLIP or depth file missing...), here as well as in the toast
            self._error(plain_text(job.error, 500))
            return
        if not job.paths:
            return  # cancelled
        result = job.paths[-1]
        if references and self.query_one("#chain", Checkbox).value:
            self._load(result)
            self.query_one("#source", Input).value = result
            self.notify(f"Chained: {Path(result).name} is the next source.", markup=False)
        elif self.mode is EditMode.INPAINT:
            self.notify(
                f"Done: {Path(result).name} is in the gallery ({self._key_for('show_gallery')}).",
                markup=False,
            )
        else:
            self.query_one("#edit-image", ImagePane).show(result, f"result: {Path(result).name}")

    def action_loras(self) -> None:
        """The generate screen's LoRA panel: an edit uses the LoRAs chosen there (a Canny LoRA, a style)."""
        self.app.get_screen("generate").action_loras()  # type: ignore[attr-defined]

    def action_controlnets(self) -> None:
        """The generate screen's ControlNet panel: an edit uses the ControlNets chosen there."""
        self.app.get_screen("generate").action_controlnets()  # type: ignore[attr-defined]


def _free(path: Path) -> Path:
    candidate, n = path, 0
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.stem}-{n}{path.suffix}")
    return candidate
