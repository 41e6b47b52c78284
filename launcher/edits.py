"""The Edit screen's data: the edit asked for, the mask painted for it, and an edit read back from an image.

Plain data (PIL, no widgets, no torch). An edit becomes request fields (launcher/form.py): Inpaint is
`init_image` + `mask`, Outpaint `init_image` + `outpaint`, Kontext `references`, Control `control_image` +
`control_preprocess`, Redux `redux_images` (each image with its strength; the size is the screen's, since
Redux images prompt a new picture rather than being edited) (engine/contract/request.py). Files the TUI writes
for a job (a painted mask, a preprocessed control map) go to `<outputs>/inputs/`, which the gallery does not list; the engine records the
name and SHA-256 of every input image in the result's PNG (engine/generation/png_output.py), so reuse finds
them again and says when one has changed.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

from PIL import Image, ImageChops, ImageDraw

from engine.contract.request import CONTROL_PREPROCESS, MAX_OUTPAINT, MAX_REDUX_STRENGTH, MAX_SIZE
from launcher.metadata import MAX_PIXELS, UnreadableImage, load_picture, plain_text

INPUTS_FOLDER = "inputs"  # under the outputs folder: masks and control maps written for jobs
SIDES = ("left", "top", "right", "bottom")
# Control mode's preprocessors: all the engine's. Canny is previewed in the TUI with the engine's own function
# (numpy/OpenCV); depth needs torch (Depth Anything V2), which the TUI process never imports, so the engine
# computes it when the job runs and the screen says so instead of a preview.
PREPROCESSORS = CONTROL_PREPROCESS
PREVIEWED = ("none", "canny")
DEPTH_NOTE = "depth is computed by the engine (no preview here: the TUI does not load torch)"
REDUX_STRENGTH_RANGE = (0.0, MAX_REDUX_STRENGTH)


class EditMode(str, Enum):
    INPAINT = "inpaint"
    OUTPAINT = "outpaint"
    KONTEXT = "kontext"
    CONTROL = "control"
    REDUX = "redux"


MODE_HELP = {
    EditMode.INPAINT: "repaint where the mask is white (a FLUX.1 Fill model, or any model with Denoise)",
    EditMode.OUTPAINT: "extend the image by the margins (a FLUX.1 Fill model)",
    EditMode.KONTEXT: "the prompt is the instruction (FLUX.1 Kontext, or FLUX.2 [klein])",
    EditMode.CONTROL: "follow the control image's edges or depth (FLUX.1 Canny/Depth, or their LoRA)",
    EditMode.REDUX: "the images prompt the picture, each with a strength (FLUX.1 [dev] + Redux files)",
}


class EditError(ValueError):
    """An edit that cannot be sent; the message is one sentence saying what to do."""


@dataclass
class EditValues:
    """One edit: the mode, its source image and the mode's fields (the prompt, model and sampling come from
    FormValues beside it)."""

    mode: EditMode
    source: str  # the image edited (Kontext: the first reference; Control: the control image)
    mask: str = ""  # Inpaint: the mask PNG written for the job
    margins: tuple[int, int, int, int] = (0, 0, 0, 0)  # Outpaint: left, top, right, bottom
    preprocess: str = "none"  # Control: none | canny | depth
    references: list[str] = field(default_factory=list)  # Kontext: more references after the source
    chain: bool = False  # Kontext: the result becomes the next source
    strength: float = 1.0  # Redux: the source image's strength
    # Redux: more (image, strength) after the source
    redux: list[tuple[str, float]] = field(default_factory=list)

    def redux_images(self) -> list[tuple[str, float]]:
        """Redux: every (image, strength), the source first."""
        return [(self.source, self.strength), *self.redux] if self.mode is EditMode.REDUX else []


def sha256_of(path: str | Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_redux_strength(text: str, what: str) -> float:
    """A Redux strength as typed: a finite number from 0 to MAX_REDUX_STRENGTH (1 as trained, 0 leaves the image
    out). One sentence naming `what` when it is not."""
    text = text.strip() or "1"
    low, high = REDUX_STRENGTH_RANGE
    try:
        value = float(text)
    except ValueError:
        raise EditError(
            f"The Redux strength of {what} must be a number from {low:g} to {high:g}, not {text!r}."
        ) from None
    if not math.isfinite(value) or not low <= value <= high:
        raise EditError(
            f"The Redux strength of {what} is {text}: use a finite number from {low:g} to {high:g}."
        )
    return value


def parse_redux_images(text: str) -> list[tuple[str, float]]:
    """More Redux images typed as `IMG[:STRENGTH]` separated by `;` (the engine's --redux-image syntax; a
    Windows drive letter's colon is not a strength, nor is the colon of a file that exists with it). Each must
    be an image and each strength in range; UnreadableImage or EditError with one sentence for the first that
    is not."""
    found = []
    for item in (part.strip().strip('"') for part in text.split(";")):
        if not item:
            continue
        path, sep, tail = item.rpartition(":")
        if not sep or not path or tail.startswith(("\\", "/")) or Path(item).expanduser().is_file():
            path, tail = item, ""
        path = str(Path(path.strip().strip('"')).expanduser())
        strength = check_redux_strength(tail, Path(path).name)
        if not Path(path).is_file():
            raise EditError(f"The Redux image {path} does not exist: give the path of a PNG or JPEG.")
        image_size(path)  # an image, not too large (UnreadableImage)
        found.append((path, strength))
    return found


def check_margins(texts: dict[str, str], size: tuple[int, int]) -> tuple[int, int, int, int]:
    """Outpaint margins typed per side: whole pixels from 0 to MAX_OUTPAINT, not all 0, and the extended image
    no larger than MAX_SIZE. One sentence for the first that is wrong."""
    margins = []
    for side in SIDES:
        text = texts.get(side, "").strip() or "0"
        try:
            value = int(text)
        except ValueError:
            raise EditError(f"The {side} margin must be a whole number of pixels, not {text!r}.") from None
        if not 0 <= value <= MAX_OUTPAINT:
            raise EditError(f"The {side} margin {value} is out of range: use 0 to {MAX_OUTPAINT} pixels.")
        margins.append(value)
    if not any(margins):
        raise EditError("All four margins are 0: give at least one side some pixels to add.")
    left, top, right, bottom = margins
    width, height = size[0] + left + right, size[1] + top + bottom
    if width > MAX_SIZE or height > MAX_SIZE:
        raise EditError(
            f"The extended image would be {width}x{height}: keep it within {MAX_SIZE}x{MAX_SIZE} (smaller margins)."
        )
    return left, top, right, bottom


class MaskPainter:
    """A mask the size of the source image: white (255) repaints, black keeps. Coordinates are image pixels."""

    def __init__(self, size: tuple[int, int]) -> None:
        self.size = size
        self.image = Image.new("L", size, 0)

    def dab(self, x: float, y: float, radius: float, paint: bool = True) -> None:
        draw = ImageDraw.Draw(self.image)
        draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=255 if paint else 0)

    def stroke(
        self, a: tuple[float, float], b: tuple[float, float], radius: float, paint: bool = True
    ) -> None:
        """A line of dabs from a to b (a mouse drag), without gaps however fast the mouse moved."""
        draw = ImageDraw.Draw(self.image)
        draw.line((a, b), fill=255 if paint else 0, width=max(1, round(2 * radius)))
        self.dab(*a, radius, paint)
        self.dab(*b, radius, paint)

    def rectangle(self, a: tuple[float, float], b: tuple[float, float], paint: bool = True) -> None:
        left, right = sorted((a[0], b[0]))
        top, bottom = sorted((a[1], b[1]))
        ImageDraw.Draw(self.image).rectangle((left, top, right, bottom), fill=255 if paint else 0)

    def invert(self) -> None:
        self.image = ImageChops.invert(self.image)

    def clear(self) -> None:
        self.image = Image.new("L", self.size, 0)

    def coverage(self) -> float:
        """The share of the image that will be repainted (0 to 1)."""
        histogram = self.image.histogram()
        return sum(histogram[128:]) / max(1, self.size[0] * self.size[1])

    def load(self, path: str | Path) -> str | None:
        """A mask from a file (its luminance, thresholded at half); one of another size is resized to the
        source's size, and the note returned says so. Raises UnreadableImage."""
        picture = load_picture(Path(path))  # refuses what is not an image or is too large to decode
        mask = picture.convert("L").point(lambda v: 255 if v >= 128 else 0)
        note = None
        if mask.size != self.size:
            note = (
                f"The mask is {mask.size[0]}x{mask.size[1]}, the image {self.size[0]}x{self.size[1]}: "
                "it was resized to fit."
            )
            mask = mask.resize(self.size, Image.Resampling.NEAREST)
        self.image = mask
        return note

    def save(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.image.save(path, format="PNG")
        return path


def image_size(path: str | Path) -> tuple[int, int]:
    """An image's size from its header; UnreadableImage when it is not one or is too large."""
    try:
        with Image.open(path) as image:
            width, height = image.size
    except Exception as exc:  # noqa: BLE001 - PIL raises many kinds for a file that is not an image
        raise UnreadableImage(f"{Path(path).name} is not an image: give a PNG or JPEG.") from exc
    if width * height > MAX_PIXELS:
        raise UnreadableImage(f"{Path(path).name} is {width}x{height} pixels, too large to edit.")
    return width, height


def _text(value: object) -> str | None:
    """A path from an image's metadata: text, without control characters (escape codes), or None."""
    return plain_text(value, 4096) if isinstance(value, str) and value.strip() else None


def edit_from_request(request: dict | None) -> EditValues | None:
    """The edit a request of ours made (None when it was plain txt2img/img2img); malformed fields are skipped
    as metadata.checked skips them."""
    if not isinstance(request, dict):
        return None
    init, mask = _text(request.get("init_image")), _text(request.get("mask"))
    outpaint, control = _text(request.get("outpaint")), _text(request.get("control_image"))
    references = request.get("references")
    references = [_text(r) for r in references if _text(r)] if isinstance(references, list) else []
    if init and mask:
        return EditValues(EditMode.INPAINT, init, mask=mask)
    if init and outpaint:
        parts = outpaint.split(",")[:5]
        try:
            margins = tuple(int(p) for p in parts)
        except ValueError:
            margins = ()
        if len(margins) == 4 and all(0 <= m <= MAX_OUTPAINT for m in margins):
            return EditValues(EditMode.OUTPAINT, init, margins=margins)  # type: ignore[arg-type]
        return None
    if references:
        return EditValues(EditMode.KONTEXT, references[0], references=references[1:])
    if control:
        preprocess = request.get("control_preprocess")
        preprocess = preprocess if preprocess in PREPROCESSORS else "none"
        return EditValues(EditMode.CONTROL, control, preprocess=preprocess)
    redux = _redux_in(request.get("redux_images"))
    if redux:
        (source, strength), *more = redux
        return EditValues(EditMode.REDUX, source, strength=strength, redux=more)
    return None


def _redux_in(items: object) -> list[tuple[str, float]]:
    """(path, strength) of a request's redux_images; entries that are not text with a finite strength in range
    are skipped."""
    found = []
    low, high = REDUX_STRENGTH_RANGE
    for item in items if isinstance(items, list) else []:
        if not isinstance(item, dict) or not (path := _text(item.get("path"))):
            continue
        strength = item.get("strength", 1.0)
        if isinstance(strength, bool) or not isinstance(strength, int | float):
            continue
        if math.isfinite(strength) and low <= strength <= high:
            found.append((path, float(strength)))
    return found


def recorded_inputs(request: dict | None) -> dict[str, str]:
    """path -> SHA-256 of the input images the engine recorded in the PNG (`inputs`)."""
    items = request.get("inputs") if isinstance(request, dict) else None
    found: dict[str, str] = {}
    for item in items if isinstance(items, list) else []:
        if (
            isinstance(item, dict)
            and (path := _text(item.get("path")))
            and (digest := _text(item.get("sha256")))
        ):
            found[path] = digest
    return found


def find_input(path: str, digest: str | None, folders: list[Path]) -> tuple[str | None, str | None]:
    """An input image recorded in a PNG, found again: the recorded path, else a file of the same name in
    `folders` (the outputs' inputs folder, the image's own folder). Returns (path or None, a note when it is
    missing or has changed since: its SHA-256 differs)."""
    name = Path(path.replace("\\", "/")).name
    candidates = [Path(path)] + [folder / name for folder in folders]
    for candidate in candidates:
        try:
            if not candidate.is_file():
                continue
            if digest is not None and sha256_of(candidate) != digest:
                continue
        except (OSError, ValueError):
            continue
        return str(candidate), None
    existing = next((c for c in candidates if _is_file(c)), None)
    if existing is not None:
        return str(existing), f"{name} has changed since the image was made (its SHA-256 differs)."
    return None, f"{name} is no longer there."


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except (OSError, ValueError):
        return False


def fit(size: tuple[int, int], cells: tuple[int, int]) -> tuple[float, int, int]:
    """How an image of `size` pixels fits `cells` (columns, rows) drawn with half blocks (one column, two
    pixel rows per cell): (scale, shown width, shown height) in half-block pixels, aspect ratio kept."""
    columns, rows = max(1, cells[0]), max(1, cells[1])
    scale = min(columns / size[0], 2 * rows / size[1])
    width = max(1, min(columns, math.floor(size[0] * scale)))
    height = max(2, min(2 * rows, 2 * math.floor(size[1] * scale / 2)))
    return scale, width, height
