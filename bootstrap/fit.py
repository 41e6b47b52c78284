"""A preset's verdict on this machine: its manifest files read as the models they hold (architecture, stored
format, bytes), handed to the engine's own estimate (engine/runtime/estimate.py). Needs torch: the wizard and
the models screen run in the built environment."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from bootstrap.hardware import GIB, SystemInfo
from bootstrap.manifest import Manifest, ModelFile, Preset
from engine.runtime import footprint
from engine.runtime.estimate import CONTROLNET, Estimate, Machine, Part, estimate
from engine.runtime.speed import DEFAULT_FILE, Speed, load, measure_here, save

ALL_IN_ONE = ("t5-xxl", "clip-l", "ae-flux1")  # beside the transformer in a FLUX.1 checkpoint
_GGUF_TYPE = re.compile(r"(?i)(?<![a-z0-9])(q\d_k(?:_[sml])?|q\d_\d|bf16|f16)(?![a-z0-9])")


def _transformer_arch(text: str) -> str:
    if "klein" in text or "flux2" in text or "flux.2" in text:
        return "klein-9b" if "9b" in text else "klein-4b"
    return "flux1-schnell" if "schnell" in text else "flux1-dev"


def _fmt(f: ModelFile, text: str, arch: str) -> str:
    if f.path.lower().endswith(".gguf"):
        found = _GGUF_TYPE.search(PurePosixPath(f.path).name)
        kind = found.group(1).upper() if found else "Q8_0"
        return {"BF16": "bf16", "F16": "fp16"}.get(kind, kind)
    if "fp8" in text or "e4m3" in text:
        return "fp8"
    if "fp16" in text:
        return "fp16"
    if f.size:  # bytes per weight tell bf16 from fp32 where the name does not
        return "fp32" if f.size / footprint.layout(arch).file_params > 3 else "bf16"
    return "bf16"


def parts_of(f: ModelFile) -> list[Part]:
    """The models a manifest file holds, read from its folder and name (the engine reads tensors; before the
    download there are only these). Files that hold no model FLUX runs every image (tokenizers, LoRAs): none."""
    text = f"{f.name} {f.path}".lower()
    if f.folder == "checkpoints":
        arch = _transformer_arch(text)
        fmt = _fmt(f, text, arch)
        archs = [arch, *ALL_IN_ONE]
        if not f.size:
            return [Part(a, fmt) for a in archs]
        params = {a: footprint.layout(a).file_params for a in archs}
        total = sum(params.values())
        return [Part(a, fmt, round(f.size * params[a] / total)) for a in archs]
    if f.folder in ("diffusion_models", "unet"):
        arch = _transformer_arch(text)
    elif f.folder in ("text_encoders", "clip"):
        if "qwen" in text:
            arch = "qwen3-8b" if "8b" in text else "qwen3-4b"
        else:
            arch = "clip-l" if "clip" in text else "t5-xxl"
    elif f.folder == "controlnet":
        fmt = "fp8" if "fp8" in text else ("fp16" if "fp16" in text else "bf16")
        return [Part(CONTROLNET, fmt, f.size)] if f.size else []
    elif f.folder == "vae":
        arch = "ae-flux2" if ("flux2" in text or "flux.2" in text) else "ae-flux1"
    else:
        return []
    return [Part(arch, _fmt(f, text, arch), f.size)]


def preset_parts(manifest: Manifest, preset: Preset) -> list[Part]:
    return [part for f in manifest.preset_files(preset.name) for part in parts_of(f)]


def machine_of(system: SystemInfo, speed: Speed | None) -> Machine:
    vram = int(system.gpu.vram_mib * 2**20) if system.gpu else None
    return Machine(int(system.ram_gb * GIB), vram, speed)


@dataclass(frozen=True)
class Verdict:
    preset: Preset
    estimate: Estimate | None  # None: the preset holds no model to run (tokenizers)
    disk_short: str | None  # the sentence when the disk is too small

    @property
    def fits(self) -> bool:
        return self.disk_short is None and self.estimate is not None and self.estimate.fits

    @property
    def image_seconds(self) -> float | None:
        return self.estimate.image_seconds if self.estimate else None

    def text(self) -> str:
        if self.disk_short:
            return self.disk_short
        if self.estimate is None:
            return "no model to run"
        return f"{self.estimate.why}; {self.estimate.time_text()}"


def verdict(manifest: Manifest, preset: Preset, system: SystemInfo, speed: Speed | None) -> Verdict:
    disk_short = None
    if system.free_disk_gb < preset.disk_gb:
        disk_short = f"needs {preset.disk_gb:g} GB free disk, {system.free_disk_gb:.0f} GB free"
    parts = preset_parts(manifest, preset)
    if not any(p.arch in footprint.TRANSFORMER_ARCHITECTURES for p in parts):
        return Verdict(preset, None, disk_short)
    return Verdict(preset, estimate(parts, machine_of(system, speed), preset.steps or 1), disk_short)


def machine_speed(
    say: Callable[[str], None], path: Path = DEFAULT_FILE, device: str = "auto"
) -> Speed | None:
    """The figures the selftest saved; measured now (a few seconds) and saved when there are none."""
    speed = load(path)
    if speed is not None:
        return speed
    say("Measuring this machine's speed for the time estimates (a few seconds)...")
    try:
        speed = measure_here(device)
    except (RuntimeError, OSError, ValueError) as exc:  # an estimate never stops the wizard
        say(f"Could not measure the speed ({type(exc).__name__}): the presets are shown without times.")
        return None
    try:
        save(speed, path)
    except OSError:
        pass  # measured again next time
    return speed
