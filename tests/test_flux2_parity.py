"""FLUX.2 [klein]: our transformer, autoencoder and Qwen3 prompt embeddings against diffusers' on the same tiny
random weights (written in the real layouts), at float32 tolerance.

The weights go to diffusers through a BFL → diffusers renaming written here, itself checked against diffusers'
own converters (convert_flux2_transformer_checkpoint_to_diffusers; the LDM autoencoder converter for the
autoencoder's body).
"""

from __future__ import annotations

import re

import pytest
import torch
from diffusers import AutoencoderKLFlux2, Flux2KleinPipeline, Flux2Transformer2DModel
from diffusers.loaders.single_file_utils import (
    convert_flux2_transformer_checkpoint_to_diffusers,
    convert_ldm_vae_checkpoint,
)
from transformers import AutoTokenizer, Qwen3ForCausalLM

from engine.fixtures_flux2 import (
    Flux2Spec,
    flux2_ae_state,
    flux2_state,
    qwen3_state,
    write_qwen3_tokenizer,
)
from engine.models.autoencoder import AutoEncoderParams
from engine.models.flux2 import Flux2, Flux2Params, image_ids, pack, reference_ids, text_ids
from engine.models.flux2_autoencoder import Flux2AutoEncoder, canonical_names, patch, unpatch
from engine.models.qwen3_encoder import KLEIN_LAYERS, build_qwen3, encode_qwen3
from engine.runtime.ops import load_into
from tests.oracle import vae_to_diffusers

TOLERANCE = 2e-5  # relative to the output's scale, as tests/test_model_parity.py


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def _shapes(state: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state.items()}


def _ours(model_class, params, state):
    with torch.device("meta"):
        model = model_class(params)
    return load_into(model, dict(state), {}, torch.float32)


# ---- BFL → diffusers names ----


def transformer_to_diffusers(bfl: dict[str, torch.Tensor], p: Flux2Params) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    h = p.hidden_size
    renames = {
        "img_in": "x_embedder",
        "txt_in": "context_embedder",
        "time_in.in_layer": "time_guidance_embed.timestep_embedder.linear_1",
        "time_in.out_layer": "time_guidance_embed.timestep_embedder.linear_2",
        "guidance_in.in_layer": "time_guidance_embed.guidance_embedder.linear_1",
        "guidance_in.out_layer": "time_guidance_embed.guidance_embedder.linear_2",
        "double_stream_modulation_img.lin": "double_stream_modulation_img.linear",
        "double_stream_modulation_txt.lin": "double_stream_modulation_txt.linear",
        "single_stream_modulation.lin": "single_stream_modulation.linear",
        "final_layer.linear": "proj_out",
    }
    double = {
        "img_attn.norm.query_norm.scale": "attn.norm_q.weight",
        "img_attn.norm.key_norm.scale": "attn.norm_k.weight",
        "img_attn.proj.weight": "attn.to_out.0.weight",
        "img_mlp.0.weight": "ff.linear_in.weight",
        "img_mlp.2.weight": "ff.linear_out.weight",
        "txt_attn.norm.query_norm.scale": "attn.norm_added_q.weight",
        "txt_attn.norm.key_norm.scale": "attn.norm_added_k.weight",
        "txt_attn.proj.weight": "attn.to_add_out.weight",
        "txt_mlp.0.weight": "ff_context.linear_in.weight",
        "txt_mlp.2.weight": "ff_context.linear_out.weight",
    }
    single = {
        "linear1.weight": "attn.to_qkv_mlp_proj.weight",
        "linear2.weight": "attn.to_out.weight",
        "norm.query_norm.scale": "attn.norm_q.weight",
        "norm.key_norm.scale": "attn.norm_k.weight",
    }
    for name, tensor in bfl.items():
        if m := re.match(r"double_blocks\.(\d+)\.(.+)$", name):
            block, rest = f"transformer_blocks.{m[1]}", m[2]
            if rest in ("img_attn.qkv.weight", "txt_attn.qkv.weight"):
                names = (
                    ("to_q", "to_k", "to_v")
                    if rest.startswith("img")
                    else ("add_q_proj", "add_k_proj", "add_v_proj")
                )
                for part, piece in zip(names, tensor.split(h)):
                    out[f"{block}.attn.{part}.weight"] = piece
            else:
                out[f"{block}.{double[rest]}"] = tensor
        elif m := re.match(r"single_blocks\.(\d+)\.(.+)$", name):
            out[f"single_transformer_blocks.{m[1]}.{single[m[2]]}"] = tensor
        elif name == "final_layer.adaLN_modulation.1.weight":
            shift, scale = tensor.chunk(2)  # BFL: shift, scale; diffusers: scale, shift
            out["norm_out.linear.weight"] = torch.cat([scale, shift])
        else:
            layer, _, kind = name.rpartition(".")
            out[f"{renames[layer]}.{kind}"] = tensor
    return out


def ae_to_diffusers(bfl: dict[str, torch.Tensor], p: AutoEncoderParams) -> dict[str, torch.Tensor]:
    """The body as FLUX.1's (tests/oracle.py), the 1×1 convolutions at the top level, the statistics as they are."""
    state = dict(bfl)
    moved = {}
    for ours, theirs in (
        ("encoder.quant_conv.", "quant_conv."),
        ("decoder.post_quant_conv.", "post_quant_conv."),
    ):
        for kind in ("weight", "bias"):
            moved[theirs + kind] = state.pop(ours + kind)
    stats = {k: state.pop(k) for k in list(state) if k.startswith("bn.")}
    return {**vae_to_diffusers(state, p), **moved, **stats}


def diffusers_transformer(p: Flux2Params) -> Flux2Transformer2DModel:
    return Flux2Transformer2DModel(
        patch_size=1,
        in_channels=p.in_channels,
        out_channels=p.out_channels,
        num_layers=p.depth,
        num_single_layers=p.depth_single,
        attention_head_dim=p.head_dim,
        num_attention_heads=p.num_heads,
        joint_attention_dim=p.context_in_dim,
        mlp_ratio=p.mlp_hidden / p.hidden_size,
        axes_dims_rope=p.axes_dim,
        rope_theta=p.theta,
        guidance_embeds=p.guidance_embed,
    ).eval()


def diffusers_autoencoder(p: AutoEncoderParams) -> AutoencoderKLFlux2:
    return AutoencoderKLFlux2(
        in_channels=p.in_channels,
        out_channels=p.out_ch,
        down_block_types=("DownEncoderBlock2D",) * len(p.ch_mult),
        up_block_types=("UpDecoderBlock2D",) * len(p.ch_mult),
        block_out_channels=tuple(p.ch * m for m in p.ch_mult),
        layers_per_block=p.num_res_blocks,
        latent_channels=p.z_channels,
        norm_num_groups=32,
    ).eval()


# ---- the renamings themselves ----


def test_transformer_renaming_matches_diffusers_converter():
    for spec in (Flux2Spec(), Flux2Spec(guidance=True, depth=2, seed=3)):
        state = flux2_state(spec)
        p = Flux2Params.from_shapes(_shapes(state))
        ours = transformer_to_diffusers(state, p)
        theirs = convert_flux2_transformer_checkpoint_to_diffusers(dict(state))
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_autoencoder_renaming_matches_diffusers_converter():
    spec = Flux2Spec()
    state = flux2_ae_state(spec)
    p = AutoEncoderParams.from_shapes(_shapes(state))
    ours = ae_to_diffusers(state, p)
    config = {"down_block_types": (None,) * len(p.ch_mult), "up_block_types": (None,) * len(p.ch_mult)}
    ldm = {
        k.replace("encoder.quant_conv", "quant_conv").replace("decoder.post_quant_conv", "post_quant_conv"): v
        for k, v in state.items()
    }
    theirs = convert_ldm_vae_checkpoint(ldm, config)
    body = {k: v for k, v in ours.items() if not k.startswith("bn.")}
    assert body.keys() == theirs.keys()
    assert all(torch.equal(body[k], theirs[k]) for k in body)


# ---- the transformer ----


def test_dimensions_are_read_off_the_weights():
    for spec in (Flux2Spec(), Flux2Spec(hidden=96, heads=3, depth=2, depth_single=3, guidance=True)):
        assert Flux2Params.from_shapes(_shapes(flux2_state(spec))) == spec.flux2_params()
    # klein 4B's and 9B's published shapes (BFL names), only the tensors from_shapes reads
    for hidden, context, depth, single in ((3072, 7680, 5, 20), (4096, 12288, 8, 24)):
        shapes = {
            "img_in.weight": (hidden, 128),
            "txt_in.weight": (hidden, context),
            "double_blocks.0.img_attn.norm.query_norm.scale": (128,),
            "double_blocks.0.img_mlp.2.weight": (hidden, 3 * hidden),
            "final_layer.linear.weight": (128, hidden),
            **{f"double_blocks.{i}.img_attn.qkv.weight": () for i in range(depth)},
            **{f"single_blocks.{i}.linear1.weight": () for i in range(single)},
        }
        p = Flux2Params.from_shapes(shapes)
        assert (p.num_heads, p.axes_dim, p.depth, p.depth_single) == (hidden // 128, (32,) * 4, depth, single)
        assert not p.guidance_embed


@pytest.mark.parametrize("spec", [Flux2Spec(), Flux2Spec(guidance=True, depth=2, depth_single=1, seed=5)])
def test_transformer_matches_diffusers(spec):
    state = flux2_state(spec)
    p = Flux2Params.from_shapes(_shapes(state))
    ours = _ours(Flux2, p, state)
    theirs = diffusers_transformer(p)
    theirs.load_state_dict(transformer_to_diffusers(state, p), strict=True)

    g = torch.Generator().manual_seed(0)
    batch, rows, cols, txt_len = 2, 4, 6, 7
    img = torch.randn(batch, rows * cols, p.in_channels, generator=g)
    txt = torch.randn(batch, txt_len, p.context_in_dim, generator=g)
    t = torch.tensor([0.9, 0.35])
    guidance = torch.tensor([4.0, 2.5]) if p.guidance_embed else None
    ids, tids = image_ids(batch, rows, cols), text_ids(batch, txt_len)
    with torch.inference_mode():
        a = ours(img, ids, txt, tids, t, guidance)
        b = theirs(
            hidden_states=img,
            encoder_hidden_states=txt,
            timestep=t,
            img_ids=ids,
            txt_ids=tids,
            guidance=guidance,
            return_dict=False,
        )[0]
    assert a.shape == (batch, rows * cols, p.out_channels)
    assert _rel_err(a, b) < TOLERANCE


def test_transformer_with_reference_images_matches_diffusers():
    """Reference tokens go after the image tokens with ids at t = 10, 20, ... as Flux2KleinPipeline appends them;
    only the image tokens' prediction comes back."""
    spec = Flux2Spec(seed=7)
    state = flux2_state(spec)
    p = Flux2Params.from_shapes(_shapes(state))
    ours = _ours(Flux2, p, state)
    theirs = diffusers_transformer(p)
    theirs.load_state_dict(transformer_to_diffusers(state, p), strict=True)

    g = torch.Generator().manual_seed(2)
    batch, rows, cols, txt_len = 1, 3, 5, 6
    refs = [
        torch.randn(1, p.in_channels, 2, 4, generator=g),
        torch.randn(1, p.in_channels, 3, 3, generator=g),
    ]
    img = torch.randn(batch, rows * cols, p.in_channels, generator=g)
    txt = torch.randn(batch, txt_len, p.context_in_dim, generator=g)
    t = torch.tensor([0.6])
    ref_img = torch.cat([pack(r) for r in refs], 1)
    ref_ids = reference_ids(batch, [tuple(r.shape[2:]) for r in refs])
    expected_ids = Flux2KleinPipeline._prepare_image_ids(refs)
    assert torch.equal(ref_ids, expected_ids)
    ids, tids = image_ids(batch, rows, cols), text_ids(batch, txt_len)
    assert torch.equal(ids, Flux2KleinPipeline._prepare_latent_ids(torch.zeros(batch, 1, rows, cols)))
    assert torch.equal(tids, Flux2KleinPipeline._prepare_text_ids(txt))
    with torch.inference_mode():
        a = ours(img, ids, txt, tids, t, ref_img=ref_img, ref_ids=ref_ids)
        b = theirs(
            hidden_states=torch.cat([img, ref_img], 1),
            encoder_hidden_states=txt,
            timestep=t,
            img_ids=torch.cat([ids, ref_ids], 1),
            txt_ids=tids,
            return_dict=False,
        )[0][:, : rows * cols]
        without = ours(img, ids, txt, tids, t)
    assert _rel_err(a, b) < TOLERANCE
    assert _rel_err(without, b) > 100 * TOLERANCE  # the references change the prediction


# ---- the autoencoder ----


def test_autoencoder_matches_diffusers():
    spec = Flux2Spec()
    state = flux2_ae_state(spec)
    p = AutoEncoderParams.from_shapes(_shapes(canonical_names(state)))
    assert p == spec.ae_params()
    ours = _ours(Flux2AutoEncoder, p, canonical_names(state))
    theirs = diffusers_autoencoder(p)
    theirs.load_state_dict(ae_to_diffusers(state, p), strict=True)

    g = torch.Generator().manual_seed(1)
    x = torch.rand(1, 3, 64, 96, generator=g) * 2 - 1
    z = torch.randn(1, 128, 4, 6, generator=g)  # what the sampler ends with: normalised, patched
    pipe = Flux2KleinPipeline  # its static helpers: the pipeline's own patching and normalisation
    with torch.inference_mode():
        encoded = ours.encode(x)
        mean = theirs.encode(x).latent_dist.mode()
        std = torch.sqrt(theirs.bn.running_var.view(1, -1, 1, 1) + theirs.config.batch_norm_eps)
        expected = (pipe._patchify_latents(mean) - theirs.bn.running_mean.view(1, -1, 1, 1)) / std
        decoded = ours.decode(z)
        unnormalised = z * std + theirs.bn.running_mean.view(1, -1, 1, 1)
        expected_image = theirs.decode(pipe._unpatchify_latents(unnormalised)).sample
    assert encoded.shape == (1, 128, 4, 6) and decoded.shape == (1, 3, 64, 96)
    assert _rel_err(encoded, expected) < TOLERANCE
    assert _rel_err(decoded, expected_image) < TOLERANCE
    assert torch.equal(patch(mean), pipe._patchify_latents(mean))
    assert torch.equal(unpatch(z), pipe._unpatchify_latents(z))


def test_autoencoder_loads_top_level_quant_convs():
    """ComfyUI's loader renames encoder.quant_conv → quant_conv; files saved that way load too."""
    state = flux2_ae_state(Flux2Spec())
    renamed = {
        k.replace("encoder.quant_conv", "quant_conv").replace("decoder.post_quant_conv", "post_quant_conv"): v
        for k, v in state.items()
    }
    assert canonical_names(renamed).keys() == canonical_names(state).keys()


# ---- the Qwen3 prompt embeddings ----


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    folder = tmp_path_factory.mktemp("qwen3_tokenizer")
    vocab = write_qwen3_tokenizer(folder)
    spec = Flux2Spec()
    state = qwen3_state(spec, vocab)
    reference = Qwen3ForCausalLM(spec.qwen3_config(vocab))
    reference.load_state_dict(state, strict=False)  # lm_head is tied to the embeddings
    reference.tie_weights()
    return state, reference.eval(), AutoTokenizer.from_pretrained(str(folder))


PROMPTS = ["a cat under a red sky", "dog"]


def _pipeline_embeds(reference, tokenizer, max_length=512, layers=KLEIN_LAYERS):
    with torch.inference_mode():
        return Flux2KleinPipeline._get_qwen3_prompt_embeds(
            reference,
            tokenizer,
            PROMPTS,
            dtype=torch.float32,
            device=torch.device("cpu"),
            max_sequence_length=max_length,
            hidden_states_layers=layers,
        )


def test_qwen3_embeddings_match_the_pipeline(qwen3):
    state, reference, tokenizer = qwen3
    model = build_qwen3(state, {}, torch.float32)
    assert len(model.layers) == max(KLEIN_LAYERS)  # layers past 27 are neither built nor loaded
    expected = _pipeline_embeds(reference, tokenizer)
    ours = encode_qwen3(model, tokenizer, PROMPTS, torch.device("cpu"))
    assert ours.shape == expected.shape == (2, 512, 3 * Flux2Spec().qwen_hidden)
    assert _rel_err(ours, expected) < TOLERANCE
    short = encode_qwen3(model, tokenizer, PROMPTS, torch.device("cpu"), max_length=24)
    assert _rel_err(short, _pipeline_embeds(reference, tokenizer, 24)) < TOLERANCE


def test_qwen3_dimensions_are_read_off_the_weights(qwen3):
    from engine.models.qwen3_encoder import qwen3_config

    state, reference, _ = qwen3
    shapes = {k.removeprefix("model."): tuple(v.shape) for k, v in state.items()}
    config, expected = qwen3_config(shapes), reference.config
    for field in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "head_dim", "rms_norm_eps", "attention_bias"):  # fmt: skip
        assert getattr(config, field) == getattr(expected, field), field
    assert config.rope_parameters["rope_theta"] == expected.rope_parameters["rope_theta"]


def test_qwen3_template_without_a_tokenizer_template(qwen3, tmp_path):
    """A tokenizer folder without a chat template (ComfyUI's bundled one) gets Qwen3's text for the same prompt."""
    state, reference, tokenizer = qwen3
    write_qwen3_tokenizer(tmp_path, chat_template=False)
    bare = AutoTokenizer.from_pretrained(str(tmp_path))
    model = build_qwen3(state, {}, torch.float32)
    ours = encode_qwen3(model, bare, PROMPTS, torch.device("cpu"), max_length=32)
    assert _rel_err(ours, _pipeline_embeds(reference, tokenizer, 32)) < TOLERANCE


def test_a_wrong_layer_choice_is_caught(qwen3):
    """The comparison sees a layer off by one (e.g. ComfyUI-style 0-based layer numbers read as transformers'
    hidden_states indices) and a final norm applied where the pipeline applies none."""
    state, reference, tokenizer = qwen3
    expected = _pipeline_embeds(reference, tokenizer, 32)
    for layers in ((10, 19, 28), (8, 17, 26), (9, 18, 26)):
        wrong = encode_qwen3(
            build_qwen3(state, {}, torch.float32, layers),
            tokenizer,
            PROMPTS,
            torch.device("cpu"),
            layers,
            max_length=32,
        )
        assert _rel_err(wrong, expected) > 1000 * TOLERANCE
    normed = build_qwen3(state, {}, torch.float32)
    normed.norm = (
        reference.model.norm
    )  # the last state normalised, as a full model's last hidden state would be
    wrong = encode_qwen3(normed, tokenizer, PROMPTS, torch.device("cpu"), max_length=32)
    assert _rel_err(wrong, expected) > 1000 * TOLERANCE


# ---- the seams the engine relies on ----


def test_streaming_and_step_cache_leave_the_transformer_unchanged():
    """Every block streamed (budget 0) gives the resident result; a first-block cache that computes gives it
    too, and reuses the tail when the first block's residual has not changed."""
    from engine.generation.step_cache import FirstBlockCache
    from engine.runtime.memory import MemoryManager, blocks_of

    spec = Flux2Spec(depth=2, depth_single=2, seed=9)
    state = flux2_state(spec)
    p = Flux2Params.from_shapes(_shapes(state))
    plain, streamed = _ours(Flux2, p, state), _ours(Flux2, p, state)
    assert blocks_of(streamed) == [*streamed.double_blocks, *streamed.single_blocks]
    memory = MemoryManager(torch.device("cpu"), 0)
    memory.manage(streamed)
    memory.activate(streamed)

    g = torch.Generator().manual_seed(4)
    img = torch.randn(1, 12, p.in_channels, generator=g)
    txt = torch.randn(1, 5, p.context_in_dim, generator=g)
    args = (img, image_ids(1, 3, 4), txt, text_ids(1, 5), torch.tensor([0.5]))
    cache = FirstBlockCache(threshold=0.05)
    with torch.inference_mode():
        expected = plain(*args)
        assert torch.equal(streamed(*args), expected)
        assert torch.equal(plain(*args, cache=cache), expected)
        assert _rel_err(plain(*args, cache=cache), expected) < TOLERANCE
    assert cache.decisions == [(True,), (False,)]


def test_qwen3_streams_its_layers_and_loads_bf16(qwen3):
    from engine.runtime.memory import MemoryManager, blocks_of

    state, reference, tokenizer = qwen3
    model = build_qwen3(state, {}, torch.float32)
    assert blocks_of(model) == list(model.layers)
    memory = MemoryManager(torch.device("cpu"), 0)
    memory.manage(model)
    memory.activate(model)
    expected = _pipeline_embeds(reference, tokenizer, 32)
    assert (
        _rel_err(encode_qwen3(model, tokenizer, PROMPTS, torch.device("cpu"), max_length=32), expected)
        < TOLERANCE
    )
    stored = {k: v.to(torch.bfloat16) for k, v in state.items()}  # as qwen_3_4b.safetensors stores it
    bf16 = encode_qwen3(
        build_qwen3(stored, {}, torch.float32), tokenizer, PROMPTS, torch.device("cpu"), max_length=32
    )
    assert _rel_err(bf16, expected) < 2e-2
