"""What this machine has: the NVIDIA GPU (through nvidia-smi, no torch needed), RAM, free disk. Stdlib only."""

from __future__ import annotations

import os
import platform
import re
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, replace
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
    # compute capability: nvidia-smi's compute_cap, else from the name
    compute: tuple[int, int] | None = None
    driver: str | None = None  # "581.57"

    @property
    def vram_gb(self) -> float:
        return self.vram_mib / 1024

    @property
    def compute_text(self) -> str:
        return ".".join(map(str, self.compute)) if self.compute else "unknown"


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


def _version(text: str) -> tuple[int, int] | None:
    match = re.fullmatch(r"\s*(\d+)\.(\d+)\s*", text)
    return (int(match.group(1)), int(match.group(2))) if match else None


def parse_gpu_details(text: str, fields: tuple[str, ...]) -> list[GpuInfo]:
    """Lines of `nvidia-smi --query-gpu=<fields> --format=csv,noheader,nounits` -> GpuInfo (cuda left unset).
    A name may hold commas, so the other fields are read from the right; "[N/A]" and the like read as unknown."""
    gpus = []
    for line in text.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) < len(fields):
            continue
        tail = dict(zip(fields[1:], parts[len(parts) - len(fields) + 1 :]))
        name = ",".join(parts[: len(parts) - len(fields) + 1]).strip()
        mib = tail.get("memory.total", "")
        if not name or not mib.isdigit():
            continue
        compute = _version(tail.get("compute_cap", "")) or compute_from_name(name)
        driver = tail.get("driver_version") or None
        gpus.append(
            GpuInfo(name, int(mib), None, compute, driver if driver and driver[0].isdigit() else None)
        )
    return gpus


def parse_cuda_version(text: str) -> tuple[int, int] | None:
    match = re.search(r"CUDA Version:\s*(\d+)\.(\d+)", text)
    return (int(match.group(1)), int(match.group(2))) if match else None


# For drivers that refuse the compute_cap field (R470 and older): the family from the card's name.
# Checked in order, first match wins; names as nvidia-smi spells them.
NAME_COMPUTE = (
    (r"RTX PRO \d+ Blackwell|RTX 50\d\d|B200|B100", (12, 0)),
    (r"RTX 40\d\d|RTX \d+ Ada|\bL4\b|\bL40", (8, 9)),
    (r"\bH100|\bH200|GH200", (9, 0)),
    (r"RTX 30\d\d|RTX A\d+|\bA[1-6]0\b|\bA2\b", (8, 6)),
    (r"\bA100\b|\bA30\b", (8, 0)),
    (r"RTX 20\d\d|GTX 16\d\d|TITAN RTX|Quadro RTX|\bT4\b|\bT\d00\b", (7, 5)),
    (r"TITAN V|V100|Quadro GV100", (7, 0)),
    (
        r"GTX 10\d\d|TITAN Xp|TITAN X \(Pascal\)|\bP100\b|\bP40\b|\bP4\b|Quadro P\d+|MX[1-3]\d0|GT 10\d\d",
        (6, 1),
    ),
    (r"GTX 9\d\d|GTX TITAN X|GTX 750|\bM\d{2,4}\b|Quadro M\d+|\bM60\b|\bM40\b", (5, 2)),
    (r"GTX 7\d\d|GTX 6\d\d|GT 7\d\d|GT 6\d\d|GTX TITAN|\bK\d{1,3}\b|Quadro K\d+", (3, 5)),
)


def compute_from_name(name: str) -> tuple[int, int] | None:
    for pattern, compute in NAME_COMPUTE:
        if re.search(pattern, name, re.IGNORECASE):
            return compute
    return None


Run = Callable[[list[str]], str | None]


def run_quietly(argv: list[str]) -> str | None:
    """stdout of a command that succeeded; None when it is missing, fails (R470 answers 2 to a field it does not
    know) or hangs."""
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError, ValueError):
        return None
    return done.stdout if done.returncode == 0 else None


QUERIES = (
    ("name", "memory.total", "compute_cap", "driver_version"),
    ("name", "memory.total", "driver_version"),  # drivers before compute_cap (R470 and older)
    ("name", "memory.total"),
)


def detect_gpu(run: Run = run_quietly) -> GpuInfo | None:
    """The NVIDIA GPU with the most memory, or None when nvidia-smi is missing or sees none."""
    gpus: list[GpuInfo] = []
    for fields in QUERIES:
        query = run(["nvidia-smi", f"--query-gpu={','.join(fields)}", "--format=csv,noheader,nounits"])
        gpus = parse_gpu_details(query or "", fields)
        if gpus:
            break
    if not gpus:
        return None
    best = max(gpus, key=lambda g: g.vram_mib)
    return replace(best, cuda=parse_cuda_version(run(["nvidia-smi"]) or ""))


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
