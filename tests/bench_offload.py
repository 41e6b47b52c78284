"""Benchmark: the transformer's step at each memory mode, against diffusers' best offload, same weights, one run.

    .venv/bin/python -m tests.bench_offload --shape small --device cpu              # anywhere (a few minutes)
    python -m tests.bench_offload --shape 12b --size 1024 --vram-cap-gb 8             # on a GPU (random 12B)

For each mode (resident, partly streamed, all streamed; CPU) it prints s/step, peak VRAM, peak RSS, bytes
streamed per step and the ratio against diffusers' group offloading (block level, CUDA streams) run on the
same weights in the same process. On CUDA it also measures pinned host→device bandwidth and prints the goal:
s/step ≤ 1.15 × max(resident compute time, streamed bytes ÷ bandwidth).
Weights are random (no download); only the shapes matter for time and memory.
"""

from __future__ import annotations

import argparse
import gc
import re
import time
from dataclasses import replace
from pathlib import Path

import psutil
import torch

from engine import fixtures
from engine.generation.sampling import image_ids
from engine.models.flux1 import Flux, FluxParams, position_embedding
from engine.runtime.memory import GB, MemoryManager
from engine.runtime.ops import load_into

SHAPES = {
    # the real FLUX.1 transformer: 3072 wide, 19 double and 38 single blocks, T5-XXL and CLIP-L inputs
    "12b": FluxParams(64, 4096, 768, 3072, 12288, 24, 19, 38, (16, 56, 56), True, True),
    "small": replace(fixtures.wide_spec(768, depth=4, depth_single=8), t5_dim=768).flux_params(),
}


def random_state(p: FluxParams, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Uniform random weights of every tensor's real shape, made directly in `dtype` (12B: ~24 GB in bf16)."""
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in Flux(p).state_dict().items()}
    generator = torch.Generator().manual_seed(0)
    return {
        name: torch.empty(shape, dtype=dtype).uniform_(-0.02, 0.02, generator=generator)
        for name, shape in shapes.items()
    }


def inputs(p: FluxParams, size: int, device, dtype):
    tokens, txt_len = (size // 16) ** 2, 512
    g = torch.Generator().manual_seed(1)
    img = torch.randn(1, tokens, 64, generator=g).to(device, dtype)
    txt = torch.randn(1, txt_len, p.context_in_dim, generator=g).to(device, dtype)
    y = torch.randn(1, p.vec_in_dim, generator=g).to(device, dtype)
    ids, txt_ids = image_ids(1, size, size).to(device), torch.zeros(1, txt_len, 3, device=device)
    t, guidance = torch.tensor([0.5], device=device, dtype=dtype), torch.tensor([3.5], device=device)
    return img, ids, txt, txt_ids, t, y, guidance


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(step, device, repeats: int) -> float:
    step()  # warm-up
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def peak_rss() -> float:
    status = Path("/proc/self/status")
    if status.exists():
        return int(re.search(r"VmHWM:\s+(\d+)", status.read_text()).group(1)) / 1024
    return psutil.Process().memory_info().rss / 2**20


def pinned_bandwidth(device) -> float:
    host = torch.empty(GB, dtype=torch.uint8).pin_memory()
    dev = torch.empty(GB, dtype=torch.uint8, device=device)
    dev.copy_(host, non_blocking=True)
    sync(device)
    start = time.perf_counter()
    for _ in range(5):
        dev.copy_(host, non_blocking=True)
    sync(device)
    return 5 * GB / (time.perf_counter() - start)


def ours(state, p, device, dtype, budget: int | None, args):
    with torch.device("meta"):
        model = Flux(p)
    load_into(model, dict(state), {}, dtype)
    memory = MemoryManager(device, budget)
    memory.manage(model)
    memory.activate(model)
    x = inputs(p, args.size, device, dtype)
    pe = position_embedding(torch.cat((x[3], x[1]), 1), p.axes_dim, p.theta)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def step():
        with torch.inference_mode():
            model(*x, pe=pe)

    seconds = timed(step, device, args.repeats)
    stats = memory.stats_of(model)
    streamed = stats.bytes_streamed / max(1, stats.passes)
    vram = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else 0.0
    memory.forget(model)
    gc.collect()
    return seconds, streamed, vram


def diffusers_group_offload(state, p, device, dtype, args):
    from tests.oracle import diffusers_transformer, transformer_to_diffusers

    with torch.device("meta"):  # no random init of 12B parameters: the weights come next
        model = diffusers_transformer(p)
    model.load_state_dict(transformer_to_diffusers(state, p), assign=True)
    model.eval()
    if device.type == "cuda":
        model.enable_group_offload(
            onload_device=device, offload_device=torch.device("cpu"), offload_type="block_level",
            num_blocks_per_group=1, use_stream=True,
        )  # fmt: skip
        torch.cuda.reset_peak_memory_stats(device)
    img, ids, txt, txt_ids, t, y, guidance = inputs(p, args.size, device, dtype)

    def step():
        with torch.inference_mode():
            model(hidden_states=img, encoder_hidden_states=txt, pooled_projections=y, timestep=t,
                  img_ids=ids[0], txt_ids=txt_ids[0], guidance=guidance, return_dict=False)  # fmt: skip

    seconds = timed(step, device, args.repeats)
    vram = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else 0.0
    gc.collect()
    return seconds, vram


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", choices=sorted(SHAPES), default="small")
    parser.add_argument("--size", type=int, default=512, help="image side in pixels")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--vram-cap-gb", type=float, default=8.0, help="cap the process's VRAM (CUDA)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and device.index is None:  # the memory-fraction cap wants an index
        device = torch.device("cuda", torch.cuda.current_device())
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    p = SHAPES[args.shape]
    state = random_state(p, dtype)
    total = sum(t.numel() * t.element_size() for t in state.values())
    print(
        f"{args.shape}: {total / GB:.1f} GB of {str(dtype).removeprefix('torch.')} weights, {args.size}x{args.size}, {device}"
    )
    if device.type == "cuda":
        print(f"card: {torch.cuda.get_device_name(device)}")
        cap = args.vram_cap_gb * GB / torch.cuda.get_device_properties(device).total_memory
        bandwidth = pinned_bandwidth(device)
        print(f"pinned host->device: {bandwidth / GB:.1f} GB/s")

    rows = []
    if device.type == "cpu":
        seconds, streamed, vram = ours(state, p, device, dtype, None, args)
        base, _ = diffusers_group_offload(state, p, device, dtype, args)
        rows.append(("cpu", seconds, streamed, vram, base))
    else:
        resident_time = None
        modes = [
            ("resident", None),
            ("partly streamed", int((args.vram_cap_gb - 2.5) * GB)),
            ("all streamed", 0),
        ]
        for name, budget in modes:
            if name == "resident" and total > torch.cuda.mem_get_info(device)[0] - 4 * GB:
                continue  # the card cannot hold it
            if name != "resident":
                torch.cuda.set_per_process_memory_fraction(cap, device)
            try:
                seconds, streamed, vram = ours(state, p, device, dtype, budget, args)
            except Exception as error:  # one mode failing must not lose the others' figures
                print(f"{name}: failed: {type(error).__name__}: {error}")
                continue
            finally:
                gc.collect()
                torch.cuda.empty_cache()
            print(
                f"{name}: {seconds:.3f} s/step, peak VRAM {vram:.0f} MB, streamed {streamed / GB:.2f} GB/step"
            )
            resident_time = seconds if name == "resident" else resident_time
            rows.append((name, seconds, streamed, vram, None))
        base, base_vram = diffusers_group_offload(state, p, device, dtype, args)
        print(
            f"diffusers group offloading (block level, streams): {base:.3f} s/step, peak VRAM {base_vram:.0f} MB"
        )
        rows = [(n, s, b, v, base) for n, s, b, v, _ in rows]

    print(
        f"{'mode':16} {'s/step':>8} {'VRAM MB':>8} {'RSS MB':>8} {'streamed/step':>14} {'vs diffusers':>12}"
    )
    for name, seconds, streamed, vram, base in rows:
        print(
            f"{name:16} {seconds:8.3f} {vram:8.0f} {peak_rss():8.0f} {streamed / GB:11.2f} GB {seconds / base:12.3f}"
        )
        if device.type == "cuda" and resident_time:
            goal = 1.15 * max(resident_time, streamed / bandwidth)
            print(f"{'':16} goal ≤ {goal:.3f} s/step ({'met' if seconds <= goal else 'NOT met'})")


if __name__ == "__main__":
    main()
