"""A generation from request to PNG: load (and keep) the models, encode, denoise, decode, save."""

from __future__ import annotations

import dataclasses
import gc
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from engine.contract import layout
from engine.contract.errors import Cancelled, UserError
from engine.contract.events import Done, EventSink, Message, Preview, Stage, Step, ignore
from engine.contract.request import GenerateRequest, parse_cache
from engine.formats.lora import apply_loras, clip_lora_key, lora_name, prompt_loras
from engine.formats.model_files import ResolvedFiles, resolve
from engine.formats.weights import Component
from engine.generation import sampling, vae_tiling
from engine.generation.embedding_cache import EmbeddingCache
from engine.generation.png_output import check_writable, parameters_text, save_png
from engine.generation.step_cache import FirstBlockCache
from engine.models.autoencoder import AutoEncoder
from engine.models.build import build_model
from engine.models.flux1 import position_embedding
from engine.models.text_encoders import (
    CLIP_LENGTH,
    encode_clip,
    encode_t5,
    load_clip_tokenizer,
    load_t5_tokenizer,
    tokenizer_identity,
)
from engine.runtime import ops
from engine.runtime.devices import pick_device
from engine.runtime.memory import GB, MemoryManager, auto_budget, tune_host_allocator


@dataclass(frozen=True)
class _Key:
    """A loaded model's identity: its file (path, modification time), where in it, and how it computes."""

    path: str
    prefix: str
    mtime: float
    dtype: torch.dtype
    device: torch.device

    @classmethod
    def of(cls, component: Component, dtype: torch.dtype, device: torch.device) -> _Key:
        path = component.file.path
        return cls(str(path.resolve()), component.prefix, path.stat().st_mtime, dtype, device)


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
        self.loads: list[str] = []  # roles loaded, in order: what tests and benchmarks look at
        self.memory: MemoryManager | None = None
        self._models: dict[str, tuple[_Key, nn.Module]] = {}
        self._sizes: dict[str, int] = {}  # bytes each loaded model's file holds for it
        self._tokenizers: dict[tuple[str, str], object] = {}
        self._projections: dict[_Key, torch.Tensor] = {}
        self._auto_budget: int | None = None
        self._budget_was_auto = True
        self._lock = threading.Lock()

    # ---- models and memory ----

    def _memory(self, device: torch.device, budget_gb: float | None) -> MemoryManager:
        """The manager for `device`. The automatic budget is measured once, before this engine holds any VRAM
        (measured later, our own weights would shrink it job after job), and follows any out-of-memory cut."""
        if self.memory is None or self.memory.device != device:
            for role in list(self._models):
                self._drop(role)
            self._auto_budget = auto_budget(device)
            self.memory = MemoryManager(device, self._auto_budget)
        elif self._budget_was_auto:
            self._auto_budget = self.memory.budget  # an out-of-memory retry may have lowered it
        self._budget_was_auto = budget_gb is None
        budget = self._auto_budget if budget_gb is None else int(budget_gb * GB)
        if self.memory.budget != budget:
            self.memory.set_budget(budget)
        return self.memory

    def _model(self, component: Component, dtype: torch.dtype, device: torch.device) -> nn.Module:
        key = _Key.of(component, dtype, device)
        cached = self._models.get(component.role)
        if cached and cached[0] == key:
            model = cached[1]
        else:
            self._drop(component.role)
            self._make_room_for(component)
            model = build_model(component, dtype)
            size = component.nbytes
            if self._expands(component, model, dtype, device):
                size = ops.expand(model, dtype)
            model = self.memory.manage(model)
            self._sizes[component.role] = size
            self._models[component.role] = (key, model)
            self.loads.append(component.role)
        self.memory.activate(model)
        return model

    def _expands(
        self, component: Component, model: nn.Module, dtype: torch.dtype, device: torch.device
    ) -> bool:
        """fp32 compute on the CPU from a narrower file (bf16, fp8, GGUF): expand the transformer's weights once
        instead of at every layer call of every step, while RAM holds the fp32 copy beside the other loaded
        models (the keep_models policy's share); with keep_models="never", or RAM short, it stays per call."""
        if component.role != "transformer" or device.type != "cpu" or dtype != torch.float32:
            return False
        if self.options.keep_models == "never":
            return False
        if not ops.needs_expanding(model, dtype):
            return False  # an fp32 file
        loaded = sum(self._sizes[r] for r in self._models if r != component.role)
        return loaded + ops.expanded_bytes(model, dtype) <= RAM_SHARE * _total_ram()

    def _drop(self, role: str) -> None:
        cached = self._models.pop(role, None)
        if cached is not None and self.memory is not None:
            self.memory.forget(cached[1])

    def _release_after_stage(self, roles: tuple[str, ...]) -> None:
        """keep_models="never": a stage's models go once it is done (their memory-mapped pages with them)."""
        if self.options.keep_models != "never":
            return
        for role in roles:
            self._drop(role)
        gc.collect()

    def _make_room_for(self, component: Component) -> None:
        """keep_models="auto": before a model loads, others go while RAM cannot hold them all: the text encoders
        first (the embedding cache stands in for them), the transformer last, so a seed hunt keeps it."""
        if self.options.keep_models != "auto":
            return
        room = RAM_SHARE * _total_ram()
        for role in ("t5", "clip", "vae", "transformer"):
            loaded = sum(self._sizes[r] for r in self._models if r != component.role)
            if component.nbytes + loaded <= room:
                return
            if role != component.role and role in self._models:
                self._drop(role)
                gc.collect()

    def _tokenizer(self, kind: str, folder: Path | None):
        key = (kind, tokenizer_identity(kind, folder))  # a tokenizer replaced in its folder is read again
        if key not in self._tokenizers:
            loader = load_clip_tokenizer if kind == "clip" else load_t5_tokenizer
            self._tokenizers[key] = loader(folder)
        return self._tokenizers[key]

    # ---- a job ----

    def generate(
        self, request: GenerateRequest, on_event: EventSink = ignore, cancel: threading.Event | None = None
    ) -> list[str]:
        with self._lock:
            return self._generate(request, on_event, cancel or threading.Event())

    def _generate(self, request: GenerateRequest, on_event: EventSink, cancel: threading.Event) -> list[str]:
        started = time.perf_counter()
        request.validate()
        if "<lora:" in request.prompt.lower():  # A1111-style tags name LoRAs in <models-dir>/loras
            loras_dir = _loras_folder(request.files.models_dir)
            prompt, tagged = prompt_loras(request.prompt, loras_dir)
            request = dataclasses.replace(request, prompt=prompt, loras=[*request.loras, *tagged])
            request.validate()  # the tags' strengths are numbers from outside too
        out = check_writable(request.out)
        device, precision = pick_device(request.device, request.dtype)
        dtype, support = precision.transformer, precision.encoders  # support: text encoders and autoencoder
        files = resolve(request.files)
        for skipped in files.notes:
            on_event(Message(skipped))
        memory = self._memory(device, request.vram_budget)
        memory.reset_stats()
        schnell = "guidance_in.in_layer.weight" not in files.components["transformer"].shapes()
        steps = request.steps or (4 if schnell else 28)
        t5_length = request.t5_max_length or (256 if schnell else 512)

        on_event(Stage("encoding", f"{device.type} {precision}"))
        conds = self._encode(request, files, t5_length, device, support, on_event)
        self._release_after_stage(("clip", "t5"))

        on_event(Stage("loading", "transformer"))
        transformer = self._model(files.components["transformer"], dtype, device)
        for note in apply_loras(transformer, None, request.loras, parts=("transformer",)):
            on_event(Message(note))

        batch, height, width = request.batch, request.height, request.width
        noise = sampling.make_noise(request.seed, batch, height, width)
        times = sampling.schedule(steps, _mu(request.shift, schnell, (height // 16) * (width // 16)))
        if request.init_image:
            vae = self._model(files.components["vae"], support, device)
            x0 = _encode_image(vae, request.init_image, width, height, device, support, on_event)
            x0 = x0.expand(batch, -1, -1, -1)
            start, times = sampling.img2img_start(noise, x0.float().cpu(), times, request.denoise)
            memory.activate(transformer)
        else:
            start = noise
        x = sampling.pack(start).to(device)

        # The prompt and, with true CFG, the negative prompt run as one batch: each streamed weight crosses the
        # bus once per step, not once per prompt.
        passes = len(conds)
        rows = passes * batch
        img_ids = sampling.image_ids(1, height, width).to(device)
        txt_ids = torch.zeros(1, t5_length, 3, device=device)
        params = transformer.params
        pe = position_embedding(torch.cat((txt_ids, img_ids), 1), params.axes_dim, params.theta)
        guidance = torch.full((rows,), request.guidance, device=device) if params.guidance_embed else None
        y = torch.cat([c[0].to(device, dtype).expand(batch, -1) for c in conds])
        txt = torch.cat([c[1].to(device, dtype).expand(batch, -1, -1) for c in conds])

        threshold = parse_cache(request.cache)
        step_cache = None if threshold is None else FirstBlockCache(threshold, groups=passes)

        @torch.inference_mode()
        def velocity(x: torch.Tensor, t: float) -> torch.Tensor:
            if cancel.is_set():
                raise Cancelled("cancelled")
            # t in fp32 whatever the compute dtype (bf16 would make 0.7 0.69921875), as ComfyUI passes it
            timesteps = torch.full((rows,), t, device=device, dtype=torch.float32)
            xin = x.to(dtype).repeat(passes, 1, 1)
            v = transformer(xin, img_ids, txt, txt_ids, timesteps, y, guidance, pe, cache=step_cache).float()
            if passes == 1:
                return v
            positive, negative = v.chunk(2)
            return negative + request.cfg * (positive - negative)

        on_event(Stage("denoising", f"{len(times) - 1} steps"))
        step_seconds: list[float] = []

        projection = self._preview_projection(files, support, device) if self.options.previews else None
        if projection is not None:
            memory.activate(transformer)

        def on_step(report: sampling.StepReport) -> None:
            step_seconds.append(report.seconds)
            cached = step_cache is not None and not any(step_cache.decisions[-1])
            on_event(Step(report.step, report.total, report.seconds, cached))
            if projection is not None:
                on_event(preview(report, projection, height, width))

        try:
            x = sampling.euler(x, times, self._retrying(velocity, transformer, on_event), on_step)
        except sampling.NonFiniteLatents as error:
            raise UserError(
                f"The image turned to NaN/infinity at step {error.step} of {error.total}, so it would be black: "
                f"the likely cause is {_nonfinite_cause(request, files, dtype)}."
            ) from None
        self._release_after_stage(("transformer",))

        on_event(Stage("decoding"))

        def note(text: str) -> None:
            on_event(Message(text))

        vae = self._model(files.components["vae"], support, device)
        images = []
        with torch.inference_mode():
            latents = sampling.unpack(x, height, width).to(support)
            for i in range(batch):  # one image at a time, kept as 8-bit: a batch never holds float pixels
                pixels = vae_tiling.decode(vae, latents[i : i + 1], on_message=note).float().cpu()
                if not _finite(pixels):
                    raise UserError(
                        f"The decoded image holds NaN/infinity: the likely cause is the autoencoder file "
                        f"{files.components['vae'].file.path} (damaged weights: download it again, or use "
                        "--dtype fp32)."
                    )
                images += _to_images(pixels)
        self._release_after_stage(("vae",))

        on_event(Stage("saving"))
        model_name = files.components["transformer"].file.path.stem
        paths = []
        for i, image in enumerate(images):
            record = request.to_dict() | {"batch_index": i, "steps": steps, "t5_max_length": t5_length}
            text = parameters_text(request, steps=steps, model=model_name, batch_index=i)
            paths.append(str(save_png(image, out, text, record)))
        mean = sum(step_seconds) / len(step_seconds) if step_seconds else 0.0
        on_event(Done(paths, time.perf_counter() - started, mean))
        return paths

    def _preview_projection(self, files: ResolvedFiles, dtype, device) -> torch.Tensor:
        """A 16→RGB linear map fitted to this autoencoder once: decode a few random latents, average each
        decoded 8×8 patch, solve least squares. Every step's preview then costs one small matrix product."""
        component = files.components["vae"]
        key = _Key.of(component, dtype, device)
        if key not in self._projections:
            vae = self._model(component, dtype, device)
            generator = torch.Generator().manual_seed(0)
            latents = torch.randn(4, vae.params.z_channels, 8, 8, generator=generator)
            with torch.inference_mode():
                images = vae.decode(latents.to(device, dtype)).float().cpu()
            rgb = torch.nn.functional.avg_pool2d(images, 8).permute(0, 2, 3, 1).reshape(-1, 3)
            flat = latents.permute(0, 2, 3, 1).reshape(-1, latents.shape[1])
            self._projections[key] = torch.linalg.lstsq(
                torch.cat([flat, torch.ones(len(rgb), 1)], 1), rgb
            ).solution
        return self._projections[key]

    def _encode(
        self, request, files: ResolvedFiles, t5_length: int, device, dtype, on_event: EventSink
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(pooled CLIP, T5 states) for the prompt, and for the negative prompt with true CFG; from the cache
        when these encoder files already encoded these prompts."""
        clip_prompt = request.prompt if request.clip_prompt is None else request.clip_prompt
        true_cfg = request.cfg > 1.0 and request.negative is not None
        pairs = [(clip_prompt, request.prompt)] + ([(request.negative, request.negative)] if true_cfg else [])
        clip_tokenizer = tokenizer_identity("clip", files.clip_tokenizer)
        t5_tokenizer = tokenizer_identity("t5", files.t5_tokenizer)
        conds = []
        for clip_text, t5_text in pairs:
            lora_key = clip_lora_key(request.loras)  # a CLIP-L LoRA changes what CLIP makes of the prompt
            clip_key = self.cache.key(
                files.components["clip"], clip_text + lora_key, CLIP_LENGTH, dtype, clip_tokenizer
            )
            t5_key = self.cache.key(files.components["t5"], t5_text, t5_length, dtype, t5_tokenizer)
            pooled, states = self.cache.get(clip_key), self.cache.get(t5_key)
            if pooled is None:
                clip = self._model(files.components["clip"], dtype, device)
                for note in apply_loras(None, clip, request.loras, parts=("clip",)):
                    on_event(Message(note))
                pooled = encode_clip(clip, self._tokenizer("clip", files.clip_tokenizer), [clip_text], device)
                _check_encoding(pooled, files.components["clip"], request.loras)
                self.cache.put(clip_key, pooled)
            if states is None:
                t5 = self._model(files.components["t5"], dtype, device)
                states = encode_t5(
                    t5, self._tokenizer("t5", files.t5_tokenizer), [t5_text], t5_length, device
                )
                _check_encoding(states, files.components["t5"], [])
                self.cache.put(t5_key, states)
            conds.append((pooled, states))
        return conds

    def _retrying(self, velocity, transformer: nn.Module, on_event: EventSink):
        """A step that runs out of GPU memory lowers the budget and runs again; it never ends the job."""

        def step(x: torch.Tensor, t: float) -> torch.Tensor:
            while True:
                try:
                    return velocity(x, t)
                except torch.OutOfMemoryError:
                    before = self.memory.budget
                    after = self.memory.lower_budget(transformer)
                    if before is not None and after >= before:
                        raise UserError(
                            "Out of GPU memory even with every block streamed: use a smaller size, "
                            "close other programs that use the GPU, or use --device cpu."
                        ) from None
                    on_event(
                        Message(
                            f"out of GPU memory: the weight budget is now {after / GB:.2f} GB; retrying the step"
                        )
                    )

        return step


RAM_SHARE = 0.6  # of the machine's RAM that loaded models may take before older ones are let go


def _total_ram() -> int:
    import psutil

    return psutil.virtual_memory().total


def _loras_folder(models_dir: str | None) -> Path | None:
    """ComfyUI's loras/ or Forge's Lora/ in the models folder."""
    if not models_dir:
        return None
    folders = [Path(models_dir) / name for name in layout.LORA_FOLDERS]
    return next((f for f in folders if f.is_dir()), folders[0])


def _finite(t: torch.Tensor) -> bool:
    return bool(torch.isfinite(t).all())


def _check_encoding(encoded: torch.Tensor, component: Component, loras) -> None:
    """A text encoding with NaN/infinity stops the job (and never reaches the cache)."""
    if _finite(encoded):
        return
    strong = [lora_name(spec.path) for spec in loras if spec.strength != 0]
    cause = (
        f"a LoRA with a CLIP-L part ({', '.join(strong)}) or the file {component.file.path}"
        if strong
        else f"the file {component.file.path} (damaged weights: download it again)"
    )
    raise UserError(f"The text encoding holds NaN/infinity: the likely cause is {cause}.")


def _holds_nonfinite(component: Component) -> bool:
    """Whether the component's stored float weights hold NaN or infinity (read tensor by tensor from the
    mapped file; quantized GGUF blocks are not expanded)."""
    for tensor in component.load().values():
        if isinstance(tensor, torch.Tensor) and tensor.is_floating_point():
            if not _finite(tensor.float() if tensor.element_size() == 1 else tensor):
                return True
    return False


def _nonfinite_cause(request: GenerateRequest, files: ResolvedFiles, dtype: torch.dtype) -> str:
    """The likely cause of NaN/infinity in the latents, in words: a weight file, a LoRA or a setting."""
    transformer = files.components["transformer"]
    if _holds_nonfinite(transformer):
        return f"the transformer file {transformer.file.path}, which holds NaN/infinite weights (download it again)"
    loras = [spec for spec in request.loras if spec.strength != 0]
    if loras:
        names = ", ".join(f"{lora_name(s.path)} (strength {s.strength:g})" for s in loras)
        return f"the LoRA {names}: try a lower strength or generate without it"
    if dtype == torch.float16:
        return "float16 overflowing in this model: use --dtype bf16 or --dtype fp32"
    settings = [
        f"--{name} {value:g}"
        for name, value, usual in (("guidance", request.guidance, 10), ("cfg", request.cfg, 10))
        if value > usual
    ]
    if request.shift not in ("auto", "none"):
        settings.append(f"--shift {request.shift}")
    if settings:
        return f"a setting far from the usual ({', '.join(settings)}): try the defaults"
    return f"the transformer file {transformer.file.path} or a setting: download the file again and try the defaults"


def _mu(shift: str, schnell: bool, image_tokens: int) -> float | None:
    if shift == "none" or (shift == "auto" and schnell):
        return None
    if shift == "auto":
        return sampling.shift_mu(image_tokens)
    return float(shift)


def _encode_image(
    vae: AutoEncoder, path: str, width: int, height: int, device, dtype, on_event
) -> torch.Tensor:
    try:
        image = Image.open(path).convert("RGB")
    except OSError:
        raise UserError(f"--init-image {path} is not an image file: give a PNG or JPEG.") from None
    image = image.resize((width, height), Image.Resampling.LANCZOS)
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)[None]
    with torch.inference_mode():
        return vae_tiling.encode(
            vae, pixels.to(device=device, dtype=dtype), on_message=lambda t: on_event(Message(t))
        )


def preview(report: sampling.StepReport, projection: torch.Tensor, height: int, width: int) -> Preview:
    """The first image of the batch, as the step sees it, at 1/8 of the size: 8-bit RGB bytes."""
    latent = sampling.unpack(report.denoised[:1].cpu(), height, width)[0]  # (16, h, w)
    flat = torch.cat(
        [latent.permute(1, 2, 0).reshape(-1, latent.shape[0]), torch.ones(latent[0].numel(), 1)], 1
    )
    rgb = ((flat @ projection).clamp(-1, 1) + 1) * 127.5
    return Preview(report.step, width // 8, height // 8, rgb.round().to(torch.uint8).numpy().tobytes())


def _to_images(pixels: torch.Tensor) -> list[Image.Image]:
    """[-1, 1] float images → 8-bit PIL images (rounded, as diffusers does)."""
    arrays = ((pixels / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(a) for a in arrays]
