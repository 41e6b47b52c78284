"""Benchmark: the engine's denoising step time on the CPU against diffusers' FluxPipeline, same weights, one run.

    .venv/bin/python -m tests.bench_vs_diffusers [--width 768] [--size 256] [--steps 4] [--threads N]

Prints the mean s/step of each (after a warm-up generation) and the ratio ours/diffusers (goal: ≤ 1.0).
Not a test: timings vary with the machine; the ratio is what to compare.
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

import torch

from engine import fixtures
from engine.contract.request import GenerateRequest, ModelFiles
from engine.generation.pipeline import Engine
from engine.generation.sampling import make_noise
from tests.oracle import build_pipeline


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--width", type=int, default=768, help="transformer hidden size")
    parser.add_argument("--size", type=int, default=256, help="image side in pixels")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    spec = fixtures.wide_spec(args.width)
    with tempfile.TemporaryDirectory() as tmp:
        models = Path(tmp) / "models"
        clip_vocab = fixtures.write_tokenizers(models)
        states = fixtures.tiny_states(spec, clip_vocab)
        paths = fixtures.write_split(models, states, transformer_dtype=torch.float32)
        engine = Engine()

        def ours() -> list[float]:
            seconds: list[float] = []
            request = GenerateRequest(
                prompt="a photo of a cat", width=args.size, height=args.size, steps=args.steps, seed=1,
                files=ModelFiles(models_dir=str(models)), out=str(Path(tmp) / "ours.png"),
            )  # fmt: skip
            engine.generate(
                request, lambda e: seconds.append(e.seconds_per_it) if hasattr(e, "seconds_per_it") else None
            )
            return seconds

        stored = {role: fixtures.dequantized(_load(p)) for role, p in paths.items()}
        pipe = build_pipeline(stored, models / "tokenizers" / "clip_l", models / "tokenizers" / "t5xxl")

        def theirs() -> list[float]:
            marks = [time.perf_counter()]

            def on_step(_pipe, _i, _t, kwargs):
                marks.append(time.perf_counter())
                return kwargs

            noise = make_noise(1, 1, args.size, args.size)
            from engine.generation.sampling import pack

            with torch.inference_mode():
                pipe("a photo of a cat", latents=pack(noise), width=args.size, height=args.size,
                     num_inference_steps=args.steps, guidance_scale=3.5, output_type="latent",
                     callback_on_step_end=on_step)  # fmt: skip
            # the first interval also holds the pipeline's text encoding and set-up: leave it out
            return [b - a for a, b in zip(marks[1:-1], marks[2:])]

        results = {"fluxdeck": [], "diffusers": []}
        ours(), theirs()  # warm-up
        for _ in range(args.repeats):
            results["fluxdeck"] += ours()[1:]
            results["diffusers"] += theirs()
        mean = {k: sorted(v)[len(v) // 2] for k, v in results.items()}
        peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        params = sum(t.numel() for t in states.transformer.values()) / 1e6
        print(f"model: hidden {args.width}, {params:.0f} M transformer parameters, {args.size}x{args.size}, "
              f"{torch.get_num_threads()} threads")  # fmt: skip
        print(f"fluxdeck : {mean['fluxdeck']:.4f} s/step (median of {len(results['fluxdeck'])})")
        print(f"diffusers: {mean['diffusers']:.4f} s/step (median of {len(results['diffusers'])})")
        print(
            f"ratio fluxdeck/diffusers: {mean['fluxdeck'] / mean['diffusers']:.3f}  (peak RSS {peak_rss:.0f} MB)"
        )


def _load(path):
    from engine.formats.weights import SafetensorsFile

    file = SafetensorsFile(path)
    return file.load(file.names())


if __name__ == "__main__":
    main()
