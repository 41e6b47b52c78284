"""Benchmark: the CPU s/step of FLUX.2 [klein] 4B-shaped blocks against FLUX.1 [dev]-shaped ones at the same image
size, and the VRAM residency the engine's memory planner gives klein 4B / 9B in fp8 on an 8 GB card.

    .venv/bin/python -m tests.bench_klein [--size 512] [--repeats 3] [--dtype auto|fp32|bf16] [--threads N]

Both transformers are built at their real width with one double-stream and one single-stream block, random
weights (klein 4B: hidden 3072, 24 heads, SwiGLU MLP 9216, Qwen3 context 7680, 512 text tokens; FLUX.1 [dev]:
hidden 3072, 24 heads, GELU MLP 12288, T5 4096 + CLIP 768, 512 text tokens), computed as the engine computes (its
own model classes, the compute dtype it picks on this CPU). Runs alternate between the two models in one process
(baseline interleaved, as README asks on shared cores). Each block's time is measured by forward hooks; a full
step is extrapolated as rest + depth · (double block) + depth_single · (single block): klein 4B 5 + 20 blocks,
FLUX.1 [dev] 19 + 38; with true CFG (klein base, --cfg > 1) a step is two passes. Peak RSS (VmHWM) is printed.

The residency part needs no weights: the block and non-block byte counts of the published shapes (fp8 e4m3 linear
weights, 1 byte each; norms bf16) go through engine.runtime.memory.make_plan with the budget auto_budget would
give on an 8 GiB card (free VRAM after the CUDA context, less its reserve).
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace

import torch
from torch import nn

from engine import fixtures
from engine.fixtures import _seeded
from engine.fixtures_flux2 import Flux2Spec
from engine.generation.sampling import image_ids as flux1_image_ids
from engine.models import flux2
from engine.models.flux1 import Flux, position_embedding
from engine.models.flux2 import Flux2, Flux2Params
from engine.runtime import memory, ops
from engine.runtime.devices import pick_device

TEXT_TOKENS = 512
FLUX1_DEV = replace(
    fixtures.TinySpec(), hidden=3072, heads=24, depth=1, depth_single=1, t5_dim=4096, clip_hidden=768
)
KLEIN_4B = Flux2Spec(hidden=3072, heads=24, depth=1, depth_single=1, qwen_hidden=2560)
FULL_DEPTH = {"klein 4B": (5, 20), "FLUX.1 [dev]": (19, 38)}
# The published shapes (tests/test_flux2_parity.py checks the engine reads them): hidden, heads, context, depths
PUBLISHED = {"klein 4B": (3072, 24, 7680, 5, 20), "klein 9B": (4096, 32, 12288, 8, 24)}
GIB = 1024**3
CUDA_CONTEXT = int(0.45 * GIB)  # what the CUDA context and driver take on a card before any tensor (typical)


def peak_rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def build(model_class, params, state, dtype) -> nn.Module:
    with torch.device("meta"):
        model = model_class(params)
    return ops.load_into(model, state, {}, dtype)


class BlockTimer:
    """Seconds spent inside each double and single block (forward hooks)."""

    def __init__(self, model: nn.Module):
        self.seconds = {"double": 0.0, "single": 0.0}
        self._start = 0.0
        for kind, blocks in (("double", model.double_blocks), ("single", model.single_blocks)):
            for block in blocks:
                block.register_forward_pre_hook(self._enter)
                block.register_forward_hook(lambda *_, kind=kind: self._leave(kind))

    def _enter(self, *_):
        self._start = time.perf_counter()

    def _leave(self, kind: str):
        self.seconds[kind] += time.perf_counter() - self._start

    def reset(self):
        self.seconds = {"double": 0.0, "single": 0.0}


def klein_case(size: int, dtype: torch.dtype):
    spec = KLEIN_4B
    p = spec.flux2_params()
    model = build(Flux2, p, fixtures.cast(_seeded(0, lambda: Flux2(p)), torch.bfloat16), dtype)
    g = torch.Generator().manual_seed(0)
    rows = cols = size // 16
    img_ids, txt_ids = flux2.image_ids(1, rows, cols), flux2.text_ids(1, TEXT_TOKENS)
    img = torch.randn(1, rows * cols, p.in_channels, generator=g).to(dtype)
    txt = torch.randn(1, TEXT_TOKENS, p.context_in_dim, generator=g).to(dtype)
    pe = model.position_embedding(torch.cat((txt_ids, img_ids), 1))
    t = torch.tensor([0.7])
    return model, lambda: model(img, img_ids, txt, txt_ids, t, None, pe)


def flux1_case(size: int, dtype: torch.dtype):
    p = FLUX1_DEV.flux_params()
    model = build(Flux, p, fixtures.cast(_seeded(0, lambda: Flux(p)), torch.bfloat16), dtype)
    g = torch.Generator().manual_seed(0)
    img_ids = flux1_image_ids(1, size, size)
    txt_ids = torch.zeros(1, TEXT_TOKENS, 3)
    img = torch.randn(1, (size // 16) ** 2, p.in_channels, generator=g).to(dtype)
    txt = torch.randn(1, TEXT_TOKENS, p.context_in_dim, generator=g).to(dtype)
    y = torch.randn(1, p.vec_in_dim, generator=g).to(dtype)
    pe = position_embedding(torch.cat((txt_ids, img_ids), 1), p.axes_dim, p.theta)
    t, guidance = torch.tensor([0.7]), torch.tensor([3.5])
    return model, lambda: model(img, img_ids, txt, txt_ids, t, y, guidance, pe)


def timing(args, dtype) -> None:
    cases = {"klein 4B": klein_case(args.size, dtype), "FLUX.1 [dev]": flux1_case(args.size, dtype)}
    timers = {name: BlockTimer(model) for name, (model, _) in cases.items()}
    samples = {name: {"total": [], "double": [], "single": []} for name in cases}
    with torch.inference_mode():
        for _, run in cases.values():
            run()  # warm-up
        for _ in range(args.repeats):
            for name, (_, run) in cases.items():  # interleaved: the load hits both alike
                timers[name].reset()
                start = time.perf_counter()
                run()
                samples[name]["total"].append(time.perf_counter() - start)
                for kind in ("double", "single"):
                    samples[name][kind].append(timers[name].seconds[kind])
    print(f"\n{args.size}² image ({(args.size // 16) ** 2} image + {TEXT_TOKENS} text tokens), {dtype}, "
          f"median of {args.repeats}")  # fmt: skip
    print(
        f"{'model':14} {'double blk s':>12} {'single blk s':>12} {'rest s':>8} {'blocks':>7} {'s/step (full)':>14}"
    )
    full = {}
    for name, s in samples.items():
        total, double, single = (statistics.median(s[k]) for k in ("total", "double", "single"))
        rest = max(0.0, total - double - single)
        depth, depth_single = FULL_DEPTH[name]
        full[name] = rest + depth * double + depth_single * single
        print(
            f"{name:14} {double:12.3f} {single:12.3f} {rest:8.3f} {depth:>3}+{depth_single:<3} {full[name]:14.2f}"
        )
    ratio = full["klein 4B"] / full["FLUX.1 [dev]"]
    print(f"klein 4B / FLUX.1 [dev] s/step: {ratio:.2f}; with true CFG (two passes): {2 * ratio:.2f}")
    steps = {
        "klein 4B (distilled, 4 steps)": 4 * full["klein 4B"],
        "FLUX.1 [dev] (28 steps)": 28 * full["FLUX.1 [dev]"],
    }
    for name, seconds in steps.items():
        print(f"  an image, {name}: {seconds:.0f} s")
    print(f"peak RSS {peak_rss_mb():.0f} MB")


def fp8_bytes(model: nn.Module) -> int:
    """Linear weights as fp8 e4m3 (1 byte), everything else bf16 (2 bytes)."""
    total = 0
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            linear = isinstance(module, nn.Linear) and name == "weight"
            total += param.numel() * (1 if linear else 2)
    return total


def residency(vram_gib: float) -> None:
    free = int(vram_gib * GIB) - CUDA_CONTEXT
    reserve = max(int(1.5 * GIB), int(0.12 * vram_gib * GIB))  # memory.auto_budget's reserve
    budget = max(0, free - reserve)
    print(f"\n{vram_gib:g} GiB card: budget {budget / GIB:.2f} GiB for the transformer (free "
          f"{free / GIB:.2f} less auto_budget's reserve {reserve / GIB:.2f})")  # fmt: skip
    for name, (hidden, heads, context, depth, depth_single) in PUBLISHED.items():
        p = Flux2Params(
            128, context, hidden, 3 * hidden, heads, depth, depth_single, (hidden // heads // 4,) * 4, False
        )
        with torch.device("meta"):
            model = Flux2(p)
        blocks = memory.blocks_of(model)
        block_bytes = [fp8_bytes(b) for b in blocks]
        rest = fp8_bytes(model) - sum(block_bytes)
        plan = memory.make_plan(block_bytes, rest, budget)
        params = sum(t.numel() for t in model.parameters())
        print(f"  {name} fp8 ({params / 1e9:.2f} B parameters, {(rest + sum(block_bytes)) / GIB:.2f} GiB): "
              f"{len(plan.resident)} of {len(blocks)} blocks resident, {plan.resident_bytes / GIB:.2f} GiB on the "
              f"card, {plan.streamed_bytes / GIB:.2f} GiB streamed per pass")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16"])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--vram-gib", type=float, default=8.0)
    parser.add_argument("--skip-timing", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    _, precision = pick_device("cpu", args.dtype)
    dtype = precision.transformer
    print(f"torch {torch.__version__}, {args.threads} threads, transformer compute {dtype}")
    if not args.skip_timing:
        timing(args, dtype)
    residency(args.vram_gib)


if __name__ == "__main__":
    main()
