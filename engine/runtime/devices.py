"""Which device computes and in which dtypes."""

from __future__ import annotations

import platform
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from engine.contract.errors import UserError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Precision:
    """Compute dtypes: the transformer's (where the time goes), and the text encoders' and autoencoder's."""

    transformer: torch.dtype
    encoders: torch.dtype

    @classmethod
    def every(cls, dtype: torch.dtype) -> Precision:
        return cls(dtype, dtype)

    def __str__(self) -> str:
        names = [str(d).removeprefix("torch.") for d in (self.transformer, self.encoders)]
        return names[0] if names[0] == names[1] else f"{names[0]} (text encoders, autoencoder {names[1]})"


def pick_device(
    device: str, dtype: str, features: Iterable[str] | None = None
) -> tuple[torch.device, Precision]:
    """The device and compute dtypes for a request; `--dtype` other than auto sets every model's.
    `features` stands in for this CPU's (`cpu_features()`) where a test wants another CPU."""
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError(
            "--device cuda was asked for but this torch has no usable CUDA GPU: use --device cpu, "
            "or rebuild the environment with the CUDA build of torch (run_gpu)."
        )
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dtype != "auto":
        return dev, Precision.every(DTYPES[dtype])
    if dev.type == "cuda":
        return dev, Precision.every(compute_dtype_for(torch.cuda.get_device_capability(dev)))
    features = cpu_features() if features is None else frozenset(features)
    # The text encoders run once per prompt (then come from the embedding cache) and the autoencoder once per
    # image: fp32 there costs little time and keeps their accuracy whatever the file; the transformer, which
    # runs every step, computes in bf16 where the CPU has it.
    return dev, Precision(cpu_compute_dtype(features), torch.float32)


def compute_dtype_for(capability: tuple[int, int]) -> torch.dtype:
    """bf16 where the GPU computes it natively (Ampere, 8.0, and newer); fp16 on Volta and Turing; fp32 on
    Pascal (GTX 10xx), whose fp16 runs at a small fraction of its fp32 rate and which has no bf16 (torch's
    is_bf16_supported() says yes there, by emulation). Weights keep their stored dtype whatever this is."""
    if capability >= (8, 0):
        return torch.bfloat16
    if capability >= (7, 0):
        return torch.float16
    return torch.float32


# CPU features that mean bf16 matrix products in hardware: x86's AVX512-BF16 and AMX (Linux flag names), and
# ARM's BF16 extension ("bf16" in Linux's Features line, FEAT_BF16 on macOS).
NATIVE_BF16 = frozenset({"avx512_bf16", "amx_bf16", "bf16"})


def cpu_compute_dtype(features: Iterable[str]) -> torch.dtype:
    """bf16 on a CPU that computes it natively (1.5–2.5× fp32's speed at FLUX's width, <1 % relative error,
    docs/benchmarks.md), fp32 elsewhere: without those instructions bf16 is emulated and slower than fp32."""
    return torch.bfloat16 if NATIVE_BF16 & {f.lower() for f in features} else torch.float32


def cpu_features() -> frozenset[str]:
    """This CPU's features by Linux's names: torch's own probes (any OS, x86), /proc/cpuinfo (Linux, x86 and
    ARM) and sysctl (macOS)."""
    found: set[str] = set()
    # (every CPU with AMX tiles has AMX-BF16)
    probes = {"avx512_bf16": "_is_avx512_bf16_supported", "amx_bf16": "_is_amx_tile_supported"}
    for name, probe in probes.items():
        check = getattr(torch.cpu, probe, None)
        try:
            if check is not None and check():
                found.add(name)
        except RuntimeError:
            pass
    try:
        found |= features_in_cpuinfo(Path("/proc/cpuinfo").read_text(errors="replace"))
    except OSError:
        pass
    if platform.system() == "Darwin":
        try:
            answer = subprocess.run(
                ["sysctl", "-n", "hw.optional.arm.FEAT_BF16"], capture_output=True, text=True, timeout=5
            )
            if answer.stdout.strip() == "1":
                found.add("bf16")
        except (OSError, subprocess.SubprocessError):
            pass
    return frozenset(found)


def features_in_cpuinfo(text: str) -> set[str]:
    """The feature names in Linux's /proc/cpuinfo: x86's `flags` lines, ARM's `Features` lines."""
    found: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            found.update(value.split())
    return found
