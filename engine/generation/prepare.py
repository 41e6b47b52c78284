"""Everything the denoising loop reads, made before it starts: Inputs (noise, start latents, schedule, ids,
RoPE, text per CFG pass, guidance, image conditioning).

As in BFL's sampling.py, an edit feature is one more function that fills a slot of Inputs — Fill, Canny and
Depth set `img_cond` (channels concatenated to the image tokens), Kontext adds reference tokens with their own
positions (`with_references`), a ControlNet sets `control` — and the denoising loop passes them on."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from engine.contract.errors import UserError
from engine.contract.events import EventSink, Message
from engine.generation import conditioning, sampling, vae_tiling
from engine.generation.encode import TextConditioning
from engine.generation.model_cache import ModelCache
from engine.generation.plan import Plan
from engine.models.flux1 import ControlResiduals, FluxParams, position_embedding

Control = Callable[[torch.Tensor, torch.Tensor], ControlResiduals]  # (image tokens of every row, timesteps)


@dataclass
class Inputs:
    """The denoising loop's inputs. Tensors are on the device; rows = passes × batch, the prompt's rows first."""

    x: torch.Tensor  # (batch, L_img, 64) packed start latents, float32
    times: list[float]  # the schedule this job runs, 1 → 0 (img2img starts later)
    img_ids: torch.Tensor  # (1, L_img, 3)
    txt_ids: torch.Tensor  # (1, L_txt, 3)
    pe: torch.Tensor  # RoPE of cat(txt_ids, img_ids, ref_ids)
    txt: torch.Tensor  # (rows, L_txt, 4096) T5 states, compute dtype
    y: torch.Tensor  # (rows, 768) CLIP pooled, compute dtype
    guidance: torch.Tensor | None  # (rows,) distilled guidance; None for a model without its embedding
    passes: int  # 1, or 2 with true CFG (prompt, negative prompt)
    cfg: float  # the true-CFG scale when passes == 2
    height: int
    width: int
    # image conditioning, per image of the batch (the denoising loop repeats it for each CFG pass); None today
    img_cond: torch.Tensor | None = None  # (batch, L_img, C): Fill/Canny/Depth channels, compute dtype
    ref_img: torch.Tensor | None = None  # (batch, L_ref, 64): Kontext reference tokens, compute dtype
    ref_ids: torch.Tensor | None = None  # (1, L_ref, 3): their positions (set with `with_references`)
    control: Control | None = None  # ControlNets: each step's residuals for every row
    # latent-blend inpainting: (x after a step, t_next) → x with the kept region put back (InpaintBlend)
    blend: Callable[[torch.Tensor, float], torch.Tensor] | None = None

    @property
    def batch(self) -> int:
        return self.x.shape[0]

    @property
    def dtype(self) -> torch.dtype:
        return self.txt.dtype


def prepare(
    plan: Plan, text: list[TextConditioning], params: FluxParams, models: ModelCache, on_event: EventSink
) -> Inputs:
    """Noise, start latents and schedule, then the positions and conditioning the transformer reads."""
    request, device = plan.request, plan.device
    x, times = _start(plan, models, on_event)
    img_ids = sampling.image_ids(1, request.height, request.width).to(device)
    txt_ids = torch.zeros(1, text[0].states.shape[1], 3, device=device)  # T5's tokens, then any Redux tokens
    pe = position_embedding(torch.cat((txt_ids, img_ids), 1), params.axes_dim, params.theta)
    passes, batch = len(text), request.batch
    return Inputs(
        x=sampling.pack(x).to(device),
        times=times,
        img_ids=img_ids,
        txt_ids=txt_ids,
        pe=pe,
        txt=torch.cat([c.states.to(device, plan.dtype).expand(batch, -1, -1) for c in text]),
        y=torch.cat([c.pooled.to(device, plan.dtype).expand(batch, -1) for c in text]),
        guidance=torch.full((passes * batch,), request.guidance, device=device)
        if params.guidance_embed
        else None,
        passes=passes,
        cfg=request.cfg,
        height=request.height,
        width=request.width,
    )


def with_references(
    inputs: Inputs, ref_img: torch.Tensor, ref_ids: torch.Tensor, params: FluxParams
) -> Inputs:
    """Inputs with reference image tokens (Kontext) that every image token attends to, and RoPE over their ids."""
    ids = torch.cat((inputs.txt_ids, inputs.img_ids, ref_ids), 1)
    pe = position_embedding(ids, params.axes_dim, params.theta)
    return dataclasses.replace(inputs, ref_img=ref_img, ref_ids=ref_ids, pe=pe)


def _start(plan: Plan, models: ModelCache, on_event: EventSink) -> tuple[torch.Tensor, list[float]]:
    """The seed's noise and the schedule; img2img starts from the init image's latents noised to a later time."""
    request = plan.request
    noise = sampling.make_noise(request.seed, request.batch, request.height, request.width)
    image_tokens = (request.height // 16) * (request.width // 16)
    times = sampling.schedule(plan.steps, _mu(request.shift, plan.schnell, image_tokens))
    if not request.init_image:
        return noise, times
    vae = models.use(plan.files.components["vae"], plan.support, plan.device)
    x0 = _encode_image(vae, _init_image(request), request.width, request.height, plan, on_event)
    return sampling.img2img_start(
        noise, x0.expand(request.batch, -1, -1, -1).float().cpu(), times, request.denoise
    )


def _mu(shift: str, schnell: bool, image_tokens: int) -> float | None:
    if shift == "none" or (shift == "auto" and schnell):
        return None
    if shift == "auto":
        return sampling.shift_mu(image_tokens)
    return float(shift)


def _init_image(request) -> Image.Image:
    """The image img2img starts from: --init-image, or with --outpaint its grown canvas (the border mid-gray), as
    diffusers' FluxFillPipeline starts from the canvas it is given when its strength is below 1."""
    try:
        with Image.open(request.init_image) as opened:
            image = opened.convert("RGB")
    except OSError:
        raise UserError(
            f"--init-image {request.init_image} is not an image file: give a PNG or JPEG."
        ) from None
    if request.outpaint is not None:
        image = conditioning.outpaint_canvas(image, *request.outpaint_margins())[0]
    return image


def _encode_image(
    vae, image: Image.Image, width: int, height: int, plan: Plan, on_event: EventSink
) -> torch.Tensor:
    if image.size != (width, height):
        image = image.resize((width, height), Image.Resampling.LANCZOS)
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)[None]
    with torch.inference_mode():
        return vae_tiling.encode(
            vae, pixels.to(device=plan.device, dtype=plan.support), on_message=lambda t: on_event(Message(t))
        )
