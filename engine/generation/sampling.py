"""Flow-matching sampling: noise, packing, the schedule, and the Euler loop with distilled guidance and true CFG."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

# the model's token layout, used by every stage alongside the schedule
from engine.models.flux1 import image_ids, pack, unpack  # noqa: F401

LATENT_CHANNELS = 16


def make_noise(seed: int, batch: int, height: int, width: int) -> torch.Tensor:
    """The project's seed convention (ComfyUI's): a CPU generator, float32, so a seed is the same everywhere."""
    generator = torch.Generator("cpu").manual_seed(seed)
    return torch.randn(
        (batch, LATENT_CHANNELS, height // 8, width // 8), generator=generator, dtype=torch.float32
    )


def shift_mu(image_tokens: int) -> float:
    """[dev]'s shift: linear in the token count, 0.5 at 256 tokens and 1.15 at 4096."""
    slope = (1.15 - 0.5) / (4096 - 256)
    return 0.5 + slope * (image_tokens - 256)


def schedule(steps: int, mu: float | None) -> list[float]:
    """steps+1 times from 1 to 0, shifted by mu (None: unshifted, as [schnell])."""
    ts = torch.linspace(1, 0, steps + 1, dtype=torch.float64).tolist()
    if mu is None:
        return ts
    return [t if t in (0.0, 1.0) else math.exp(mu) / (math.exp(mu) + (1 / t - 1)) for t in ts]


Velocity = Callable[[torch.Tensor, float], torch.Tensor]  # (x, t) → v


class NonFiniteLatents(Exception):
    """The latents held NaN or infinity at the end of a step: the image would come out black."""

    def __init__(self, step: int, total: int):
        super().__init__(f"NaN or infinity in the latents after step {step} of {total}")
        self.step, self.total = step, total


@dataclass
class StepReport:
    step: int
    total: int
    seconds: float
    denoised: torch.Tensor  # the step's estimate of the clean latent, x − t·v (what previews show)


def euler(
    x: torch.Tensor,
    times: list[float],
    velocity: Velocity,
    on_step: Callable[[StepReport], None],
    after_step: Callable[[torch.Tensor, float], torch.Tensor] | None = None,
) -> torch.Tensor:
    """x ← x + (t_next − t)·v(x, t), in float32 between steps whatever the compute dtype; then
    x ← after_step(x, t_next) when given (latent-blend inpainting). Latents that hold NaN or infinity at the end
    of a step stop the loop (NonFiniteLatents): nothing good can come of them."""
    total = len(times) - 1
    for i, (t, t_next) in enumerate(zip(times[:-1], times[1:])):
        start = time.perf_counter()
        v = velocity(x, t).float()
        denoised = x - t * v
        x = x + (t_next - t) * v
        if after_step is not None:
            x = after_step(x, t_next)
        if not bool(torch.isfinite(x).all()):
            raise NonFiniteLatents(i + 1, total)
        on_step(StepReport(i + 1, total, time.perf_counter() - start, denoised))
    return x


def img2img_skip(steps: int, denoise: float) -> int:
    """How many of the first steps img2img skips: diffusers' int(steps − min(steps·denoise, steps)).

    Not int(steps·(1 − denoise)): 1 − 0.8 is 0.19999999999999996 in floating point, so that rule skips one
    step fewer than diffusers at 10/20/30/50 steps with denoise 0.8 or 0.9. At least one step always runs
    (where diffusers refuses a denoise so small that none would)."""
    return min(int(steps - min(steps * denoise, steps)), steps - 1)


def img2img_start(noise: torch.Tensor, x0: torch.Tensor, times: list[float], denoise: float):
    """Skip the first `img2img_skip` steps and start from t·noise + (1−t)·x0 at the first kept time."""
    times = times[img2img_skip(len(times) - 1, denoise) :]
    t = times[0]
    return t * noise + (1 - t) * x0, times
