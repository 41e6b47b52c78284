"""FLUX.2 [klein]'s stages, as diffusers' Flux2KleinPipeline runs them: Qwen3 encode → noise, ids and schedule →
Euler with true CFG → decode through the FLUX.2 autoencoder. FLUX.1's stages stay as they are; the pipeline
hands a job here when the transformer's tensor names say FLUX.2 (plan.family).

- Text: the prompt (and with --cfg above 1 the negative prompt, "" when none is given, as the pipeline does)
  through Qwen3's chat template, 512 tokens, the states after layers 9, 18, 27 (encode_qwen3); from the embedding
  cache when this encoder file and tokenizer already encoded it. The encoder is released before the transformer
  loads, as T5 is.
- Noise (../shared/DESIGN.md): randn((B, 128, H/16, W/16)) from a CPU generator seeded with --seed, float32, one
  draw for the batch; image token n is noise[b, :, n // (W/16), n % (W/16)].
- Schedule: sigmas linspace(1, 1/N, N) in float32, shifted by the exponential time shift with
  mu = compute_empirical_mu(tokens, N), then 0; the transformer sees t = sigma. --shift, --guidance are not used
  (klein has no guidance embedding: --guidance is ignored with a note).
- References (--reference, flux2_references): encoded by the FLUX.2 autoencoder before the transformer loads,
  attended at t = 10, 20, ... in both CFG passes.
- LoRAs (--lora, <lora:...> tags): at FLUX.1's chokepoint (engine/formats/lora), FLUX.2's diffusers names in
  flux2_layouts; a tensor that fits no layer refuses the LoRA by name.
- Decode through vae_tiling (tiled for big images or when memory runs out, as FLUX.1's, 512-pixel tiles);
  previews (EngineOptions.previews) through a 128→RGB projection fitted to this autoencoder, one pixel a token.
- Not taken: --init-image (Flux2KleinPipeline has no img2img), --mask/--outpaint/--control-image/--controlnet.
"""

from __future__ import annotations

import math
import threading
import time
from pathlib import Path

import numpy as np
import torch

from engine.contract.errors import Cancelled, UserError
from engine.contract.events import Done, EventSink, Message, Stage, Step
from engine.contract.request import GenerateRequest, parse_cache
from engine.formats.lora.library import unknown_keys
from engine.generation import edits, flux2_references, sampling, vae_tiling
from engine.generation.decode import checked_images
from engine.generation.denoise import _retrying, nonfinite_cause
from engine.generation.encode import _check_encoding
from engine.generation.plan import Plan
from engine.generation.png_output import save_images
from engine.generation.preview import latent_preview
from engine.generation.step_cache import FirstBlockCache
from engine.models import flux2
from engine.models.qwen3_encoder import MAX_LENGTH, encode_qwen3, qwen3_tokenizer_identity

LATENT_CHANNELS = 128  # 32 latent channels × a 2×2 patch
DOWNSCALE = 16  # pixels per latent token along each side
DEFAULT_GUIDANCE = GenerateRequest.__dataclass_fields__["guidance"].default
# Decode tiles in latent tokens: FLUX.1's 512-pixel tiles overlapping by 128 pixels, at 16 pixels a token
DECODE_TILE, DECODE_OVERLAP = vae_tiling.DECODE_TILE // 2, vae_tiling.DECODE_OVERLAP // 2


def make_noise(seed: int, batch: int, height: int, width: int) -> torch.Tensor:
    """FLUX.2's seed convention: (batch, 128, H/16, W/16) float32 from a CPU generator."""
    generator = torch.Generator("cpu").manual_seed(seed)
    shape = (batch, LATENT_CHANNELS, height // DOWNSCALE, width // DOWNSCALE)
    return torch.randn(shape, generator=generator, dtype=torch.float32)


def empirical_mu(image_tokens: int, steps: int) -> float:
    """Flux2KleinPipeline's compute_empirical_mu: linear in the token count, fitted at 10 and 200 steps."""
    a1, b1 = 8.73809524e-05, 1.89833333
    a2, b2 = 0.00016927, 0.45666666
    if image_tokens > 4300:
        return float(a2 * image_tokens + b2)
    m200, m10 = a2 * image_tokens + b2, a1 * image_tokens + b1
    slope = (m200 - m10) / 190.0
    return float(slope * steps + (m200 - 200.0 * slope))


def schedule(steps: int, image_tokens: int, mu: float | None = None) -> list[float]:
    """steps + 1 times: linspace(1, 1/N, N) shifted exponentially by mu (the empirical one by default), in float32
    as the scheduler keeps them, then 0."""
    mu = empirical_mu(image_tokens, steps) if mu is None else mu
    sigmas = np.linspace(1.0, 1.0 / steps, steps)
    shifted = math.exp(mu) / (math.exp(mu) + (1.0 / sigmas - 1.0))
    return [float(s) for s in torch.from_numpy(shifted).to(torch.float32)] + [0.0]


def check_request(plan: Plan, on_event: EventSink) -> None:
    """What FLUX.2 does not take yet is refused in one sentence; --guidance is ignored with a note."""
    request = plan.request
    model = plan.files.components["transformer"].file.path.name
    for name in ("controlnets", "mask", "outpaint", "control_image"):
        if getattr(request, name, None):
            flag = "--" + name.replace("_", "-").removesuffix("s")
            raise UserError(f"{flag} is not supported with the FLUX.2 [klein] model {model}: leave it out.")
    if request.init_image:
        raise UserError(
            f"--init-image is not supported with the FLUX.2 [klein] model {model} (it has no img2img): "
            "give the image as --reference instead."
        )
    if request.guidance != DEFAULT_GUIDANCE:
        on_event(Message("--guidance is ignored: FLUX.2 [klein] has no guidance embedding (use --cfg)."))


def apply_loras(engine, plan: Plan, transformer, on_event: EventSink) -> None:
    """The job's LoRAs on the transformer (the FLUX.1 chokepoint, with FLUX.2's diffusers names), or none: the
    previous job's are taken off. A LoRA with a tensor that fits no layer is refused by that name."""
    model = plan.files.components["transformer"].file.path.name
    for spec in plan.request.loras:
        lora = engine.models.loras.load(spec.path)
        unknown, text = unknown_keys(transformer, lora)
        if unknown:
            more = f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""
            raise UserError(
                f"LoRA {lora.path} has {unknown[0]}{more}, which fits no layer of the FLUX.2 [klein] transformer "
                f"{model}: use a LoRA made for this model."
            )
        if text:
            on_event(
                Message(
                    f"LoRA {lora.name}: its text-encoder part ({len(text)} layers) was not applied: LoRAs apply "
                    "to the FLUX.2 transformer only"
                )
            )
    for note in engine.models.loras.apply(transformer, None, plan.request.loras, parts=("transformer",)):
        on_event(Message(note))


def encode(plan: Plan, engine, texts: list[str]) -> list[torch.Tensor]:
    """Each text's Qwen3 embedding (1, 512, 3 × width), from the cache when there."""
    files = plan.files
    component = files.components["text_encoder"]
    tokenizer_id = qwen3_tokenizer_identity(files.text_tokenizer)
    out = []
    for text in texts:
        key = engine.cache.key(component, text, MAX_LENGTH, plan.support, tokenizer_id)
        states = engine.cache.get(key)
        if states is None:
            model = engine.models.use(component, plan.support, plan.device)
            tokenizer = engine.models.tokenizer("qwen3", files.text_tokenizer)
            states = encode_qwen3(model, tokenizer, [text], plan.device)
            _check_encoding(states, component, [])
            engine.cache.put(key, states)
        out.append(states)
    return out


def generate_flux2(
    engine, plan: Plan, out: Path, on_event: EventSink, cancel: threading.Event, started: float
) -> list[str]:
    """The whole job for a FLUX.2 transformer, from the plan to the saved PNGs."""
    request, device = plan.request, plan.device
    check_request(plan, on_event)
    passes = 2 if request.cfg > 1.0 else 1
    texts = [request.prompt] + ([request.negative or ""] if passes == 2 else [])

    on_event(Stage("encoding", f"{device.type} {plan.precision}"))
    states = encode(plan, engine, texts)
    engine.models.release(("text_encoder",))

    refs = None
    if request.references:
        vae = engine.models.use(plan.files.components["vae"], plan.support, device)
        images = [(path, edits._open(path, "--reference")) for path in request.references]
        with torch.inference_mode():
            refs = flux2_references.reference_tokens(vae, images, device, plan.support)

    on_event(Stage("loading", "transformer"))
    transformer = engine.models.use(plan.files.components["transformer"], plan.dtype, device)
    apply_loras(engine, plan, transformer, on_event)
    rows, cols = request.height // DOWNSCALE, request.width // DOWNSCALE
    batch = request.batch
    x = flux2.pack(make_noise(request.seed, batch, request.height, request.width)).to(device)
    times = schedule(plan.steps, rows * cols)
    img_ids = flux2.image_ids(1, rows, cols).to(device)
    txt_ids = flux2.text_ids(1, MAX_LENGTH).to(device)
    ids = [txt_ids, img_ids] + ([refs.ids] if refs is not None else [])
    pe = transformer.position_embedding(torch.cat(ids, 1))
    ref_img = None if refs is None else refs.tokens.to(plan.dtype).expand(passes * batch, -1, -1)
    ref_ids = None if refs is None else refs.ids
    txt = torch.cat([s.to(device, plan.dtype).expand(batch, -1, -1) for s in states])
    threshold = parse_cache(request.cache)
    step_cache = None if threshold is None else FirstBlockCache(threshold, groups=passes)

    @torch.inference_mode()
    def velocity(x: torch.Tensor, t: float) -> torch.Tensor:
        if cancel.is_set():
            raise Cancelled("cancelled")
        timesteps = torch.full((passes * batch,), t, device=device, dtype=torch.float32)
        img = x.to(plan.dtype).repeat(passes, 1, 1)
        v = transformer(img, img_ids, txt, txt_ids, timesteps, None, pe, ref_img, ref_ids, step_cache).float()
        if passes == 1:
            return v
        positive, negative = v.chunk(2)
        return negative + request.cfg * (positive - negative)

    step_seconds: list[float] = []
    projection = None
    if engine.options.previews:
        projection = engine.models.preview_projection(plan.files.components["vae"], plan.support, device)

    def progress(report: sampling.StepReport) -> None:
        step_seconds.append(report.seconds)
        cached = step_cache is not None and not any(step_cache.decisions[-1])
        on_event(Step(report.step, report.total, report.seconds, cached))
        if projection is not None:
            latent = flux2.unpack(report.denoised[:1].float().cpu(), rows, cols)[0]
            on_event(latent_preview(report.step, latent, projection))

    on_event(Stage("denoising", f"{len(times) - 1} steps"))
    try:
        latents = sampling.euler(
            x, times, _retrying(velocity, transformer, engine.models.memory, on_event), progress
        )
    except sampling.NonFiniteLatents as error:
        raise UserError(
            f"The image turned to NaN/infinity at step {error.step} of {error.total}, so it would be black: "
            f"the likely cause is {nonfinite_cause(plan)}."
        ) from None
    engine.models.release(("transformer",))

    on_event(Stage("decoding"))
    vae = engine.models.use(plan.files.components["vae"], plan.support, device)
    images = []
    with torch.inference_mode():
        unpacked = flux2.unpack(latents, rows, cols).to(plan.support)
        for i in range(batch):
            pixels = vae_tiling.decode(
                vae,
                unpacked[i : i + 1],
                on_message=lambda text: on_event(Message(text)),
                tile=DECODE_TILE,
                overlap=DECODE_OVERLAP,
            )
            images += checked_images(pixels, plan)
    engine.models.release(("vae",))

    on_event(Stage("saving"))
    model = plan.files.components["transformer"].file.path.stem
    paths = save_images(
        images, request, out, steps=plan.steps, t5_length=MAX_LENGTH, model=model, hashes=engine.hashes
    )
    mean = sum(step_seconds) / len(step_seconds) if step_seconds else 0.0
    on_event(Done(paths, time.perf_counter() - started, mean))
    return paths
