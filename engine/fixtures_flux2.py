"""Tiny random FLUX.2 [klein] parts in the real layouts: the transformer and autoencoder with BFL names, Qwen3 with
the names of ComfyUI's `qwen_3_4b.safetensors`, and a tiny Qwen2-style byte-level BPE tokenizer with Qwen3's
special tokens and chat template (built offline with the `tokenizers` library)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from engine.fixtures import _byte_alphabet, _seeded
from engine.models.autoencoder import AutoEncoderParams
from engine.models.flux2 import ROPE_AXES, Flux2, Flux2Params
from engine.models.flux2_autoencoder import PATCH, Flux2AutoEncoder
from engine.models.qwen3_encoder import KLEIN_LAYERS, MAX_POSITIONS, RMS_NORM_EPS, ROPE_THETA


@dataclass(frozen=True)
class Flux2Spec:
    hidden: int = 64
    heads: int = 2
    depth: int = 1
    depth_single: int = 2
    guidance: bool = False  # klein has no guidance_in; FLUX.2 [dev] has
    qwen_hidden: int = 32
    qwen_layers: int = max(KLEIN_LAYERS) + 1  # the pipeline reads states after layer 27 of 36
    qwen_heads: int = 4
    qwen_kv_heads: int = 2
    vae_ch: int = 32
    vae_levels: int = 4  # 8× down-sampling needs four levels
    z_channels: int = 32
    seed: int = 0

    def flux2_params(self) -> Flux2Params:
        head_dim = self.hidden // self.heads
        return Flux2Params(
            in_channels=PATCH * PATCH * self.z_channels,
            context_in_dim=len(KLEIN_LAYERS) * self.qwen_hidden,
            hidden_size=self.hidden,
            mlp_hidden=3 * self.hidden,
            num_heads=self.heads,
            depth=self.depth,
            depth_single=self.depth_single,
            axes_dim=(head_dim // ROPE_AXES,) * ROPE_AXES,
            guidance_embed=self.guidance,
            out_channels=PATCH * PATCH * self.z_channels,
        )

    def ae_params(self) -> AutoEncoderParams:
        return AutoEncoderParams(3, self.vae_ch, (1,) * self.vae_levels, 1, self.z_channels, 3)

    def qwen3_config(self, vocab_size: int) -> Qwen3Config:
        return Qwen3Config(
            vocab_size=vocab_size,
            hidden_size=self.qwen_hidden,
            intermediate_size=3 * self.qwen_hidden,
            num_hidden_layers=self.qwen_layers,
            num_attention_heads=self.qwen_heads,
            num_key_value_heads=self.qwen_kv_heads,
            head_dim=2 * self.qwen_hidden // self.qwen_heads,  # as in Qwen3-4B, heads × head_dim ≠ width
            max_position_embeddings=MAX_POSITIONS,
            rms_norm_eps=RMS_NORM_EPS,
            rope_parameters={"rope_type": "default", "rope_theta": ROPE_THETA},
            tie_word_embeddings=True,  # Qwen3-4B's own config: no lm_head in the file
        )


def flux2_state(spec: Flux2Spec) -> dict[str, torch.Tensor]:
    """BFL names, as in flux-2-klein-4b.safetensors and ComfyUI's split diffusion model."""
    return _seeded(spec.seed, lambda: Flux2(spec.flux2_params()))


def flux2_ae_state(spec: Flux2Spec) -> dict[str, torch.Tensor]:
    """BFL names (encoder.quant_conv, decoder.post_quant_conv, bn.*), as in flux2-vae.safetensors."""
    state = _seeded(spec.seed + 1, lambda: Flux2AutoEncoder(spec.ae_params()))
    g = torch.Generator().manual_seed(spec.seed + 1)
    channels = state["bn.running_mean"].shape[0]
    state["bn.running_mean"] = 0.3 * torch.randn(channels, generator=g)
    state["bn.running_var"] = 0.5 + torch.rand(channels, generator=g)
    state["bn.num_batches_tracked"] = torch.tensor(1000, dtype=torch.long)  # BatchNorm2d saves its counter
    return state


def qwen3_state(spec: Flux2Spec, vocab_size: int) -> dict[str, torch.Tensor]:
    """HF names under `model.`, as in ComfyUI's qwen_3_4b.safetensors (tied embeddings: no lm_head)."""
    state = _seeded(spec.seed + 2, lambda: Qwen3ForCausalLM(spec.qwen3_config(vocab_size)))
    return {k: v for k, v in state.items() if not k.startswith("lm_head.")}


# ---- the tokenizer ----

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>")

# Qwen3's template reduced to what the pipeline uses (one user message, generation prompt, thinking on or off);
# the same text as the real template for that case.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}"
    "{%- endif %}"
)


def write_qwen3_tokenizer(folder: Path, chat_template: bool = True) -> int:
    """tokenizer.json + tokenizer_config.json of a byte-level BPE with Qwen's special tokens (pad
    <|endoftext|>, padding on the right); returns the vocabulary size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    alphabet = _byte_alphabet()
    merges = [("Ġ", "a"), ("c", "a"), ("ca", "t"), ("Ġ", "ca"), ("Ġca", "t"), ("d", "o"), ("do", "g")]
    vocab = {t: i for i, t in enumerate(alphabet + ["".join(m) for m in merges])}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
    tokenizer.save(str(folder / "tokenizer.json"))
    config = {
        "tokenizer_class": "Qwen2Tokenizer",
        "model_max_length": 131072,
        "pad_token": "<|endoftext|>",
        "eos_token": "<|im_end|>",
        "bos_token": None,
        "padding_side": "right",
        "add_prefix_space": False,
        "errors": "replace",
    }
    if chat_template:
        config["chat_template"] = CHAT_TEMPLATE
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return tokenizer.get_vocab_size()
