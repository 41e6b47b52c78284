"""An image drawn in the terminal: the live latent preview while a job runs, then the result.

textual-image picks kitty graphics or sixel where the terminal has them and half-cell blocks elsewhere;
`renderer` forces one ("halfcell" keeps snapshot tests independent of the terminal).
"""

from __future__ import annotations

from PIL import Image as PILImage
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widget import Widget
from textual.widgets import Static
from textual_image.widget import HalfcellImage, UnicodeImage
from textual_image.widget import Image as AutoImage

RENDERERS: dict[str, type[Widget]] = {"auto": AutoImage, "halfcell": HalfcellImage, "unicode": UnicodeImage}


def preview_image(width: int, height: int, rgb: bytes) -> PILImage.Image:
    """The engine's preview bytes (width x height x 3, row-major) as a PIL image."""
    return PILImage.frombytes("RGB", (width, height), rgb)


class ImagePane(Vertical):
    DEFAULT_CSS = """
    ImagePane { height: 1fr; align: center middle; }
    ImagePane > #picture { width: auto; height: 1fr; max-width: 100%; }
    ImagePane > #caption { height: 1; width: 100%; color: $text-muted; text-align: center; }
    """

    def __init__(self, renderer: str = "auto", **kwargs) -> None:
        super().__init__(**kwargs)
        self._renderer = RENDERERS.get(renderer, AutoImage)
        self.image: PILImage.Image | None = None

    def compose(self) -> ComposeResult:
        yield self._renderer(None, id="picture")
        yield Static("", id="caption", markup=False)

    def show(self, image: PILImage.Image | str | None, caption: str = "") -> None:
        if isinstance(image, str):
            with PILImage.open(image) as opened:
                image = opened.convert("RGB")
        self.image = image
        self.query_one("#picture").image = image
        self.query_one("#caption", Static).update(caption)
