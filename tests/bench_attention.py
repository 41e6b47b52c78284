"""Benchmark: FLUX's attention at 1024² (4608 tokens, 24 heads of 128) through each scaled-dot-product backend,
peak VRAM and time, in fp32 (what Pascal cards compute in) and bf16. CUDA only.

    python -m tests.bench_attention [--tokens 4608]

`auto` is what the engine gets (torch picks the backend); the memory-efficient kernel keeps fp32 attention at
1024² to tens of MB where the math path materializes the 24 × 4608² score matrix (2 GB per image in fp32).
"""

from __future__ import annotations

import argparse
import time
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

BACKENDS = {
    "auto": None,
    "math": SDPBackend.MATH,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "flash": SDPBackend.FLASH_ATTENTION,
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=4608)
    args = parser.parse_args()
    device = torch.device("cuda")
    print(f"{torch.cuda.get_device_name(device)}: 1 x 24 heads x {args.tokens} tokens x 128")
    print(f"{'dtype':6} {'backend':10} {'ms':>8} {'extra VRAM MB':>14}")
    for dtype in (torch.float32, torch.bfloat16):
        q, k, v = (torch.randn(1, 24, args.tokens, 128, device=device, dtype=dtype) for _ in range(3))
        for name, backend in BACKENDS.items():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            try:
                with sdpa_kernel([backend]) if backend else nullcontext():
                    F.scaled_dot_product_attention(q, k, v)
                    torch.cuda.synchronize()
                    start = time.perf_counter()
                    for _ in range(5):
                        F.scaled_dot_product_attention(q, k, v)
                    torch.cuda.synchronize()
            except RuntimeError as error:
                print(f"{str(dtype).removeprefix('torch.'):6} {name:10} not available ({str(error)[:60]})")
                continue
            ms = (time.perf_counter() - start) / 5 * 1e3
            extra = (torch.cuda.max_memory_allocated(device) - base) / 2**20
            print(f"{str(dtype).removeprefix('torch.'):6} {name:10} {ms:8.2f} {extra:14.0f}")


if __name__ == "__main__":
    main()
