"""A modal that asks for a PNG's path and reads the parameters in it."""

from __future__ import annotations

from pathlib import Path

from textual import on
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Input, Label

from launcher.metadata import ImageParams, read_png_params


class LoadPngScreen(ModalScreen[ImageParams | None]):
    BINDINGS = [("escape", "dismiss(None)", "Close")]
    DEFAULT_CSS = """
    LoadPngScreen { align: center middle; }
    LoadPngScreen > Vertical { width: 80; height: auto; padding: 1 2; border: thick $primary; background: $surface; }
    LoadPngScreen #error { color: $error; }
    """

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Label("Load parameters from a PNG (ours, A1111/Forge or ComfyUI). Path:")
            yield Input(placeholder="/path/to/image.png", id="path")
            yield Label("", id="error", markup=False)

    @on(Input.Submitted)
    def _submitted(self, event: Input.Submitted) -> None:
        path = Path(event.value.strip().strip('"')).expanduser()
        error = self.query_one("#error", Label)
        if not path.is_file():
            error.update(f"{path} does not exist: give the path of a PNG file.")
            return
        try:
            params = read_png_params(path)
        except (OSError, ValueError) as exc:
            error.update(f"Could not read {path.name}: {exc}")
            return
        if params is None:
            error.update(
                f"{path.name} holds no generation parameters (no parameters, prompt or fluxdeck chunk)."
            )
            return
        self.dismiss(params)
