"""Paint an inpainting mask in the terminal, over the image, with the mouse or the keyboard.

Drawn with half blocks (one cell: a pixel column, two pixel rows), as textual-image's half-cell renderer
draws pictures, but by this widget itself: a mouse cell must map to an exact image pixel, which a renderer that
picks kitty/sixel by terminal cannot promise. The mask shows as a red tint; the cursor is a cross, the first
corner of a rectangle a square.

Keys (the canvas focused): arrows move the cursor (shift: 4x), space paints a dab, x toggles paint/erase,
+ and - change the brush, r sets a rectangle's first corner then fills it at the second, i inverts,
c clears. Mouse: the left button paints, the right button erases.
"""

from __future__ import annotations

from dataclasses import dataclass

from PIL import Image
from rich.segment import Segment
from rich.style import Style
from textual import events
from textual.binding import Binding
from textual.message import Message
from textual.strip import Strip
from textual.widget import Widget

from launcher.edits import MaskPainter, fit

TINT = (230, 40, 40)
MIN_BRUSH, MAX_BRUSH_SHARE = 1, 0.5  # radius in image pixels; at most half the image's longer side


class MaskCanvas(Widget, can_focus=True):
    BINDINGS = [
        Binding("up", "move(0,-1)", "Up", show=False),
        Binding("down", "move(0,1)", "Down", show=False),
        Binding("left", "move(-1,0)", "Left", show=False),
        Binding("right", "move(1,0)", "Right", show=False),
        Binding("shift+up", "move(0,-4)", "Up", show=False),
        Binding("shift+down", "move(0,4)", "Down", show=False),
        Binding("shift+left", "move(-4,0)", "Left", show=False),
        Binding("shift+right", "move(4,0)", "Right", show=False),
        Binding("space", "dab", "Paint"),
        Binding("x", "toggle_erase", "Paint/erase"),
        Binding("plus,equals_sign", "brush(1)", "Brush +"),
        Binding("minus", "brush(-1)", "Brush -"),
        Binding("r", "rectangle", "Rectangle"),
        Binding("i", "invert", "Invert"),
        Binding("c", "clear", "Clear"),
    ]
    DEFAULT_CSS = """
    MaskCanvas { width: 1fr; height: 1fr; }
    MaskCanvas:focus { background: $boost; }
    """

    @dataclass
    class Changed(Message):
        """The mask, the brush or the cursor changed (the screen shows the brush and the coverage)."""

        canvas: MaskCanvas

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.source: Image.Image | None = None
        self.painter: MaskPainter | None = None
        self.cursor = (0.0, 0.0)
        self.radius = 8.0
        self.erase = False
        self.anchor: tuple[float, float] | None = None  # a rectangle's first corner
        self._last: tuple[float, float] | None = None  # the previous point of a mouse drag
        self._drag_paint = True
        self._shown: Image.Image | None = None  # the composite at the cell size, remade after each change
        self._base: Image.Image | None = None  # the source at the cell size
        self._layout: tuple[float, int, int, int, int] = (
            1.0,
            1,
            2,
            0,
            0,
        )  # scale, w, h, x offset, row offset

    # -- the image and the mask -------------------------------------------------------------------------
    def set_image(self, image: Image.Image | None, painter: MaskPainter | None = None) -> None:
        """Show this image with a new empty mask (or `painter`'s); None shows nothing."""
        self.source = image.convert("RGB") if image is not None else None
        self._base = None
        self.painter = painter or (MaskPainter(image.size) if image is not None else None)
        if image is not None:
            self.cursor = (image.size[0] / 2, image.size[1] / 2)
            self.radius = max(MIN_BRUSH, round(max(image.size) / 32))
        self.anchor = None
        self._changed()

    def _changed(self) -> None:
        self._shown = None
        self.refresh()
        self.post_message(self.Changed(self))

    def _composite(self) -> Image.Image | None:
        if self.source is None or self.painter is None:
            return None
        if self._shown is None:
            scale, width, height = fit(self.source.size, (self.size.width, self.size.height))
            if self._base is None or self._base.size != (width, height):  # only the mask changes per stroke
                self._base = self.source.resize((width, height), Image.Resampling.BILINEAR)
            base = self._base
            mask = self.painter.image.resize((width, height), Image.Resampling.BILINEAR)
            tinted = Image.blend(base, Image.new("RGB", base.size, TINT), 0.55)
            self._shown = Image.composite(tinted, base, mask)
            x_offset = (self.size.width - width) // 2
            row_offset = (self.size.height - height // 2) // 2
            self._layout = (scale, width, height, x_offset, row_offset)
        return self._shown

    def on_resize(self) -> None:
        self._shown = None

    # -- drawing -----------------------------------------------------------------------------------------
    def render_line(self, y: int) -> Strip:
        shown = self._composite()
        if shown is None:
            return Strip.blank(self.size.width)
        scale, width, height, x_offset, row_offset = self._layout
        row = y - row_offset
        if not 0 <= row < height // 2:
            return Strip.blank(self.size.width)
        pixels = shown.load()
        cursor_cell = self._cell(self.cursor)
        anchor_cell = self._cell(self.anchor) if self.anchor is not None else None
        segments = [Segment(" " * x_offset)] if x_offset > 0 else []
        for x in range(width):
            top, bottom = pixels[x, 2 * row], pixels[x, 2 * row + 1]
            style = Style(color=f"rgb{top}", bgcolor=f"rgb{bottom}")
            if (x, row) == cursor_cell:
                segments.append(
                    Segment(
                        "╋",
                        Style(color="white" if not self.erase else "cyan", bgcolor=f"rgb{bottom}", bold=True),
                    )
                )
            elif (x, row) == anchor_cell:
                segments.append(Segment("■", Style(color="yellow", bgcolor=f"rgb{bottom}")))
            else:
                segments.append(Segment("▀", style))
        return Strip(segments)

    def _cell(self, point: tuple[float, float] | None) -> tuple[int, int] | None:
        if point is None:
            return None
        scale = self._layout[0]
        return int(point[0] * scale), int(point[1] * scale / 2)

    def image_point(self, x: int, y: int) -> tuple[float, float] | None:
        """The image pixel under the cell (x, y) of this widget (its centre), or None off the image."""
        if self._composite() is None or self.source is None:
            return None
        scale, width, height, x_offset, row_offset = self._layout
        column, row = x - x_offset, y - row_offset
        if not (0 <= column < width and 0 <= row < height // 2):
            return None
        px = min(self.source.size[0] - 1, (column + 0.5) / scale)
        py = min(self.source.size[1] - 1, (2 * row + 1) / scale)
        return px, py

    # -- keyboard ----------------------------------------------------------------------------------------
    def action_move(self, dx: int, dy: int) -> None:
        if self.source is None:
            return
        step = max(1.0, self.radius)
        w, h = self.source.size
        x = min(w - 1.0, max(0.0, self.cursor[0] + dx * step))
        y = min(h - 1.0, max(0.0, self.cursor[1] + dy * step))
        self.cursor = (x, y)
        self._changed()

    def action_dab(self) -> None:
        if self.painter is not None:
            self.painter.dab(*self.cursor, self.radius, not self.erase)
            self._changed()

    def action_toggle_erase(self) -> None:
        self.erase = not self.erase
        self._changed()

    def action_brush(self, direction: int) -> None:
        if self.source is None:
            return
        largest = max(self.source.size) * MAX_BRUSH_SHARE
        factor = 1.25 if direction > 0 else 0.8
        self.radius = min(largest, max(MIN_BRUSH, round(self.radius * factor + 0.49 * direction)))
        self._changed()

    def action_rectangle(self) -> None:
        if self.painter is None:
            return
        if self.anchor is None:
            self.anchor = self.cursor
        else:
            self.painter.rectangle(self.anchor, self.cursor, not self.erase)
            self.anchor = None
        self._changed()

    def action_invert(self) -> None:
        if self.painter is not None:
            self.painter.invert()
            self._changed()

    def action_clear(self) -> None:
        if self.painter is not None:
            self.painter.clear()
            self.anchor = None
            self._changed()

    # -- mouse -------------------------------------------------------------------------------------------
    def on_mouse_down(self, event: events.MouseDown) -> None:
        point = self.image_point(event.x, event.y)
        if point is None or self.painter is None:
            return
        self.focus()
        self._drag_paint = event.button != 3 and not self.erase
        self.capture_mouse()
        self.cursor = self._last = point
        self.painter.dab(*point, self.radius, self._drag_paint)
        self._changed()

    def on_mouse_move(self, event: events.MouseMove) -> None:
        if self._last is None or self.painter is None:
            return
        point = self.image_point(event.x, event.y)
        if point is None:
            return
        self.painter.stroke(self._last, point, self.radius, self._drag_paint)
        self.cursor = self._last = point
        self._changed()

    def on_mouse_up(self, event: events.MouseUp) -> None:
        if self._last is not None:
            self._last = None
            self.release_mouse()
