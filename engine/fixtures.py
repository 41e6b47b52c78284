"""Tiny random FLUX model sets in the real file formats (names, dtypes, prefixes, tokenizer files).

Used by the tests and by `python -m engine selftest`: the same loaders, the same code path as the 17 GB files.
"""

from __future__ import annotations

import io
import json
import random
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

from engine.models.autoencoder import AutoEncoder, AutoEncoderParams
from engine.models.flux1 import Flux, FluxParams

FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)


@dataclass(frozen=True)
class TinySpec:
    hidden: int = 64
    heads: int = 2
    depth: int = 1
    depth_single: int = 2
    guidance: bool = True  # [dev] has guidance_in, [schnell] has not
    clip_hidden: int = 64
    clip_layers: int = 2
    t5_dim: int = 64
    t5_layers: int = 2
    t5_heads: int = 2
    t5_vocab: int = 512
    vae_ch: int = 32
    vae_levels: int = 4  # 8× down-sampling needs four levels
    seed: int = 0
    in_channels: int = 64  # 384 for FLUX.1 Fill, 128 for Canny/Depth: conditioning channels after the latent

    def flux_params(self) -> FluxParams:
        head_dim = self.hidden // self.heads
        rope = (7 * head_dim // 16) // 2 * 2
        return FluxParams(
            in_channels=self.in_channels,
            context_in_dim=self.t5_dim,
            vec_in_dim=self.clip_hidden,
            hidden_size=self.hidden,
            mlp_hidden=4 * self.hidden,
            num_heads=self.heads,
            depth=self.depth,
            depth_single=self.depth_single,
            axes_dim=(head_dim - 2 * rope, rope, rope),
            guidance_embed=self.guidance,
            qkv_bias=True,
        )


SCHNELL = TinySpec(guidance=False)


def _seeded(seed: int, build) -> dict[str, torch.Tensor]:
    """A model's state dict from a seeded random init, livened so that every tensor shows in the output."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        state = build().state_dict()
        return {name: _liven(t.detach().clone()) for name, t in state.items()}


def _liven(t: torch.Tensor) -> torch.Tensor:
    """Default inits leave norms at 1 and biases at 0 (a swapped pair would go unseen) and modulations weak;
    randomize the first two and strengthen the matrices, so a test fails when any weight is misused."""
    if not t.is_floating_point():
        return t.contiguous()
    if t.ndim == 1 and bool((t == 1).all()):
        return (1 + 0.3 * torch.randn_like(t)).contiguous()
    if t.ndim == 1 and bool((t == 0).all()):
        return (0.2 * torch.randn_like(t)).contiguous()
    return (t * GAIN).contiguous() if t.ndim >= 2 else t.contiguous()


GAIN = 1.6


def flux_state(spec: TinySpec) -> dict[str, torch.Tensor]:
    """BFL names."""
    return _seeded(spec.seed, lambda: Flux(spec.flux_params()))


def ae_state(spec: TinySpec) -> dict[str, torch.Tensor]:
    params = AutoEncoderParams(3, spec.vae_ch, (1,) * spec.vae_levels, 1, 16, 3)
    return _seeded(spec.seed + 1, lambda: AutoEncoder(params))


def clip_state(spec: TinySpec, vocab_size: int) -> dict[str, torch.Tensor]:
    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=spec.clip_hidden,
        intermediate_size=2 * spec.clip_hidden,
        num_hidden_layers=spec.clip_layers,
        num_attention_heads=max(1, spec.clip_hidden // 64),
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=1,
    )
    state = _seeded(spec.seed + 2, lambda: CLIPTextModel(config))
    # clip_l.safetensors names everything under text_model. (transformers' older layout)
    return {f"text_model.{k}": v for k, v in state.items()}


def t5_state(spec: TinySpec) -> dict[str, torch.Tensor]:
    config = T5Config(
        vocab_size=spec.t5_vocab,
        d_model=spec.t5_dim,
        d_kv=spec.t5_dim // spec.t5_heads,
        d_ff=2 * spec.t5_dim,
        num_layers=spec.t5_layers,
        num_heads=spec.t5_heads,
        feed_forward_proj="gated-gelu",
        is_encoder_decoder=False,
    )
    state = _seeded(spec.seed + 3, lambda: T5EncoderModel(config))
    state.pop("encoder.embed_tokens.weight", None)  # the files people download store the shared table once
    return state


def cast(state: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}


def is_big_weight(name: str, tensor: torch.Tensor) -> bool:
    """The tensors fp8 files store as fp8: matrices of linear and conv layers (norms and biases stay)."""
    return name.endswith(".weight") and tensor.ndim >= 2


def to_fp8(
    state: dict[str, torch.Tensor], dtype=torch.float8_e4m3fn, scaled: bool = False
) -> dict[str, torch.Tensor]:
    """An fp8 file as ComfyUI stores them; `scaled` adds the scaled-fp8 marker and per-layer scale_weight."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        if not is_big_weight(name, tensor):
            out[name] = tensor.to(torch.bfloat16)
            continue
        if scaled:
            scale = tensor.abs().max().float() / torch.finfo(dtype).max * 4
            out[name] = (tensor.float() / scale).to(dtype)
            out[name[: -len(".weight")] + ".scale_weight"] = scale.reshape(1)
        else:
            out[name] = tensor.to(dtype)
    if scaled:
        out["scaled_fp8"] = torch.zeros(0, dtype=dtype)
    return out


COMFY_FORMAT_NAMES = {torch.float8_e4m3fn: "float8_e4m3fn", torch.float8_e5m2: "float8_e5m2"}


def to_comfy_quant(
    state: dict[str, torch.Tensor],
    dtype=torch.float8_e4m3fn,
    in_header: bool = False,
    uint8_container: bool = False,
    prefix: str = "",
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, header metadata) of a file in ComfyUI's current quantized layout, holding exactly the scaled-fp8
    values `to_fp8(state, dtype, scaled=True)` holds: per layer `.weight` (fp8, or its bytes as uint8),
    `.weight_scale` (fp32 scalar), `.input_scale` (fp32 scalar, for fp8 activations) and the layer's config
    {"format": ...} as a uint8 `.comfy_quant` tensor or, `in_header`, in `_quantization_metadata`. `prefix` is
    put before every name (an all-in-one checkpoint's), the header's layer names included."""
    tensors: dict[str, torch.Tensor] = {}
    layers: dict[str, dict] = {}
    for name, tensor in to_fp8(state, dtype, scaled=True).items():
        if name == "scaled_fp8":
            continue
        if name.endswith(".scale_weight"):
            layer = name[: -len(".scale_weight")]
            tensors[prefix + layer + ".weight_scale"] = tensor.reshape(()).float()
            tensors[prefix + layer + ".input_scale"] = torch.tensor(0.0123, dtype=torch.float32)
            layers[prefix + layer] = {"format": COMFY_FORMAT_NAMES[dtype]}
        elif uint8_container and tensor.dtype == dtype:
            tensors[prefix + name] = tensor.view(torch.uint8)
        else:
            tensors[prefix + name] = tensor
    if in_header:
        return tensors, {"_quantization_metadata": json.dumps({"format_version": "1.0", "layers": layers})}
    for layer, conf in layers.items():
        tensors[layer + ".comfy_quant"] = torch.tensor(
            list(json.dumps(conf).encode("utf-8")), dtype=torch.uint8
        )
    return tensors, {}


def dequantized(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What an fp8 (or scaled-fp8) state means in float32: the oracle's weights."""
    out = {}
    for name, tensor in state.items():
        if name == "scaled_fp8" or name.endswith(".scale_weight"):
            continue
        value = tensor.float()
        scale = state.get(name[: -len(".weight")] + ".scale_weight") if name.endswith(".weight") else None
        out[name] = value * scale.float() if scale is not None else value
    return out


# ---- tokenizers ----


def _byte_alphabet() -> list[str]:
    """The byte-level BPE alphabet: each byte as a printable character (GPT-2/CLIP convention)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = [], 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


_WORDS = (
    "a photo of cat dog red blue green house tree under over sky night day portrait painting "
    "the in on with and city river mountain forest glass light dark old young woman man robot"
).split()


def write_clip_tokenizer(folder: Path) -> int:
    """vocab.json + merges.txt; returns the vocabulary size (end-of-text is the highest id, as in CLIP)."""
    folder.mkdir(parents=True, exist_ok=True)
    alphabet = _byte_alphabet()
    tokens = alphabet + [c + "</w>" for c in alphabet]
    merges = ["t h", "th e</w>", "c a", "ca t</w>", "o f</w>", "d o", "do g</w>"]
    tokens += [m.replace(" ", "") for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 77}), encoding="utf-8")
    return len(tokens)


def write_t5_tokenizer(folder: Path) -> None:
    """A SentencePiece spiece.model trained on a tiny corpus, with T5's special ids (pad 0, eos 1, unk 2)."""
    import sentencepiece as spm

    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    sentences = [" ".join(rng.choice(_WORDS) for _ in range(8)) for _ in range(400)]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_writer=model,
        vocab_size=100,
        hard_vocab_limit=False,
        model_type="unigram",
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        num_threads=1,
        minloglevel=2,
    )
    (folder / "spiece.model").write_bytes(model.getvalue())
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 512}), encoding="utf-8")


# ---- whole model sets ----


@dataclass
class TinyStates:
    """The four components' state dicts in float32 (BFL/HF names), before any storage cast."""

    transformer: dict[str, torch.Tensor]
    clip: dict[str, torch.Tensor]
    t5: dict[str, torch.Tensor]
    vae: dict[str, torch.Tensor]


def tiny_states(spec: TinySpec, clip_vocab: int) -> TinyStates:
    return TinyStates(flux_state(spec), clip_state(spec, clip_vocab), t5_state(spec), ae_state(spec))


def write_tokenizers(models_dir: Path) -> int:
    write_t5_tokenizer(models_dir / "tokenizers" / "t5xxl")
    return write_clip_tokenizer(models_dir / "tokenizers" / "clip_l")


def write_split(
    models_dir: Path, states: TinyStates, transformer_dtype=torch.bfloat16, name="flux-tiny"
) -> dict:
    """Split files as BFL and comfyanonymous publish them: bf16 transformer, fp16 text encoders, fp32 autoencoder."""
    paths = {
        "transformer": models_dir / "diffusion_models" / f"{name}.safetensors",
        "clip": models_dir / "text_encoders" / "clip_l.safetensors",
        "t5": models_dir / "text_encoders" / "t5xxl_fp16.safetensors",
        "vae": models_dir / "vae" / "ae.safetensors",
    }
    transformer = (
        to_fp8(states.transformer, transformer_dtype)
        if transformer_dtype in FP8
        else cast(states.transformer, transformer_dtype)
    )
    contents = {
        "transformer": transformer,
        "clip": cast(states.clip, torch.float16),
        "t5": cast(states.t5, torch.float16),
        "vae": states.vae,
    }
    for role, path in paths.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(contents[role], str(path))
    return paths


def write_checkpoint(path: Path, parts: dict[str, dict[str, torch.Tensor]]) -> Path:
    """A ComfyUI all-in-one checkpoint from stored-dtype parts (roles: transformer, clip, t5, vae)."""
    prefixes = {
        "transformer": "model.diffusion_model.",
        "clip": "text_encoders.clip_l.transformer.",
        "t5": "text_encoders.t5xxl.transformer.",
        "vae": "vae.",
    }
    merged = {prefixes[role] + k: v for role, state in parts.items() for k, v in state.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(merged, str(path))
    return path


def write_tiny_model_set(models_dir: Path, spec: TinySpec = TinySpec()) -> dict[str, Path]:
    """A complete tiny models folder in the ComfyUI layout; returns the path of each role's file."""
    models_dir = Path(models_dir)
    clip_vocab = write_tokenizers(models_dir)
    return write_split(models_dir, tiny_states(spec, clip_vocab))


def wide_spec(width: int = 512, depth: int = 2, depth_single: int = 4) -> TinySpec:
    """Small in depth but wide: matrix multiplies dominate, as in the real model (for benchmarks)."""
    return replace(TinySpec(), hidden=width, heads=width // 64, depth=depth, depth_single=depth_single)
