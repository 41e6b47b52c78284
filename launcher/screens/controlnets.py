"""The ControlNet panel: every file in `<models>/controlnet/`, each on or off with its control image,
preprocessor (none, canny, depth; canny and none previewed in the terminal), strength, start/end range and Union
mode (keyboard only).

Like the LoRA panel it edits the form's choices in place, so they last for the session. Enter in an image field
(or a change of preprocessor) previews that row's control map as the engine will get it; a depth map is the
engine's to compute (the TUI never loads torch), so for depth the panel says so instead of a preview.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from PIL import Image
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.content import Content
from textual.message import Message
from textual.screen import ModalScreen
from textual.widgets import Checkbox, Footer, Input, Label, Select

from launcher.controlnets import (
    ENGINE_MADE,
    MODES,
    PREPROCESSORS,
    ControlNetChoice,
    ControlNetFile,
    check_choice,
    control_map,
    label,
)
from launcher.keymap import KEYS
from launcher.limits import FormError
from launcher.metadata import plain_text
from launcher.models import human_size
from launcher.screens.loras import LoraList
from launcher.widgets.image_pane import ImagePane


@dataclass
class MapPreview(Message):
    """A row's control map, computed off the UI thread (or why it could not be)."""

    row: int
    preprocess: str
    image: Image.Image | None
    error: str | None = None


class ControlNetScreen(ModalScreen[None]):
    BINDINGS = [
        Binding("escape", "done", "Done"),
        KEYS.binding("controlnets", "done", "Done", show=False),
        Binding("ctrl+n", "all_off", "All off"),
    ]
    DEFAULT_CSS = """
    ControlNetScreen { align: center middle; }
    ControlNetScreen > Vertical {
        width: 120; max-width: 100%; height: auto; max-height: 95%;
        padding: 0 1; border: thick $primary; background: $surface;
    }
    ControlNetScreen .help { color: $text-muted; width: 100%; }
    ControlNetScreen LoraList { height: auto; max-height: 16; }
    ControlNetScreen .cn-row { height: 1; }
    ControlNetScreen .cn-row > Checkbox { width: 1fr; }
    ControlNetScreen .cn-row > .detail { width: 24; padding: 0 1; color: $text-muted; }
    ControlNetScreen .cn-row > .gap { width: auto; padding: 0 1; color: $text-muted; }
    ControlNetScreen .cn-row > Input { background: $boost; }
    ControlNetScreen .cn-row > .image { width: 1fr; }
    ControlNetScreen .cn-row > .number { width: 7; }
    ControlNetScreen .cn-row > Select { width: 14; }
    ControlNetScreen .cn-gap { height: 1; }
    ControlNetScreen #cn-preview { height: 12; }
    ControlNetScreen #cn-error { color: $error; height: auto; }
    """

    def __init__(
        self,
        files: list[ControlNetFile],
        choices: dict[str, ControlNetChoice],
        folders: list[Path],
        renderer: str = "auto",
        on_change: Callable[[], None] = lambda: None,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.choices = choices
        self.folders = folders
        self.on_change = on_change
        self._renderer = renderer
        listed = {str(f.path) for f in files}
        extra = [p for p, c in choices.items() if c.enabled and p not in listed and Path(p).is_file()]
        self.rows: list[tuple[str, str, str]] = [
            (str(f.path), f.name, f"{human_size(f.size)} · {f.path.parent.name}") for f in files
        ]
        self.rows += [(p, label(p), "from an image") for p in extra]
        for path, _, _ in self.rows:
            choices.setdefault(path, ControlNetChoice())
        self.preview: Image.Image | None = None  # the last map shown
        self.preview_row: int | None = None

    def compose(self) -> ComposeResult:
        modes = [("no mode", "")] + [(f"mode {m}", m) for m in MODES[1:]]
        preprocessors = [(p, p) for p in PREPROCESSORS]
        with Vertical():
            where = ", ".join(str(f) for f in self.folders) or "<models>/controlnet (not there yet)"
            yield Label(f"ControlNets in {where}", markup=False)
            yield Label(
                "space: on/off · tab: image, preprocessor, strength (0-10), start/end (0-1), Union mode · "
                "enter in the image: preview · up/down: next ControlNet · escape: done",
                classes="help",
                markup=False,
            )
            yield Label(
                "The image is a control map, or a photo with canny or depth; depth is computed by the engine when the "
                "job runs (no preview here; Depth Anything V2 in models/depth/).",
                id="cn-depth-note",
                classes="help",
                markup=False,
            )
            if not self.rows:
                yield Label(
                    "No ControlNet files found: put them in the models folder's controlnet folder.",
                    markup=False,
                )
            with LoraList():
                for i, (path, name, detail) in enumerate(self.rows):
                    c = self.choices[path]
                    with Horizontal(classes="cn-row"):
                        yield Checkbox(Content(name), c.enabled, id=f"on-{i}", compact=True)
                        yield Label(detail, classes="detail", markup=False)
                        yield Select(modes, value=c.mode, allow_blank=False, id=f"mode-{i}", compact=True)
                    with Horizontal(classes="cn-row"):
                        yield Label("image", classes="gap")
                        yield Input(
                            c.image,
                            id=f"image-{i}",
                            classes="image",
                            placeholder="control image",
                            compact=True,
                        )
                        yield Select(
                            preprocessors, value=c.preprocess, allow_blank=False, id=f"pre-{i}", compact=True
                        )
                        yield Label("strength", classes="gap")
                        yield Input(c.strength, id=f"strength-{i}", classes="number", compact=True)
                        yield Label("from", classes="gap")
                        yield Input(c.start, id=f"start-{i}", classes="number", compact=True)
                        yield Label("to", classes="gap")
                        yield Input(c.end, id=f"end-{i}", classes="number", compact=True)
                    yield Label("", classes="cn-gap")
            yield ImagePane(self._renderer, id="cn-preview")
            yield Label("", id="cn-error", markup=False)
        yield Footer()

    def on_mount(self) -> None:
        if self.rows:
            self.query_one("#on-0", Checkbox).focus()

    def _row(self, widget_id: str | None) -> int:
        return int(str(widget_id).rpartition("-")[2])

    def _choice(self, widget_id: str | None) -> ControlNetChoice:
        return self.choices[self.rows[self._row(widget_id)][0]]

    @on(Checkbox.Changed)
    def _toggled(self, event: Checkbox.Changed) -> None:
        self._choice(event.checkbox.id).enabled = event.value
        self._check()

    @on(Input.Changed)
    def _typed(self, event: Input.Changed) -> None:
        kind = str(event.input.id).partition("-")[0]
        setattr(self._choice(event.input.id), kind, event.value)
        self._check()

    @on(Select.Changed)
    def _selected(self, event: Select.Changed) -> None:
        kind = str(event.select.id).partition("-")[0]
        choice = self._choice(event.select.id)
        if kind == "mode":
            choice.mode = str(event.value)
        else:
            choice.preprocess = str(event.value)
            self._preview(self._row(event.select.id))
        self._check()

    @on(Input.Submitted)
    def _submitted(self, event: Input.Submitted) -> None:
        if str(event.input.id).startswith("image-"):
            self._preview(self._row(event.input.id))
        else:
            self.action_done()

    # -- preview -----------------------------------------------------------------------------------------
    def _preview(self, row: int) -> None:
        choice = self.choices[self.rows[row][0]]
        image = choice.image.strip().strip('"')
        if not image:
            return
        pane = self.query_one("#cn-preview", ImagePane)
        if choice.preprocess in ENGINE_MADE:
            self.preview, self.preview_row = None, row
            pane.show(
                None,
                f"{self.rows[row][1]}: the {choice.preprocess} map is computed by the engine when the job runs",
            )
            return
        pane.show(None, "computing the control map…")
        self._compute(row, str(Path(image).expanduser()), choice.preprocess)

    @work(thread=True, exclusive=True, group="cn-preview")
    def _compute(self, row: int, image: str, preprocess: str) -> None:
        try:
            made = control_map(image, preprocess)
        except Exception as error:  # noqa: BLE001 - an unreadable file, OpenCV missing: said, not raised
            self.post_message(MapPreview(row, preprocess, None, plain_text(str(error), 300)))
            return
        self.post_message(MapPreview(row, preprocess, made))

    @on(MapPreview)
    def _previewed(self, message: MapPreview) -> None:
        path, name, _ = self.rows[message.row]
        choice = self.choices[path]
        if choice.preprocess != message.preprocess:
            return  # the preprocessor changed while this one was computed (to depth: nothing to show)
        pane = self.query_one("#cn-preview", ImagePane)
        if message.image is None:
            pane.show(None, "")
            self.query_one("#cn-error", Label).update(message.error or "The control map could not be made.")
            return
        pane.show(message.image, f"{name}: {choice.preprocess} map of {Path(choice.image).name}")
        self.preview, self.preview_row = message.image, message.row

    # -- checking ----------------------------------------------------------------------------------------
    def _problem(self) -> tuple[str, str] | None:
        """The first enabled ControlNet with a field that does not pass: (the field's id, one sentence)."""
        for i, (path, _, _) in enumerate(self.rows):
            choice = self.choices[path]
            if not choice.enabled:
                continue
            try:
                check_choice(path, choice)
            except FormError as error:
                text = str(error)
                field = next(
                    (k for k in ("strength", "start", "end") if k.capitalize() in text or f"{k} " in text),
                    "image",
                )
                return f"{field}-{i}", text
        return None

    def _check(self) -> tuple[str, str] | None:
        self.on_change()
        problem = self._problem()
        self.query_one("#cn-error", Label).update(problem[1] if problem else "")
        return problem

    def error_text(self) -> str:
        return str(self.query_one("#cn-error", Label).render())

    def action_all_off(self) -> None:
        for checkbox in self.query(Checkbox):
            checkbox.value = False

    def action_done(self) -> None:
        problem = self._check()
        if problem is not None:
            self.query_one(f"#{problem[0]}").focus()
            return
        self.dismiss(None)
