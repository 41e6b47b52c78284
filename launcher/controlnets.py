"""ControlNet files in the models folders, the session's choice of them, and ControlNets read back from an image.

Plain data (no widgets, no torch): the ControlNet panel (launcher/screens/controlnets.py) shows
`scan_controlnets`, the form keeps a `ControlNetChoice` per file for the session, and the enabled ones become
the request's `controlnets` (engine/contract/request.py, `--controlnet FILE,image=IMG,...,preprocess=P`).

Preprocessors: `none` (the image is already a control map), `canny` and `depth`. With `canny` the TUI makes the
map itself with the engine's own function (engine/generation/control_preprocess.py, numpy and OpenCV) at the
job's size, writes it to `<outputs>/inputs/`, stores the photo it came from in the map's PNG text (so reusing
the result restores the photo and the preprocessor, not only the map), and sends the map with `preprocess=none`.
Depth needs torch, which the TUI process never imports: with `depth` the TUI sends the photo itself with
`preprocess="depth"` and the engine computes the map at the job's size (Depth Anything files in
`<models>/depth/`, checked by the engine with one sentence); there is no preview of it in the panel, and reuse
reads the photo and `depth` straight from the request.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path, PureWindowsPath

from PIL import Image, PngImagePlugin

from engine.contract import layout
from engine.contract.request import MAX_CONTROL_STRENGTH, UNION_MODES
from launcher.edits import sha256_of
from launcher.limits import FormError, parse_number
from launcher.metadata import MAX_NAME_CHARS, UnreadableImage, load_picture, plain_text

STRENGTH_RANGE = (0.0, MAX_CONTROL_STRENGTH)
PREPROCESSORS = ("none", "canny", "depth")
TUI_MADE = ("canny",)  # maps the TUI computes itself, without torch (sent as a map, preprocess none)
ENGINE_MADE = ("depth",)  # sent as the photo with its preprocess key; the engine computes the map
NO_MODE = ""  # a net without a Union mode embedding
MODES = (NO_MODE, *UNION_MODES)  # canny 0, tile 1, depth 2, blur 3, pose 4, gray 5, lq 6
SOURCE_KEY, PREPROCESS_KEY, SOURCE_SHA_KEY = (
    "fluxdeck-control-source",
    "fluxdeck-control-preprocess",
    "fluxdeck-control-source-sha256",
)


@dataclass(frozen=True)
class ControlNetFile:
    path: Path
    name: str  # relative to its folder, without the suffix
    size: int


@dataclass
class ControlNetChoice:
    """One file's state in the panel, as typed (checked when generating)."""

    enabled: bool = False
    image: str = ""
    preprocess: str = "none"
    strength: str = "1"
    start: str = "0"
    end: str = "1"
    mode: str = NO_MODE


@dataclass
class ControlNetValue:
    """A checked ControlNet for one press of generate; `image` is what the engine gets (a map, or for an
    engine-made preprocessor the photo), `source` the photo a preprocessor starts from."""

    path: str
    image: str
    strength: float = 1.0
    start: float = 0.0
    end: float = 1.0
    mode: str | None = None
    preprocess: str = "none"
    source: str = ""

    @property
    def engine_preprocess(self) -> str:
        """The request's `preprocess` key: the engine's own preprocessor (depth), else none (the image is a map:
        given ready, or made here by write_maps)."""
        return self.preprocess if self.preprocess in ENGINE_MADE else "none"


def controlnet_folders(roots: list[Path]) -> list[Path]:
    folders, seen = [], set()
    for root in roots:
        folder = root / layout.CONTROLNET
        if folder.is_dir() and folder.resolve() not in seen:
            seen.add(folder.resolve())
            folders.append(folder)
    return folders


def scan_controlnets(roots: list[Path]) -> list[ControlNetFile]:
    """Weight files (.safetensors, .gguf) in `<models>/controlnet/` and its subfolders, each file once."""
    found: list[ControlNetFile] = []
    seen: set[Path] = set()
    for folder in controlnet_folders(roots):
        files = [p for p in folder.rglob("*") if p.suffix.lower() in layout.WEIGHT_SUFFIXES and p.is_file()]
        for path in sorted(files, key=lambda p: p.relative_to(folder).as_posix().lower()):
            if path.resolve() in seen:
                continue
            seen.add(path.resolve())
            found.append(
                ControlNetFile(path, path.relative_to(folder).with_suffix("").as_posix(), path.stat().st_size)
            )
    return found


def label(path: str | Path) -> str:
    return PureWindowsPath(str(path)).stem


def check_choice(path: str, choice: ControlNetChoice) -> ControlNetValue:
    """One enabled ControlNet's fields: the image an image file, every number finite and in range, start
    before end, the mode a Union mode. FormError with one sentence for the first that is not."""
    name = label(path)
    if not Path(path).is_file():
        raise FormError(f"ControlNet {name} is no longer at {path}: turn it off in the ControlNet panel.")
    image = choice.image.strip().strip('"')
    if not image:
        raise FormError(f"ControlNet {name} has no control image: give the path of a PNG or JPEG.")
    image = str(Path(image).expanduser())
    if not Path(image).is_file():
        raise FormError(
            f"The control image of {name}, {image}, does not exist: give the path of a PNG or JPEG."
        )
    low, high = STRENGTH_RANGE
    strength = float(parse_number(choice.strength, float, f"Strength of ControlNet {name}", low, high))
    start = float(parse_number(choice.start, float, f"Start of ControlNet {name}", 0.0, 1.0))
    end = float(parse_number(choice.end, float, f"End of ControlNet {name}", 0.0, 1.0))
    if not start < end:
        raise FormError(
            f"ControlNet {name}: start {start:g} is not before end {end:g}; use 0 <= start < end <= 1."
        )
    if choice.mode not in MODES:
        raise FormError(
            f"ControlNet {name}: mode {choice.mode!r} is not a Union mode; use {', '.join(MODES[1:])}."
        )
    if choice.preprocess not in PREPROCESSORS:
        raise FormError(
            f"ControlNet {name}: preprocessor {choice.preprocess!r} is not one of {', '.join(PREPROCESSORS)}."
        )
    return ControlNetValue(path, image, strength, start, end, choice.mode or None, choice.preprocess, image)


def checked(choices: dict[str, ControlNetChoice]) -> list[ControlNetValue]:
    return [check_choice(path, choice) for path, choice in choices.items() if choice.enabled]


def control_map(image_path: str, preprocess: str, size: tuple[int, int] | None = None) -> Image.Image:
    """The control image after its preprocessor, computed by the engine's own function (numpy and OpenCV,
    never torch) at `size` (the job's; default: the image's floored to 16). Raises UnreadableImage, or the
    engine's UserError when OpenCV is missing."""
    picture = load_picture(Path(image_path))
    if preprocess not in TUI_MADE:  # none, or depth (the engine's to compute: the photo itself)
        return picture
    from engine.generation.control_preprocess import canny

    width, height = size or tuple(max(16, side - side % 16) for side in picture.size)
    return canny(picture, width, height)


def write_maps(values: list[ControlNetValue], size: tuple[int, int] | None, inputs_dir: Path) -> None:
    """For each ControlNet with a preprocessor the TUI runs (canny; depth is the engine's): its map at the job's size (None: the photo's, floored to 16; the
    engine fits a control image to the job's size) written to `inputs_dir` (the photo it came from and its
    SHA-256 in the PNG's text), and `image` set to the map. Raises FormError."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for index, value in enumerate(values):
        if value.preprocess not in TUI_MADE:
            continue
        try:
            made = control_map(value.source, value.preprocess, size)
        except UnreadableImage as error:
            raise FormError(str(error)) from None
        except Exception as error:  # noqa: BLE001 - the engine's UserError (no OpenCV): one sentence
            raise FormError(plain_text(str(error), 300)) from None
        info = PngImagePlugin.PngInfo()
        info.add_text(SOURCE_KEY, value.source)
        info.add_text(SOURCE_SHA_KEY, sha256_of(value.source))
        info.add_text(PREPROCESS_KEY, value.preprocess)
        inputs_dir.mkdir(parents=True, exist_ok=True)
        path = inputs_dir / f"{stamp}-controlnet{index}-{value.preprocess}.png"
        n = 0
        while path.exists():
            n += 1
            path = inputs_dir / f"{stamp}-controlnet{index}-{value.preprocess}-{n}.png"
        made.save(path, format="PNG", pnginfo=info)
        value.image = str(path)


def map_source(map_path: str) -> tuple[str, str] | None:
    """(photo, preprocessor) stored in a control map the TUI wrote, when the photo is still there unchanged."""
    try:
        with Image.open(map_path) as image:
            text = dict(getattr(image, "text", {}) or {})
    except Exception:  # noqa: BLE001 - anything that is not a readable PNG: no source to restore
        return None
    source, preprocess, digest = text.get(SOURCE_KEY), text.get(PREPROCESS_KEY), text.get(SOURCE_SHA_KEY)
    if not source or preprocess not in TUI_MADE or not Path(source).is_file():
        return None
    try:
        if digest and sha256_of(source) != digest:
            return None
    except OSError:
        return None
    return source, preprocess


def controlnets_in_request(request: dict | None) -> list[tuple[str, ControlNetChoice]]:
    """(path, choice) for each ControlNet in a request read back from one of our PNGs; malformed entries (not
    text, numbers not finite or out of range, an unknown mode or preprocessor) are skipped. An engine-run
    preprocessor (depth; canny from the command line too) comes back with its photo; a map the TUI made, with
    the photo and preprocessor stored in it."""
    items = request.get("controlnets") if isinstance(request, dict) else None
    found = []
    for item in items if isinstance(items, list) else []:
        if not isinstance(item, dict):
            continue
        path, image = item.get("path"), item.get("image")
        if not (isinstance(path, str) and path and isinstance(image, str) and image):
            continue
        numbers = []
        for key, default, (low, high) in (
            ("strength", 1.0, STRENGTH_RANGE),
            ("start", 0.0, (0.0, 1.0)),
            ("end", 1.0, (0.0, 1.0)),
        ):
            value = item.get(key, default)
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                break
            if not low <= value <= high:
                break
            numbers.append(float(value))
        else:
            mode = item.get("mode")
            mode = "" if mode is None else str(mode).strip().lower()
            if mode.isdigit():
                mode = next((name for name, index in UNION_MODES.items() if index == int(mode)), None)
            preprocess = item.get("preprocess", "none")
            preprocess = "none" if preprocess is None else str(preprocess).strip().lower()
            if (
                mode is None
                or mode not in MODES
                or preprocess not in PREPROCESSORS
                or not numbers[1] < numbers[2]
            ):
                continue
            choice = ControlNetChoice(
                True, image, preprocess, f"{numbers[0]:g}", f"{numbers[1]:g}", f"{numbers[2]:g}", mode
            )
            if preprocess == "none" and (restored := map_source(image)) is not None:
                choice.image, choice.preprocess = restored
            found.append((plain_text(path, 4096), choice))
    return found


def match(
    wanted: list[tuple[str, ControlNetChoice]], available: list[ControlNetFile]
) -> tuple[list[tuple[str, ControlNetChoice]], list[str]]:
    """The wanted ControlNets listed here: the same file, else a listed file of the same name. Returns (found,
    names of the missing)."""
    by_name = {f.path.name.lower(): str(f.path) for f in available}
    listed = {str(f.path) for f in available}
    found, missing = [], []
    for path, choice in wanted:
        name = PureWindowsPath(path).name
        if path in listed:
            found.append((path, choice))
        elif (other := by_name.get(name.lower())) is not None:
            found.append((other, choice))
        else:
            missing.append(plain_text(label(name), MAX_NAME_CHARS))
    return found, missing


def choose(choices: dict[str, ControlNetChoice], wanted: list[tuple[str, ControlNetChoice]]) -> None:
    for choice in choices.values():
        choice.enabled = False
    for path, choice in wanted:
        choices[path] = choice


def summary(choices: dict[str, ControlNetChoice]) -> str:
    on = [
        f"{label(path)} {c.strength.strip()}{f' {c.mode}' if c.mode else ''}"
        for path, c in choices.items()
        if c.enabled
    ]
    return ", ".join(on) if on else "none"
