"""CLIP-L and T5-XXL through transformers, built from the single files people download, tokenizers from folders."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel, T5Tokenizer
from transformers.models.t5 import modeling_t5

from engine.contract.errors import UserError
from engine.formats.weights import count_indexed
from engine.runtime import ops

CLIP_LENGTH = 77
CLIP_HEAD_DIM = 64  # CLIP-L: 12 heads of 64; heads are not visible in the tensors


def clip_config(shapes: dict[str, tuple[int, ...]]) -> CLIPTextConfig:
    """From the names as CLIPTextModel has them (without the files' `text_model.` prefix)."""
    vocab, hidden = shapes["embeddings.token_embedding.weight"]
    return CLIPTextConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=shapes["encoder.layers.0.mlp.fc1.weight"][0],
        num_hidden_layers=count_indexed(shapes, "encoder.layers."),
        num_attention_heads=max(1, hidden // CLIP_HEAD_DIM),
        max_position_embeddings=shapes["embeddings.position_embedding.weight"][0],
        hidden_act="quick_gelu",
        # CLIP-L's own config: eos id 2 selects the legacy pooling at the highest token id (end of text).
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=1,
    )


def t5_config(shapes: dict[str, tuple[int, ...]]) -> T5Config:
    vocab, d_model = shapes["shared.weight"]
    buckets, heads = shapes["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"]
    gated = "encoder.block.0.layer.1.DenseReluDense.wi_0.weight" in shapes
    d_ff_name = "wi_0" if gated else "wi"
    return T5Config(
        vocab_size=vocab,
        d_model=d_model,
        d_kv=shapes["encoder.block.0.layer.0.SelfAttention.q.weight"][0] // heads,
        d_ff=shapes[f"encoder.block.0.layer.1.DenseReluDense.{d_ff_name}.weight"][0],
        num_layers=count_indexed(shapes, "encoder.block."),
        num_heads=heads,
        relative_attention_num_buckets=buckets,
        feed_forward_proj="gated-gelu" if gated else "relu",
        is_encoder_decoder=False,
        use_cache=False,
    )


class _T5GatedFF(modeling_t5.T5DenseGatedActDense):
    """transformers casts activations to `wo`'s stored dtype (it would cast them to fp8); we cast the weight."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.wo(self.act(self.wi_0(hidden_states)) * self.wi_1(hidden_states))


class _T5FF(modeling_t5.T5DenseActDense):
    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.wo(self.act(self.wi(hidden_states)))


def _without_cast_to_storage(model: nn.Module) -> None:
    for module in model.modules():
        if type(module) is modeling_t5.T5DenseGatedActDense:
            module.__class__ = _T5GatedFF
        elif type(module) is modeling_t5.T5DenseActDense:
            module.__class__ = _T5FF


def build_clip(
    state: dict[str, torch.Tensor], scales: dict[str, torch.Tensor], dtype: torch.dtype
) -> CLIPTextModel:
    # The files name CLIP's tensors text_model.*; a text_projection (unused by FLUX) may sit beside them.
    n = len("text_model.")
    state = {
        k[n:]: v for k, v in state.items() if k.startswith("text_model.") and not k.endswith("position_ids")
    }
    scales = {k[n:]: v for k, v in scales.items() if k.startswith("text_model.")}
    config = clip_config({k: tuple(v.shape) for k, v in state.items()})
    config._attn_implementation = "sdpa"
    with torch.device("meta"):
        model = CLIPTextModel(config)
    ops.adopt(model)
    ops.load_into(model, state, scales, dtype)
    model.embeddings.position_ids = torch.arange(config.max_position_embeddings).expand((1, -1))
    return model


def build_t5(
    state: dict[str, torch.Tensor], scales: dict[str, torch.Tensor], dtype: torch.dtype
) -> T5EncoderModel:
    state = dict(state)
    if "shared.weight" not in state and "encoder.embed_tokens.weight" in state:
        state["shared.weight"] = state["encoder.embed_tokens.weight"]
    state["encoder.embed_tokens.weight"] = state["shared.weight"]
    config = t5_config({k: tuple(v.shape) for k, v in state.items()})
    config._attn_implementation = "eager"
    with torch.device("meta"):
        model = T5EncoderModel(config)
    ops.adopt(model)
    _without_cast_to_storage(model)
    ops.load_into(model, state, scales, dtype)
    model.encoder.embed_tokens = model.shared
    return model


def _tokenizer_folder(folder: str | Path | None, what: str, flag: str) -> Path:
    if folder is None:
        raise UserError(f"No {what} tokenizer folder was given: pass {flag} DIR or use --models-dir.")
    path = Path(folder)
    if not path.is_dir():
        raise UserError(
            f"The {what} tokenizer folder {path} does not exist: download the tokenizer or pass {flag}."
        )
    return path


def tokenizer_identity(kind: str, folder: str | Path | None) -> str:
    """What the text-embedding cache knows a tokenizer by: its folder (resolved) and each file's name, size and
    modification time. The folder is checked as loading it would be, so a missing tokenizer is an error even
    when the embeddings are cached."""
    path = _checked_folder(kind, folder)
    files = sorted(p for p in path.iterdir() if p.is_file())
    return json.dumps(
        [str(path.resolve()), [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files]]
    )


def _checked_folder(kind: str, folder: str | Path | None) -> Path:
    if kind == "clip":
        path = _tokenizer_folder(folder, "CLIP", "--clip-tokenizer")
        if not (
            (path / "tokenizer.json").is_file()
            or (path / "vocab.json").is_file()
            and (path / "merges.txt").is_file()
        ):
            raise UserError(
                f"{path} has no tokenizer.json nor vocab.json + merges.txt: it is not a CLIP tokenizer folder."
            )
        return path
    path = _tokenizer_folder(folder, "T5", "--t5-tokenizer")
    if not ((path / "tokenizer.json").is_file() or (path / "spiece.model").is_file()):
        raise UserError(f"{path} has no tokenizer.json nor spiece.model: it is not a T5 tokenizer folder.")
    return path


def load_clip_tokenizer(folder: str | Path | None) -> CLIPTokenizer:
    return CLIPTokenizer.from_pretrained(str(_checked_folder("clip", folder)))


def load_t5_tokenizer(folder: str | Path | None) -> T5Tokenizer:
    return T5Tokenizer.from_pretrained(str(_checked_folder("t5", folder)))


def _ids(tokenizer, prompts: list[str], length: int, device: torch.device) -> torch.Tensor:
    batch = tokenizer(prompts, padding="max_length", max_length=length, truncation=True, return_tensors="pt")
    return batch.input_ids.to(device)


@torch.inference_mode()
def encode_clip(
    model: CLIPTextModel, tokenizer: CLIPTokenizer, prompts: list[str], device: torch.device
) -> torch.Tensor:
    """The pooled CLIP-L output (B, 768), padded to 77 tokens."""
    return model(_ids(tokenizer, prompts, CLIP_LENGTH, device)).pooler_output


@torch.inference_mode()
def encode_t5(
    model: T5EncoderModel, tokenizer: T5Tokenizer, prompts: list[str], length: int, device: torch.device
) -> torch.Tensor:
    """T5's last hidden states (B, length, 4096), padded to `length` and run without an attention mask."""
    return model(_ids(tokenizer, prompts, length, device)).last_hidden_state
