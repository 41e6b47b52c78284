"""What a generation is asked to do: one dataclass, shared by the CLI, the TUI's engine server and the PNG metadata."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

from engine.contract.errors import UserError

# Limits on what a request may ask for (docs/engine.md says why each is where it is).
MAX_STEPS = 1000  # a schedule of 1000 steps is already far past where FLUX's images stop changing
MAX_BATCH = 64  # images decoded one at a time; 64 latents of 4096² are 1 GB, far below any RAM we run in
MAX_CFG = 100.0
MAX_GUIDANCE = 100.0
MAX_SHIFT = 10.0  # the shift's mu: e^10 pushes every time to within 0.01 % of 1 already
MAX_LORA_STRENGTH = 10.0
MAX_VRAM_GB = 1024.0
DEFAULT_CACHE_THRESHOLD = 0.12  # nunchaku's FLUX default: the top of the range where the loss stays minor
MAX_INIT_PIXELS = 8192 * 8192  # an init image is resized to at most 4096² anyway


def _check_number(
    name: str, value, low: float, high: float, wanted: str, *, whole: bool = False, shown: str | None = None
):
    """`value` if it is a finite number (a whole one when `whole`) from `low` to `high`; else one sentence."""
    shown = shown if shown is not None else _shown(value)
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or (whole and not isinstance(value, int))
    ):
        raise UserError(f"--{name} {shown} is not {'a whole number' if whole else 'a number'}: use {wanted}.")
    if isinstance(value, float) and not math.isfinite(value):  # (a whole number is finite, however big)
        raise UserError(f"--{name} {shown} is not a finite number: use {wanted}.")
    if not low <= value <= high:
        raise UserError(f"--{name} {shown} is out of range: use {wanted}.")
    return value


def _shown(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _check_text(name: str, value, *, optional: bool = False) -> None:
    """A text field: a string that is valid Unicode (a prompt read from bytes that were not UTF-8 is refused)."""
    if value is None and optional:
        return
    if not isinstance(value, str):
        raise UserError(f"--{name.replace('_', '-')} is not text: give it as a string.")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise UserError(
            f"--{name.replace('_', '-')} holds bytes that are not valid UTF-8: save or type it as UTF-8 text."
        ) from None


def check_init_image(path: str) -> None:
    """The init image exists, is an image, and is not so big that decoding it would exhaust memory (its size
    is read from the header: nothing is decoded here)."""
    from PIL import Image

    if not Path(path).is_file():
        raise UserError(f"--init-image {path} does not exist: give the path of a PNG or JPEG.")
    try:
        with Image.open(path) as image:
            width, height = image.size
    except Image.DecompressionBombError:
        width, height = MAX_INIT_PIXELS, 2  # PIL's own alarm: far above our limit
    except (OSError, ValueError, SyntaxError):
        raise UserError(f"--init-image {path} is not an image file: give a PNG or JPEG.") from None
    if width * height > MAX_INIT_PIXELS:
        raise UserError(
            f"--init-image {path} is too big to open safely (over {MAX_INIT_PIXELS // 10**6} megapixels): "
            "scale it down first."
        )


@dataclass
class LoraSpec:
    path: str
    strength: float = 1.0


@dataclass
class ModelFiles:
    """Where the weights come from: an all-in-one checkpoint, four split files, or a ComfyUI models folder."""

    checkpoint: str | None = None
    transformer: str | None = None
    clip: str | None = None
    t5: str | None = None
    vae: str | None = None
    models_dir: str | None = None
    clip_tokenizer: str | None = None
    t5_tokenizer: str | None = None


@dataclass
class GenerateRequest:
    prompt: str
    out: str
    clip_prompt: str | None = None  # None: CLIP gets the same prompt as T5
    negative: str | None = None
    cfg: float = 1.0  # true CFG; > 1 with a negative prompt runs a second pass
    width: int = 1024
    height: int = 1024
    steps: int | None = None  # None: 28 for [dev], 4 for [schnell]
    guidance: float = 3.5  # distilled guidance, used by models with guidance_in ([dev])
    seed: int = 0
    batch: int = 1
    shift: str = "auto"  # "auto" (shift [dev], not [schnell]), "none", or a number: the mu of the shift
    init_image: str | None = None
    denoise: float = 1.0
    loras: list[LoraSpec] = field(default_factory=list)
    files: ModelFiles = field(default_factory=ModelFiles)
    t5_max_length: int | None = None  # None: 512 for [dev], 256 for [schnell]
    device: str = "auto"
    dtype: str = "auto"
    vram_budget: float | None = None  # GB of weights kept on the GPU; None: automatic
    cache: str = "none"  # step caching: "none", "first-block" or "first-block:THRESHOLD" (engine.generation.step_cache)

    def validate(self) -> None:
        """Refuse what cannot be generated, in one sentence that says what to do. Every number is checked here
        for its type, for being finite and for its range, before anything is loaded or allocated."""
        for name in ("prompt", "clip_prompt", "negative", "out", "init_image", "shift", "device", "dtype"):
            _check_text(name, getattr(self, name), optional=name not in ("prompt", "out", "shift"))
        for name in ("width", "height"):
            value = _check_number(name, getattr(self, name), 64, 4096, "a size between 64 and 4096 pixels",
                                  whole=True)  # fmt: skip
            if value % 16:
                raise UserError(
                    f"--{name} {value} is not a multiple of 16: FLUX needs multiples of 16 "
                    f"(try {round(value / 16) * 16})."
                )
        if self.steps is not None:
            _check_number("steps", self.steps, 1, MAX_STEPS, f"1 to {MAX_STEPS} steps", whole=True)
        _check_number("seed", self.seed, 0, 2**64 - 1, "a whole number from 0 to 2^64-1", whole=True)
        _check_number("batch", self.batch, 1, MAX_BATCH, f"1 to {MAX_BATCH} images", whole=True)
        _check_number("denoise", self.denoise, 0.0, 1.0, "a value above 0 and up to 1")
        if self.denoise == 0:
            raise UserError(f"--denoise {self.denoise} is out of range: use a value above 0 and up to 1.")
        _check_number("cfg", self.cfg, 1.0, MAX_CFG, f"1 (off) to {MAX_CFG:g}")
        _check_number("guidance", self.guidance, 0.0, MAX_GUIDANCE, f"0 to {MAX_GUIDANCE:g}")
        if self.shift not in ("auto", "none"):
            try:
                mu = float(self.shift)
            except ValueError:
                raise UserError(f"--shift {self.shift!r} is not valid: use auto, none or a number.") from None
            _check_number(
                "shift",
                mu,
                -MAX_SHIFT,
                MAX_SHIFT,
                f"auto, none or a number from {-MAX_SHIFT:g} to {MAX_SHIFT:g}",
            )
        if self.t5_max_length is not None:
            _check_number("t5-max-length", self.t5_max_length, 1, 512, "1 to 512", whole=True)
        if self.vram_budget is not None:
            _check_number("vram-budget", self.vram_budget, 0.0, MAX_VRAM_GB, f"0 to {MAX_VRAM_GB} GB")
        if not isinstance(self.loras, list) or not all(isinstance(s, LoraSpec) for s in self.loras):
            raise UserError(
                "The request's loras are not a list of LoRAs: give each as --lora FILE[:STRENGTH]."
            )
        for spec in self.loras:
            _check_text("lora", spec.path)
            _check_number(
                "lora", spec.strength, -MAX_LORA_STRENGTH, MAX_LORA_STRENGTH,
                f"a strength from {-MAX_LORA_STRENGTH:g} to {MAX_LORA_STRENGTH:g}", shown=f"{spec.path}:{spec.strength!r}",
            )  # fmt: skip
        if self.device not in ("auto", "cpu", "cuda"):
            raise UserError(f"--device {self.device!r} is not known: use auto, cpu or cuda.")
        if self.dtype not in ("auto", "fp32", "bf16", "fp16"):
            raise UserError(f"--dtype {self.dtype!r} is not known: use auto, fp32, bf16 or fp16.")
        if not str(self.out).lower().endswith(".png"):
            raise UserError(f"--out {self.out} does not end in .png: give a PNG file name.")
        try:
            parse_cache(str(self.cache))
        except ValueError:
            raise UserError(
                f"--cache {self.cache!r} is not valid: use none, first-block or first-block:T with T from 0 to 1."
            ) from None
        if self.init_image is not None:
            check_init_image(self.init_image)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> GenerateRequest:
        """A request from to_dict's output, or from the JSON a PNG of ours carries (whose batch_index, the
        image's place in its batch, is not part of the request)."""
        if not isinstance(data, dict):
            raise UserError("The request is not a JSON object: send the fields of a generation as an object.")
        data = dict(data)
        data.pop("batch_index", None)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise UserError(f"Unknown request fields {sorted(map(str, unknown))[:5]}: remove them.")
        try:
            files = ModelFiles(**data.pop("files", {}) or {})
            loras = [LoraSpec(**item) for item in data.pop("loras", []) or []]
            return cls(files=files, loras=loras, **data)
        except TypeError:  # a list where an object belongs, a missing prompt, an unknown field inside files
            raise UserError(
                "The request is malformed (a field is missing or of the wrong kind): send it as "
                "GenerateRequest.to_dict writes it."
            ) from None


def parse_cache(text: str) -> float | None:
    """Step caching (engine.generation.step_cache): `none` → None; `first-block` → the default threshold;
    `first-block:T` → T. Raises ValueError."""
    method, _, threshold = text.partition(":")
    if method == "none" and not threshold:
        return None
    if method != "first-block":
        raise ValueError(text)
    value = DEFAULT_CACHE_THRESHOLD if not threshold else float(threshold)
    if not 0.0 <= value <= 1.0:  # also refuses nan
        raise ValueError(text)
    return value
