"""Benchmark: what a quantized layer's expansion costs next to its matrix product, per layer of a 12B block.

    .venv/bin/python -m tests.bench_dequant                       # CPU, 1024² tokens (4608), bf16 compute
    .venv/bin/python -m tests.bench_dequant --tokens 1024 --repeats 2
    python -m tests.bench_dequant --device cuda                   # on a GPU

For each layer shape of FLUX.1's transformer blocks (hidden 3072) and each stored format (bf16, Q8_0, Q4_0,
Q4_K, Q6_K, fp8 e4m3, scaled fp8) it times the layer's forward through the engine's chokepoint (`ops.Linear`:
expand the stored weight, then the product) and prints the ratio against the same layer stored in bf16, run in
the same process; also the expansion alone. Weights are random but valid (finite fp16 scales); only the shapes
and formats matter for time.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from torch import nn

from engine.formats.gguf_file import GGUFSource
from engine.formats.gguf_quants import QType
from engine.runtime import ops
from tests.test_gguf import random_raw

HIDDEN, MLP = 3072, 12288
LAYERS = {  # name: (in_features, out_features)
    "double qkv": (HIDDEN, 3 * HIDDEN),
    "double proj": (HIDDEN, HIDDEN),
    "double mlp in": (HIDDEN, MLP),
    "double mlp out": (MLP, HIDDEN),
    "single linear1": (HIDDEN, 3 * HIDDEN + MLP),
    "single linear2": (HIDDEN + MLP, HIDDEN),
}
FORMATS = ("bf16", "Q8_0", "Q4_0", "Q4_K", "Q6_K", "fp8 e4m3", "scaled fp8")


def layer(fmt: str, in_f: int, out_f: int, device: torch.device, rng: np.random.Generator) -> ops.Linear:
    with torch.device("meta"):
        linear = ops.Linear(in_f, out_f)
    bias = torch.randn(out_f, dtype=torch.bfloat16) * 0.01
    if fmt == "bf16":
        weight = torch.randn(out_f, in_f, dtype=torch.bfloat16) * 0.02
    elif fmt.startswith(("fp8", "scaled")):
        weight = (torch.randn(out_f, in_f) * (1 if fmt == "scaled fp8" else 0.02)).to(torch.float8_e4m3fn)
        if fmt == "scaled fp8":
            linear.scale_weight = torch.tensor(0.02, device=device)
    else:
        qtype = QType[fmt]
        weight = torch.from_numpy(random_raw(qtype, in_f * out_f, rng)).reshape(-1)
        linear.source = GGUFSource(qtype, (out_f, in_f))
    linear.weight = nn.Parameter(weight.to(device), requires_grad=False)
    linear.bias = nn.Parameter(bias.to(device), requires_grad=False)
    return linear


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn, device, repeats: int) -> float:
    fn()
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp32", "fp16"])
    parser.add_argument("--tokens", type=int, default=4608, help="4096 image + 512 text tokens: 1024²")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--formats", default=",".join(FORMATS))
    parser.add_argument("--layers", default=",".join(LAYERS), help="comma-separated layer names")
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}[args.dtype]
    formats = args.formats.split(",")
    rng = np.random.default_rng(0)
    name = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu, {torch.get_num_threads()} threads"
    )
    print(f"{name}; {args.tokens} tokens; compute {args.dtype}; median of {args.repeats}")
    print(f"{'layer':16} {'format':11} {'ms':>9} {'expand ms':>10} {'vs bf16':>8}")
    totals = dict.fromkeys(formats, 0.0)
    for layer_name in args.layers.split(","):
        in_f, out_f = LAYERS[layer_name]
        x = torch.randn(1, args.tokens, in_f, dtype=dtype, device=device)
        base = None
        for fmt in ["bf16", *[f for f in formats if f != "bf16"]]:
            linear = layer(fmt, in_f, out_f, device, rng)
            with torch.inference_mode():
                seconds = median_seconds(lambda linear=linear, x=x: linear(x), device, args.repeats)
                expand = median_seconds(lambda linear=linear, x=x: linear.fetch(x), device, args.repeats)
            base = seconds if fmt == "bf16" else base
            if fmt in totals:
                totals[fmt] += seconds
            print(f"{layer_name:16} {fmt:11} {seconds * 1e3:9.1f} {expand * 1e3:10.1f} {seconds / base:8.2f}")
            del linear
    print("all layers timed:")
    for fmt, seconds in totals.items():
        print(f"  {fmt:11} {seconds * 1e3:9.1f} ms  {seconds / totals['bf16']:.2f} × bf16")


if __name__ == "__main__":
    main()
