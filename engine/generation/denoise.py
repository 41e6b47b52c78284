"""The denoising loop: the velocity of every CFG pass in one transformer batch, the step cache handed to the
model, an out-of-memory step retried under a lower budget, cancel between steps, and latents that turn to
NaN/infinity stopping the job with their likely cause."""

from __future__ import annotations

import threading
from collections.abc import Callable

import torch
from torch import nn

from engine.contract.errors import Cancelled, UserError
from engine.contract.events import EventSink, Message
from engine.formats.lora import lora_name
from engine.formats.weights import Component
from engine.generation import sampling
from engine.generation.plan import Plan
from engine.generation.prepare import Inputs
from engine.models.flux1 import StepCache
from engine.runtime.memory import GB, MemoryManager


def denoise(
    transformer: nn.Module,
    inputs: Inputs,
    cache: StepCache | None,
    progress: Callable[[sampling.StepReport], None],
    cancel: threading.Event,
    *,
    memory: MemoryManager,
    on_event: EventSink,
    nonfinite_cause: Callable[[], str],
) -> torch.Tensor:
    """Euler over `inputs.times` from `inputs.x`; returns the final packed latents (batch, L_img, 64), float32."""
    velocity = _velocity(transformer, inputs, cache, cancel)
    try:
        return sampling.euler(
            inputs.x, inputs.times, _retrying(velocity, transformer, memory, on_event), progress, inputs.blend
        )
    except sampling.NonFiniteLatents as error:
        raise UserError(
            f"The image turned to NaN/infinity at step {error.step} of {error.total}, so it would be black: "
            f"the likely cause is {nonfinite_cause()}."
        ) from None


def _velocity(
    transformer: nn.Module, inputs: Inputs, cache: StepCache | None, cancel: threading.Event
) -> sampling.Velocity:
    """(x, t) → v. The prompt and, with true CFG, the negative prompt run as one batch: each streamed weight
    crosses the bus once per step, not once per prompt."""
    passes, device = inputs.passes, inputs.x.device
    rows = passes * inputs.batch
    img_cond, ref_img = _per_pass(inputs.img_cond, passes), _per_pass(inputs.ref_img, passes)

    @torch.inference_mode()
    def velocity(x: torch.Tensor, t: float) -> torch.Tensor:
        if cancel.is_set():
            raise Cancelled("cancelled")
        # t in fp32 whatever the compute dtype (bf16 would make 0.7 0.69921875), as ComfyUI passes it
        timesteps = torch.full((rows,), t, device=device, dtype=torch.float32)
        img = x.to(inputs.dtype).repeat(passes, 1, 1)
        control = None if inputs.control is None else inputs.control(img, timesteps)
        v = transformer(
            img, inputs.img_ids, inputs.txt, inputs.txt_ids, timesteps, inputs.y, inputs.guidance, inputs.pe,
            img_cond=img_cond, ref_img=ref_img, ref_ids=inputs.ref_ids, control=control, cache=cache,
        ).float()  # fmt: skip
        if passes == 1:
            return v
        positive, negative = v.chunk(2)
        return negative + inputs.cfg * (positive - negative)

    return velocity


def _per_pass(t: torch.Tensor | None, passes: int) -> torch.Tensor | None:
    return t if t is None or passes == 1 else t.repeat(passes, *([1] * (t.dim() - 1)))


def _retrying(
    velocity: sampling.Velocity, transformer: nn.Module, memory: MemoryManager, on_event: EventSink
) -> sampling.Velocity:
    """A step that runs out of GPU memory lowers the budget and runs again; it never ends the job."""

    def step(x: torch.Tensor, t: float) -> torch.Tensor:
        while True:
            try:
                return velocity(x, t)
            except torch.OutOfMemoryError:
                before = memory.budget
                after = memory.lower_budget(transformer)
                if before is not None and after >= before:
                    raise UserError(
                        "Out of GPU memory even with every block streamed: use a smaller size, "
                        "close other programs that use the GPU, or use --device cpu."
                    ) from None
                on_event(
                    Message(
                        f"out of GPU memory: the weight budget is now {after / GB:.2f} GB; retrying the step"
                    )
                )

    return step


def nonfinite_cause(plan: Plan) -> str:
    """The likely cause of NaN/infinity in the latents, in words: a weight file, a LoRA or a setting."""
    request, transformer = plan.request, plan.files.components["transformer"]
    if _holds_nonfinite(transformer):
        return f"the transformer file {transformer.file.path}, which holds NaN/infinite weights (download it again)"
    loras = [spec for spec in request.loras if spec.strength != 0]
    if loras:
        names = ", ".join(f"{lora_name(s.path)} (strength {s.strength:g})" for s in loras)
        return f"the LoRA {names}: try a lower strength or generate without it"
    if plan.dtype == torch.float16:
        return "float16 overflowing in this model: use --dtype bf16 or --dtype fp32"
    settings = [
        f"--{name} {value:g}"
        for name, value, usual in (("guidance", request.guidance, 10), ("cfg", request.cfg, 10))
        if value > usual
    ]
    if request.shift not in ("auto", "none"):
        settings.append(f"--shift {request.shift}")
    if settings:
        return f"a setting far from the usual ({', '.join(settings)}): try the defaults"
    return f"the transformer file {transformer.file.path} or a setting: download the file again and try the defaults"


def _holds_nonfinite(component: Component) -> bool:
    """Whether the component's stored float weights hold NaN or infinity (read tensor by tensor from the
    mapped file; quantized GGUF blocks are not expanded)."""
    for tensor in component.load().values():
        if isinstance(tensor, torch.Tensor) and tensor.is_floating_point():
            if not bool(torch.isfinite(tensor.float() if tensor.element_size() == 1 else tensor).all()):
                return True
    return False
