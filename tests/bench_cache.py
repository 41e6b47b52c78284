"""Benchmark: what a step costs when First-Block-Cache reuses the blocks after the first, against a full step,
same weights, same process.

    .venv/bin/python -m tests.bench_cache --shape small --size 512        # any machine
    python -m tests.bench_cache --shape 12b --size 1024                   # a GPU (random 12B, resident)

Random weights cannot say how many steps a real model skips (that needs real weights and a threshold); this
measures the other half of the speed-up: a cached step's cost relative to a computed one. A job of N steps of
which K are cached takes about (N − K + K·ratio)/N of the uncached time.
"""

from __future__ import annotations

import argparse

import torch

from engine.generation.step_cache import FirstBlockCache
from engine.models.flux1 import Flux, position_embedding
from engine.runtime.memory import MemoryManager
from engine.runtime.ops import load_into
from tests.bench_offload import SHAPES, inputs, random_state, sync, timed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", choices=sorted(SHAPES), default="small")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    p = SHAPES[args.shape]
    with torch.device("meta"):
        model = Flux(p)
    load_into(model, random_state(p, dtype), {}, dtype)
    memory = MemoryManager(device, None)
    memory.manage(model)
    memory.activate(model)
    x = inputs(p, args.size, device, dtype)
    pe = position_embedding(torch.cat((x[3], x[1]), 1), p.axes_dim, p.theta)

    def step(cache):
        def run():
            with torch.inference_mode():
                model(*x, pe=pe, cache=cache)

        return run

    full = timed(step(None), device, args.repeats)
    reuse = FirstBlockCache(threshold=float("inf"))
    step(reuse)()  # the first step computes and fills the cache; every later one reuses it
    sync(device)
    cached = timed(step(reuse), device, args.repeats)
    assert not any(d[0] for d in reuse.decisions[1:])
    print(f"{args.shape}, {args.size}x{args.size}, {device} {str(dtype).removeprefix('torch.')}")
    print(
        f"computed step {full:.3f} s, cached step {cached:.3f} s: a cached step costs {cached / full:.3f} of one"
    )


if __name__ == "__main__":
    main()
