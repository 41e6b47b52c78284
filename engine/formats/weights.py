"""What a weight file holds: its components (roles) found by tensor names, loaded in the dtype stored, and
ComfyUI's quantized layers.

A file holds one or more components (an all-in-one checkpoint holds all four), each found by its tensor names
under a known prefix. Tensors are loaded one at a time in the dtype the file stores (fp8 stays fp8). Reading a
file is its format's business (engine/formats/weight_file.py: the `WeightFile` face and the openers registry;
safetensors_file.py, gguf_file.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from engine.contract.errors import UserError

# re-exported: the reading side, imported from here by much of the engine and the tests
from engine.formats.safetensors_file import SafetensorsFile as SafetensorsFile
from engine.formats.safetensors_file import check_header as check_header
from engine.formats.weight_file import TensorInfo as TensorInfo
from engine.formats.weight_file import WeightFile, open_weights

ROLES = ("transformer", "clip", "t5", "vae", "text_encoder")
ROLE_NAMES = {
    "transformer": "a FLUX transformer (diffusion model)",
    "clip": "a CLIP-L text encoder",
    "t5": "a T5-XXL text encoder",
    "vae": "a FLUX autoencoder (VAE)",
    "controlnet": "a FLUX.1 ControlNet",
    "text_encoder": "a Qwen3 text encoder (FLUX.2 [klein])",
}
# A ControlNet (InstantX/diffusers, XLabs, MistoLine) has one of these; XLabs' nets also have the transformer's
# marker, so a file with one is a ControlNet and nothing else (`find_components`).
CONTROLNET_MARKERS = (
    "controlnet_x_embedder.weight",
    "controlnet_blocks.0.weight",
    "controlnet_blocks.0.linear.weight",
)

# Prefixes under which each role's tensors appear: ComfyUI all-in-one checkpoints first, then bare files.
PREFIXES = {
    "transformer": ("model.diffusion_model.", "diffusion_model.", ""),
    "clip": ("text_encoders.clip_l.transformer.", "cond_stage_model.clip_l.transformer.", ""),
    "t5": ("text_encoders.t5xxl.transformer.", "cond_stage_model.t5xxl.transformer.", ""),
    "vae": ("vae.", "first_stage_model.", ""),
    "text_encoder": ("",),
}
# One tensor that only that role has, relative to its prefix.
MARKERS = {
    "transformer": "double_blocks.0.img_attn.qkv.weight",
    "clip": "text_model.embeddings.token_embedding.weight",
    "t5": "encoder.block.0.layer.0.SelfAttention.q.weight",
    "vae": "decoder.conv_in.weight",
    "text_encoder": "model.layers.0.self_attn.q_norm.weight",  # Qwen3 (Qwen2 has no q_norm); ComfyUI's names
}


def count_indexed(names, prefix: str) -> int:
    """How many numbered parts (`<prefix>0.`, `<prefix>1.`, ...) the tensor names have: blocks, layers, levels."""
    indices = {int(name[len(prefix) :].split(".")[0]) for name in names if name.startswith(prefix)}
    return max(indices) + 1 if indices else 0


@dataclass
class Component:
    """One role's tensors inside a file: names are given relative to `prefix`."""

    role: str
    file: WeightFile
    prefix: str

    def shapes(self) -> dict[str, tuple[int, ...]]:
        n = len(self.prefix)
        return {
            name[n:]: info.shape for name, info in self.file.tensors.items() if name.startswith(self.prefix)
        }

    def load(self) -> dict[str, torch.Tensor]:
        n = len(self.prefix)
        names = [name for name in self.file.tensors if name.startswith(self.prefix)]
        return {name[n:]: tensor for name, tensor in self.file.load(names).items()}

    @property
    def nbytes(self) -> int:
        """Bytes as stored (what the model costs in RAM, and on the bus when streamed)."""
        return sum(info.nbytes for name, info in self.file.tensors.items() if name.startswith(self.prefix))


def find_components(file: WeightFile) -> dict[str, Component]:
    """Every role this file holds, found by its tensor names (a ControlNet file: only "controlnet")."""
    names = file.tensors
    if any(marker in names for marker in CONTROLNET_MARKERS):
        return {"controlnet": Component("controlnet", file, "")}
    found = {}
    for role in ROLES:
        for prefix in PREFIXES[role]:
            if prefix + MARKERS[role] in names:
                found[role] = Component(role, file, prefix)
                break
    return found


def describe(file: WeightFile) -> str:
    """What the file looks like, for error messages."""
    roles = find_components(file)
    if len(roles) > 1:
        return "an all-in-one checkpoint with " + ", ".join(ROLE_NAMES[r] for r in roles)
    if roles:
        return ROLE_NAMES[next(iter(roles))]
    names = list(file.tensors)
    if any("lora_" in n or ".lora" in n for n in names):
        return "a LoRA"
    if any("transformer_blocks." in n and "attn.to_q" in n for n in names):
        return "a diffusers-format transformer (use the single-file BFL/ComfyUI format instead)"
    if any("input_blocks." in n for n in names):
        return "a Stable Diffusion UNet checkpoint"
    if any("joint_blocks." in n for n in names):
        return "a Stable Diffusion 3 model"
    return f"an unknown model ({len(names)} tensors, e.g. {', '.join(names[:3])})"


def component_from(path: str | Path, role: str, flag: str) -> Component:
    """The `role` component of the file a flag named, or one sentence saying what the file is instead."""
    file = open_weights(path)
    found = find_components(file)
    if role not in found:
        raise UserError(
            f"{flag} {path} looks like {describe(file)}, not {ROLE_NAMES[role]}: give the right file for {flag}."
        )
    return found[role]


# ComfyUI's quantized layers. Older "scaled fp8" files: a `scaled_fp8` marker tensor and, per layer,
# `<layer>.scale_weight` (and `<layer>.scale_input`). Current ones (ComfyUI converts the older kind to this on load
# and writes it when it saves): `<layer>.weight` stored quantized, `<layer>.weight_scale` (fp32, weight = q × scale),
# `<layer>.input_scale` (for fp8 activations, which the engine does not use: it computes in bf16/fp16/fp32) and
# `<layer>.comfy_quant`, uint8 bytes of the layer's JSON config such as {"format": "float8_e4m3fn"}; or, instead of
# the uint8 tensors, the configs in the header: `_quantization_metadata` = {"format_version", "layers": {layer:
# config}}. The engine computes the fp8 formats (kept fp8 in memory, scaled when a layer runs) and names the rest.
COMFY_FP8_FORMATS = {"float8_e4m3fn": torch.float8_e4m3fn, "float8_e5m2": torch.float8_e5m2}
_QUANT_EXTRAS = (".scale_input", ".input_scale", ".comfy_quant")


def quantized_layers(component: Component) -> dict[str, dict]:
    """{layer name relative to the component's prefix: its ComfyUI quantization config} from `.comfy_quant`
    tensors and the header's `_quantization_metadata` (layer names there may or may not carry the prefix)."""
    file, prefix = component.file, component.prefix
    configs: dict[str, dict] = {}
    raw = file.metadata.get("_quantization_metadata")  # a text in safetensors headers; absent from GGUF files
    if isinstance(raw, str) and raw:
        try:
            layers = json.loads(raw)["layers"]
            layers = {name: _layer_config(conf) for name, conf in layers.items()}
        except (ValueError, KeyError, TypeError, AttributeError):
            raise UserError(
                f"{file.path} has an unreadable _quantization_metadata in its header: the file is damaged; "
                "download it again."
            ) from None
        for name, conf in layers.items():
            if prefix and name.startswith(prefix) and name + ".weight" in file.tensors:
                configs[name[len(prefix) :]] = conf
            elif prefix + name + ".weight" in file.tensors:
                configs[name] = conf
    marked = [n for n in file.tensors if n.startswith(prefix) and n.endswith(".comfy_quant")]
    for name, tensor in file.load(marked).items():
        try:
            conf = _layer_config(json.loads(tensor.numpy().tobytes()))
        except (ValueError, TypeError, AttributeError):
            raise UserError(
                f"{file.path}: {name} is not readable quantization JSON: the file is damaged."
            ) from None
        configs[name[len(prefix) : -len(".comfy_quant")]] = conf
    return configs


def _layer_config(conf) -> dict:
    if not isinstance(conf, dict) or not isinstance(conf.get("format"), str):
        raise ValueError("a layer's quantization config has no format")
    return conf


def uncomputable_format(component: Component) -> str | None:
    """The name of a ComfyUI quantization the component uses that the engine does not compute (None: all fine)."""
    formats = {conf["format"] for conf in quantized_layers(component).values()}
    return next(iter(sorted(formats - set(COMFY_FP8_FORMATS))), None)


def split_quantized(
    state: dict[str, torch.Tensor], configs: dict[str, dict] | None = None, source: str = "the file"
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Take ComfyUI's quantization extras out of a state dict: (weights, {layer name: scale}).

    Both the legacy scaled-fp8 names and the current comfy_quant layout (`configs`: `quantized_layers`) give a
    layer's scale, which `ops.fetch` applies to the stored fp8 weight; fp8 bytes in a uint8 container are viewed as
    the fp8 type their config names. Formats the engine does not compute are refused by name."""
    configs, state = configs or {}, dict(state)
    for layer, conf in configs.items():
        dtype = COMFY_FP8_FORMATS.get(conf["format"])
        if dtype is None:
            raise UserError(
                f"{source} stores {layer} in ComfyUI's {conf['format']!r} quantization, which FluxDeck does not "
                "compute: use a bf16, fp8 (float8_e4m3fn/e5m2) or GGUF file of the model instead."
            )
        weight = state.get(layer + ".weight")
        if weight is None or layer + ".weight_scale" not in state:
            raise UserError(
                f"{source} marks {layer} as {conf['format']} but lacks its weight or weight_scale: "
                "the file is damaged; download it again."
            )
        if weight.dtype == torch.uint8:
            state[layer + ".weight"] = weight.view(dtype)
    scales, weights = {}, {}
    for name, tensor in state.items():
        if name == "scaled_fp8" or name.endswith(_QUANT_EXTRAS):
            continue
        for suffix in (".scale_weight", ".weight_scale"):
            if name.endswith(suffix):
                scales[name[: -len(suffix)]] = tensor
                break
        else:
            weights[name] = tensor
    packed = [
        n
        for n, t in weights.items()
        if isinstance(t, torch.Tensor) and n.endswith(".weight") and t.dtype == torch.uint8
    ]
    if packed:
        raise UserError(
            f"{source} stores {packed[0]} as packed bytes (a 4-bit quantization such as nvfp4), which FluxDeck "
            "does not compute: use a bf16, fp8 or GGUF file of the model instead."
        )
    return weights, scales


def __getattr__(name: str):
    """`GGUFFile` is still importable from here, without importing the GGUF reader until someone asks for it."""
    if name == "GGUFFile":
        from engine.formats.gguf_file import GGUFFile

        return GGUFFile
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
