"""diffusers as the oracle: the same tiny weights renamed into diffusers' layout, run through FluxPipeline.

Only tests import this (the engine never imports diffusers). The renaming is written here from the two
layouts' tensor names; the values are never touched except to split BFL's fused qkv / linear1 and to swap
the final modulation's halves (BFL: shift, scale; diffusers: scale, shift).
"""

from __future__ import annotations

import re

import numpy as np
import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    FluxImg2ImgPipeline,
    FluxPipeline,
    FluxTransformer2DModel,
)
from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5Tokenizer

from engine.models.autoencoder import SCALE_FACTOR, SHIFT_FACTOR, AutoEncoderParams
from engine.models.flux1 import FluxParams
from engine.models.text_encoders import clip_config, t5_config
from tests.metrics import psnr  # noqa: F401  (the oracle's comparisons, re-exported for the tests)


def transformer_to_diffusers(bfl: dict[str, torch.Tensor], p: FluxParams) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}

    def put(name: str, src: str) -> None:
        for kind in ("weight", "bias"):
            if f"{src}.{kind}" in bfl:
                out[f"{name}.{kind}"] = bfl[f"{src}.{kind}"]

    def put_split(names: list[str], src: str, sizes: list[int]) -> None:
        for kind in ("weight", "bias"):
            if f"{src}.{kind}" in bfl:
                for name, part in zip(names, bfl[f"{src}.{kind}"].split(sizes)):
                    out[f"{name}.{kind}"] = part

    h = p.hidden_size
    put("x_embedder", "img_in")
    put("context_embedder", "txt_in")
    for ours, theirs in (
        ("time_in", "timestep_embedder"),
        ("vector_in", "text_embedder"),
        ("guidance_in", "guidance_embedder"),
    ):
        put(f"time_text_embed.{theirs}.linear_1", f"{ours}.in_layer")
        put(f"time_text_embed.{theirs}.linear_2", f"{ours}.out_layer")
    for i in range(p.depth):
        s, d = f"double_blocks.{i}", f"transformer_blocks.{i}"
        put(f"{d}.norm1.linear", f"{s}.img_mod.lin")
        put(f"{d}.norm1_context.linear", f"{s}.txt_mod.lin")
        put_split([f"{d}.attn.to_q", f"{d}.attn.to_k", f"{d}.attn.to_v"], f"{s}.img_attn.qkv", [h, h, h])
        put_split(
            [f"{d}.attn.add_q_proj", f"{d}.attn.add_k_proj", f"{d}.attn.add_v_proj"],
            f"{s}.txt_attn.qkv",
            [h, h, h],
        )
        out[f"{d}.attn.norm_q.weight"] = bfl[f"{s}.img_attn.norm.query_norm.scale"]
        out[f"{d}.attn.norm_k.weight"] = bfl[f"{s}.img_attn.norm.key_norm.scale"]
        out[f"{d}.attn.norm_added_q.weight"] = bfl[f"{s}.txt_attn.norm.query_norm.scale"]
        out[f"{d}.attn.norm_added_k.weight"] = bfl[f"{s}.txt_attn.norm.key_norm.scale"]
        put(f"{d}.attn.to_out.0", f"{s}.img_attn.proj")
        put(f"{d}.attn.to_add_out", f"{s}.txt_attn.proj")
        put(f"{d}.ff.net.0.proj", f"{s}.img_mlp.0")
        put(f"{d}.ff.net.2", f"{s}.img_mlp.2")
        put(f"{d}.ff_context.net.0.proj", f"{s}.txt_mlp.0")
        put(f"{d}.ff_context.net.2", f"{s}.txt_mlp.2")
    for i in range(p.depth_single):
        s, d = f"single_blocks.{i}", f"single_transformer_blocks.{i}"
        put(f"{d}.norm.linear", f"{s}.modulation.lin")
        names = [f"{d}.attn.to_q", f"{d}.attn.to_k", f"{d}.attn.to_v", f"{d}.proj_mlp"]
        put_split(names, f"{s}.linear1", [h, h, h, p.mlp_hidden])
        put(f"{d}.proj_out", f"{s}.linear2")
        out[f"{d}.attn.norm_q.weight"] = bfl[f"{s}.norm.query_norm.scale"]
        out[f"{d}.attn.norm_k.weight"] = bfl[f"{s}.norm.key_norm.scale"]
    for kind in ("weight", "bias"):
        shift, scale = bfl[f"final_layer.adaLN_modulation.1.{kind}"].chunk(2)
        out[f"norm_out.linear.{kind}"] = torch.cat([scale, shift])
    put("proj_out", "final_layer.linear")
    return out


def vae_to_diffusers(bfl: dict[str, torch.Tensor], p: AutoEncoderParams) -> dict[str, torch.Tensor]:
    levels = len(p.ch_mult)
    out = {}
    for name, tensor in bfl.items():
        new = name
        new = re.sub(
            r"^(encoder|decoder)\.mid\.block_(\d)", lambda m: f"{m[1]}.mid_block.resnets.{int(m[2]) - 1}", new
        )
        new = re.sub(r"^(encoder|decoder)\.mid\.attn_1\.", r"\1.mid_block.attentions.0.", new)
        new = re.sub(r"^encoder\.down\.(\d+)\.block\.", r"encoder.down_blocks.\1.resnets.", new)
        new = re.sub(r"^encoder\.down\.(\d+)\.downsample\.", r"encoder.down_blocks.\1.downsamplers.0.", new)
        new = re.sub(r"^decoder\.up\.(\d+)\.", lambda m: f"decoder.up_blocks.{levels - 1 - int(m[1])}.", new)
        new = new.replace(".block.", ".resnets.").replace(".upsample.", ".upsamplers.0.")
        new = new.replace("nin_shortcut", "conv_shortcut").replace(".norm_out.", ".conv_norm_out.")
        if ".attentions.0." in new:
            new = new.replace(".norm.", ".group_norm.").replace(".q.", ".to_q.").replace(".k.", ".to_k.")
            new = new.replace(".v.", ".to_v.").replace(".proj_out.", ".to_out.0.")
            if tensor.ndim == 4:
                tensor = tensor[:, :, 0, 0]
        out[new] = tensor
    return out


def diffusers_transformer(p: FluxParams) -> FluxTransformer2DModel:
    """diffusers' transformer of the same shape as ours (random init, or on the meta device if built there)."""
    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=p.in_channels,
        out_channels=p.out_channels,
        num_layers=p.depth,
        num_single_layers=p.depth_single,
        attention_head_dim=p.head_dim,
        num_attention_heads=p.num_heads,
        joint_attention_dim=p.context_in_dim,
        pooled_projection_dim=p.vec_in_dim,
        guidance_embeds=p.guidance_embed,
        axes_dims_rope=p.axes_dim,
    )


def build_pipeline(
    states: dict[str, dict[str, torch.Tensor]],  # float32, engine (file) names: transformer, clip, t5, vae
    clip_tokenizer_dir,
    t5_tokenizer_dir,
) -> FluxPipeline:
    tp = FluxParams.from_shapes({k: tuple(v.shape) for k, v in states["transformer"].items()})
    transformer = diffusers_transformer(tp)
    transformer.load_state_dict(transformer_to_diffusers(states["transformer"], tp), strict=True)

    vp = AutoEncoderParams.from_shapes({k: tuple(v.shape) for k, v in states["vae"].items()})
    vae = AutoencoderKL(
        in_channels=vp.in_channels,
        out_channels=vp.out_ch,
        down_block_types=("DownEncoderBlock2D",) * len(vp.ch_mult),
        up_block_types=("UpDecoderBlock2D",) * len(vp.ch_mult),
        block_out_channels=tuple(vp.ch * m for m in vp.ch_mult),
        layers_per_block=vp.num_res_blocks,
        latent_channels=vp.z_channels,
        norm_num_groups=32,
        use_quant_conv=False,
        use_post_quant_conv=False,
        scaling_factor=SCALE_FACTOR,
        shift_factor=SHIFT_FACTOR,
    )
    vae.load_state_dict(vae_to_diffusers(states["vae"], vp), strict=True)

    clip_state = {k.removeprefix("text_model."): v for k, v in states["clip"].items()}
    clip = CLIPTextModel(clip_config({k: tuple(v.shape) for k, v in clip_state.items()}))
    clip.load_state_dict(clip_state, strict=False)
    t5_state = dict(states["t5"])
    t5_state["encoder.embed_tokens.weight"] = t5_state["shared.weight"]
    t5 = T5EncoderModel(t5_config({k: tuple(v.shape) for k, v in t5_state.items()}))
    t5.load_state_dict(t5_state, strict=True)

    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=1.0,
        use_dynamic_shifting=tp.guidance_embed,  # [dev] shifts by resolution, [schnell] does not
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    pipe = FluxPipeline(
        scheduler=scheduler,
        vae=vae.eval(),
        text_encoder=clip.eval(),
        tokenizer=CLIPTokenizer.from_pretrained(str(clip_tokenizer_dir)),
        text_encoder_2=t5.eval(),
        tokenizer_2=T5Tokenizer.from_pretrained(str(t5_tokenizer_dir)),
        transformer=transformer.eval(),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_pipeline(pipe, noise: torch.Tensor, **kwargs) -> np.ndarray:
    """Run with our noise (the seed convention, packed as the pipeline packs it); (B, H, W, 3) uint8."""
    from engine.generation.sampling import pack

    height, width = kwargs["height"], kwargs["width"]
    with torch.inference_mode():
        result = pipe(latents=pack(noise), output_type="np", **kwargs).images
    assert result.shape[1:3] == (height, width)
    return (result * 255).round().astype(np.uint8)


def img2img_pipeline(pipe: FluxPipeline) -> FluxImg2ImgPipeline:
    """diffusers' img2img on the same components, encoding the init image to the posterior mean as the engine
    does (diffusers samples the posterior by default, which no seed convention of ours could reproduce)."""
    img2img = FluxImg2ImgPipeline(**{k: v for k, v in pipe.components.items()})
    vae = img2img.vae

    def encode_mean(image: torch.Tensor, generator=None) -> torch.Tensor:
        mean = vae.encode(image).latent_dist.mode()
        return (mean - vae.config.shift_factor) * vae.config.scaling_factor

    img2img._encode_vae_image = encode_mean
    img2img.set_progress_bar_config(disable=True)
    return img2img


def run_img2img(pipe: FluxImg2ImgPipeline, seed: int, **kwargs) -> np.ndarray:
    """img2img with the seed convention's noise: diffusers draws (B, 16, H/8, W/8) float32 from the CPU
    generator it is given, as `make_noise` does. (B, H, W, 3) uint8."""
    generator = torch.Generator("cpu").manual_seed(seed)
    with torch.inference_mode():
        result = pipe(generator=generator, output_type="np", **kwargs).images
    return (result * 255).round().astype(np.uint8)
