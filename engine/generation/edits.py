"""Issue 14's edits in the pipeline: which one a request asks for and whether its transformer can do it
(`resolve`, at plan time, from the transformer's `img_in` width), and the conditioning each adds to the
denoising loop's Inputs (`condition`, after `prepare`).

- `--init-image I --mask M`: FLUX.1 Fill (384 inputs) gets `img_cond` (`fill_conditioning`); any other
  transformer inpaints by latent blending (`InpaintBlend` after every step, as diffusers' FluxInpaintPipeline).
- `--init-image I --outpaint L,T,R,B`: Fill on `outpaint_canvas` (refused without Fill).
- `--control-image C [--control-preprocess canny|depth]`: FLUX.1 Canny/Depth [dev] (128 inputs) get `img_cond`
  (`control_conditioning`); so does [dev] with a Canny/Depth control LoRA, which widens `img_in` to 128
  (engine/formats/lora: zero columns plus the LoRA's product, as BFL's `LinearLora` and ComfyUI do).
- `--reference R...`: FLUX.1 Kontext's reference tokens and their RoPE (`reference_tokens`, `with_references`).

Without --width/--height the size is the edit image's (`edit_size`; the outpaint canvas; Kontext's
`kontext_size` of the first reference); without --guidance, the guidance the model was trained with."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from types import SimpleNamespace

import torch
from PIL import Image

from engine.contract.errors import UserError
from engine.contract.events import EventSink, Message
from engine.contract.request import (
    CANNY_GUIDANCE,
    DEPTH_GUIDANCE,
    DEV,
    FILL_GUIDANCE,
    KONTEXT_GUIDANCE,
    MAX_SIZE,
    MIN_SIZE,
    GenerateRequest,
)
from engine.formats.lora import LoraLibrary
from engine.formats.model_files import ResolvedFiles
from engine.formats.weights import uncomputable_format
from engine.generation import conditioning, control_preprocess, sampling
from engine.generation.model_cache import ModelCache
from engine.generation.plan import Plan
from engine.generation.prepare import Inputs, with_references
from engine.models.flux1 import FluxParams

PLAIN, CONTROL, FILL = 64, 128, 384  # the transformer's input features: plain, Canny/Depth [dev], Fill
DEFAULT_SIZE = 1024


def in_channels(files: ResolvedFiles) -> int:
    shape = files.components["transformer"].shapes().get("img_in.weight")
    return int(shape[-1]) if shape else PLAIN


def control_lora(request: GenerateRequest, loras: LoraLibrary | None) -> tuple[str, int] | None:
    """(file name, input features) of the first LoRA of the job (strength ≠ 0) that widens `img_in` past a plain
    model's 64: a Canny/Depth control LoRA (128). None: no LoRA widens it."""
    for spec in request.loras if loras is not None else ():
        width = loras.load(spec.path).img_in_width if spec.strength != 0 else None
        if width is not None and width > PLAIN:
            return Path(spec.path).name, width
    return None


def resolve(
    request: GenerateRequest, files: ResolvedFiles, loras: LoraLibrary | None = None
) -> GenerateRequest:
    """The request with its size and guidance filled in, after refusing (one sentence) an edit the transformer
    cannot do or a transformer that needs an edit the request does not give. A Canny/Depth control LoRA among
    the job's LoRAs (read from `loras`) makes a plain transformer a control one: its `img_in` takes 128."""
    # FLUX.2 checks its own flags (flux2_stages), and a file in a format the engine does not compute is refused by
    # name when it loads (its packed shapes say nothing here): only the default size applies to either (for
    # FLUX.2 with --reference, the first reference's, flux2_references)
    if files.family == "flux2" or uncomputable_format(files.components["transformer"]):
        from engine.generation.flux2_references import default_size  # klein sizes references its own way

        width, height = (files.family == "flux2" and default_size(request.references)) or (DEFAULT_SIZE,) * 2
        return dataclasses.replace(request, width=request.width or width, height=request.height or height)
    channels = in_channels(files)
    name = files.components["transformer"].file.path.name
    widened = control_lora(request, loras)
    if widened is not None:
        lora, width = widened
        if width != CONTROL:
            raise UserError(
                f"The LoRA {lora} gives img_in {width} input features: FluxDeck widens it only for the Canny/Depth "
                f"control LoRAs ({CONTROL}); for Fill use the flux1-fill-dev transformer."
            )
        if channels != PLAIN:
            raise UserError(
                f"The LoRA {lora} is a Canny/Depth control LoRA: it goes on a plain FLUX.1 [dev] transformer, "
                f"not on {name}; use flux1-dev with it."
            )
        channels, name = CONTROL, lora
    inpaint = request.mask is not None or request.outpaint is not None
    if channels == FILL and not inpaint:
        raise UserError(
            f"{name} is FLUX.1 Fill: give --init-image with --mask or --outpaint, or use another transformer."
        )
    if channels == CONTROL and request.control_image is None:
        raise UserError(
            f"{name} is FLUX.1 Canny/Depth [dev]: give --control-image, or use another transformer."
        )
    if channels not in (PLAIN, CONTROL, FILL):
        raise UserError(f"{name} takes {channels} input features, which no FLUX.1 model known here has.")
    if request.outpaint is not None and channels != FILL:
        raise UserError(f"--outpaint needs a FLUX.1 Fill transformer ({name} is not): use flux1-fill-dev.")
    if request.control_image is not None and channels != CONTROL:
        raise UserError(
            f"--control-image needs FLUX.1 Canny or Depth [dev] ({name} has no control inputs): use one of them, "
            "or a Canny/Depth control LoRA with --lora."
        )
    if request.control_preprocess == "depth":
        control_preprocess.depth_folder(request.files.models_dir)  # its files checked before anything loads
    size = _edit_size(request)
    guidance = request.guidance
    if guidance is None:
        guidance = DEV.guidance
        if channels == FILL:
            guidance = FILL_GUIDANCE
        elif channels == CONTROL:
            guidance = DEPTH_GUIDANCE if "depth" in name.lower() else CANNY_GUIDANCE
        elif request.references:
            guidance = KONTEXT_GUIDANCE
    return dataclasses.replace(
        request,
        width=request.width if request.width is not None else size[0],
        height=request.height if request.height is not None else size[1],
        guidance=guidance,
    )


def _size_of(path: str) -> tuple[int, int]:
    with Image.open(path) as image:
        return image.size


def _edit_size(request: GenerateRequest) -> tuple[int, int]:
    """(width, height) without --width/--height."""
    if request.outpaint is not None:
        left, top, right, bottom = request.outpaint_margins()
        width, height = _size_of(request.init_image)
        return _clamped((_round_up(width + left + right), _round_up(height + top + bottom)))
    if request.mask is not None:
        return _clamped(conditioning.edit_size(SimpleNamespace(size=_size_of(request.init_image))))
    if request.control_image is not None:
        return _clamped(conditioning.edit_size(SimpleNamespace(size=_size_of(request.control_image))))
    if request.references:
        return conditioning.kontext_size(*_size_of(request.references[0]), conditioning.KONTEXT_RESOLUTIONS)
    return DEFAULT_SIZE, DEFAULT_SIZE


def _round_up(size: int) -> int:
    return size + -size % 16


def _clamped(size: tuple[int, int]) -> tuple[int, int]:
    width, height = size
    if not (MIN_SIZE <= width <= MAX_SIZE and MIN_SIZE <= height <= MAX_SIZE):
        raise UserError(
            f"The edit image is {width}x{height}, outside {MIN_SIZE} to {MAX_SIZE} pixels: give --width and --height."
        )
    return size


def _open(path: str, name: str) -> Image.Image:
    try:
        with Image.open(path) as image:
            image.load()
            return image
    except OSError:
        raise UserError(f"{name} {path} is not an image file: give a PNG or JPEG.") from None


def condition(
    inputs: Inputs, plan: Plan, params: FluxParams, models: ModelCache, on_event: EventSink
) -> Inputs:
    """Inputs with the request's edit conditioning (on the transformer's device and dtype); unchanged without an
    edit."""
    request = plan.request
    if not (request.mask or request.outpaint or request.control_image or request.references):
        return inputs
    width, height, batch = request.width, request.height, request.batch
    device, dtype = plan.device, plan.dtype

    def notify(text: str) -> None:
        on_event(Message(text))

    vae = models.use(plan.files.components["vae"], plan.support, plan.device)
    with torch.inference_mode():
        if request.mask is not None or request.outpaint is not None:
            image = _open(request.init_image, "--init-image")
            if request.outpaint is not None:
                image, mask_image = conditioning.outpaint_canvas(image, *request.outpaint_margins())
            else:
                mask_image = _open(request.mask, "--mask")
                if mask_image.size != (width, height):
                    notify(
                        f"the mask is {mask_image.size[0]}x{mask_image.size[1]}: resized to {width}x{height}"
                    )
            mask = conditioning.load_mask(mask_image, width, height)
            pixels = conditioning.to_pixels(image, width, height)
            if params.in_channels == FILL:
                cond = conditioning.fill_conditioning(vae, pixels, mask, batch, notify)
                return dataclasses.replace(inputs, img_cond=cond.to(device, dtype))
            x0 = sampling.pack(conditioning.encode(vae, pixels, notify)).float().to(device)
            noise = sampling.pack(sampling.make_noise(request.seed, batch, height, width)).to(device)
            blend = conditioning.InpaintBlend(
                x0.expand(batch, -1, -1), noise, conditioning.latent_mask(mask).to(device)
            )
            return dataclasses.replace(inputs, blend=blend)
        if request.control_image is not None:
            image = _open(request.control_image, "--control-image")
            image = control_preprocess.preprocess(
                request.control_preprocess, image, width, height, request.files.models_dir, device
            )
            cond = conditioning.control_conditioning(vae, image, width, height, batch, notify)
            return dataclasses.replace(inputs, img_cond=cond.to(device, dtype))
        images = [_open(path, "--reference") for path in request.references]
        refs = conditioning.reference_tokens(vae, images, batch, notify, conditioning.KONTEXT_RESOLUTIONS)
        return with_references(inputs, refs.tokens.to(device, dtype), refs.ids[:1].to(device), params)
