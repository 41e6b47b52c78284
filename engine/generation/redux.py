"""`--redux-image IMG[:STRENGTH]`: FLUX.1 Redux's image prompt, after the text encoders and before the transformer.

Each image goes through SigLIP and the Redux embedder (engine/models/redux.py) into 729 tokens of T5's width,
placed after the prompt's T5 tokens, as diffusers' FluxPriorReduxPipeline does; CLIP-L's pooled vector stays the
prompt's. The files come from the models folder, recognised by their tensors: the embedder in `style_models/`,
SigLIP in `clip_vision/`. They load and are released like the text encoders (the pipeline releases them with
CLIP and T5).

Several images are concatenated, as ComfyUI's StyleModelApply chains do: each image's tokens follow the previous
one's, each multiplied by its own STRENGTH. diffusers' prior sums instead — (text + tokens) × scale per image,
summed over images — which counts the prompt once per image and adds different images' patch grids position by
position; concatenation keeps every image's tokens whole and the prompt as it is, at 729 more tokens per image.
STRENGTH (0 to 10, default 1, a finite number) multiplies its image's tokens only (ComfyUI's default "multiply"
strength; diffusers' prompt_embeds_scale multiplies the prompt's tokens too): 1 is what Redux was trained with;
0 leaves the image out (a zero token would still be txt_in's bias, not nothing); the text is never scaled. The
effect is gentler than the number suggests: FLUX layer-normalizes every token before attention, so a scale
mostly cancels except against txt_in's bias — small strengths (0.1-0.5) weaken an image, large ones change
little. ComfyUI's "attn_bias" strength (log(strength) added to the attention logits of those tokens) would act
more strongly; it needs an attention bias in the transformer, which FluxDeck does not have yet.

True CFG (--negative with --cfg above 1) is refused with Redux: the negative pass would need tokens of the same
length, and neither diffusers nor ComfyUI defines what they should be.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from engine.contract import layout
from engine.contract.errors import UserError
from engine.contract.events import EventSink, Message
from engine.contract.request import GenerateRequest
from engine.formats.weight_file import open_weights
from engine.formats.weights import Component
from engine.generation.encode import TextConditioning
from engine.generation.model_cache import ModelCache
from engine.generation.plan import Plan
from engine.models.redux import REDUX_MARKER, is_siglip, redux_tokens

ROLES = ("siglip", "redux")


@dataclass(frozen=True)
class ReduxFiles:
    siglip: Component
    embedder: Component


def plan_redux(request: GenerateRequest) -> ReduxFiles | None:
    """The Redux embedder and SigLIP files for a request with --redux-image (None without), found before anything
    loads; one sentence naming the file that is missing and where it goes."""
    if not request.redux_images:
        return None
    if request.cfg > 1.0 and request.negative is not None:
        raise UserError(
            "--redux-image cannot go with true CFG (--negative with --cfg above 1): drop --negative or --cfg."
        )
    if not request.files.models_dir:
        raise UserError(
            f"--redux-image needs the Redux files of a models folder: give --models-dir with "
            f"{layout.STYLE_MODELS}/ (flux1-redux-dev) and {layout.CLIP_VISION}/ (sigclip_vision_patch14_384)."
        )
    root = Path(request.files.models_dir)
    embedder = _find(root / layout.STYLE_MODELS, lambda names: REDUX_MARKER in names, "redux")
    if embedder is None:
        raise UserError(
            f"--redux-image needs the FLUX.1 Redux embedder, which is not in {root / layout.STYLE_MODELS}: put "
            "flux1-redux-dev.safetensors there (python -m bootstrap download flux1-redux-dev-comfy)."
        )
    siglip = _find(root / layout.CLIP_VISION, is_siglip, "siglip")
    if siglip is None:
        raise UserError(
            f"--redux-image needs the SigLIP image encoder, which is not in {root / layout.CLIP_VISION}: put "
            "sigclip_vision_patch14_384.safetensors there (python -m bootstrap download sigclip_vision_384)."
        )
    width = siglip.shapes()["vision_model.embeddings.patch_embedding.weight"][0]
    wanted = embedder.shapes()["redux_up.weight"][1]
    if width != wanted:
        raise UserError(
            f"{siglip.file.path} gives {width}-wide image features but the Redux embedder {embedder.file.path} "
            f"takes {wanted}: use the SigLIP file Redux was made with (sigclip_vision_patch14_384)."
        )
    return ReduxFiles(siglip, embedder)


def _find(folder: Path, recognised, role: str) -> Component | None:
    """The first weight file in `folder` (sorted by name) whose tensor names `recognised` accepts."""
    if not folder.is_dir():
        return None
    for path in sorted(p for p in folder.iterdir() if p.name.lower().endswith(layout.SAFETENSORS_SUFFIXES)):
        try:
            file = open_weights(path)
        except UserError:
            continue
        if recognised(file.tensors):
            return Component(role, file, "")
    return None


def with_redux(
    text: list[TextConditioning],
    plan: Plan,
    files: ReduxFiles | None,
    models: ModelCache,
    on_event: EventSink,
) -> list[TextConditioning]:
    """The prompt's text conditioning with every --redux-image's tokens after its T5 tokens (unchanged without)."""
    if files is None:
        return text
    siglip = models.use(files.siglip, plan.support, plan.device)
    embedder = models.use(files.embedder, plan.support, plan.device)
    prompt = text[0]
    parts = [prompt.states]
    for spec in plan.request.redux_images:
        if spec.strength == 0:
            continue
        image = _open(spec.path)
        tokens = redux_tokens(siglip, embedder, image, plan.device, plan.support)
        if tokens.shape[-1] != prompt.states.shape[-1]:
            raise UserError(
                f"The Redux embedder {files.embedder.file.path} makes {tokens.shape[-1]}-wide tokens, but the "
                f"T5 encoder's are {prompt.states.shape[-1]}: use the Redux file made for FLUX.1."
            )
        if not bool(torch.isfinite(tokens).all()):
            raise UserError(
                f"The Redux tokens of {spec.path} hold NaN/infinity: the likely cause is a damaged "
                f"{files.siglip.file.path} or {files.embedder.file.path}; download them again."
            )
        parts.append(tokens.to(prompt.states.dtype) * spec.strength)
    if len(parts) == 1:  # every image at strength 0
        return text
    count = sum(p.shape[1] for p in parts[1:])
    on_event(Message(f"Redux: {len(parts) - 1} images, {count} tokens after the prompt's"))
    return [TextConditioning(prompt.pooled, torch.cat(parts, 1)), *text[1:]]


def _open(path: str) -> Image.Image:
    try:
        with Image.open(path) as image:
            image.load()
            return image
    except OSError:
        raise UserError(f"--redux-image {path} is not an image file: give a PNG or JPEG.") from None
