"""The names LoRA files give our layers, one `Layout` per way people share FLUX LoRAs.

Each layout maps the names its files use (after the wrapping prefixes are stripped) to our models' own (BFL)
layer names, with the rows of a fused layer a name covers. `TRANSFORMER_LAYOUTS` and `CLIP_LAYOUTS` are the
registries a file's keys are looked up in; a new layout is one class here and one entry in its registry.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

# Dotted prefixes that wrap the model's own names in the files (stripped repeatedly, in any order).
TRANSFORMER_PREFIXES = (
    "model.diffusion_model.",
    "diffusion_model.",
    "base_model.model.",
    "transformer.",
    "unet.",
)
CLIP_PREFIXES = (
    "text_encoders.clip_l.transformer.",
    "text_encoder.",
    "clip_l.",
    "te1.",
    "base_model.model.",
)
CLIP_KOHYA = ("lora_te1_", "lora_te_")
# What the layouts call the transformer's `img_in` (the one layer a LoRA may widen: Canny/Depth control LoRAs)
IMG_IN_NAMES = ("img_in", "lora_unet_img_in", "x_embedder", "lora_transformer_x_embedder")
T5_MARKERS = ("lora_te2_", "text_encoder_2.", "text_encoders.t5xxl.", "t5xxl.", "te2.")


@dataclass(frozen=True)
class Target:
    """Where (part of) a LoRA pair goes."""

    layer: str  # the module name in our model
    rows: tuple[int, int] | None = None  # the rows of a fused layer it covers (None: all)
    up_rows: tuple[int, int] | None = None  # the rows of the LoRA's up it takes (None: all)


Names = dict[str, list[Target]]  # a layout's name of a layer → the layers (rows) it patches


class Layout:
    """One way LoRA files name the layers of one of our models."""

    title = ""  # for people: where such files come from
    example = ""  # one tensor name of such a file (a pair's down half), as docs/lora.md shows it

    def names(self, layers: list[str], params: Any) -> Names:
        """Every name this layout gives our `layers` (`params`: the model's config, None if it has none)."""
        raise NotImplementedError


def underscored(name: str) -> str:
    return name.replace(".", "_")


# ---- the transformer ----


class Bfl(Layout):
    title = "BFL / ComfyUI"
    example = "diffusion_model.double_blocks.0.img_attn.qkv.lora_down.weight"  # or lora_A / lora_B

    def names(self, layers, params):
        return {name: [Target(name)] for name in layers}


class Kohya(Layout):
    title = "kohya / sd-scripts (A1111, Forge)"
    example = "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"  # .lora_up.weight, .alpha

    def names(self, layers, params):
        return {"lora_unet_" + underscored(name): [Target(name)] for name in layers}


class Diffusers(Layout):
    """diffusers' FluxTransformer2DModel module names (PEFT saves them as lora_A / lora_B)."""

    title = "diffusers / PEFT"
    example = "transformer.transformer_blocks.0.attn.to_q.lora_A.weight"  # and lora_B

    def names(self, layers, params):
        if params is None:
            return {}
        h, m = params.hidden_size, params.mlp_hidden
        out: Names = {}

        def put(theirs: str, ours: str, rows=None, up_rows=None) -> None:
            out.setdefault(theirs, []).append(Target(ours, rows, up_rows))

        put("x_embedder", "img_in")
        put("context_embedder", "txt_in")
        for ours, theirs in (
            ("time_in", "timestep_embedder"),
            ("vector_in", "text_embedder"),
            ("guidance_in", "guidance_embedder"),
        ):
            put(f"time_text_embed.{theirs}.linear_1", f"{ours}.in_layer")
            put(f"time_text_embed.{theirs}.linear_2", f"{ours}.out_layer")
        for i in range(params.depth):
            d, b = f"transformer_blocks.{i}", f"double_blocks.{i}"
            for j, x in enumerate("qkv"):
                put(f"{d}.attn.to_{x}", f"{b}.img_attn.qkv", (j * h, (j + 1) * h))
                put(f"{d}.attn.add_{x}_proj", f"{b}.txt_attn.qkv", (j * h, (j + 1) * h))
            put(f"{d}.attn.to_out.0", f"{b}.img_attn.proj")
            put(f"{d}.attn.to_add_out", f"{b}.txt_attn.proj")
            put(f"{d}.ff.net.0.proj", f"{b}.img_mlp.0")
            put(f"{d}.ff.net.2", f"{b}.img_mlp.2")
            put(f"{d}.ff_context.net.0.proj", f"{b}.txt_mlp.0")
            put(f"{d}.ff_context.net.2", f"{b}.txt_mlp.2")
            put(f"{d}.norm1.linear", f"{b}.img_mod.lin")
            put(f"{d}.norm1_context.linear", f"{b}.txt_mod.lin")
        for i in range(params.depth_single):
            d, b = f"single_transformer_blocks.{i}", f"single_blocks.{i}"
            for j, x in enumerate("qkv"):
                put(f"{d}.attn.to_{x}", f"{b}.linear1", (j * h, (j + 1) * h))
            put(f"{d}.proj_mlp", f"{b}.linear1", (3 * h, 3 * h + m))
            put(f"{d}.proj_out", f"{b}.linear2")
            put(f"{d}.norm.linear", f"{b}.modulation.lin")
        # diffusers' final modulation is (scale, shift), BFL's (shift, scale): each half of up goes to the other
        put("norm_out.linear", "final_layer.adaLN_modulation.1", (0, h), (h, 2 * h))
        put("norm_out.linear", "final_layer.adaLN_modulation.1", (h, 2 * h), (0, h))
        put("proj_out", "final_layer.linear")
        return out


class KohyaDiffusers(Layout):
    """kohya-style names of diffusers modules, as OneTrainer and SimpleTuner export them."""

    title = "kohya names of diffusers modules"
    example = "lora_transformer_single_transformer_blocks_0_attn_to_q.lora_down.weight"

    def names(self, layers, params):
        return kohya_spelling(Diffusers().names(layers, params))


def kohya_spelling(names: Names) -> Names:
    """The same targets under kohya's spellings of diffusers' module names (`lora_transformer_…`, `lora_unet_…`)."""
    out: Names = {}
    for theirs, targets in names.items():
        out["lora_transformer_" + underscored(theirs)] = targets
        out["lora_unet_" + underscored(theirs)] = targets
    return out


class XLabs(Layout):
    """XLabs' attention-processor LoRAs: lora1 on the image stream, lora2 on the text stream."""

    title = "XLabs"
    example = "double_blocks.0.processor.qkv_lora1.down.weight"  # and .up.weight

    def names(self, layers, params):
        if params is None:
            return {}
        out: Names = {}
        for i in range(params.depth):
            b = f"double_blocks.{i}"
            for n, stream in (("1", "img"), ("2", "txt")):
                out[f"{b}.processor.qkv_lora{n}"] = [Target(f"{b}.{stream}_attn.qkv")]
                out[f"{b}.processor.proj_lora{n}"] = [Target(f"{b}.{stream}_attn.proj")]
        for i in range(params.depth_single):
            b = f"single_blocks.{i}"
            out[f"{b}.processor.qkv_lora"] = [Target(f"{b}.linear1", (0, 3 * params.hidden_size))]
            out[f"{b}.processor.proj_lora"] = [Target(f"{b}.linear2")]
        return out


# ---- CLIP-L (our layer names are HF's CLIPTextModel names without `text_model.`) ----


class ClipDiffusers(Layout):
    title = "diffusers / PEFT / ComfyUI CLIP-L"
    example = "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight"

    def names(self, layers, params):
        return {key: [Target(name)] for name in layers for key in (name, "text_model." + name)}


class ClipKohya(Layout):
    title = "kohya CLIP-L"
    example = "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight"

    def names(self, layers, params):
        return {
            prefix + "text_model_" + underscored(name): [Target(name)]
            for name in layers
            for prefix in CLIP_KOHYA
        }


# The registries: a key is looked up in every layout's names, the first layout in the list that knows it wins.
TRANSFORMER_LAYOUTS: tuple[Layout, ...] = (Bfl(), Kohya(), Diffusers(), KohyaDiffusers(), XLabs())
CLIP_LAYOUTS: tuple[Layout, ...] = (ClipDiffusers(), ClipKohya())


@dataclass
class LayerIndex:
    """One model's patchable layers by our name, and every name the registered layouts give them."""

    layers: dict[str, nn.Module]
    names: Names
    prefixes: tuple[str, ...]
    norms: dict[str, nn.Module] = field(default_factory=dict)  # norms whose scale a LoRA may replace

    def targets(self, key: str) -> list[Target] | None:
        """Where a file's pair key goes (None: no layout names such a layer of this model)."""
        targets = self.names.get(strip(key, self.prefixes))
        if not targets or any(t.layer not in self.layers for t in targets):
            return None
        return targets


def strip(key: str, prefixes: tuple[str, ...]) -> str:
    while True:
        for prefix in prefixes:
            if key.startswith(prefix):
                key = key[len(prefix) :]
                break
        else:
            return key


def part_of(key: str) -> str:
    """Which model a file's pair key is for: "t5" (never applied), "clip" or "transformer"."""
    if key.startswith(T5_MARKERS):
        return "t5"
    if key.startswith(CLIP_KOHYA) or strip(key, CLIP_PREFIXES).startswith("text_model."):
        return "clip"
    return "transformer"
