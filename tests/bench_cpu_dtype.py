"""Benchmark: CPU s/step at FLUX's real block width in fp32 and bf16 compute, on bf16, fp8 and GGUF Q8_0 files.

    .venv/bin/python -m tests.bench_cpu_dtype [--sizes 512 1024] [--files bf16 fp8 q8_0] [--repeats 3] [--threads N]

A transformer of the real width (hidden 3072, 24 heads of 128, MLP 12288, T5 width 4096, CLIP 768) with one
double-stream and one single-stream block, random weights written in each file format and loaded the engine's way
(memory-mapped, stored dtype kept, expanded per layer by `ops.fetch`). For each image size (T5 length 512) it
prints the median time of one forward pass (what a step costs for 1 + 1 blocks; FLUX.1 has 19 + 38) in fp32
with the weights expanded at every layer call and expanded once (`ops.expand`, what the engine does when RAM
allows), and in bf16; the bf16/fp32 speed-up (per-call fp32), and bf16's relative error against fp32 on the same file (‖y_bf16 − y_fp32‖ / ‖y_fp32‖), and
which dtype the engine picks on this CPU by itself. Not a test: timings vary with the machine and its load.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import save_file

from engine import fixtures
from engine.formats.gguf_file import write_gguf
from engine.formats.gguf_quants import QType
from engine.formats.weights import component_from
from engine.generation.sampling import image_ids
from engine.models.build import build_model
from engine.models.flux1 import position_embedding
from engine.runtime import ops
from engine.runtime.devices import cpu_features, pick_device

REAL = replace(
    fixtures.TinySpec(), hidden=3072, heads=24, depth=1, depth_single=1, t5_dim=4096, clip_hidden=768
)
T5_LENGTH = 512


def write_file(kind: str, state: dict[str, torch.Tensor], folder: Path) -> Path:
    if kind == "bf16":
        path = folder / "flux-bf16.safetensors"
        save_file(fixtures.cast(state, torch.bfloat16), str(path))
    elif kind == "fp8":
        path = folder / "flux-fp8.safetensors"
        save_file(fixtures.to_fp8(state, torch.float8_e4m3fn), str(path))
    elif kind == "q8_0":
        path = folder / "flux-Q8_0.gguf"
        arrays = {name: t.float().numpy() for name, t in state.items()}
        types = {name: QType.Q8_0 for name, t in state.items() if t.ndim == 2 and t.shape[1] % 32 == 0}
        write_gguf(path, arrays, types, arch="flux")
    else:
        raise ValueError(kind)
    return path


def inputs(size: int, p) -> dict:
    generator = torch.Generator().manual_seed(0)
    tokens = (size // 16) ** 2
    img_ids = image_ids(1, size, size)
    txt_ids = torch.zeros(1, T5_LENGTH, 3)
    return {
        "img": torch.randn(1, tokens, p.in_channels, generator=generator),
        "img_ids": img_ids,
        "txt": torch.randn(1, T5_LENGTH, p.context_in_dim, generator=generator),
        "txt_ids": txt_ids,
        "timesteps": torch.tensor([0.7]),
        "y": torch.randn(1, p.vec_in_dim, generator=generator),
        "guidance": torch.tensor([3.5]),
        "pe": position_embedding(torch.cat((txt_ids, img_ids), 1), p.axes_dim, p.theta),
    }


def forward(model, x: dict, dtype: torch.dtype) -> torch.Tensor:
    with torch.inference_mode():
        return model(
            x["img"].to(dtype), x["img_ids"], x["txt"].to(dtype), x["txt_ids"], x["timesteps"],
            x["y"].to(dtype), x["guidance"], x["pe"],
        ).float()  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 1024])
    parser.add_argument(
        "--files", nargs="+", default=["bf16", "fp8", "q8_0"], choices=["bf16", "fp8", "q8_0"]
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    auto = pick_device("cpu", "auto")[1]
    native = sorted(f for f in cpu_features() if "bf16" in f)
    print(
        f"torch {torch.__version__}, {args.threads} threads, CPU capability {torch.backends.cpu.get_cpu_capability()}"
    )
    print(f"bf16 features: {', '.join(native) or 'none'}; the engine picks: {auto}")
    state = fixtures.flux_state(REAL)
    params = sum(t.numel() for t in state.values())
    print(f"transformer: hidden 3072, 1 double + 1 single block, {params / 1e6:.0f} M parameters")
    print(
        f"{'file':6} {'size':>5} {'fp32 s/step':>12} {'fp32 expanded':>14} {'bf16 s/step':>12}"
        f" {'bf16/fp32':>10} {'bf16 rel. err':>14}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        for kind in args.files:
            path = write_file(kind, state, Path(tmp))
            component = component_from(path, "transformer", "--transformer")
            expanded = build_model(component, torch.float32)
            ops.expand(expanded, torch.float32)  # what the engine does when RAM holds the fp32 copy
            models = {
                "fp32": (build_model(component, torch.float32), torch.float32),
                "fp32 expanded": (expanded, torch.float32),
                "bf16": (build_model(component, torch.bfloat16), torch.bfloat16),
            }
            for size in args.sizes:
                x = inputs(size, expanded.params)
                seconds, outputs = {}, {}
                for name, (model, dtype) in models.items():
                    outputs[name] = forward(model, x, dtype)  # warm-up
                    times = []
                    for _ in range(args.repeats):
                        start = time.perf_counter()
                        forward(model, x, dtype)
                        times.append(time.perf_counter() - start)
                    seconds[name] = statistics.median(times)
                fp32, bf16 = outputs["fp32"], outputs["bf16"]
                error = float((bf16 - fp32).norm() / fp32.norm())
                s32, once, s16 = seconds["fp32"], seconds["fp32 expanded"], seconds["bf16"]
                print(
                    f"{kind:6} {size:5} {s32:12.3f} {once:14.3f} {s16:12.3f} {s32 / s16:9.2f}× {error:14.2e}",
                    flush=True,
                )
            del models, expanded


if __name__ == "__main__":
    main()
