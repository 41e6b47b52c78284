"""What the generate form holds, and how it becomes engine requests (plain data: no widgets, no torch)."""

from __future__ import annotations

import dataclasses
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from engine.contract import layout
from engine.contract.request import DEV, ControlNetSpec, GenerateRequest, LoraSpec, ModelFiles, ReduxSpec
from launcher.config import Settings
from launcher.edits import EditMode, EditValues
from launcher.loras import loras_in_request
from launcher.metadata import ImageParams
from launcher.models import family_for_file, is_all_in_one
from launcher.seeds import SeedMode, seeds_for

if TYPE_CHECKING:
    from launcher.controlnets import ControlNetValue

AUTO_MODEL = "auto"  # let the engine find the parts in the models folder


@dataclass
class FormValues:
    prompt: str = ""
    clip_prompt: str = ""
    negative: str = ""
    model: str = AUTO_MODEL  # AUTO_MODEL or the path of a checkpoint / diffusion model file
    width: int = 1024
    height: int = 1024
    steps: int = DEV.steps
    guidance: float = DEV.guidance
    cfg: float = 1.0
    seed: int = 0
    seed_mode: SeedMode = SeedMode.INCREMENT
    batch: int = 1
    hunt: bool = False
    init_image: str = ""
    denoise: float = 1.0
    loras: list[tuple[str, float]] = field(default_factory=list)  # (path, strength) of the enabled LoRAs
    edit: EditValues | None = None  # sent from the Edit screen: inpaint, outpaint, Kontext, control or Redux
    controlnets: list[ControlNetValue] = field(default_factory=list)  # checked, their maps made (panel)
    edit_guidance: float | None = None  # an edit's guidance; None: the model's own (Fill 30, Kontext 2.5...)

    def with_params(self, params: ImageParams) -> FormValues:
        """These values with everything the image's metadata says (what it does not say stays)."""
        values = dataclasses.replace(self, prompt=params.prompt or self.prompt)
        values.clip_prompt = params.clip_prompt or ""
        values.negative = params.negative or ""
        for name in ("width", "height", "steps", "guidance", "cfg", "seed"):
            value = getattr(params, name)
            if value is not None:
                setattr(values, name, value)
        values.seed_mode = SeedMode.FIXED
        values.init_image, values.denoise, values.edit = "", 1.0, None
        values.controlnets = []  # the panel's choices are restored from the request (GenerateScreen.use_params)
        # Our PNGs hold the request with its LoRAs; others carry theirs as <lora:name:w> tags in the prompt,
        # which the engine reads, so the panel's LoRAs are turned off for them.
        values.loras = loras_in_request(params.request)
        return values


def output_path(output_dir: Path, seed: int, index: int = 0) -> Path:
    """A new file name; the engine picks another if it exists (outputs never overwrite)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    suffix = f"-{index}" if index else ""
    return output_dir / f"{stamp}-{seed}{suffix}.png"


def build_request(values: FormValues, settings: Settings, seed: int, out: Path, models_root: Path) -> dict:
    """One GenerateRequest.to_dict() for the engine; what the form does not set keeps the request's default."""
    files = ModelFiles(models_dir=str(models_root))
    if values.model != AUTO_MODEL:
        folder = Path(values.model).parent.name
        if folder == layout.CHECKPOINTS or is_all_in_one(values.model):
            files.checkpoint = values.model
        else:
            files.transformer = values.model
    with_cfg = values.cfg > 1
    if values.model != AUTO_MODEL and family_for_file(values.model).flux2:
        values = dataclasses.replace(values, guidance=None)  # klein has no guidance: the engine's default
    edit = values.edit
    init_image, denoise = values.init_image or None, values.denoise if values.init_image else 1.0
    width, height, guidance = values.width, values.height, values.guidance
    mask = outpaint = control_image = None
    references: list[str] = []
    redux: list[tuple[str, float]] = []
    preprocess = "none"
    if edit is not None:
        # the size is the edit image's (the engine resolves it), the guidance the model's own unless given;
        # Redux images prompt a new picture of the size asked for
        if edit.mode is not EditMode.REDUX:
            width = height = None
        guidance = values.edit_guidance
        init_image, denoise = None, 1.0
        if edit.mode is EditMode.INPAINT:
            init_image, mask, denoise = edit.source, edit.mask or None, values.denoise
        elif edit.mode is EditMode.OUTPAINT:
            init_image, outpaint = edit.source, ",".join(str(m) for m in edit.margins)
        elif edit.mode is EditMode.KONTEXT:
            references = [edit.source, *edit.references]
        elif edit.mode is EditMode.REDUX:
            redux = edit.redux_images()
        else:
            control_image, preprocess = edit.source, edit.preprocess
    return GenerateRequest(
        prompt=values.prompt,
        out=str(out),
        clip_prompt=values.clip_prompt or None,
        negative=(values.negative or None) if with_cfg else None,
        cfg=values.cfg,
        width=width,
        height=height,
        steps=values.steps,
        guidance=guidance,
        seed=seed,
        init_image=init_image,
        denoise=denoise,
        mask=mask,
        outpaint=outpaint,
        control_image=control_image,
        control_preprocess=preprocess,
        references=references,
        redux_images=[ReduxSpec(path, float(strength)) for path, strength in redux],
        loras=[LoraSpec(str(path), float(strength)) for path, strength in values.loras],
        controlnets=[
            ControlNetSpec(c.path, c.image, c.strength, c.start, c.end, c.mode, c.engine_preprocess)
            for c in values.controlnets
        ],
        files=files,
        device=settings.device,
        dtype=settings.dtype,
        vram_budget=settings.vram_budget,
        cache=settings.cache,
    ).to_dict()


def build_requests(
    values: FormValues, settings: Settings, output_dir: Path, models_root: Path, rng: random.Random
) -> list[dict]:
    """The requests for one press of generate: `batch` images with seeds by the seed mode."""
    seeds = seeds_for(values.seed_mode, values.seed, values.batch, rng)
    return [
        build_request(values, settings, seed, output_path(output_dir, seed, i), models_root)
        for i, seed in enumerate(seeds)
    ]
