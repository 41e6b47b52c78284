"""What a generation is asked to do: one dataclass, shared by the CLI, the TUI's engine server and the PNG metadata."""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.contract.errors import UserError

# Limits on what a request may ask for (docs/engine.md says why each is where it is); the launcher's form takes
# its ranges from these (launcher/limits.py).
MIN_SIZE, MAX_SIZE, SIZE_MULTIPLE = 64, 4096, 16  # pixels; FLUX needs multiples of 16
MAX_SEED = 2**64 - 1  # the CPU generator's range (a ComfyUI image's 64-bit seed regenerates)
MAX_STEPS = 1000  # a schedule of 1000 steps is already far past where FLUX's images stop changing
MAX_BATCH = 64  # images decoded one at a time; 64 latents of 4096² are 1 GB, far below any RAM we run in
MAX_CFG = 100.0
MAX_GUIDANCE = 100.0
MAX_SHIFT = 10.0  # the shift's mu: e^10 pushes every time to within 0.01 % of 1 already
MAX_LORA_STRENGTH = 10.0
MAX_REDUX_STRENGTH = 10.0  # ComfyUI's StyleModelApply allows 0 to 10 too
MAX_VRAM_GB = 1024.0
DEFAULT_CACHE_THRESHOLD = 0.12  # nunchaku's FLUX default: the top of the range where the loss stays minor
MAX_INIT_PIXELS = 8192 * 8192  # an init image is resized to at most 4096² anyway
MAX_CONTROL_STRENGTH = 10.0  # ComfyUI's range; 1 is the usual
# InstantX / Shakker-Labs Union model cards: the mode index each control type was trained with.
UNION_MODES = {"canny": 0, "tile": 1, "depth": 2, "blur": 3, "pose": 4, "gray": 5, "lq": 6}
CONTROLNET_FLAG = "FILE,image=IMG[,strength=S][,start=A][,end=B][,mode=M][,preprocess=none|canny|depth]"


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
    check_image(path, "--init-image")


def check_image(path: str, flag_name: str) -> None:
    """An input image (`flag_name` says which, for the sentence) exists, is an image, and is small enough to
    decode safely (its size is read from the header: nothing is decoded here)."""
    from PIL import Image

    if not isinstance(path, str) or not path:
        raise UserError(f"{flag_name} is not a file name: give the path of a PNG or JPEG.")
    if not Path(path).is_file():
        raise UserError(f"{flag_name} {path} does not exist: give the path of a PNG or JPEG.")
    try:
        with Image.open(path) as image:
            width, height = image.size
    except Image.DecompressionBombError:
        width, height = MAX_INIT_PIXELS, 2  # PIL's own alarm: far above our limit
    except (OSError, ValueError, SyntaxError):
        raise UserError(f"{flag_name} {path} is not an image file: give a PNG or JPEG.") from None
    if width * height > MAX_INIT_PIXELS:
        raise UserError(
            f"{flag_name} {path} is too big to open safely (over {MAX_INIT_PIXELS // 10**6} megapixels): "
            "scale it down first."
        )


@dataclass(frozen=True)
class ModelDefaults:
    """What FLUX.1 [dev] and [schnell] want where a request leaves a field to the model (steps and t5_max_length
    None), and the guidance the launcher's form starts from."""

    variant: str
    steps: int
    guidance: float
    t5_max_length: int


DEV = ModelDefaults("dev", steps=28, guidance=3.5, t5_max_length=512)
SCHNELL = ModelDefaults("schnell", steps=4, guidance=0.0, t5_max_length=256)


DEVICES = ("auto", "cpu", "cuda")
CONTROL_PREPROCESS = ("none", "canny", "depth")
MAX_OUTPAINT = 2048  # pixels added on one side
# the distilled guidance the edit models were trained with (BFL's cli_fill, cli_control, cli_kontext; diffusers)
FILL_GUIDANCE, CANNY_GUIDANCE, DEPTH_GUIDANCE, KONTEXT_GUIDANCE = 30.0, 30.0, 10.0, 2.5
DTYPES = ("auto", "fp32", "bf16", "fp16")


@dataclass(frozen=True)
class Flag:
    """How a request field is given on the engine's command line: engine/cli.py makes each flag from the field
    (its type, its default; required when it has none) and this. A field of a list type is a repeatable flag,
    each value read by `parse`; a dataclass field without a Flag gives its own fields' flags."""

    help: str | None = None
    metavar: str | None = None
    choices: tuple[str, ...] | None = None
    name: str | None = None  # without the dashes; default: the field's name with "-" for "_"
    parse: Callable[[str], Any] | None = None  # a list field's items

    def flag_of(self, field_name: str) -> str:
        return "--" + (self.name or field_name.replace("_", "-"))


def flag(help: str | None = None, **options) -> dict:
    """A field's metadata: its command-line flag."""
    return {"flag": Flag(help, **options)}


@dataclass
class LoraSpec:
    path: str
    strength: float = 1.0

    @classmethod
    def parse(cls, text: str) -> LoraSpec:
        """FILE[:STRENGTH]; a Windows drive letter's colon is not a strength."""
        path, sep, strength = text.rpartition(":")
        if sep and path and not strength.startswith(("\\", "/")):
            try:
                return cls(path, float(strength))
            except ValueError:
                pass
        return cls(text, 1.0)


@dataclass
class ReduxSpec:
    """One --redux-image: the image and its strength. STRENGTH multiplies that image's Redux tokens (ComfyUI's
    "multiply" strength): 1 as trained, 0 leaves the image out, up to MAX_REDUX_STRENGTH; the text and the
    CLIP pooled vector are never scaled."""

    path: str
    strength: float = 1.0

    @classmethod
    def parse(cls, text: str) -> ReduxSpec:
        """IMG[:STRENGTH]; a Windows drive letter's colon is not a strength."""
        spec = LoraSpec.parse(text)
        return cls(spec.path, spec.strength)


@dataclass
class ControlNetSpec:
    """One --controlnet: the net's file (a bare name is looked up in <models-dir>/controlnet/), its control
    image (a map, or a photo the preprocessor turns into one: canny, depth, as --control-preprocess does),
    strength, the part of the schedule it controls (diffusers' rule: step i of N when [i/N, (i+1)/N] lies inside
    [start, end]) and, for Union nets, the mode (a name or its number)."""

    path: str
    image: str
    strength: float = 1.0
    start: float = 0.0
    end: float = 1.0
    mode: str | None = None
    preprocess: str = "none"

    @classmethod
    def parse(cls, text: str) -> ControlNetSpec:
        """FILE,image=IMG[,strength=S][,start=A][,end=B][,mode=M][,preprocess=P]. Only a comma and `key=` start a new
        part, so Windows paths (C:\\nets\\x.safetensors) and file names with commas stay whole."""
        path, *parts = re.split(r",(?=\s*[A-Za-z_]+\s*=)", text)
        values: dict = {}
        for part in parts:
            key, _, value = part.partition("=")
            key, value = key.strip().lower(), value.strip()
            if key not in ("image", "strength", "start", "end", "mode", "preprocess"):
                raise UserError(f"--controlnet {text}: {key!r} is not a known key; use {CONTROLNET_FLAG}.")
            if key in ("strength", "start", "end"):
                try:
                    values[key] = float(value)
                except ValueError:
                    raise UserError(f"--controlnet {text}: {key}={value!r} is not a number.") from None
            else:
                values[key] = value.lower() if key == "preprocess" else value
        if not path.strip():
            raise UserError(f"--controlnet {text} names no ControlNet file: use {CONTROLNET_FLAG}.")
        if not values.get("image"):
            raise UserError(f"--controlnet {text} has no control image: add image=IMG ({CONTROLNET_FLAG}).")
        return cls(path.strip(), **values)

    def mode_index(self) -> int | None:
        """The Union mode's index (None when no mode is given); UserError for an unknown one."""
        if self.mode is None:
            return None
        key = str(self.mode).strip().lower()
        if key in UNION_MODES:
            return UNION_MODES[key]
        if key.isdigit():
            return int(key)
        raise UserError(
            f"--controlnet {self.path}: mode {self.mode!r} is not known; use {_one_of(tuple(UNION_MODES))} "
            "or a mode number."
        )

    def check(self) -> None:
        """Types and ranges, one sentence for the first that is wrong (the file and image are checked later)."""
        _check_text("controlnet", self.path)
        _check_text("controlnet", self.image)
        shown = f"{self.path},strength={self.strength!r}"
        _check_number("controlnet", self.strength, 0.0, MAX_CONTROL_STRENGTH,
                      f"a strength from 0 to {MAX_CONTROL_STRENGTH:g}", shown=shown)  # fmt: skip
        for name in ("start", "end"):
            value = getattr(self, name)
            _check_number(
                "controlnet", value, 0.0, 1.0, f"{name} from 0 to 1", shown=f"{self.path},{name}={value!r}"
            )
        if not self.start < self.end:
            raise UserError(
                f"--controlnet {self.path}: start={self.start:g} is not before end={self.end:g}; "
                "use 0 <= start < end <= 1."
            )
        if self.preprocess not in CONTROL_PREPROCESS:
            raise UserError(
                f"--controlnet {self.path}: preprocess={self.preprocess!r} is not known; use "
                f"{_one_of(CONTROL_PREPROCESS)}."
            )
        if self.mode is not None and not (isinstance(self.mode, str) or type(self.mode) is int):
            raise UserError(f"--controlnet {self.path}: mode {self.mode!r} is not a name or a number.")
        self.mode_index()


@dataclass
class ModelFiles:
    """Where the weights come from: an all-in-one checkpoint, four split files, or a ComfyUI models folder."""

    checkpoint: str | None = field(
        default=None, metadata=flag("an all-in-one checkpoint (transformer, CLIP, T5 and VAE)")
    )
    transformer: str | None = field(
        default=None, metadata=flag("the FLUX transformer (diffusion model) file")
    )
    clip: str | None = field(default=None, metadata=flag("the CLIP-L text encoder file"))
    t5: str | None = field(default=None, metadata=flag("the T5-XXL text encoder file"))
    vae: str | None = field(default=None, metadata=flag("the autoencoder file (ae.safetensors)"))
    models_dir: str | None = field(default=None, metadata=flag("a models folder in the ComfyUI layout"))
    clip_tokenizer: str | None = field(default=None, metadata=flag("folder with the CLIP tokenizer"))
    t5_tokenizer: str | None = field(default=None, metadata=flag("folder with the T5 tokenizer"))
    # FLUX.2 [klein]: the Qwen3 text encoder and its tokenizer (the transformer's tensor names give the family)
    text_encoder: str | None = field(
        default=None, metadata=flag("the Qwen3 text encoder file (FLUX.2 [klein])")
    )
    text_tokenizer: str | None = field(
        default=None, metadata=flag("folder with the Qwen3 tokenizer (FLUX.2 [klein])")
    )

    def check_given(self) -> None:
        """Some source of weights is named (the server's requests name the models folder)."""
        flux1 = all([self.transformer, self.clip, self.t5, self.vae])
        flux2 = all([self.transformer, self.text_encoder, self.vae])
        if not (self.checkpoint or self.models_dir or flux1 or flux2):
            raise UserError(
                "Say where the model is: --checkpoint FILE, --models-dir DIR, or all of --transformer --clip --t5 "
                "--vae (FLUX.2 [klein]: --transformer --text-encoder --vae)."
            )


@dataclass
class GenerateRequest:
    """One generation. The one place a request field is written: its type, default and flag (engine/cli.py
    derives `generate`'s flags from them), its check in `validate`; the launcher builds it (launcher/form.py),
    the server reads it from JSON (`from_dict`), the PNG carries `to_dict`."""

    prompt: str = field(metadata=flag("the prompt (T5; also CLIP unless --clip-prompt)"))
    # None: CLIP gets the same prompt as T5
    clip_prompt: str | None = field(default=None, metadata=flag("a separate prompt for CLIP-L"))
    negative: str | None = field(default=None, metadata=flag("negative prompt, used with --cfg above 1"))
    # true CFG: above 1 with a negative prompt runs a second pass
    cfg: float = field(default=1.0, metadata=flag("true CFG scale (1: off)"))
    # None: the edit image's size (--mask, --outpaint, --control-image, --reference), else 1024
    width: int | None = field(default=None, metadata=flag("default: 1024, or the edit image's size"))
    height: int | None = field(default=None, metadata=flag("default: 1024, or the edit image's size"))
    steps: int | None = field(
        default=None, metadata=flag(f"default: {DEV.steps} for [dev], {SCHNELL.steps} for [schnell]")
    )
    # distilled guidance, used by models with guidance_in ([dev])
    # None: the model's own (3.5; Fill and Canny 30, Depth 10, Kontext 2.5); the PNG records the value used
    guidance: float | None = field(
        default=None,
        metadata=flag(
            f"distilled guidance ([dev]); default {DEV.guidance:g}, Fill/Canny {FILL_GUIDANCE:g}, "
            f"Depth {DEPTH_GUIDANCE:g}, Kontext {KONTEXT_GUIDANCE:g}"
        ),
    )
    seed: int = field(default=0, metadata=flag())
    batch: int = field(default=1, metadata=flag())
    # "auto" (shift [dev], not [schnell]), "none", or a number: the mu of the shift
    shift: str = field(default="auto", metadata=flag("auto, none, or the shift's mu"))
    init_image: str | None = field(default=None, metadata=flag("img2img: the starting image"))
    denoise: float = field(default=1.0, metadata=flag("img2img strength (1: ignore the image)"))
    mask: str | None = field(
        default=None,
        metadata=flag("inpainting: white repaints, black keeps (with --init-image)", metavar="IMG"),
    )
    outpaint: str | None = field(
        default=None,
        metadata=flag(
            "outpainting: pixels to add on each side (with --init-image, a Fill model)", metavar="L,T,R,B"
        ),
    )
    control_image: str | None = field(
        default=None, metadata=flag("FLUX.1 Canny/Depth [dev]: the control image", metavar="IMG")
    )
    control_preprocess: str = field(
        default="none",
        metadata=flag("turn --control-image into a control map first", choices=CONTROL_PREPROCESS),
    )
    references: list[str] = field(
        default_factory=list,
        metadata=flag(
            "FLUX.1 Kontext: a reference image (repeatable)", name="reference", metavar="IMG", parse=str
        ),
    )
    redux_images: list[ReduxSpec] = field(
        default_factory=list,
        metadata=flag(
            "FLUX.1 Redux: an image prompt (repeatable; STRENGTH 0 to 10 scales its tokens, default 1; needs "
            "style_models/ and clip_vision/ in the models folder)",
            name="redux-image",
            metavar="IMG[:STRENGTH]",
            parse=ReduxSpec.parse,
        ),
    )
    loras: list[LoraSpec] = field(
        default_factory=list, metadata=flag(name="lora", metavar="FILE[:STRENGTH]", parse=LoraSpec.parse)
    )
    controlnets: list[ControlNetSpec] = field(
        default_factory=list,
        metadata=flag(
            "a FLUX.1 ControlNet and its control image (repeatable; a bare FILE is looked up in "
            "<models-dir>/controlnet/)",
            name="controlnet",
            metavar=CONTROLNET_FLAG,
            parse=ControlNetSpec.parse,
        ),
    )
    files: ModelFiles = field(default_factory=ModelFiles)
    t5_max_length: int | None = field(
        default=None,
        metadata=flag(
            f"T5 tokens: default {DEV.t5_max_length} for [dev], {SCHNELL.t5_max_length} for [schnell]"
        ),
    )
    device: str = field(default="auto", metadata=flag(choices=DEVICES))
    dtype: str = field(default="auto", metadata=flag(choices=DTYPES))
    # None: automatic
    vram_budget: float | None = field(default=None, metadata=flag("GB of weights to keep on the GPU"))
    # step caching: "none", "first-block" or "first-block:THRESHOLD" (engine.generation.step_cache)
    cache: str = field(
        default="none",
        metadata=flag(
            "step caching: skip most of the transformer on steps whose first block barely changed "
            f"(faster, slightly different image; default threshold {DEFAULT_CACHE_THRESHOLD:g})",
            metavar="none|first-block[:THRESHOLD]",
        ),
    )
    # keyword-only, so that it can come last (its flag too) without a default
    out: str = field(
        kw_only=True, metadata=flag("the PNG to write (never overwritten: a free name is picked)")
    )

    def validate(self) -> None:
        """Refuse what cannot be generated, in one sentence that says what to do. Every number is checked here
        for its type, for being finite and for its range, before anything is loaded or allocated."""
        for name in ("prompt", "clip_prompt", "negative", "out", "init_image", "shift", "device", "dtype"):
            _check_text(name, getattr(self, name), optional=name not in ("prompt", "out", "shift"))
        for name in ("width", "height"):
            if getattr(self, name) is None:
                continue
            value = _check_number(name, getattr(self, name), MIN_SIZE, MAX_SIZE,
                                  f"a size between {MIN_SIZE} and {MAX_SIZE} pixels", whole=True)  # fmt: skip
            if value % SIZE_MULTIPLE:
                raise UserError(
                    f"--{name} {value} is not a multiple of {SIZE_MULTIPLE}: FLUX needs multiples of "
                    f"{SIZE_MULTIPLE} (try {round(value / SIZE_MULTIPLE) * SIZE_MULTIPLE})."
                )
        if self.steps is not None:
            _check_number("steps", self.steps, 1, MAX_STEPS, f"1 to {MAX_STEPS} steps", whole=True)
        _check_number("seed", self.seed, 0, MAX_SEED, "a whole number from 0 to 2^64-1", whole=True)
        _check_number("batch", self.batch, 1, MAX_BATCH, f"1 to {MAX_BATCH} images", whole=True)
        _check_number("denoise", self.denoise, 0.0, 1.0, "a value above 0 and up to 1")
        if self.denoise == 0:
            raise UserError(f"--denoise {self.denoise} is out of range: use a value above 0 and up to 1.")
        _check_number("cfg", self.cfg, 1.0, MAX_CFG, f"1 (off) to {MAX_CFG:g}")
        if self.guidance is not None:
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
        if not isinstance(self.controlnets, list) or not all(
            isinstance(s, ControlNetSpec) for s in self.controlnets
        ):
            raise UserError(
                f"The request's controlnets are not a list of ControlNets: give each as --controlnet {CONTROLNET_FLAG}."
            )
        for spec in self.controlnets:
            spec.check()
        if self.device not in DEVICES:
            raise UserError(f"--device {self.device!r} is not known: use {_one_of(DEVICES)}.")
        if self.dtype not in DTYPES:
            raise UserError(f"--dtype {self.dtype!r} is not known: use {_one_of(DTYPES)}.")
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
        for spec in self.controlnets:
            check_image(spec.image, f"--controlnet {spec.path} image")
        self._validate_edits()

    def _validate_edits(self) -> None:
        """--mask, --outpaint, --control-image, --control-preprocess, --reference: each image readable, the
        margins in range, no two edits that need different models (the model's own checks: engine.generation.edits)."""
        for name in ("mask", "outpaint", "control_image"):
            _check_text(name, getattr(self, name), optional=True)
        if self.mask is not None:
            if self.init_image is None:
                raise UserError("--mask needs --init-image: give the image the mask belongs to.")
            check_image(self.mask, "--mask")
        if self.outpaint is not None:
            self.outpaint_margins()
            if self.init_image is None:
                raise UserError("--outpaint needs --init-image: give the image to extend.")
            if self.mask is not None:
                raise UserError(
                    "--outpaint and --mask cannot go together: the border is the mask; drop --mask."
                )
        if self.control_preprocess not in CONTROL_PREPROCESS:
            raise UserError(
                f"--control-preprocess {self.control_preprocess!r} is not known: use {_one_of(CONTROL_PREPROCESS)}."
            )
        if self.control_image is not None:
            check_image(self.control_image, "--control-image")
            if self.mask is not None or self.outpaint is not None:
                raise UserError(
                    "--control-image cannot go with --mask or --outpaint: they need different models; do one at a time."
                )
        elif self.control_preprocess != "none":
            raise UserError(
                f"--control-preprocess {self.control_preprocess} needs --control-image: give the image."
            )
        if not isinstance(self.redux_images, list) or not all(
            isinstance(s, ReduxSpec) for s in self.redux_images
        ):
            raise UserError(
                "The request's redux_images are not a list: give each as --redux-image IMG[:STRENGTH]."
            )
        for spec in self.redux_images:
            _check_text("redux-image", spec.path)
            _check_number(
                "redux-image", spec.strength, 0.0, MAX_REDUX_STRENGTH,
                f"a strength from 0 to {MAX_REDUX_STRENGTH:g}", shown=f"{spec.path}:{spec.strength!r}",
            )  # fmt: skip
            check_image(spec.path, "--redux-image")
        if not isinstance(self.references, list):
            raise UserError("The request's references are not a list: give each as --reference IMG.")
        for path in self.references:
            check_image(path, "--reference")
        if self.references and (self.mask is not None or self.outpaint is not None or self.control_image):
            raise UserError(
                "--reference cannot go with --mask, --outpaint or --control-image: they need different models; "
                "do one at a time."
            )

    def outpaint_margins(self) -> tuple[int, int, int, int]:
        """--outpaint L,T,R,B as four whole numbers of pixels (left, top, right, bottom)."""
        wanted = f"four whole numbers of pixels from 0 to {MAX_OUTPAINT}, as L,T,R,B, not all 0"
        parts = str(self.outpaint).split(",")
        try:
            margins = tuple(int(p.strip()) for p in parts)
        except ValueError:
            margins = ()
        if len(margins) != 4 or not all(0 <= m <= MAX_OUTPAINT for m in margins) or not any(margins):
            raise UserError(f"--outpaint {_shown(self.outpaint)} is not valid: use {wanted}.")
        return margins  # type: ignore[return-value]

    def input_images(self) -> list[tuple[str, str]]:
        """(role, path) of every input image: the init image, mask, control image, references, ControlNet and
        Redux images (the PNG records each one's name and SHA-256: engine/generation/png_output.py)."""
        inputs = [("init_image", self.init_image), ("mask", self.mask), ("control_image", self.control_image)]
        inputs += [("reference", path) for path in self.references]
        inputs += [("controlnet_image", spec.image) for spec in self.controlnets]
        inputs += [("redux_image", spec.path) for spec in self.redux_images]
        return [(role, path) for role, path in inputs if path]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> GenerateRequest:
        """A request from to_dict's output, or from the JSON a PNG of ours carries (whose batch_index, the
        image's place in its batch, and inputs, its input images' hashes, are not part of the request)."""
        if not isinstance(data, dict):
            raise UserError("The request is not a JSON object: send the fields of a generation as an object.")
        data = dict(data)
        data.pop("batch_index", None)
        data.pop("inputs", None)  # the PNG's record of the input images' names and hashes (png_output)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise UserError(f"Unknown request fields {sorted(map(str, unknown))[:5]}: remove them.")
        try:
            files = ModelFiles(**data.pop("files", {}) or {})
            loras = [LoraSpec(**item) for item in data.pop("loras", []) or []]
            controlnets = [ControlNetSpec(**item) for item in data.pop("controlnets", []) or []]
            redux = [ReduxSpec(**item) for item in data.pop("redux_images", []) or []]
            return cls(files=files, loras=loras, controlnets=controlnets, redux_images=redux, **data)
        except TypeError:  # a list where an object belongs, a missing prompt, an unknown field inside files
            raise UserError(
                "The request is malformed (a field is missing or of the wrong kind): send it as "
                "GenerateRequest.to_dict writes it."
            ) from None


def _one_of(names: tuple[str, ...]) -> str:
    return ", ".join(names[:-1]) + " or " + names[-1]


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
