"""Will a set of model files run on this machine, and how long will an image take: the placement rules of
`placement` applied to the files' bytes spread over their architecture (`footprint`), and a step's FLOPs and
streamed bytes divided by the speed the selftest measured (`speed`). The wizard, the models screen and
`python -m bootstrap list` all ask this one function; the formula is in docs/estimates.md."""

from __future__ import annotations

import math
from dataclasses import dataclass

from engine.formats.gguf_quants import QType, raw_nbytes
from engine.runtime import footprint
from engine.runtime.placement import GB, ModelBytes, Placement, activation_bytes, place
from engine.runtime.speed import Speed

TEXT_TOKENS = {"flux1-dev": 512, "flux1-schnell": 256, "klein-4b": 512, "klein-9b": 512}
ENCODER_TOKENS = {"t5-xxl": None, "clip-l": 77, "qwen3-4b": 512, "qwen3-8b": 512}  # None: the transformer's


CONTROLNET = "controlnet"  # runs beside the transformer every step, in the same budget
CONTROLNET_BLOCKS = 8


@dataclass(frozen=True)
class Part:
    """One model inside a file: its architecture (footprint.ARCHITECTURES) and stored format."""

    arch: str
    fmt: str  # "bf16", "fp16", "fp32", "fp8", or a GGUF type name ("Q8_0", "Q4_K", …)
    file_bytes: int | None = None  # this model's share of its file; None: from the format's bytes per weight

    def model_bytes(self) -> ModelBytes:
        if self.arch == CONTROLNET:  # no published shape to count: its bytes in equal blocks
            size = self.file_bytes or 0
            return ModelBytes(CONTROLNET, (size // CONTROLNET_BLOCKS,) * CONTROLNET_BLOCKS, 0)
        layout = footprint.layout(self.arch)
        return layout.bytes_for(self.arch, self.file_bytes or round(self.expected_bytes()))

    def expected_bytes(self) -> float:
        """The file's bytes for this model when none are published: its weights at the format's bytes per weight;
        a GGUF transformer keeps what is outside its blocks (embedders, modulations, final layer) in bf16, as the
        published FLUX.1 and [klein] GGUF files do (their sizes to within the header)."""
        layout = footprint.layout(self.arch)
        per_weight = bytes_per_weight(self.fmt)
        if (
            self.fmt in ("bf16", "fp16", "fp32", "fp8")
            or self.arch not in footprint.TRANSFORMER_ARCHITECTURES
        ):
            return layout.file_params * per_weight
        blocks = sum(layout.block_params)
        return blocks * per_weight + (layout.file_params - blocks) * 2


def bytes_per_weight(fmt: str) -> float:
    if fmt in ("bf16", "fp16"):
        return 2.0
    if fmt == "fp32":
        return 4.0
    if fmt == "fp8":
        return 1.0
    kind = QType[fmt.removesuffix("_S").removesuffix("_M").removesuffix("_L")]
    return raw_nbytes(kind, (256,)) / 256


@dataclass(frozen=True)
class Machine:
    ram: int  # bytes
    vram: int | None  # bytes of the card; None: the CPU does the work
    speed: Speed | None = None  # None: no time estimate


@dataclass(frozen=True)
class Estimate:
    placement: Placement
    fits: bool
    why: str  # one clause: what it takes here, or what is short
    step_seconds: float | None  # None without a speed
    image_seconds: float | None

    def time_text(self) -> str:
        if self.step_seconds is None or self.image_seconds is None:
            return "no time estimate (the selftest has not measured this machine)"
        # ASCII only: a Windows console redirected to a file writes in the ANSI code page
        return f"about {duration(self.step_seconds)} per step, {duration(self.image_seconds)} per 1024x1024 image"


def duration(seconds: float) -> str:
    if seconds < 9.5:
        return f"{seconds:.1f} s"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _gb(nbytes: float) -> str:
    return f"{nbytes / GB:.1f} GB"


def estimate(
    parts: list[Part], machine: Machine, steps: int, width: int = 1024, height: int = 1024
) -> Estimate:
    """Placement, verdict and time of `steps` steps at `width`×`height` for these models on `machine`."""
    models = _stages([p.model_bytes() for p in parts])
    placed = place(models, machine.vram, _activations(parts, machine, width, height))
    if machine.ram >= placed.ram_well:
        fits = True
        if placed.gpu:
            streamed = max((placed.streamed_bytes(m.name) for m in models), default=0)
            why = (
                "resident on the GPU: nothing streams"
                if not streamed
                else f"streams up to {_gb(streamed)} per step from {_gb(placed.ram_well)} RAM"
            )
        else:
            why = f"runs on the CPU in {_gb(placed.ram_needed)} RAM"
    elif machine.ram >= placed.ram_needed:
        fits = True
        why = f"streams from pageable memory: {_gb(placed.ram_well)} RAM would let it pin and run faster"
    else:
        fits = False
        role = "transformer" if placed.largest in footprint.TRANSFORMER_ARCHITECTURES else "text encoder"
        where = "on the CPU it" if not placed.gpu else f"streaming the {role} from RAM"
        why = f"{where} needs {_gb(placed.ram_needed)} RAM, this machine has {_gb(machine.ram)}"
    step, image = _times(parts, models, placed, machine, steps, width, height)
    return Estimate(placed, fits, why, step, image)


def _activations(parts: list[Part], machine: Machine, width: int, height: int) -> int:
    """The transformer's largest activations at this size (the engine takes the same for a job)."""
    transformer = next((p for p in parts if p.arch in footprint.TRANSFORMER_ARCHITECTURES), None)
    if transformer is None:
        return 0
    shape = footprint.transformer_params(transformer.arch)
    tokens = (width // 16) * (height // 16) + TEXT_TOKENS[transformer.arch]
    dtype_bytes = 4 if machine.speed is not None and machine.speed.compute_dtype == "float32" else 2
    return activation_bytes(tokens, shape.hidden_size, shape.mlp_hidden, dtype_bytes)


def _stages(models: list[ModelBytes]) -> list[ModelBytes]:
    """ControlNets join the transformer's stage: they run with it every step and share its budget."""
    nets = [m for m in models if m.name == CONTROLNET]
    if not nets:
        return models
    rest = [m for m in models if m.name != CONTROLNET]
    for i, m in enumerate(rest):
        if m.name in footprint.TRANSFORMER_ARCHITECTURES:
            blocks = m.block_bytes + tuple(b for net in nets for b in net.block_bytes)
            rest[i] = ModelBytes(m.name, blocks, m.rest_bytes + sum(net.rest_bytes for net in nets))
            break
    return rest


def _times(parts, models, placed: Placement, machine: Machine, steps: int, width: int, height: int):
    speed = machine.speed
    if speed is None or (placed.gpu and speed.device != "cuda"):
        return None, None
    flops = speed.compute_flops
    transformer = next((p for p in parts if p.arch in footprint.TRANSFORMER_ARCHITECTURES), None)
    if transformer is None:
        return None, None
    layout = footprint.layout(transformer.arch)
    expand = speed.expand.get(_expand_kind(transformer.fmt))
    # the whole block's rate (products, attention, norms), not the bare product's
    step = footprint.transformer_flops(transformer.arch, width, height, TEXT_TOKENS[transformer.arch])
    step /= speed.block_flops
    # a ControlNet of the base's width costs its weights' share of the base's FLOPs (same tokens, same layers)
    net_weights = sum((p.file_bytes or 0) / bytes_per_weight(p.fmt) for p in parts if p.arch == CONTROLNET)
    step *= 1 + net_weights / layout.loaded_params
    if expand:
        step += layout.loaded_params / expand  # each weight expands once per pass
    if placed.gpu and speed.h2d:
        step = max(step, placed.streamed_bytes(transformer.arch) / speed.h2d)
    once = 0.0
    # on the CPU the text encoders and the autoencoder compute in fp32 (engine/runtime/devices.py)
    other_flops = speed.flops.get("float32", flops) if speed.device == "cpu" else flops
    for part in parts:
        if part.arch in ENCODER_TOKENS:
            tokens = ENCODER_TOKENS[part.arch] or TEXT_TOKENS[transformer.arch]
            once += footprint.encoder_flops(part.arch, tokens) / other_flops
        elif part.arch.startswith("ae-"):
            once += footprint.decode_flops(part.arch, width, height) / other_flops
    if placed.gpu and speed.h2d:  # the encoders' streamed bytes cross once per image
        once += sum(placed.streamed_bytes(m.name) for m in models if m.name != transformer.arch) / speed.h2d
    image = steps * step + once
    return (step, image) if math.isfinite(image) else (None, None)


def _expand_kind(fmt: str) -> str:
    """The measured expansion standing for `fmt` (16-bit files: none where they compute as stored)."""
    if fmt in ("bf16", "fp16"):
        return "bf16"
    if fmt == "fp32":
        return ""
    if fmt == "fp8":
        return "fp8"
    base = fmt.removesuffix("_S").removesuffix("_M").removesuffix("_L")
    return base if base in ("Q8_0", "Q4_0", "Q4_K") else "Q4_K"  # K-quants alike; Q5/Q6 near Q4_K's cost
