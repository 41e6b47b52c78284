"""Benchmark: the CPU step time of Kontext (one reference) against plain txt2img at the same output size, same
weights, same process; and the process's peak RSS after each.

    .venv/bin/python -m tests.bench_kontext [--width 512] [--size 1024] [--steps 2] [--repeats 3]

A wide random FLUX.1 (hidden `--width`: 2 double + 4 single blocks; Kontext [dev] is [dev]'s architecture, so the
same file serves both) written in the real file formats and run through `Engine.generate`. The reference is a
`--size`² image: at 1024² (Kontext's own size, one of its preferred resolutions) it stays 1024², so the reference
adds exactly as many tokens as the image has — 512 text + 4096 image + 4096 reference tokens against 512 + 4096.
The mean s/step of a generation after a one-step warm-up of each; the runs alternate and the fastest of each
kind counts (a shared machine only ever slows a run down). Random weights: only the shapes matter for time.
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from engine import fixtures
from engine.contract.events import Done
from engine.contract.request import GenerateRequest, ModelFiles
from engine.generation import conditioning
from engine.generation.pipeline import Engine


def peak_rss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp())
    models = root / "models"
    spec = fixtures.wide_spec(args.width, depth=2, depth_single=4)
    fixtures.write_split(models, fixtures.tiny_states(spec, fixtures.write_tokenizers(models)))
    rgb = (np.random.default_rng(0).random((args.size // 8, args.size // 8, 3)) * 255).astype(np.uint8)
    Image.fromarray(rgb).resize((args.size, args.size), Image.Resampling.BICUBIC).save(root / "reference.png")
    engine = Engine()

    def step_seconds(references: list[str], name: str, steps: int) -> float:
        done: list[Done] = []
        request = GenerateRequest(
            prompt="make it night", width=args.size, height=args.size, steps=steps, seed=1, dtype="fp32",
            guidance=2.5, files=ModelFiles(models_dir=str(models)), references=references,
            out=str(root / f"{name}.png"),
        )  # fmt: skip
        engine.generate(request, on_event=lambda e: done.append(e) if isinstance(e, Done) else None)
        return done[-1].mean_seconds_per_it

    reference = [str(root / "reference.png")]
    step_seconds([], "warm-a", 1)
    plain_runs = [step_seconds([], "a", args.steps)]
    plain_rss = peak_rss_mb()
    step_seconds(reference, "warm-b", 1)
    kontext_runs = [step_seconds(reference, "b", args.steps)]
    kontext_rss = peak_rss_mb()
    for _ in range(args.repeats - 1):  # alternated: a busy machine slows both alike
        plain_runs.append(step_seconds([], "a", args.steps))
        kontext_runs.append(step_seconds(reference, "b", args.steps))
    plain, kontext = min(plain_runs), min(kontext_runs)  # the least disturbed run of each
    image = (args.size // 16) ** 2
    ref_width, ref_height = conditioning.kontext_size(args.size, args.size, conditioning.KONTEXT_RESOLUTIONS)
    ref = (ref_width // 16) * (ref_height // 16)
    print(f"hidden {args.width}, 2+4 blocks, {args.size}x{args.size}, fp32 on the CPU, {args.steps} steps")
    print(
        f"sequence: plain 512 + {image} tokens, Kontext 512 + {image} + {ref} (reference at {ref_width}x{ref_height})"
    )
    print(f"plain {plain:.3f} s/step, Kontext {kontext:.3f} s/step (the fastest of {args.repeats} runs each): "
          f"{kontext / plain:.2f} x")  # fmt: skip
    print("all runs: plain " + ", ".join(f"{s:.2f}" for s in plain_runs) + "; Kontext "
          + ", ".join(f"{s:.2f}" for s in kontext_runs))  # fmt: skip
    print(f"peak RSS: {plain_rss:.0f} MB after plain, {kontext_rss:.0f} MB after Kontext")


if __name__ == "__main__":
    main()
