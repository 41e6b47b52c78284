"""A generation from request to PNG, in stages: plan → encode → prepare → denoise → decode → save.

Each stage is a function in its own module (encode.py, prepare.py, denoise.py, decode.py, png_output.py); the
ModelCache (model_cache.py) hands each stage its models loaded and active, and keeps them between jobs as the
RAM policy allows. `Engine` is the public face: one job at a time, models kept between jobs."""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from engine.contract import families, layout
from engine.contract.errors import UserError
from engine.contract.events import Done, EventSink, Message, Stage, Step, ignore
from engine.contract.request import GenerateRequest, parse_cache
from engine.formats.lora import FileHashes, prompt_loras
from engine.formats.model_files import resolve
from engine.generation import edits, redux, sampling
from engine.generation.control import plan_controls, with_controls
from engine.generation.decode import decode
from engine.generation.denoise import denoise, nonfinite_cause
from engine.generation.embedding_cache import EmbeddingCache
from engine.generation.encode import encode_prompts
from engine.generation.model_cache import ModelCache
from engine.generation.plan import Plan
from engine.generation.png_output import check_writable, save_images
from engine.generation.prepare import Inputs, prepare
from engine.generation.preview import preview
from engine.generation.step_cache import FirstBlockCache
from engine.runtime.devices import pick_device
from engine.runtime.memory import MemoryManager, tune_host_allocator
from engine.runtime.placement import activation_bytes


@dataclass
class EngineOptions:
    """How the engine spends memory. keep_models: "auto" keeps models loaded between stages and jobs while RAM
    holds them (older ones go when a new one would not fit), "never" releases each stage's models when it is
    done (peak RAM ≈ the largest model), "always" keeps everything."""

    keep_models: str = "auto"
    cache_dir: str | None = None  # text-embedding cache; None: none
    previews: bool = False  # a Preview event after every step (the TUI's live view)


def default_cache_dir() -> Path:
    return (
        Path(os.environ.get("FLUXDECK_CACHE") or Path(__file__).resolve().parents[2] / "cache") / "embeddings"
    )


class Engine:
    """Keeps models loaded between jobs (RAM allowing); one job at a time."""

    def __init__(self, options: EngineOptions | None = None) -> None:
        self.options = options or EngineOptions()
        tune_host_allocator()
        self.cache = EmbeddingCache(self.options.cache_dir)
        self.models = ModelCache(self.options.keep_models)
        self.hashes = FileHashes()  # the LoRA files' SHA-256 for PNG metadata, computed once per file
        self._lock = threading.Lock()

    @property
    def memory(self) -> MemoryManager | None:
        return self.models.memory

    @property
    def loads(self) -> Counter[str]:
        """How many times each role was loaded."""
        return self.models.loads

    def generate(
        self, request: GenerateRequest, on_event: EventSink = ignore, cancel: threading.Event | None = None
    ) -> list[str]:
        with self._lock:
            return self._generate(request, on_event, cancel or threading.Event())

    def _generate(self, request: GenerateRequest, on_event: EventSink, cancel: threading.Event) -> list[str]:
        started = time.perf_counter()
        request = _with_prompt_loras(request)
        out = check_writable(request.out)
        plan = self._plan(request, on_event)
        if plan.family == "flux2":
            if request.redux_images:
                raise UserError("--redux-image is FLUX.1 Redux: use a FLUX.1 [dev] transformer with it.")
            from engine.generation.flux2_stages import generate_flux2

            return generate_flux2(self, plan, out, on_event, cancel, started)
        controls = plan_controls(plan)  # every --controlnet checked before anything loads
        redux_files = redux.plan_redux(plan.request)  # the Redux files found before anything loads

        on_event(Stage("encoding", f"{plan.device.type} {plan.precision}"))
        text = encode_prompts(plan, self.models, self.cache, on_event)
        text = redux.with_redux(text, plan, redux_files, self.models, on_event)
        self.models.release(("clip", "t5", *redux.ROLES))

        on_event(Stage("loading", "transformer"))
        transformer = self._transformer(plan, on_event)
        inputs = prepare(plan, text, transformer.params, self.models, on_event)
        inputs = edits.condition(inputs, plan, transformer.params, self.models, on_event)
        inputs = with_controls(inputs, controls, plan, transformer, self.models, on_event)

        on_event(Stage("denoising", f"{len(inputs.times) - 1} steps"))
        step_seconds: list[float] = []
        latents = self._denoise(plan, inputs, step_seconds, on_event, cancel)
        self.models.release(("transformer", *(c.role for c in controls)))

        on_event(Stage("decoding"))
        images = decode(
            self.models.use(plan.files.components["vae"], plan.support, plan.device), latents, plan, on_event
        )
        self.models.release(("vae",))

        on_event(Stage("saving"))
        model = plan.files.components["transformer"].file.path.stem
        paths = save_images(
            images,
            plan.request,
            out,
            steps=plan.steps,
            t5_length=plan.t5_length,
            model=model,
            hashes=self.hashes,
        )
        mean = sum(step_seconds) / len(step_seconds) if step_seconds else 0.0
        on_event(Done(paths, time.perf_counter() - started, mean))
        return paths

    def _plan(self, request: GenerateRequest, on_event: EventSink) -> Plan:
        """The request's device, precisions and files, and this job's memory budget; nothing loads yet."""
        device, precision = pick_device(request.device, request.dtype)
        files = resolve(request.files)
        for skipped in files.notes:
            on_event(Message(skipped))
        request = edits.resolve(request, files, self.models.loras)  # the edit's model checks, size, guidance
        activations = _activations(request, files.components["transformer"].shapes(), precision.transformer)
        self.models.start_job(device, request.vram_budget, activations)
        schnell = not families.has_guidance_embedding(files.components["transformer"].shapes())
        return Plan(request, files, device, precision, schnell, files.family)

    def _transformer(self, plan: Plan, on_event: EventSink) -> nn.Module:
        transformer = self.models.use(plan.files.components["transformer"], plan.dtype, plan.device)
        for note in self.models.loras.apply(transformer, None, plan.request.loras, parts=("transformer",)):
            on_event(Message(note))
        return transformer

    def _denoise(
        self,
        plan: Plan,
        inputs: Inputs,
        step_seconds: list[float],
        on_event: EventSink,
        cancel: threading.Event,
    ) -> torch.Tensor:
        threshold = parse_cache(plan.request.cache)
        step_cache = None if threshold is None else FirstBlockCache(threshold, groups=inputs.passes)
        projection = None
        if self.options.previews:
            projection = self.models.preview_projection(
                plan.files.components["vae"], plan.support, plan.device
            )

        def progress(report: sampling.StepReport) -> None:
            step_seconds.append(report.seconds)
            cached = step_cache is not None and not any(step_cache.decisions[-1])
            on_event(Step(report.step, report.total, report.seconds, cached))
            if projection is not None:
                on_event(preview(report, projection, inputs.height, inputs.width))

        transformer = self.models.use(plan.files.components["transformer"], plan.dtype, plan.device)
        return denoise(
            transformer, inputs, step_cache, progress, cancel,
            memory=self.models.memory, on_event=on_event, nonfinite_cause=lambda: nonfinite_cause(plan),
        )  # fmt: skip


REFERENCE_TOKENS = 4096  # a Kontext or klein reference is sized to about 1 MP: 4096 tokens at most
REDUX_TOKENS = 729  # SigLIP's 27 × 27 patches per Redux image
TEXT_TOKENS = 512


def _activations(request: GenerateRequest, shapes: dict[str, tuple[int, ...]], dtype: torch.dtype) -> int:
    """This job's largest activations on the device (placement.activation_bytes), for the sequence it really
    runs: image tokens, reference tokens, text and Redux tokens, both CFG passes in one batch."""
    tokens = (request.width // 16) * (request.height // 16) * request.batch
    tokens += (
        REFERENCE_TOKENS * len(request.references) + TEXT_TOKENS + REDUX_TOKENS * len(request.redux_images)
    )
    hidden = shapes.get("img_in.weight", (3072,))[0]
    rows = 2 if request.cfg > 1 else 1
    return activation_bytes(tokens, hidden, 4 * hidden, dtype.itemsize, rows)


def _with_prompt_loras(request: GenerateRequest) -> GenerateRequest:
    """The request validated, with the LoRAs its prompt's A1111-style `<lora:name:strength>` tags name (from
    <models-dir>/loras) taken out of the prompt and added to its LoRAs."""
    request.validate()
    if "<lora:" not in request.prompt.lower():
        return request
    prompt, tagged = prompt_loras(request.prompt, _loras_folder(request.files.models_dir))
    request = dataclasses.replace(request, prompt=prompt, loras=[*request.loras, *tagged])
    request.validate()  # the tags' strengths are numbers from outside too
    return request


def _loras_folder(models_dir: str | None) -> Path | None:
    """ComfyUI's loras/ or Forge's Lora/ in the models folder."""
    if not models_dir:
        return None
    folders = [Path(models_dir) / name for name in layout.LORA_FOLDERS]
    return next((f for f in folders if f.is_dir()), folders[0])
