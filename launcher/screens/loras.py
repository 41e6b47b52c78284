"""The LoRA panel: every LoRA file in the models folders, each on or off with a strength (keyboard only).

It edits the form's choices in place, so they last for the session and ctrl+g uses them even while it is open.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.content import Content
from textual.screen import ModalScreen
from textual.widgets import Checkbox, Footer, Input, Label

from launcher.keymap import KEYS
from launcher.limits import FormError, parse_number
from launcher.loras import STRENGTH_RANGE, LoraChoice, LoraFile, lora_label
from launcher.models import human_size


class LoraList(VerticalScroll):
    """The rows; up/down move between them (in the same column) instead of scrolling."""

    BINDINGS = [
        Binding("up", "move(-1)", "Previous LoRA", show=False),
        Binding("down", "move(1)", "Next LoRA", show=False),
    ]

    def action_move(self, delta: int) -> None:
        focused = self.screen.focused
        if focused is None or not focused.id or "-" not in focused.id:
            return
        kind, _, index = focused.id.partition("-")
        target = int(index) + delta
        matches = self.query(f"#{kind}-{target}")
        if matches:
            matches.first().focus()


class LoraScreen(ModalScreen[None]):
    BINDINGS = [
        Binding("escape", "done", "Done"),
        KEYS.binding("loras", "done", "Done", show=False),
        Binding("ctrl+n", "all_off", "All off"),
    ]
    DEFAULT_CSS = """
    LoraScreen { align: center middle; }
    LoraScreen > Vertical {
        width: 100; max-width: 100%; height: auto; max-height: 90%;
        padding: 0 1; border: thick $primary; background: $surface;
    }
    LoraScreen #help { color: $text-muted; margin-bottom: 1; }
    LoraScreen LoraList { height: auto; max-height: 24; }
    LoraScreen .lora-row { height: 1; }
    LoraScreen .lora-row > Checkbox { width: 1fr; }
    LoraScreen .lora-row > Input { width: 10; background: $boost; }
    LoraScreen .lora-row > .detail { width: 22; padding: 0 1; color: $text-muted; }
    LoraScreen #lora-error { color: $error; height: auto; }
    """

    def __init__(
        self,
        files: list[LoraFile],
        choices: dict[str, LoraChoice],
        folders: list[Path],
        on_change: Callable[[], None] = lambda: None,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.choices = choices
        self.folders = folders
        self.on_change = on_change  # the form shows the choices as they change
        listed = {str(f.path) for f in files}
        # LoRAs turned on from an image but outside the folders scanned stay visible, so they can be turned off
        extra = [p for p, c in choices.items() if c.enabled and p not in listed and Path(p).is_file()]
        self.rows: list[tuple[str, str, str]] = [
            (str(f.path), f.name, f"{human_size(f.size)} · {f.path.parent.name}") for f in files
        ]
        self.rows += [(p, lora_label(p), "from an image") for p in extra]
        for path, _, _ in self.rows:
            choices.setdefault(path, LoraChoice())

    def compose(self) -> ComposeResult:
        with Vertical():
            where = ", ".join(str(f) for f in self.folders) or "<models>/loras (not there yet)"
            yield Label(f"LoRAs in {where}", markup=False)
            yield Label(
                "space: on/off · tab: its strength (e.g. -2 to 2) · up/down: next LoRA · escape: done",
                id="help",
                markup=False,
            )
            if not self.rows:
                yield Label(
                    "No LoRA files (.safetensors) found: put them in the models folder's loras folder.",
                    markup=False,
                )
            with LoraList():
                for index, (path, name, detail) in enumerate(self.rows):
                    choice = self.choices[path]
                    with Horizontal(classes="lora-row"):
                        yield Checkbox(Content(name), choice.enabled, id=f"on-{index}", compact=True)
                        yield Input(choice.strength, id=f"strength-{index}", type="number", compact=True)
                        yield Label(detail, classes="detail", markup=False)
            yield Label("", id="lora-error", markup=False)
        yield Footer()

    def on_mount(self) -> None:
        if self.rows:
            self.query_one("#on-0", Checkbox).focus()

    def _path(self, widget_id: str | None) -> str:
        return self.rows[int(str(widget_id).partition("-")[2])][0]

    @on(Checkbox.Changed)
    def _toggled(self, event: Checkbox.Changed) -> None:
        self.choices[self._path(event.checkbox.id)].enabled = event.value
        self._check()

    @on(Input.Changed)
    def _strength(self, event: Input.Changed) -> None:
        self.choices[self._path(event.input.id)].strength = event.value
        self._check()

    @on(Input.Submitted)
    def _submitted(self) -> None:
        self.action_done()

    def _problem(self) -> tuple[int, str] | None:
        """The first LoRA that is on with a strength that does not parse: (row, message)."""
        low, high = STRENGTH_RANGE
        for index, (path, name, _) in enumerate(self.rows):
            choice = self.choices[path]
            if not choice.enabled:
                continue
            try:
                parse_number(choice.strength, float, f"Strength of {name}", low, high)
            except FormError as error:
                return index, str(error)
        return None

    def _check(self) -> tuple[int, str] | None:
        self.on_change()
        problem = self._problem()
        self.query_one("#lora-error", Label).update(problem[1] if problem else "")
        return problem

    def action_all_off(self) -> None:
        for checkbox in self.query(Checkbox):
            checkbox.value = False

    def action_done(self) -> None:
        problem = self._check()
        if problem is not None:
            self.query_one(f"#strength-{problem[0]}", Input).focus()
            return
        self.dismiss(None)
