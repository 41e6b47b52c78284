"""The outputs folder: each image with its parameters; reuse them, refine the image, open it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.reactive import var
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Static

from launcher.edits import INPUTS_FOLDER
from launcher.keymap import KEYS
from launcher.messages import EditRequested, JobFinished, UseParams
from launcher.metadata import ImageParams, load_picture, plain_text, read_png_params
from launcher.widgets.image_pane import ImagePane

IMAGE_SUFFIXES = (".png",)


def list_images(folder: Path) -> list[Path]:
    """PNG files in the folder (and its subfolders), newest first; a file that vanishes meanwhile is left out,
    and so are the masks and control maps written for edits (`inputs/`)."""
    if not folder.is_dir():
        return []
    found: list[tuple[float, str, Path]] = []
    inputs = folder / INPUTS_FOLDER
    try:
        for path in folder.rglob("*"):
            if path.suffix.lower() not in IMAGE_SUFFIXES or path.is_relative_to(inputs):
                continue
            try:
                if path.is_file():
                    found.append((path.stat().st_mtime, path.name, path))
            except OSError:
                continue
    except OSError:  # the folder itself went away or became unreadable while listing
        pass
    return [path for _, _, path in sorted(found, reverse=True)]


def open_in_viewer(path: Path) -> None:
    """The operating system's image viewer, without waiting for it."""
    if sys.platform.startswith("win"):
        os.startfile(path)  # type: ignore[attr-defined]
    else:
        opener = "open" if sys.platform == "darwin" else "xdg-open"
        subprocess.Popen([opener, str(path)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


class GalleryScreen(Screen):
    BINDINGS = [
        KEYS.binding("reuse", "reuse", "Reuse"),
        KEYS.binding("refine", "refine", "Refine"),
        KEYS.binding("open_image", "open_image", "Open"),
        KEYS.binding("edit_image", "edit_image", "Edit"),
    ]
    DEFAULT_CSS = """
    GalleryScreen #title { height: 1; padding: 0 1; background: $panel; }
    GalleryScreen DataTable { width: 1fr; height: 1fr; }
    GalleryScreen #side { width: 1fr; }
    GalleryScreen #params { height: auto; max-height: 12; padding: 0 1; border-top: tall $panel; }
    """

    folder: var[Path] = var(Path, init=False)  # the outputs folder (bound to the app's settings)

    def __init__(self, folder: Path, renderer: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self.set_reactive(GalleryScreen.folder, folder)
        self._renderer = renderer
        self._params: dict[str, ImageParams | None] = {}
        self._problems: dict[str, str] = {}  # why an image's metadata could not be read
        self._shown: str | None = None

    def compose(self) -> ComposeResult:
        yield Static("", id="title", markup=False)
        with Horizontal():
            yield DataTable(id="images", cursor_type="row", zebra_stripes=True)
            with Vertical(id="side"):
                yield ImagePane(self._renderer, id="image")
                yield Static("", id="params", markup=False)
        yield Footer()

    def on_mount(self) -> None:
        self.query_one(DataTable).add_columns("Image", "Seed", "Size", "Steps", "Prompt")
        self.refresh_images()

    def on_screen_resume(self) -> None:
        self.refresh_images()

    @on(JobFinished)
    def _job_finished(self, message: JobFinished) -> None:
        if message.job.paths and self.is_current:  # shown again: on_screen_resume lists the folder
            self.refresh_images()

    def refresh_images(self) -> None:
        table = self.query_one(DataTable)
        images = list_images(self.folder)
        self.query_one("#title", Static).update(f"Gallery: {len(images)} image(s) in {self.folder}")
        table.clear()
        for path in images:
            key = str(path)
            if key not in self._params:
                self._params[key] = self._read(path)
            p = self._params[key]
            prompt = " ".join((p.prompt if p else "").split())[:60]
            size = f"{p.width}x{p.height}" if p and p.width else ""
            seed = str(p.seed) if p and p.seed is not None else ""
            steps = str(p.steps) if p and p.steps is not None else ""
            name = plain_text(path.name, 120)
            table.add_row(*(Text(cell) for cell in (name, seed, size, steps, prompt)), key=key)
        if table.row_count:
            table.move_cursor(row=0)
            self._show(str(images[0]))
        else:
            self.query_one("#params", Static).update("No images yet: generate one with ctrl+g.")

    def _read(self, path: Path) -> ImageParams | None:
        """An image's parameters; any file in the folder may be hostile, so nothing raised here leaves the
        screen: the reason is kept and shown when the image is selected."""
        try:
            return read_png_params(path, full=False)
        except Exception as exc:  # noqa: BLE001 - UnreadableImage, or anything a future reader lets through
            self._problems[str(path)] = plain_text(str(exc), 300) or type(exc).__name__
            return None

    def selected(self) -> str | None:
        table = self.query_one(DataTable)
        if not table.row_count:
            return None
        return table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value

    @on(DataTable.RowHighlighted)
    def _highlighted(self, event: DataTable.RowHighlighted) -> None:
        if event.row_key.value:
            self._show(event.row_key.value)

    @on(DataTable.RowSelected)
    def _selected(self) -> None:
        self.action_reuse()

    def _show(self, key: str) -> None:
        if key == self._shown:
            return
        self._shown = key
        name = plain_text(Path(key).name, 120)
        problems = [self._problems[key]] if key in self._problems else []
        try:
            picture = load_picture(Path(key))
        except Exception as error:  # noqa: BLE001 - see _read
            picture = None
            problems.append(plain_text(str(error), 300))
        self.query_one(ImagePane).show(picture, name)
        params = self._params.get(key)
        text = params.describe() if params else "No parameters in this image."
        self.query_one("#params", Static).update("\n".join([text, *problems]))

    def _selected_params(self) -> tuple[str, ImageParams] | None:
        key = self.selected()
        if key is None:
            self.notify("No image selected.", severity="warning", markup=False)
            return None
        params = self._params.get(key)
        if params is None:
            self.notify("This image has no parameters to reuse.", severity="warning", markup=False)
            return None
        return key, params

    def action_reuse(self) -> None:
        if picked := self._selected_params():
            self.post_message(UseParams(picked[1], image=picked[0]))

    def action_edit_image(self) -> None:
        key = self.selected()
        if key is None:
            self.notify("No image selected.", severity="warning", markup=False)
            return
        self.post_message(EditRequested(key))

    def action_refine(self) -> None:
        if picked := self._selected_params():
            self.post_message(UseParams(picked[1], refine_from=picked[0]))

    def action_open_image(self) -> None:
        key = self.selected()
        if key:
            try:
                open_in_viewer(Path(key))
            except OSError as error:
                self.notify(f"Could not open the viewer: {error}", severity="error", markup=False)
