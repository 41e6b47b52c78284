"""Which device computes and in which dtype."""

from __future__ import annotations

import torch

from engine.errors import UserError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def pick_device(device: str, dtype: str) -> tuple[torch.device, torch.dtype]:
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError(
            "--device cuda was asked for but this torch has no usable CUDA GPU: use --device cpu, "
            "or rebuild the environment with the CUDA build of torch (run_gpu)."
        )
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dtype != "auto":
        return dev, DTYPES[dtype]
    if dev.type == "cuda":
        return dev, compute_dtype_for(torch.cuda.get_device_capability(dev))
    return dev, torch.float32


def compute_dtype_for(capability: tuple[int, int]) -> torch.dtype:
    """bf16 where the GPU computes it natively (Ampere, 8.0, and newer); fp16 on Volta and Turing; fp32 on
    Pascal (GTX 10xx), whose fp16 runs at a small fraction of its fp32 rate and which has no bf16 (torch's
    is_bf16_supported() says yes there, by emulation). Weights keep their stored dtype whatever this is."""
    if capability >= (8, 0):
        return torch.bfloat16
    if capability >= (7, 0):
        return torch.float16
    return torch.float32
