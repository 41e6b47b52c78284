"""The names FLUX.2 [klein] LoRAs give our FLUX.2 transformer's layers (engine/models/flux2.py, BFL names).

BFL / ComfyUI names (`diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight`) and kohya's underscored BFL
names (`lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight`, `.alpha`) are the FLUX.1 layouts' (layouts.Bfl,
layouts.Kohya): they name layers, whatever the family. What is FLUX.2's own is diffusers' Flux2Transformer2DModel
module names, as PEFT saves them (`transformer.transformer_blocks.0.attn.to_q.lora_A.weight`, alpha from the
adapter metadata), and kohya-style names of those modules:

- double blocks: `attn.to_q/to_k/to_v` → rows [0,h) [h,2h) [2h,3h) of `img_attn.qkv`, `attn.add_{q,k,v}_proj` of
  `txt_attn.qkv`; `attn.to_out.0`/`attn.to_add_out` → `{img,txt}_attn.proj`; `ff(_context).linear_in/_out` →
  `{img,txt}_mlp.0/.2`;
- single blocks: `attn.to_qkv_mlp_proj` → `linear1` (fused, as BFL's), `attn.to_out` → `linear2`;
- shared modulations: `double_stream_modulation_{img,txt}.linear`, `single_stream_modulation.linear` → `.lin`;
- `x_embedder`→`img_in`, `context_embedder`→`txt_in`, `time_guidance_embed.{timestep,guidance}_embedder.linear_{1,2}`
  → `{time,guidance}_in.{in,out}_layer`, `proj_out`→`final_layer.linear`, `norm_out.linear` →
  `final_layer.adaLN_modulation.1` with its halves swapped (diffusers: scale, shift; BFL: shift, scale).

`unknown_keys` lists what of a file names no layer of a FLUX.2 transformer, so klein refuses such a LoRA by name
instead of applying part of it.
"""

from __future__ import annotations

from engine.formats.lora.layouts import Layout, Names, Target, kohya_spelling


class Flux2Diffusers(Layout):
    title = "diffusers / PEFT (FLUX.2)"
    example = "transformer.single_transformer_blocks.0.attn.to_qkv_mlp_proj.lora_A.weight"

    def names(self, layers, params):
        if (
            params is None
            or not hasattr(params, "depth_single")
            or "single_stream_modulation.lin" not in layers
        ):
            return {}
        h = params.hidden_size
        out: Names = {}

        def put(theirs: str, ours: str, rows=None, up_rows=None) -> None:
            out.setdefault(theirs, []).append(Target(ours, rows, up_rows))

        put("x_embedder", "img_in")
        put("context_embedder", "txt_in")
        for ours, theirs in (("time_in", "timestep_embedder"), ("guidance_in", "guidance_embedder")):
            put(f"time_guidance_embed.{theirs}.linear_1", f"{ours}.in_layer")
            put(f"time_guidance_embed.{theirs}.linear_2", f"{ours}.out_layer")
        for stream in (
            "double_stream_modulation_img",
            "double_stream_modulation_txt",
            "single_stream_modulation",
        ):
            put(f"{stream}.linear", f"{stream}.lin")
        for i in range(params.depth):
            d, b = f"transformer_blocks.{i}", f"double_blocks.{i}"
            for j, x in enumerate("qkv"):
                put(f"{d}.attn.to_{x}", f"{b}.img_attn.qkv", (j * h, (j + 1) * h))
                put(f"{d}.attn.add_{x}_proj", f"{b}.txt_attn.qkv", (j * h, (j + 1) * h))
            put(f"{d}.attn.to_out.0", f"{b}.img_attn.proj")
            put(f"{d}.attn.to_add_out", f"{b}.txt_attn.proj")
            for theirs, ours in (("ff", "img_mlp"), ("ff_context", "txt_mlp")):
                put(f"{d}.{theirs}.linear_in", f"{b}.{ours}.0")
                put(f"{d}.{theirs}.linear_out", f"{b}.{ours}.2")
        for i in range(params.depth_single):
            d, b = f"single_transformer_blocks.{i}", f"single_blocks.{i}"
            put(f"{d}.attn.to_qkv_mlp_proj", f"{b}.linear1")
            put(f"{d}.attn.to_out", f"{b}.linear2")
        put("norm_out.linear", "final_layer.adaLN_modulation.1", (0, h), (h, 2 * h))
        put("norm_out.linear", "final_layer.adaLN_modulation.1", (h, 2 * h), (0, h))
        put("proj_out", "final_layer.linear")
        # some exports cut "tran" off the double blocks' name (diffusers reads `sformer_blocks.` as an alias)
        for key in [k for k in out if k.startswith("transformer_blocks.")]:
            out["sformer_" + key.removeprefix("transformer_")] = out[key]
        return out


class KohyaFlux2Diffusers(Layout):
    """kohya-style names of diffusers' FLUX.2 modules (`lora_transformer_…`, `lora_unet_…`)."""

    title = "kohya names of diffusers modules (FLUX.2)"
    example = "lora_transformer_single_transformer_blocks_0_attn_to_qkv_mlp_proj.lora_down.weight"

    def names(self, layers, params):
        return kohya_spelling(Flux2Diffusers().names(layers, params))


FLUX2_LAYOUTS: tuple[Layout, ...] = (Flux2Diffusers(), KohyaFlux2Diffusers())


TEXT_ENCODER_MARKERS = ("text_encoder", "lora_te")  # a Qwen3 part: diffusers' and kohya's prefixes
