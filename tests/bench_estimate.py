"""Benchmark: the wizard's time estimate against a measured step, on blocks of FLUX.1's real widths.

    .venv/bin/python -m tests.bench_estimate                  # 512² (1024 image + 256 text tokens), CPU
    .venv/bin/python -m tests.bench_estimate --size 1024 --repeats 2

The estimate is the one engine/runtime/estimate.py makes for a preset: the transformer's FLOPs as torch's
FlopCounterMode counts them on the model code (meta device) divided by the matmul throughput that
`engine.runtime.speed.measure` gets in a few seconds, plus each weight's expansion at the measured rate for
formats that expand. Here both sides run in one process on a transformer of FLUX.1 [dev]'s widths (hidden 3072,
MLP 12288) with one double and two single blocks instead of 19 and 38: the full model's step is these blocks'
time × the block counts (the per-block cost is the same), so the ratio measured ÷ estimated holds for it.
Prints the ratio per stored format and the peak RSS.
"""

from __future__ import annotations

import argparse
import time

import psutil
import torch
from torch.utils.flop_counter import FlopCounterMode

from engine.models.flux1 import Flux, FluxParams
from engine.runtime import ops, speed
from engine.runtime.devices import pick_device

PARAMS = FluxParams(64, 4096, 768, 3072, 12288, 24, 1, 2, (16, 56, 56), True, True)


def model_in(fmt: str, dtype: torch.dtype) -> Flux:
    torch.manual_seed(0)
    with torch.device("meta"):
        model = Flux(PARAMS)
    state = {}
    for name, param in model.state_dict().items():
        value = torch.randn(param.shape) * 0.02
        stored = torch.float8_e4m3fn if fmt == "fp8" and value.ndim == 2 else torch.bfloat16
        state[name] = value.to(stored)
    model = ops.load_into(model, state, {}, dtype)
    ops.set_compute_dtype(model, dtype)
    return model


def inputs(size: int, text: int, dtype: torch.dtype):
    n = (size // 16) ** 2
    return (
        torch.randn(1, n, 64, dtype=dtype),
        torch.zeros(1, n, 3),
        torch.randn(1, text, 4096, dtype=dtype),
        torch.zeros(1, text, 3),
        torch.ones(1, dtype=dtype),
        torch.randn(1, 768, dtype=dtype),
        torch.full((1,), 3.5, dtype=dtype),
    )


def flops_of(size: int, text: int) -> int:
    with torch.device("meta"):
        model = Flux(PARAMS)
        args = inputs(size, text, torch.float32)
    with FlopCounterMode(display=False) as counter:
        model(*args)
    return counter.get_total_flops()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--text", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    device, precision = pick_device("cpu", "auto")
    dtype = precision.transformer
    measured = speed.measure(device, dtype)
    print(f"speed: {speed.summary(measured)}")
    flops = flops_of(args.size, args.text)
    with torch.device("meta"):
        params = sum(p.numel() for p in Flux(PARAMS).parameters())
    print(
        f"{args.size}² with {args.text} text tokens: {flops / 1e12:.3f} TFLOP per pass, {params / 1e6:.0f} M weights"
    )
    print(f"{'format':8} {'measured s':>10} {'estimated s':>11} {'measured/est':>12} {'peak RSS MB':>11}")
    for fmt in ("bf16", "fp8"):
        model = model_in(fmt, dtype)
        args_ = inputs(args.size, args.text, dtype)
        with torch.inference_mode():
            model(*args_)  # warm-up
            start = time.perf_counter()
            for _ in range(args.repeats):
                model(*args_)
            seconds = (time.perf_counter() - start) / args.repeats
        estimate = flops / measured.block_flops
        if fmt == "fp8":
            estimate += params / measured.expand["fp8"]
        rss = psutil.Process().memory_info().rss / 2**20
        print(f"{fmt:8} {seconds:10.3f} {estimate:11.3f} {seconds / estimate:12.2f} {rss:11.0f}")
        del model


if __name__ == "__main__":
    main()
