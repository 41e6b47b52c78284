"""Generation parameters read back from a PNG: ours (`fluxdeck` JSON), A1111/Forge `parameters`, ComfyUI `prompt`.

A PNG may come from anyone: reading one raises nothing but UnreadableImage (one sentence), and every value is
checked for type, finiteness and the form's range (launcher/limits.py) before it is used; what does not pass is
left out and named in `ImageParams.ignored`.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from launcher.limits import MAX_NAME_CHARS, MAX_PROMPT_CHARS, RANGES

# Pixels decoded at most: a decompression bomb is a few kB on disk and gigabytes in memory. 64 MP is far above
# any size the form allows (4096 x 4096 = 16.8 MP).
MAX_PIXELS = 64 * 1024 * 1024


class UnreadableImage(ValueError):
    """A file that is not a PNG we can read safely; the message is one sentence."""


def plain_text(value: str, limit: int = MAX_PROMPT_CHARS) -> str:
    """Text from a file, made harmless for the terminal: control characters (escape codes among them) other than
    newline and tab are dropped, and the length is capped."""
    cleaned = "".join(ch for ch in value if ch in "\n\t" or ch.isprintable())
    return cleaned[:limit]


@dataclass
class ImageParams:
    source: str  # "fluxdeck", "a1111" or "comfyui"
    prompt: str = ""
    clip_prompt: str | None = None
    negative: str | None = None
    width: int | None = None
    height: int | None = None
    steps: int | None = None
    guidance: float | None = None
    cfg: float | None = None
    seed: int | None = None
    denoise: float | None = None
    model: str | None = None
    request: dict | None = None  # the whole request, for our own PNGs
    extra: dict[str, str] = field(default_factory=dict)
    ignored: list[str] = field(default_factory=list)  # values left out: wrong type, not finite, out of range

    def describe(self) -> str:
        """The parameters as a few lines for the gallery."""
        lines = [self.prompt or "(no prompt)"]
        if self.clip_prompt:
            lines.append(f"CLIP prompt: {self.clip_prompt}")
        if self.negative:
            lines.append(f"Negative: {self.negative}")
        facts = [
            ("Size", f"{self.width}x{self.height}" if self.width and self.height else None),
            ("Seed", self.seed),
            ("Steps", self.steps),
            ("Guidance", self.guidance),
            ("CFG", self.cfg),
            ("Denoise", self.denoise if self.denoise not in (None, 1.0) else None),
            ("Model", self.model),
        ]
        lines.append(", ".join(f"{name}: {value}" for name, value in facts if value not in (None, "")))
        if self.ignored:
            lines.append(f"Ignored: {', '.join(self.ignored)}")
        lines.append(f"(read from {self.source} metadata)")
        return "\n".join(lines)


def _text_chunks(path: Path, full: bool) -> dict[str, str]:
    with Image.open(path) as image:  # PIL refuses text chunks over its own limits (ValueError)
        width, height = image.size
        if full and width * height <= MAX_PIXELS:
            image.load()  # the chunks after the pixels too
        text = dict(getattr(image, "text", {}) or {}) if full else {}
        text.update({k: v for k, v in image.info.items() if isinstance(v, str) and k not in text})
    return text


def read_png_params(path: Path, full: bool = True) -> ImageParams | None:
    """The parameters in an image's text chunks, checked (see `checked`), or None when it has none we understand.

    full=False reads only the chunks before the pixels (where we, A1111 and ComfyUI write them): fast for lists.
    Pixels are never decoded for an image over MAX_PIXELS. Raises UnreadableImage and nothing else.
    """
    try:
        text = _text_chunks(path, full)
    except Exception as exc:  # noqa: BLE001 - PIL raises OSError, ValueError, SyntaxError, EOFError, bomb errors...
        raise UnreadableImage(
            f"{plain_text(path.name, MAX_NAME_CHARS)} cannot be read: {_why(exc)}."
        ) from None
    return params_from_text(text)


def load_picture(path: Path) -> Image.Image:
    """The image's pixels as RGB for showing, refused (UnreadableImage) over MAX_PIXELS or when unreadable."""
    try:
        with Image.open(path) as image:
            width, height = image.size
            if width * height > MAX_PIXELS:
                raise UnreadableImage(
                    f"{plain_text(path.name, MAX_NAME_CHARS)} is {width}x{height} pixels, too large to show."
                )
            return image.convert("RGB")
    except UnreadableImage:
        raise
    except Exception as exc:  # noqa: BLE001 - as in read_png_params
        raise UnreadableImage(
            f"{plain_text(path.name, MAX_NAME_CHARS)} cannot be read: {_why(exc)}."
        ) from None


def _why(exc: Exception) -> str:
    if isinstance(exc, Image.DecompressionBombError):
        return "its pixel count is too large to be a real image (a decompression bomb)"
    return plain_text(str(exc), 200) or type(exc).__name__


# What goes wrong parsing someone else's metadata: the parsers below are written to check types, and this is
# the net under them (deep JSON nesting is a RecursionError).
_PARSE_ERRORS = (ValueError, TypeError, AttributeError, KeyError, IndexError, RecursionError, OverflowError)


def params_from_text(text: dict[str, str]) -> ImageParams | None:
    """The first kind of metadata that parses: ours, then A1111/Forge, then ComfyUI."""
    readers = (
        ("fluxdeck", lambda t: params_from_request(json.loads(t))),
        ("parameters", parse_a1111),
        ("prompt", lambda t: parse_comfyui(json.loads(t))),
    )
    for key, read in readers:
        if key in text:
            try:
                return read(text[key])
            except _PARSE_ERRORS:
                continue
    return None


def params_from_request(request: dict) -> ImageParams:
    if not isinstance(request, dict):
        raise TypeError("the request is not a JSON object")
    files = request.get("files")
    files = files if isinstance(files, dict) else {}
    model = files.get("checkpoint") or files.get("transformer")
    return checked(
        ImageParams(
            source="fluxdeck",
            prompt=request.get("prompt", ""),
            clip_prompt=request.get("clip_prompt"),
            negative=request.get("negative"),
            width=request.get("width"),
            height=request.get("height"),
            steps=request.get("steps"),
            guidance=request.get("guidance"),
            cfg=request.get("cfg"),
            seed=request.get("seed"),
            denoise=request.get("denoise"),
            model=model,
            request=request,
        )
    )


def _in_range(name: str, value: object) -> int | float | None:
    """The value as the form's kind when it is a finite number in the form's range, else None."""
    kind, low, high = RANGES[name]
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if kind is int:
        if isinstance(value, float) and not value.is_integer():
            return None
        value = int(value)
    else:
        value = float(value)
    return value if low <= value <= high else None


def _shown(value: object) -> str:
    return plain_text(repr(value) if not isinstance(value, str) else value, 40)


def checked(params: ImageParams) -> ImageParams:
    """Every value with the type the form needs, finite and within the form's range; what is not is set to
    None (the form keeps its own value) and named in `ignored`. Text is made plain and capped; the model is a
    file name only."""
    for name in ("width", "height", "steps", "guidance", "cfg", "seed", "denoise"):
        value = getattr(params, name)
        if value is None:
            continue
        good = _in_range(name, value)
        if good is None:
            params.ignored.append(f"{name} {_shown(value)}")
        setattr(params, name, good)
    if params.width is None or params.height is None:
        params.width = params.height = None  # a size is both or neither
    for name in ("prompt", "clip_prompt", "negative"):
        value = getattr(params, name)
        if value is None or value == "":
            continue
        if not isinstance(value, str):
            params.ignored.append(f"{name} (not text)")
            setattr(params, name, "" if name == "prompt" else None)
            continue
        if len(value) > MAX_PROMPT_CHARS:
            params.ignored.append(f"{name} beyond {MAX_PROMPT_CHARS} characters")
        setattr(params, name, plain_text(value))
    model = params.model
    if model is not None:
        params.model = (
            plain_text(Path(model.replace("\\", "/")).name, MAX_NAME_CHARS)
            if isinstance(model, str)
            else None
        )
    if params.request is not None and not isinstance(params.request, dict):
        params.request = None
    params.extra = {
        plain_text(str(k), 80): plain_text(str(v), 400) for k, v in list(params.extra.items())[:100]
    }
    return params


# A1111 writes `key: value` pairs separated by commas; a value with commas in it is quoted.
_PAIR = re.compile(r'\s*([\w][\w \-/+.()]*):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')


def _number(value: str | None, kind: type) -> int | float | None:
    """A number written in the text, as a float ("inf" and "1e999" too: `checked` judges them), or None. An
    int field keeps the float (20.0), so a huge or fractional value is refused by `checked`, not rounded."""
    if value is None:
        return None
    text = value.strip()
    if kind is int and text.lstrip("+-").isdigit():
        return int(text)  # exact: a 64-bit seed is not rounded through a float
    try:
        return float(text)
    except ValueError:
        return None


def parse_a1111(text: str) -> ImageParams:
    lines = text.strip().splitlines()
    settings_line = ""
    if lines and re.search(r"(^|, )Steps: ", lines[-1]):
        settings_line = lines.pop()
    prompt_lines: list[str] = []
    negative_lines: list[str] | None = None
    for line in lines:
        if line.startswith("Negative prompt:"):
            negative_lines = [line[len("Negative prompt:") :].strip()]
        elif negative_lines is not None:
            negative_lines.append(line)
        else:
            prompt_lines.append(line)
    pairs: dict[str, str] = {}
    for match in _PAIR.finditer(settings_line):
        key, value = match.group(1).strip(), match.group(2).strip()
        if value.startswith('"') and value.endswith('"'):
            value = json.loads(value) if value.count('"') >= 2 else value.strip('"')
        pairs[key] = value
    width = height = None
    if "Size" in pairs and "x" in pairs["Size"]:
        w, _, h = pairs["Size"].partition("x")
        width, height = _number(w, int), _number(h, int)
    # Forge: "Distilled CFG Scale" is FLUX's guidance and "CFG scale" the true CFG; plain A1111 has only CFG.
    guidance = _number(pairs.get("Distilled CFG Scale") or pairs.get("Guidance"), float)
    negative = "\n".join(negative_lines).strip() if negative_lines is not None else None
    used = {
        "Steps",
        "CFG scale",
        "Distilled CFG Scale",
        "Guidance",
        "Seed",
        "Size",
        "Model",
        "Denoising strength",
    }
    return checked(
        ImageParams(
            source="a1111",
            prompt="\n".join(prompt_lines).strip(),
            negative=negative or None,
            width=width,
            height=height,
            steps=_number(pairs.get("Steps"), int),
            guidance=guidance,
            cfg=_number(pairs.get("CFG scale"), float),
            seed=_number(pairs.get("Seed"), int),
            denoise=_number(pairs.get("Denoising strength"), float),
            model=pairs.get("Model"),
            extra={k: v for k, v in pairs.items() if k not in used},
        )
    )


_TEXT_NODES = ("CLIPTextEncodeFlux", "CLIPTextEncode")
_SAMPLERS = ("KSampler", "KSamplerAdvanced", "SamplerCustomAdvanced", "SamplerCustom")


def _inputs(node: object) -> dict:
    """A node's inputs; {} for a node without them (or with something else there)."""
    inputs = node.get("inputs") if isinstance(node, dict) else None
    return inputs if isinstance(inputs, dict) else {}


def _str(value: object) -> str | None:
    return value if isinstance(value, str) else None


def parse_comfyui(workflow: dict) -> ImageParams:
    """Read an API-format ComfyUI workflow (node id -> {class_type, inputs}); links are [node id, slot]."""
    if not isinstance(workflow, dict):
        raise TypeError("the workflow is not a JSON object")
    nodes = {str(k): v for k, v in workflow.items() if isinstance(v, dict) and "class_type" in v}

    def node(link: object) -> dict | None:
        if (
            isinstance(link, list)
            and link
            and isinstance(link[0], str | int)
            and not isinstance(link[0], bool)
        ):
            return nodes.get(str(link[0]))
        return None

    def literal(value: object, depth: int = 0) -> object:
        """A value, following a link to a primitive node when the input is linked."""
        linked = node(value)
        if linked is None or depth > 8:
            return value
        inputs = _inputs(linked)
        for key in ("text", "string", "value", "seed", "noise_seed", "int", "float"):
            if key in inputs:
                return literal(inputs[key], depth + 1)
        return None

    def texts(link: object, depth: int = 0) -> tuple[str | None, str | None, float | None]:
        """(T5 text, CLIP text, guidance) of the conditioning a link leads to."""
        current = node(link)
        if current is None or depth > 16:
            return None, None, None
        inputs = _inputs(current)
        kind = current.get("class_type")
        if kind == "CLIPTextEncodeFlux":
            t5, clip = _str(literal(inputs.get("t5xxl"))), _str(literal(inputs.get("clip_l")))
            return t5 or "", (clip if clip and clip != t5 else None), _float(inputs.get("guidance"))
        if kind == "CLIPTextEncode":
            return _str(literal(inputs.get("text"))) or "", None, None
        guidance = _float(inputs.get("guidance")) if kind == "FluxGuidance" else None
        for key in ("conditioning", "positive", "conditioning_to", "conditioning_1", "guider"):
            if key in inputs:
                t5, clip, inner = texts(inputs[key], depth + 1)
                if t5 is not None:
                    return t5, clip, guidance if guidance is not None else inner
        return None, None, guidance

    params = ImageParams(source="comfyui")
    sampler = next((n for n in nodes.values() if n.get("class_type") in _SAMPLERS), None)
    if sampler is not None:
        inputs = _inputs(sampler)
        positive = inputs.get("positive")
        negative = inputs.get("negative")
        guider = node(inputs.get("guider"))
        if guider is not None:
            guider_inputs = _inputs(guider)
            positive = guider_inputs.get("positive", guider_inputs.get("conditioning"))
            negative = guider_inputs.get("negative")
            params.cfg = _float(guider_inputs.get("cfg"))
        t5, clip, guidance = texts(positive)
        params.prompt, params.clip_prompt, params.guidance = t5 or "", clip, guidance
        if negative is not None:
            params.negative = texts(negative)[0] or None
        params.seed = _int(literal(inputs.get("seed", inputs.get("noise_seed"))))
        params.steps = _int(literal(inputs.get("steps")))
        params.cfg = _float(inputs.get("cfg")) if "cfg" in inputs else params.cfg
        params.denoise = _float(inputs.get("denoise"))
    for item in nodes.values():
        kind, inputs = item.get("class_type"), _inputs(item)
        if kind == "RandomNoise" and params.seed is None:
            params.seed = _int(literal(inputs.get("noise_seed")))
        elif kind == "BasicScheduler":
            params.steps = params.steps or _int(literal(inputs.get("steps")))
            params.denoise = params.denoise if params.denoise is not None else _float(inputs.get("denoise"))
        elif kind == "FluxGuidance" and params.guidance is None:
            params.guidance = _float(inputs.get("guidance"))
        elif (
            kind in ("EmptyLatentImage", "EmptySD3LatentImage", "EmptyFlux2LatentImage")
            and params.width is None
        ):
            params.width, params.height = (
                _int(literal(inputs.get("width"))),
                _int(literal(inputs.get("height"))),
            )
        elif kind in ("UNETLoader", "CheckpointLoaderSimple", "UnetLoaderGGUF") and params.model is None:
            params.model = _str(inputs.get("unet_name")) or _str(inputs.get("ckpt_name"))
        elif kind in _TEXT_NODES and not params.prompt:
            params.prompt = _str(literal(inputs.get("t5xxl", inputs.get("text")))) or ""
    return checked(params)


def _int(value: object) -> int | float | None:
    """A whole number as ComfyUI stores it (a number, or a numeric string); `checked` judges its range."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lstrip("+-").isdigit():
        return int(value.strip())
    number = _float(value)
    return int(number) if number is not None and math.isfinite(number) and number.is_integer() else number


def _float(value: object) -> float | None:
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int):
        return float(value) if abs(value) < 2**64 else math.inf
    try:
        return float(value) if isinstance(value, float | str) else None
    except ValueError:
        return None
