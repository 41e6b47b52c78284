"""Text conditioning: the prompt, and with true CFG the negative prompt, through CLIP-L and T5; from the
embedding cache when these encoder files already encoded these prompts."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.contract.errors import UserError
from engine.contract.events import EventSink, Message
from engine.formats.lora import lora_name
from engine.formats.weights import Component
from engine.generation.embedding_cache import EmbeddingCache
from engine.generation.model_cache import ModelCache
from engine.generation.plan import Plan
from engine.models.text_encoders import CLIP_LENGTH, encode_clip, encode_t5, tokenizer_identity


@dataclass
class TextConditioning:
    """One CFG pass's text: CLIP-L's pooled vector (1, 768) and T5's states (1, L, 4096)."""

    pooled: torch.Tensor
    states: torch.Tensor


def encode_prompts(
    plan: Plan, models: ModelCache, cache: EmbeddingCache, on_event: EventSink
) -> list[TextConditioning]:
    """The prompt's conditioning, then the negative prompt's when true CFG runs ."""
    request = plan.request
    clip_prompt = request.prompt if request.clip_prompt is None else request.clip_prompt
    pairs = [(clip_prompt, request.prompt)]
    if request.cfg > 1.0 and request.negative is not None:
        pairs.append((request.negative, request.negative))
    return [
        TextConditioning(
            _pooled(plan, clip_text, models, cache, on_event), _states(plan, t5_text, models, cache)
        )
        for clip_text, t5_text in pairs
    ]


def _pooled(
    plan: Plan, text: str, models: ModelCache, cache: EmbeddingCache, on_event: EventSink
) -> torch.Tensor:
    files, loras = plan.files, plan.request.loras
    component = files.components["clip"]
    tokenizer_id = tokenizer_identity("clip", files.clip_tokenizer)
    lora_key = models.loras.clip_key(loras)  # a CLIP-L LoRA changes what CLIP makes of the prompt
    key = cache.key(component, text + lora_key, CLIP_LENGTH, plan.support, tokenizer_id)
    pooled = cache.get(key)
    if pooled is None:
        clip = models.use(component, plan.support, plan.device)
        for note in models.loras.apply(None, clip, loras, parts=("clip",)):
            on_event(Message(note))
        pooled = encode_clip(clip, models.tokenizer("clip", files.clip_tokenizer), [text], plan.device)
        _check_encoding(pooled, component, loras)
        cache.put(key, pooled)
    return pooled


def _states(plan: Plan, text: str, models: ModelCache, cache: EmbeddingCache) -> torch.Tensor:
    files = plan.files
    component = files.components["t5"]
    tokenizer_id = tokenizer_identity("t5", files.t5_tokenizer)
    key = cache.key(component, text, plan.t5_length, plan.support, tokenizer_id)
    states = cache.get(key)
    if states is None:
        t5 = models.use(component, plan.support, plan.device)
        tokenizer = models.tokenizer("t5", files.t5_tokenizer)
        states = encode_t5(t5, tokenizer, [text], plan.t5_length, plan.device)
        _check_encoding(states, component, [])
        cache.put(key, states)
    return states


def _check_encoding(encoded: torch.Tensor, component: Component, loras) -> None:
    """A text encoding with NaN/infinity stops the job (and never reaches the cache)."""
    if bool(torch.isfinite(encoded).all()):
        return
    strong = [lora_name(spec.path) for spec in loras if spec.strength != 0]
    cause = (
        f"a LoRA with a CLIP-L part ({', '.join(strong)}) or the file {component.file.path}"
        if strong
        else f"the file {component.file.path} (damaged weights: download it again)"
    )
    raise UserError(f"The text encoding holds NaN/infinity: the likely cause is {cause}.")
