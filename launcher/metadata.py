"""Generation parameters read back from a PNG: ours (`fluxdeck` JSON), A1111/Forge `parameters`, ComfyUI `prompt`."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image


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
        lines.append(f"(read from {self.source} metadata)")
        return "\n".join(lines)


def read_png_params(path: Path, full: bool = True) -> ImageParams | None:
    """The parameters in an image's text chunks, or None when it has none we understand.

    full=False reads only the chunks before the pixels (where we, A1111 and ComfyUI write them): fast for lists.
    """
    with Image.open(path) as image:
        if full:
            image.load()
        text = dict(getattr(image, "text", {}) or {}) if full else {}
        text.update({k: v for k, v in image.info.items() if isinstance(v, str) and k not in text})
    if "fluxdeck" in text:
        try:
            return params_from_request(json.loads(text["fluxdeck"]))
        except (ValueError, TypeError, AttributeError):
            pass
    if "parameters" in text:
        return parse_a1111(text["parameters"])
    if "prompt" in text:
        try:
            return parse_comfyui(json.loads(text["prompt"]))
        except (ValueError, TypeError, AttributeError):
            return None
    return None


def params_from_request(request: dict) -> ImageParams:
    files = request.get("files") or {}
    model = files.get("checkpoint") or files.get("transformer")
    return ImageParams(
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
        model=Path(model).name if model else None,
        request=request,
    )


# A1111 writes `key: value` pairs separated by commas; a value with commas in it is quoted.
_PAIR = re.compile(r'\s*([\w][\w \-/+.()]*):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')


def _number(value: str | None, kind: type) -> int | float | None:
    if value is None:
        return None
    try:
        return kind(float(value)) if kind is int else kind(value)
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
    return ImageParams(
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


_TEXT_NODES = ("CLIPTextEncodeFlux", "CLIPTextEncode")
_SAMPLERS = ("KSampler", "KSamplerAdvanced", "SamplerCustomAdvanced", "SamplerCustom")


def parse_comfyui(workflow: dict) -> ImageParams:
    """Read an API-format ComfyUI workflow (node id -> {class_type, inputs}); links are [node id, slot]."""
    nodes = {str(k): v for k, v in workflow.items() if isinstance(v, dict) and "class_type" in v}

    def node(link: object) -> dict | None:
        if isinstance(link, list) and link:
            return nodes.get(str(link[0]))
        return None

    def literal(value: object, depth: int = 0) -> object:
        """A value, following a link to a primitive node when the input is linked."""
        linked = node(value)
        if linked is None or depth > 8:
            return value
        inputs = linked.get("inputs", {})
        for key in ("text", "string", "value", "seed", "noise_seed", "int", "float"):
            if key in inputs:
                return literal(inputs[key], depth + 1)
        return None

    def texts(link: object, depth: int = 0) -> tuple[str | None, str | None, float | None]:
        """(T5 text, CLIP text, guidance) of the conditioning a link leads to."""
        current = node(link)
        if current is None or depth > 16:
            return None, None, None
        inputs = current.get("inputs", {})
        kind = current.get("class_type")
        if kind == "CLIPTextEncodeFlux":
            t5, clip = literal(inputs.get("t5xxl")), literal(inputs.get("clip_l"))
            return str(t5 or ""), (str(clip) if clip and clip != t5 else None), _float(inputs.get("guidance"))
        if kind == "CLIPTextEncode":
            return str(literal(inputs.get("text")) or ""), None, None
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
        inputs = sampler["inputs"]
        positive = inputs.get("positive")
        negative = inputs.get("negative")
        guider = node(inputs.get("guider"))
        if guider is not None:
            positive = guider["inputs"].get("positive", guider["inputs"].get("conditioning"))
            negative = guider["inputs"].get("negative")
            params.cfg = _float(guider["inputs"].get("cfg"))
        t5, clip, guidance = texts(positive)
        params.prompt, params.clip_prompt, params.guidance = t5 or "", clip, guidance
        if negative is not None:
            params.negative = texts(negative)[0] or None
        params.seed = _int(literal(inputs.get("seed", inputs.get("noise_seed"))))
        params.steps = _int(literal(inputs.get("steps")))
        params.cfg = _float(inputs.get("cfg")) if "cfg" in inputs else params.cfg
        params.denoise = _float(inputs.get("denoise"))
    for item in nodes.values():
        kind, inputs = item.get("class_type"), item.get("inputs", {})
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
            params.model = inputs.get("unet_name") or inputs.get("ckpt_name")
        elif kind in _TEXT_NODES and not params.prompt:
            params.prompt = str(literal(inputs.get("t5xxl", inputs.get("text"))) or "")
    return params


def _int(value: object) -> int | None:
    try:
        return int(value) if value is not None and not isinstance(value, list) else None
    except (TypeError, ValueError):
        return None


def _float(value: object) -> float | None:
    try:
        return float(value) if value is not None and not isinstance(value, list) else None
    except (TypeError, ValueError):
        return None
