"""The Qwen3 text encoder of FLUX.2 [klein] through transformers, built from ComfyUI's `qwen_3_4b` /
`qwen_3_8b` single files (HF names `model.layers.N.*`), and the prompt embeddings diffusers'
Flux2KleinPipeline computes with it.

The embedding (Flux2KleinPipeline._get_qwen3_prompt_embeds): the prompt goes through the tokenizer's chat template
as one user message with the generation prompt and thinking disabled, is padded (and truncated) to 512 tokens
with an attention mask, and the hidden states after layers 9, 18 and 27 (transformers' `hidden_states[k]`:
index 0 is the token embeddings, so before any final norm) are laid side by side per token:
(B, 512, 3 × width). Layers past the last one used never run here: they are not built, and their weights are
not loaded.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers import AutoTokenizer, Qwen3Config, Qwen3Model

from engine.contract.errors import UserError
from engine.formats.weights import count_indexed
from engine.runtime import ops

KLEIN_LAYERS = (9, 18, 27)
MAX_LENGTH = 512
# Not in the weights: Qwen3's published config (both 4B and 8B).
ROPE_THETA = 1_000_000.0
RMS_NORM_EPS = 1e-6
MAX_POSITIONS = 40_960
# What Qwen3's chat template gives for one user message, add_generation_prompt=True, enable_thinking=False;
# used when a tokenizer folder carries no chat template.
KLEIN_TEMPLATE = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"


def _model_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Qwen3Model's names: the files' `model.` prefix removed; `lm_head` (8B files keep it) dropped."""
    out = {}
    for name, tensor in state.items():
        if name.startswith("lm_head."):
            continue
        out[name.removeprefix("model.")] = tensor
    return out


def qwen3_config(shapes: dict[str, tuple[int, ...]], num_layers: int | None = None) -> Qwen3Config:
    """From Qwen3Model's names. `num_layers` builds only the first layers (the encoder needs no more)."""
    vocab, hidden = shapes["embed_tokens.weight"]
    head_dim = shapes["layers.0.self_attn.q_norm.weight"][0]
    layers = count_indexed(shapes, "layers.")
    return Qwen3Config(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=shapes["layers.0.mlp.gate_proj.weight"][0],
        num_hidden_layers=layers if num_layers is None else num_layers,
        num_attention_heads=shapes["layers.0.self_attn.q_proj.weight"][0] // head_dim,
        num_key_value_heads=shapes["layers.0.self_attn.k_proj.weight"][0] // head_dim,
        head_dim=head_dim,
        max_position_embeddings=MAX_POSITIONS,
        rms_norm_eps=RMS_NORM_EPS,
        rope_parameters={"rope_type": "default", "rope_theta": ROPE_THETA},
        attention_bias="layers.0.self_attn.q_proj.bias" in shapes,
        tie_word_embeddings=False,
        use_cache=False,
    )


class KleinQwen3(Qwen3Model):
    """Qwen3Model that tells the memory manager to stream its decoder layers (like T5's blocks)."""

    def streamable_blocks(self) -> list[nn.Module]:
        return list(self.layers)


def build_qwen3(
    state: dict[str, torch.Tensor],
    scales: dict[str, torch.Tensor],
    dtype: torch.dtype,
    layers: tuple[int, ...] = KLEIN_LAYERS,
) -> KleinQwen3:
    """Qwen3's first max(layers) decoder layers, weights as stored (through ops.fetch), no final norm: its last
    hidden state is the output of layer max(layers), unnormalised, like the pipeline's hidden_states[k]."""
    state, scales = _model_names(state), _model_names(scales)
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    available = count_indexed(shapes, "layers.")
    depth = max(layers)
    if depth > available or min(layers) < 1:
        raise UserError(
            f"This Qwen3 text encoder has {available} layers; FLUX.2 [klein] takes the states after layers "
            f"{', '.join(map(str, layers))}: it is not a klein text encoder."
        )

    def kept(name: str) -> bool:
        """Not the final norm, nor a layer at or past `depth`."""
        if name.startswith("layers."):
            return int(name.split(".")[1]) < depth
        return not name.startswith("norm.")

    state = {k: v for k, v in state.items() if kept(k)}
    scales = {k: v for k, v in scales.items() if kept(k)}
    config = qwen3_config(shapes, depth)
    config._attn_implementation = "sdpa"
    with torch.device("meta"):
        model = KleinQwen3(config)
    model.norm = nn.Identity()
    ops.adopt(model)
    ops.load_into(model, state, scales, dtype)
    # Buffers computed at init (RoPE frequencies) were made on the meta device: compute them again.
    with torch.device("cpu"):
        model.rotary_emb = type(model.rotary_emb)(config=config)
    return model


def load_qwen3_tokenizer(folder: str | Path | None):
    if folder is None:
        raise UserError("No Qwen3 tokenizer folder was given: pass --text-tokenizer DIR or use --models-dir.")
    path = Path(folder)
    if not (path / "tokenizer.json").is_file() and not (
        (path / "vocab.json").is_file() and (path / "merges.txt").is_file()
    ):
        raise UserError(
            f"{path} has no tokenizer.json nor vocab.json + merges.txt: it is not a Qwen3 tokenizer folder."
        )
    return AutoTokenizer.from_pretrained(str(path))


def qwen3_tokenizer_identity(folder: str | Path | None) -> str:
    """What the embedding cache knows a Qwen3 tokenizer folder by: its path and each file's name, size and
    modification time (checked as loading it would be)."""
    import json

    load_check = Path(folder) if folder is not None else None
    if load_check is None or not load_check.is_dir():
        load_qwen3_tokenizer(folder)  # the one-sentence error
    files = sorted(p for p in load_check.iterdir() if p.is_file())
    return json.dumps(
        [str(load_check.resolve()), [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files]]
    )


def chat_text(tokenizer, prompt: str) -> str:
    """The prompt as the pipeline hands it to the tokenizer: one user turn, the assistant's turn opened,
    thinking disabled."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}],
            tokenize=False,
            add_generation_prompt=True,
            enable_thinking=False,
        )
    return KLEIN_TEMPLATE.format(prompt)


@torch.inference_mode()
def encode_qwen3(
    model: KleinQwen3,
    tokenizer,
    prompts: list[str],
    device: torch.device,
    layers: tuple[int, ...] = KLEIN_LAYERS,
    max_length: int = MAX_LENGTH,
) -> torch.Tensor:
    """(B, max_length, len(layers) × width): per token, the hidden states after each of `layers` side by side."""
    batch = tokenizer(
        [chat_text(tokenizer, p) for p in prompts],
        return_tensors="pt",
        padding="max_length",
        truncation=True,
        max_length=max_length,
    )
    out = model(
        input_ids=batch["input_ids"].to(device),
        attention_mask=batch["attention_mask"].to(device),
        output_hidden_states=True,
        use_cache=False,
    )
    states = torch.stack([out.hidden_states[k] for k in layers], dim=2)  # (B, L, layers, width)
    return states.flatten(2)
