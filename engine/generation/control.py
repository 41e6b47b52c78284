"""ControlNets in a job: each --controlnet resolved and checked before anything loads (`plan_controls`), then
loaded through the ModelCache, its control image encoded once, and a per-step function set as `Inputs.control`
(`with_controls`) that runs every net the step is in range for and sums their residuals.

Gating follows diffusers (`controlled`: step i of N when [i/N, (i+1)/N] lies inside [start, end]), over the
steps this job runs (img2img gates over its shortened schedule, as FluxControlNetImg2ImgPipeline). The nets see
the positive prompt's text; with true CFG the negative pass reuses the same residuals, as diffusers does. The
nets and the transformer share the VRAM budget (`MemoryManager.share_budget`) and stream the same way."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from PIL import Image

from engine.contract.errors import UserError
from engine.contract.events import EventSink, Message
from engine.contract.request import ControlNetSpec
from engine.formats.model_files import controlnet_component
from engine.formats.weights import Component
from engine.generation import control_preprocess, vae_tiling
from engine.generation.conditioning import to_pixels
from engine.generation.model_cache import ModelCache
from engine.generation.plan import Plan
from engine.generation.prepare import Inputs
from engine.generation.sampling import pack
from engine.models.controlnet import ControlNet, ControlNetParams, add_residuals, controlled
from engine.models.flux1 import ControlResiduals, FluxParams


@dataclass(frozen=True)
class ControlPlan:
    """One --controlnet, resolved: its file (under the role "controlnet:i"), shapes and mode index."""

    spec: ControlNetSpec
    component: Component
    params: ControlNetParams
    mode: int | None

    @property
    def role(self) -> str:
        return self.component.role


def plan_controls(plan: Plan) -> list[ControlPlan]:
    """Each --controlnet's file found and read by its header, checked against the transformer (widths) and its
    mode; one sentence for the first that does not fit. Nothing loads."""
    request = plan.request
    if not request.controlnets:
        return []
    try:
        base = FluxParams.from_shapes(plan.files.components["transformer"].shapes())
    except (KeyError, ValueError, IndexError):
        raise UserError("ControlNets work with FLUX.1 transformers only: remove --controlnet.") from None
    controls = []
    for i, spec in enumerate(request.controlnets):
        component = controlnet_component(spec.path, request.files.models_dir)
        component = dataclasses.replace(component, role=f"controlnet:{i}")
        try:
            params = ControlNetParams.from_shapes(component.shapes())
        except (KeyError, ValueError, IndexError) as e:
            raise UserError(f"--controlnet {spec.path} cannot be used: {e}.") from None
        try:
            params.check_base(base)
        except ValueError as e:
            raise UserError(
                f"--controlnet {spec.path} does not fit the transformer ({e}): use a ControlNet made for this model."
            ) from None
        mode = spec.mode_index()
        if params.num_modes and mode is None:
            raise UserError(
                f"--controlnet {spec.path} is a Union ControlNet: give its mode (mode=canny, tile, depth, blur, "
                "pose, gray or lq)."
            )
        if not params.num_modes and mode is not None:
            raise UserError(f"--controlnet {spec.path} has no mode embedding: remove mode={spec.mode}.")
        if mode is not None and mode >= params.num_modes:
            raise UserError(
                f"--controlnet {spec.path}: mode {spec.mode} is outside its {params.num_modes} modes "
                "(canny 0, tile 1, depth 2, blur 3, pose 4, gray 5, lq 6)."
            )
        if spec.preprocess == "depth":  # its files checked before anything loads
            control_preprocess.depth_folder(
                request.files.models_dir, f"--controlnet {spec.path},preprocess=depth"
            )
        controls.append(ControlPlan(spec, component, params, mode))
    return controls


def with_controls(
    inputs: Inputs,
    controls: list[ControlPlan],
    plan: Plan,
    transformer: torch.nn.Module,
    models: ModelCache,
    on_event: EventSink,
) -> Inputs:
    """`inputs` with `control` set: the nets loaded (sharing the budget with the transformer), each control
    image resized to the output size and encoded once."""
    if not controls:
        return inputs
    conds = _control_images(controls, plan, models, on_event)
    nets: list[ControlNet] = [models.use(c.component, plan.dtype, plan.device) for c in controls]
    models.memory.share_budget([transformer, *nets])
    base: FluxParams = transformer.params
    rows, passes = inputs.batch, inputs.passes
    steps = len(inputs.times) - 1
    times = torch.tensor(inputs.times[:-1], dtype=torch.float64)
    guidance = torch.full((rows,), plan.request.guidance, device=plan.device)

    def control(img: torch.Tensor, timesteps: torch.Tensor) -> ControlResiduals | None:
        step = int((times - float(timesteps[0])).abs().argmin())
        parts = []
        for c, net, cond in zip(controls, nets, conds):
            if not controlled(step, steps, c.spec.start, c.spec.end):
                continue  # out of its range: the net does not run at all
            parts.append(
                net(
                    img[:rows],
                    inputs.img_ids,
                    inputs.txt[:rows],
                    inputs.txt_ids,
                    timesteps[:rows],
                    inputs.y[:rows],
                    guidance if c.params.guidance_embed else None,
                    cond,
                    base=base,
                    mode=c.mode,
                    strength=c.spec.strength,
                )  # fmt: skip
            )
        return _per_pass(add_residuals(*parts), passes)

    return dataclasses.replace(inputs, control=control)


def _control_images(
    controls: list[ControlPlan], plan: Plan, models: ModelCache, on_event: EventSink
) -> list[torch.Tensor]:
    """Each control image at the output size: pixels in [-1, 1] for XLabs nets, the autoencoder's packed
    latent mean for the others; on the device, in the compute dtype."""
    request = plan.request
    vae = None
    conds = []
    for c in controls:
        try:
            with Image.open(c.spec.image) as image:
                image = control_preprocess.preprocess(
                    c.spec.preprocess,
                    image,
                    request.width,
                    request.height,
                    request.files.models_dir,
                    plan.device,
                )
                pixels = to_pixels(image, request.width, request.height)
        except OSError:
            raise UserError(
                f"--controlnet {c.spec.path} image {c.spec.image} is not an image file: give a PNG or JPEG."
            ) from None
        pixels = pixels.to(plan.device, plan.support)
        if not c.params.pixel_hint:
            vae = vae or models.use(plan.files.components["vae"], plan.support, plan.device)
            with torch.inference_mode():
                pixels = pack(vae_tiling.encode(vae, pixels, on_message=lambda text: on_event(Message(text))))
        conds.append(pixels.to(plan.device, plan.dtype))
    if vae is not None:
        models.release(("vae",))
    return conds


def _per_pass(residuals: ControlResiduals | None, passes: int) -> ControlResiduals | None:
    """The positive pass's residuals for every CFG pass (diffusers reuses them for the negative prompt); a
    tensor shared by several blocks is repeated once."""
    if residuals is None or passes == 1:
        return residuals
    memo: dict[int, torch.Tensor] = {}

    def rows(r: torch.Tensor | None) -> torch.Tensor | None:
        if r is None:
            return None
        if id(r) not in memo:
            memo[id(r)] = r.repeat(passes, 1, 1)
        return memo[id(r)]

    return ControlResiduals([rows(r) for r in residuals.double], [rows(r) for r in residuals.single])
