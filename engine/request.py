"""What a generation is asked to do: one dataclass, shared by the CLI, the TUI's engine server and the PNG metadata."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from engine.errors import UserError
from engine.step_cache import parse_cache


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
    cache: str = "none"  # step caching: "none", "first-block" or "first-block:THRESHOLD" (engine.step_cache)

    def validate(self) -> None:
        """Refuse what cannot be generated, in one sentence that says what to do."""
        for name in ("width", "height"):
            value = getattr(self, name)
            if value < 64 or value > 4096:
                raise UserError(f"--{name} {value} is out of range: use a size between 64 and 4096 pixels.")
            if value % 16:
                raise UserError(
                    f"--{name} {value} is not a multiple of 16: FLUX needs multiples of 16 "
                    f"(try {round(value / 16) * 16})."
                )
        if self.steps is not None and self.steps < 1:
            raise UserError(f"--steps {self.steps} is too small: use 1 or more steps.")
        if not 0 <= self.seed < 2**64:
            raise UserError(f"--seed {self.seed} is out of range: use a whole number from 0 to 2^64-1.")
        if self.batch < 1:
            raise UserError(f"--batch {self.batch} is too small: use 1 or more.")
        if not 0.0 < self.denoise <= 1.0:
            raise UserError(f"--denoise {self.denoise} is out of range: use a value above 0 and up to 1.")
        if self.cfg < 1.0:
            raise UserError(f"--cfg {self.cfg} is below 1: use 1 (off) or more.")
        if self.shift not in ("auto", "none"):
            try:
                float(self.shift)
            except ValueError:
                raise UserError(f"--shift {self.shift!r} is not valid: use auto, none or a number.") from None
        if self.t5_max_length is not None and not 1 <= self.t5_max_length <= 512:
            raise UserError(f"--t5-max-length {self.t5_max_length} is out of range: use 1 to 512.")
        if self.device not in ("auto", "cpu", "cuda"):
            raise UserError(f"--device {self.device!r} is not known: use auto, cpu or cuda.")
        if self.dtype not in ("auto", "fp32", "bf16", "fp16"):
            raise UserError(f"--dtype {self.dtype!r} is not known: use auto, fp32, bf16 or fp16.")
        if not str(self.out).lower().endswith(".png"):
            raise UserError(f"--out {self.out} does not end in .png: give a PNG file name.")
        try:
            parse_cache(self.cache)
        except ValueError:
            raise UserError(
                f"--cache {self.cache!r} is not valid: use none, first-block or first-block:T with T from 0 to 1."
            ) from None
        if self.init_image is not None and not Path(self.init_image).is_file():
            raise UserError(f"--init-image {self.init_image} does not exist: give the path of a PNG or JPEG.")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> GenerateRequest:
        """A request from to_dict's output, or from the JSON a PNG of ours carries (whose batch_index, the
        image's place in its batch, is not part of the request)."""
        data = dict(data)
        data.pop("batch_index", None)
        files = ModelFiles(**data.pop("files", {}) or {})
        loras = [LoraSpec(**item) for item in data.pop("loras", []) or []]
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise UserError(f"Unknown request fields {sorted(unknown)}: remove them.")
        return cls(files=files, loras=loras, **data)
