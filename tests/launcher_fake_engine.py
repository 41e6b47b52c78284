"""A stand-in engine for the launcher's protocol tests: engine.server's real loop around a fake Engine.

Run as a script: python tests/launcher_fake_engine.py. The prompt steers it: "slow" sleeps 0.2 s a step,
"crash" exits the process with code 137 (as the kernel's OOM killer would), "bad" raises a UserError,
"boom" raises an unexpected exception.

The files an edit needs beyond the model are looked for by the real engine's own functions, so a job the real
engine would refuse for a missing file fails here with the same sentence: Redux's embedder and SigLIP
(engine/generation/redux.plan_redux, which reads the files' tensor names) and the depth model for
--control-preprocess depth or a ControlNet's preprocess=depth (engine/generation/control_preprocess.depth_folder).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.contract.errors import Cancelled, UserError  # noqa: E402
from engine.contract.events import Done, Preview, Stage, Step  # noqa: E402
from engine.server import main  # noqa: E402


def sha256(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def edit_size(request) -> tuple[int, int]:
    """The size the real engine gives an edit without --width/--height: the edit image's (plus the outpaint
    margins); else the request's, or 1024."""
    from PIL import Image

    edit_image = request.init_image or request.control_image or (request.references or [None])[0]
    if request.width is not None or edit_image is None:
        return request.width or 1024, request.height or 1024
    with Image.open(edit_image) as image:
        width, height = image.size
    if request.outpaint:
        left, top, right, bottom = request.outpaint_margins()
        width, height = width + left + right, height + top + bottom
    return width, height


class FakeEngine:
    def generate(self, request, on_event, cancel=None) -> list[str]:
        from PIL import Image, PngImagePlugin

        start = time.perf_counter()
        prompt = request.prompt
        if "crash" in prompt:
            print("CUDA out of memory (pretend)", file=sys.stderr, flush=True)
            os._exit(137)
        if "bad" in prompt:
            raise UserError("The fake engine refuses bad prompts: write a good one.")
        if "boom" in prompt:
            raise RuntimeError("something broke")
        if request.redux_images:
            from engine.generation.redux import plan_redux

            plan_redux(request)  # a UserError naming the missing Redux or SigLIP file
        if request.control_image and request.control_preprocess == "depth":
            from engine.generation.control_preprocess import depth_folder

            depth_folder(request.files.models_dir)  # a UserError naming the missing depth model files
        for spec in request.controlnets:
            if spec.preprocess == "depth":  # as engine/generation/control.py checks it, before loading
                from engine.generation.control_preprocess import depth_folder

                depth_folder(request.files.models_dir, f"--controlnet {spec.path},preprocess=depth")
        on_event(Stage("loading"))
        print("a stray print that must not reach stdout")
        on_event(Stage("encoding"))
        steps = request.steps or 4
        on_event(Stage("denoising"))
        for step in range(1, steps + 1):
            if cancel is not None and cancel.is_set():
                raise Cancelled()
            time.sleep(0.2 if "slow" in prompt else 0.01)
            on_event(Step(step, steps, 0.01))
            shade = int(255 * step / steps)
            on_event(Preview(step, 4, 4, bytes([shade, 0, 255 - shade] * 16)))
        on_event(Stage("decoding"))
        out = Path(request.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        n = 1
        while out.exists():
            out = out.with_name(f"{Path(request.out).stem}_{n}.png")
            n += 1
        info = PngImagePlugin.PngInfo()
        info.add_text(
            "parameters",
            f"{prompt}\nSteps: {steps}, Seed: {request.seed}, Size: {request.width}x{request.height}",
        )
        record = request.to_dict()
        if (
            inputs := request.input_images()
        ):  # recorded as the real engine does (engine/generation/png_output.py)
            record["inputs"] = [
                {"role": role, "name": Path(path).name, "path": path, "sha256": sha256(path)}
                for role, path in inputs
            ]
        width, height = edit_size(request)
        record["width"], record["height"] = width, height
        info.add_text("fluxdeck", json.dumps(record))
        Image.new("RGB", (width, height), (request.seed % 256, 80, 160)).save(out, pnginfo=info)
        on_event(Done([str(out)], time.perf_counter() - start, 0.01))
        return [str(out)]


if __name__ == "__main__":
    import engine.server as server

    server._default_engine = FakeEngine  # the fake stands in for engine.generation.pipeline.Engine
    sys.exit(main(sys.argv[1:]))
