"""What this machine has: the NVIDIA GPU (through nvidia-smi, no torch needed), RAM, free disk. Stdlib only."""

from __future__ import annotations

import os
import platform
import re
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bootstrap.disk import free_bytes

GIB = 1024**3


@dataclass(frozen=True)
class Platform:
    system: str  # platform.system(): "Windows", "Linux", "Darwin"
    machine: str = "x86_64"

    @property
    def windows(self) -> bool:
        return self.system == "Windows"

    @classmethod
    def current(cls) -> Platform:
        return cls(platform.system(), platform.machine())


@dataclass(frozen=True)
class GpuInfo:
    name: str
    vram_mib: int
    cuda: tuple[int, int] | None = None  # the newest CUDA the driver runs ("CUDA Version" of nvidia-smi)

    @property
    def vram_gb(self) -> float:
        return self.vram_mib / 1024


@dataclass(frozen=True)
class SystemInfo:
    gpu: GpuInfo | None
    ram_gb: float
    free_disk_gb: float

    @property
    def vram_gb(self) -> float:
        return self.gpu.vram_gb if self.gpu else 0.0


def parse_gpu_query(text: str) -> list[tuple[str, int]]:
    """`nvidia-smi --query-gpu=name,memory.total --format=csv,noheader,nounits` -> [(name, MiB)]."""
    gpus = []
    for line in text.splitlines():
        name, _, mib = line.rpartition(",")
        if name.strip() and mib.strip().isdigit():
            gpus.append((name.strip(), int(mib.strip())))
    return gpus


def parse_cuda_version(text: str) -> tuple[int, int] | None:
    match = re.search(r"CUDA Version:\s*(\d+)\.(\d+)", text)
    return (int(match.group(1)), int(match.group(2))) if match else None


Run = Callable[[list[str]], str | None]


def run_quietly(argv: list[str]) -> str | None:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout if done.returncode == 0 else None


def detect_gpu(run: Run = run_quietly) -> GpuInfo | None:
    """The NVIDIA GPU with the most memory, or None when nvidia-smi is missing or sees none."""
    query = run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader,nounits"])
    gpus = parse_gpu_query(query or "")
    if not gpus:
        return None
    name, mib = max(gpus, key=lambda g: g[1])
    return GpuInfo(name, mib, parse_cuda_version(run(["nvidia-smi"]) or ""))


def total_ram_bytes() -> int:
    try:
        import psutil

        return int(psutil.virtual_memory().total)
    except ImportError:
        pass
    if hasattr(os, "sysconf") and "SC_PHYS_PAGES" in os.sysconf_names:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return 0


def detect_system(models_dir: Path, run: Run = run_quietly) -> SystemInfo:
    return SystemInfo(detect_gpu(run), total_ram_bytes() / GIB, free_bytes(models_dir) / 1e9)
