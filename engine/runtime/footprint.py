"""What a model weighs and costs before its file is on disk: its blocks' parameters and a step's FLOPs, counted on
the engine's own model code built on the meta device (no memory, no weights) at the published sizes.

A preset's file sizes are spread over these counts to give the memory manager's view (`placement.ModelBytes`);
the FLOPs are what torch's FlopCounterMode counts for one forward pass of that code, so a time estimate is
FLOPs ÷ the throughput the selftest measured (docs/estimates.md). Everything is computed once per architecture.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from engine.models.autoencoder import AutoEncoder, AutoEncoderParams
from engine.models.flux1 import Flux, FluxParams
from engine.models.flux2 import Flux2, Flux2Params
from engine.models.flux2_autoencoder import Flux2AutoEncoder
from engine.models.qwen3_encoder import KLEIN_LAYERS
from engine.runtime.memory import blocks_of
from engine.runtime.placement import ModelBytes

# The published sizes (../shared/reference/flux.md; BFL's and the encoders' configs). Only what the weights
# cannot tell before they are downloaded.
FLUX1_DEV = FluxParams(64, 4096, 768, 3072, 12288, 24, 19, 38, (16, 56, 56), True, True)
FLUX1_SCHNELL = FluxParams(64, 4096, 768, 3072, 12288, 24, 19, 38, (16, 56, 56), False, True)
KLEIN_4B = Flux2Params(128, 7680, 3072, 9216, 24, 5, 20, (32, 32, 32, 32), False)
KLEIN_9B = Flux2Params(128, 12288, 4096, 12288, 32, 8, 24, (32, 32, 32, 32), False)
FLUX1_AE = AutoEncoderParams(3, 128, (1, 2, 4, 4), 2, 16, 3)
FLUX2_AE = AutoEncoderParams(3, 128, (1, 2, 4, 4), 2, 32, 3)
T5_XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
              feed_forward_proj="gated-gelu", is_encoder_decoder=False)  # fmt: skip
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
              num_attention_heads=12, max_position_embeddings=77)  # fmt: skip
QWEN3_4B = dict(vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                num_attention_heads=32, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True)  # fmt: skip
QWEN3_8B = dict(vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                num_attention_heads=32, num_key_value_heads=8, head_dim=128, tie_word_embeddings=False)  # fmt: skip
TRANSFORMER_ARCHITECTURES = ("flux1-dev", "flux1-schnell", "klein-4b", "klein-9b")
ARCHITECTURES = ("flux1-dev", "flux1-schnell", "klein-4b", "klein-9b", "t5-xxl", "clip-l", "qwen3-4b",
                 "qwen3-8b", "ae-flux1", "ae-flux2")  # fmt: skip


@dataclass(frozen=True)
class Layout:
    """A model's parameters as the memory manager splits them, and how many of the file's it loads."""

    block_params: tuple[int, ...]
    rest_params: int
    file_params: int  # all the file holds (a klein Qwen3 file has layers the encoder never loads)

    @property
    def loaded_params(self) -> int:
        return sum(self.block_params) + self.rest_params

    def bytes_for(self, name: str, file_bytes: int) -> ModelBytes:
        """The memory manager's view when the file holds `file_bytes` for this model: bytes per parameter as
        stored, spread over the blocks by their parameters."""
        per_param = file_bytes / self.file_params
        blocks = tuple(round(p * per_param) for p in self.block_params)
        return ModelBytes(name, blocks, round(self.rest_params * per_param))


def transformer_params(arch: str) -> FluxParams | Flux2Params:
    """The published shape of a transformer architecture (TRANSFORMER_ARCHITECTURES)."""
    return {
        "flux1-dev": FLUX1_DEV,
        "flux1-schnell": FLUX1_SCHNELL,
        "klein-4b": KLEIN_4B,
        "klein-9b": KLEIN_9B,
    }[arch]


def _meta_model(arch: str) -> nn.Module:
    from transformers import CLIPTextConfig, CLIPTextModel, Qwen3Config, Qwen3Model, T5Config, T5EncoderModel

    with torch.device("meta"):
        if arch.startswith("flux1"):
            return Flux(FLUX1_DEV if arch == "flux1-dev" else FLUX1_SCHNELL)
        if arch.startswith("klein"):
            return Flux2(KLEIN_4B if arch == "klein-4b" else KLEIN_9B)
        if arch == "ae-flux1":
            return AutoEncoder(FLUX1_AE)
        if arch == "ae-flux2":
            return Flux2AutoEncoder(FLUX2_AE)
        if arch == "t5-xxl":
            return T5EncoderModel(T5Config(**T5_XXL))
        if arch == "clip-l":
            return CLIPTextModel(CLIPTextConfig(**CLIP_L))
        if arch in ("qwen3-4b", "qwen3-8b"):
            return Qwen3Model(Qwen3Config(**(QWEN3_4B if arch == "qwen3-4b" else QWEN3_8B)))
    raise ValueError(f"unknown architecture {arch!r}: one of {', '.join(ARCHITECTURES)}")


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@cache
def layout(arch: str) -> Layout:
    model = _meta_model(arch)
    total = _count(model)
    if arch.startswith("qwen3"):
        layers = list(model.layers)
        used = layers[: max(KLEIN_LAYERS)]  # the encoder stops at the last layer klein reads
        unused = sum(_count(layer) for layer in layers[len(used) :]) + _count(model.norm)
        blocks = tuple(_count(layer) for layer in used)
        return Layout(blocks, total - unused - sum(blocks), total)
    blocks = tuple(_count(b) for b in (model.layers if arch.startswith("qwen3") else blocks_of(model)))
    return Layout(blocks, total - sum(blocks), total)


def _flops(run) -> int:
    with FlopCounterMode(display=False) as counter:
        run()
    return counter.get_total_flops()


@cache
def transformer_flops(arch: str, width: int, height: int, text_tokens: int, batch: int = 1) -> int:
    """One forward pass of the transformer at this size (CFG's two passes: batch 2)."""
    model = _meta_model(arch)
    flux1 = arch.startswith("flux1")
    channels, context = (64, 4096) if flux1 else (128, model.params.context_in_dim)
    n_img = (width // 16) * (height // 16)
    with torch.device("meta"):
        img, txt = torch.empty(batch, n_img, channels), torch.empty(batch, text_tokens, context)
        ids = torch.zeros(batch, n_img, 3 if flux1 else 4)
        tids = torch.zeros(batch, text_tokens, 3 if flux1 else 4)
        t = torch.ones(batch)
        if flux1:
            y, g = torch.empty(batch, 768), torch.ones(batch)
            return _flops(
                lambda: model(img, ids, txt, tids, t, y, g if model.params.guidance_embed else None)
            )
        return _flops(lambda: model(img, ids, txt, tids, t))


@cache
def decode_flops(arch: str, width: int, height: int) -> int:
    """The autoencoder's decode of one image of this size (untiled)."""
    model = _meta_model(arch)
    with torch.device("meta"):
        if arch == "ae-flux1":
            z = torch.empty(1, 16, height // 8, width // 8)
        else:
            z = torch.empty(1, 128, height // 16, width // 16)
        return _flops(lambda: model.decode(z))


def encoder_flops(arch: str, tokens: int) -> int:
    """A text encoder's pass over `tokens`: two FLOPs per loaded weight per token (its attention over 512 tokens
    or fewer adds under 5 %)."""
    return 2 * layout(arch).loaded_params * tokens
