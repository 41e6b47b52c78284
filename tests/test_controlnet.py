"""FLUX.1 ControlNets against diffusers on the same tiny weights, in the layouts people download.

Each net's residuals, and the base transformer's output with them, against diffusers' FluxControlNetModel +
FluxTransformer2DModel (float32, relative error < 2e-5 as tests/test_model_parity.py). XLabs' layout has no
diffusers loader: the oracle below renames an XLabs file into the FluxControlNetModel that diffusers runs XLabs
nets with (an `input_hint_block`, patch size 2, `controlnet_blocks_repeat=True`), and checks the renaming
covers every tensor (strict loading, both ways). The base is 3 double + 4 single blocks and the nets are
shallower, so the spread over the base's depth is exercised, and a wrong spread is shown to be caught.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    FluxControlNetModel,
    FluxControlNetPipeline,
    FluxMultiControlNetModel,
)

from engine.fixtures import TinySpec, ae_state, flux_state
from engine.fixtures_controlnet import diffusers_controlnet_state, xlabs_controlnet_state
from engine.generation.sampling import image_ids
from engine.models.autoencoder import SCALE_FACTOR, SHIFT_FACTOR, AutoEncoder, AutoEncoderParams
from engine.models.controlnet import (
    UNION_MODES,
    ControlNetParams,
    add_residuals,
    build_controlnet,
    controlled,
    layout_of,
    spread,
    union_mode,
)
from engine.models.flux1 import ControlResiduals, Flux, FluxParams
from engine.runtime.memory import MemoryManager, blocks_of
from engine.runtime.ops import load_into
from tests.oracle import diffusers_transformer, transformer_to_diffusers, vae_to_diffusers

TOLERANCE = 2e-5
SPEC = TinySpec(depth=3, depth_single=4)
HEIGHT, WIDTH, TXT_LEN = 32, 48, 5


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


# ---- the oracle: diffusers' models on the same weights ----


def xlabs_to_diffusers(xlabs: dict[str, torch.Tensor], p: ControlNetParams) -> dict[str, torch.Tensor]:
    """An XLabs file's tensors under FluxControlNetModel's names: the blocks and embedders as the base
    transformer's renaming, `pos_embed_input` → `controlnet_x_embedder`, and the hint encoder's eight
    convolutions (Sequential indices 0, 2, …, 14) → `conv_in`, `blocks.0-5`, `conv_out`."""
    fp = p.flux_params()
    h = p.hidden_size
    as_base = dict(xlabs)  # the renaming of the transformer wants a final layer: a placeholder, dropped after
    as_base["final_layer.adaLN_modulation.1.weight"] = torch.zeros(2 * h, h)
    as_base["final_layer.adaLN_modulation.1.bias"] = torch.zeros(2 * h)
    out = transformer_to_diffusers(as_base, fp)
    out = {k: v for k, v in out.items() if not k.startswith(("norm_out.", "proj_out."))}
    convs = ["conv_in", *(f"blocks.{i}" for i in range(6)), "conv_out"]
    for i, name in enumerate(convs):
        for kind in ("weight", "bias"):
            out[f"input_hint_block.{name}.{kind}"] = xlabs[f"input_hint_block.{2 * i}.{kind}"]
    for name, tensor in xlabs.items():
        if name.startswith("controlnet_blocks."):
            out[name] = tensor
        elif name.startswith("pos_embed_input."):
            out[name.replace("pos_embed_input", "controlnet_x_embedder")] = tensor
    return out


def diffusers_controlnet(p: ControlNetParams) -> FluxControlNetModel:
    xlabs = p.pixel_hint
    return FluxControlNetModel(
        patch_size=2 if xlabs else 1,
        in_channels=p.in_channels,
        num_layers=p.depth,
        num_single_layers=p.depth_single,
        attention_head_dim=p.head_dim,
        num_attention_heads=p.num_heads,
        joint_attention_dim=p.context_in_dim,
        pooled_projection_dim=p.vec_in_dim,
        guidance_embeds=p.guidance_embed,
        axes_dims_rope=list(p.axes_dim),
        num_mode=p.num_modes or None,
        conditioning_embedding_channels=16 if xlabs else None,
    ).eval()


def _controlnet_pair(state: dict[str, torch.Tensor]):
    ours = build_controlnet(dict(state), {}, torch.float32)
    p = ours.params
    theirs = diffusers_controlnet(p)
    theirs_state = xlabs_to_diffusers(state, p) if p.pixel_hint else state
    theirs.load_state_dict(
        theirs_state, strict=True
    )  # every tensor of the file used, every one diffusers has
    return ours, theirs


@pytest.fixture(scope="module")
def base():
    state = flux_state(SPEC)
    p = FluxParams.from_shapes({k: tuple(v.shape) for k, v in state.items()})
    with torch.device("meta"):
        ours = Flux(p)
    load_into(ours, dict(state), {}, torch.float32)
    theirs = diffusers_transformer(p).eval()
    theirs.load_state_dict(transformer_to_diffusers(state, p), strict=True)
    return p, ours, theirs


def _inputs(p: FluxParams, batch: int = 1):
    g = torch.Generator().manual_seed(0)
    img = torch.randn(batch, (HEIGHT // 16) * (WIDTH // 16), 64, generator=g)
    txt = torch.randn(batch, TXT_LEN, p.context_in_dim, generator=g)
    y = torch.randn(batch, p.vec_in_dim, generator=g)
    t, guidance = torch.full((batch,), 0.7), torch.full((batch,), 3.5)
    return img, image_ids(batch, HEIGHT, WIDTH), txt, torch.zeros(batch, TXT_LEN, 3), t, y, guidance


def _cond(pixel_hint: bool, seed: int = 5) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if pixel_hint:  # XLabs: the control image's pixels in [-1, 1]
        return torch.rand(1, 3, HEIGHT, WIDTH, generator=g) * 2 - 1
    return torch.randn(1, (HEIGHT // 16) * (WIDTH // 16), 64, generator=g)  # the packed latent


def _theirs_controlnet(net, inputs, cond, mode, strength):
    img, ids, txt, txt_ids, t, y, guidance = inputs
    mode_tensor = None if mode is None else torch.full((img.shape[0], 1), mode, dtype=torch.long)
    with torch.inference_mode():
        return net(hidden_states=img, controlnet_cond=cond.expand(img.shape[0], *cond.shape[1:]),
                   controlnet_mode=mode_tensor, conditioning_scale=strength, encoder_hidden_states=txt,
                   pooled_projections=y, timestep=t, img_ids=ids[0], txt_ids=txt_ids[0], guidance=guidance,
                   return_dict=False)  # fmt: skip


def _theirs_base(theirs, inputs, double, single, repeat: bool):
    img, ids, txt, txt_ids, t, y, guidance = inputs
    with torch.inference_mode():
        return theirs(hidden_states=img, encoder_hidden_states=txt, pooled_projections=y, timestep=t,
                      img_ids=ids[0], txt_ids=txt_ids[0], guidance=guidance, controlnet_block_samples=double,
                      controlnet_single_block_samples=single, controlnet_blocks_repeat=repeat,
                      return_dict=False)[0]  # fmt: skip


LAYOUTS = {
    "instantx": lambda: diffusers_controlnet_state(SPEC, depth=2, depth_single=3),
    "union": lambda: diffusers_controlnet_state(SPEC, depth=2, depth_single=3, modes=10, seed=13),
    "union-pro-2": lambda: diffusers_controlnet_state(SPEC, depth=2, depth_single=0, seed=14),
    "xlabs": lambda: xlabs_controlnet_state(SPEC, depth=2),
}


@pytest.mark.parametrize("name", LAYOUTS)
def test_controlnet_matches_diffusers(base, name):
    p, ours_base, theirs_base = base
    state = LAYOUTS[name]()
    ours, theirs = _controlnet_pair(state)
    cp = ours.params
    assert cp == ControlNetParams.from_shapes({k: tuple(v.shape) for k, v in state.items()})
    assert (cp.layout, cp.depth, cp.num_modes) == (layout_of(state), 2, 10 if name == "union" else 0)
    assert cp.depth_single == {"instantx": 3, "union": 3, "union-pro-2": 0, "xlabs": 0}[name]
    mode = UNION_MODES["depth"] if cp.num_modes else None
    strength = 0.7
    inputs = _inputs(p, batch=2)
    cond = _cond(cp.pixel_hint)

    double, single = _theirs_controlnet(theirs, inputs, cond, mode, strength)
    with torch.inference_mode():
        raw_double, raw_single = ours.samples(*inputs, cond, mode)
        residuals = ours(*inputs, cond, base=p, mode=mode, strength=strength)
        a = ours_base(*inputs, control=residuals)
        plain = ours_base(*inputs)
    assert len(raw_double) == len(double) == 2
    for r, s in zip(raw_double, double):
        assert _rel_err(r * strength, s) < TOLERANCE
    assert len(raw_single) == (0 if single is None else len(single))
    for r, s in zip(raw_single, single or []):
        assert _rel_err(r * strength, s) < TOLERANCE
    # one residual per base block, as the base's actual depth needs
    assert (len(residuals.double), len(residuals.single)) == (
        p.depth,
        p.depth_single if cp.depth_single else 0,
    )

    b = _theirs_base(theirs_base, inputs, double, single, repeat=cp.pixel_hint)
    assert _rel_err(a, b) < TOLERANCE
    assert _rel_err(a, plain) > 1e-3  # the ControlNet changed the prediction

    # a wrong spread is caught: the net's outputs without expansion over the base's depth, or the other rule
    unspread = ControlResiduals([r * strength for r in raw_double], [r * strength for r in raw_single])
    other = "interval" if cp.spread_rule == "repeat" else "repeat"
    misspread = ControlResiduals(spread(unspread.double, p.depth, other), residuals.single)
    with torch.inference_mode():
        for wrong in (unspread, misspread):
            assert _rel_err(ours_base(*inputs, control=wrong), b) > 1e-3


def test_union_mode_changes_the_residuals(base):
    p = base[0]
    ours, _ = _controlnet_pair(LAYOUTS["union"]())
    inputs, cond = _inputs(p), _cond(False)
    with torch.inference_mode():
        canny = ours(*inputs, cond, base=p, mode=union_mode("canny"))
        depth = ours(*inputs, cond, base=p, mode=union_mode("depth"))
    assert _rel_err(canny.double[0], depth.double[0]) > 1e-3
    with pytest.raises(ValueError, match="needs a mode"):
        ours(*inputs, cond, base=p)
    with pytest.raises(ValueError, match="outside"):
        ours(*inputs, cond, base=p, mode=10)


def test_union_mode_names():
    assert UNION_MODES == {"canny": 0, "tile": 1, "depth": 2, "blur": 3, "pose": 4, "gray": 5, "lq": 6}
    assert union_mode("Depth") == 2 and union_mode("4") == 4
    with pytest.raises(ValueError, match="unknown ControlNet mode"):
        union_mode("scribble")


def test_stacked_controlnets_match_diffusers_multi(base):
    p, ours_base, theirs_base = base
    nets = [_controlnet_pair(diffusers_controlnet_state(SPEC, 2, 3, seed=s)) for s in (21, 22)]
    inputs, conds, strengths = _inputs(p), [_cond(False, 6), _cond(False, 7)], [0.8, 0.5]
    multi = FluxMultiControlNetModel([theirs for _, theirs in nets]).eval()
    img, ids, txt, txt_ids, t, y, guidance = inputs
    with torch.inference_mode():
        double, single = multi(hidden_states=img, controlnet_cond=conds, controlnet_mode=[torch.tensor([0])] * 2,
                               conditioning_scale=strengths, encoder_hidden_states=txt, pooled_projections=y,
                               timestep=t, img_ids=ids[0], txt_ids=txt_ids[0], guidance=guidance,
                               return_dict=False)  # fmt: skip
        parts = [ours(*inputs, c, base=p, strength=s) for (ours, _), c, s in zip(nets, conds, strengths)]
        a = ours_base(*inputs, control=add_residuals(*parts, None))
        one = ours_base(*inputs, control=parts[0])
    b = _theirs_base(theirs_base, inputs, double, single, repeat=False)
    assert _rel_err(a, b) < TOLERANCE
    assert _rel_err(one, b) > 1e-3  # the second net counted


def test_add_residuals_adds_shared_pairs_once():
    x, y = torch.ones(1, 2, 3), torch.full((1, 2, 3), 2.0)
    a = ControlResiduals([x, x, None], [x])
    b = ControlResiduals([y, y], [])
    total = add_residuals(a, b)
    assert [float(r[0, 0, 0]) if r is not None else None for r in total.double] == [3.0, 3.0, None]
    assert total.double[0] is total.double[1]
    assert total.single[0] is x
    assert add_residuals(None) is None


def test_spread_rules():
    s = ["a", "b"]
    assert spread(s, 3, "interval") == ["a", "a", "b"]
    assert spread(s, 19, "interval") == ["a"] * 10 + ["b"] * 9
    assert spread(["a", "b", "c", "d", "e"], 19, "interval") == [x for x in "abcde" for _ in range(4)][:19]
    assert spread(s, 5, "repeat") == ["a", "b", "a", "b", "a"]
    assert spread([], 19, "interval") == []


def _diffusers_vae(state, vp: AutoEncoderParams) -> AutoencoderKL:
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(vp.ch,) * 4,
                        layers_per_block=1, latent_channels=16, norm_num_groups=32, use_quant_conv=False,
                        use_post_quant_conv=False, scaling_factor=SCALE_FACTOR,
                        shift_factor=SHIFT_FACTOR).eval()  # fmt: skip
    vae.load_state_dict(vae_to_diffusers(state, vp), strict=True)
    return vae


GATING = [(4, 0.25, 0.75), (7, 0.2, 0.8), (10, 0.3, 0.7), (3, 0.0, 1.0), (6, 0.5, 0.51), (5, 0.1, 0.9)]


def test_gating_matches_diffusers_pipeline(base):
    """diffusers' FluxControlNetPipeline computes `controlnet_keep` inside __call__: run it (tiny models, latent
    output) and record the conditioning scale its ControlNet gets at each step."""
    p = base[0]
    spec = SPEC
    vp = AutoEncoderParams(3, spec.vae_ch, (1,) * spec.vae_levels, 1, 16, 3)
    vae = _diffusers_vae(ae_state(spec), vp)
    _, net = _controlnet_pair(diffusers_controlnet_state(SPEC, 1, 0))
    pipe = FluxControlNetPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=None,
                                  tokenizer=None, text_encoder_2=None, tokenizer_2=None,
                                  transformer=diffusers_transformer(p).eval(), controlnet=net)  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    seen: list[float] = []
    forward = net.forward

    def recording(*args, **kwargs):
        seen.append(float(kwargs["conditioning_scale"]))
        return forward(*args, **kwargs)

    net.forward = recording
    img, _, txt, _, _, y, _ = _inputs(p)
    strength = 0.6
    for steps, start, end in GATING:
        seen.clear()
        with torch.inference_mode():
            pipe(prompt_embeds=txt, pooled_prompt_embeds=y, latents=img, control_image=_cond(True),
                 height=HEIGHT, width=WIDTH, num_inference_steps=steps, control_guidance_start=start,
                 control_guidance_end=end, controlnet_conditioning_scale=strength, guidance_scale=3.5,
                 output_type="latent")  # fmt: skip
        ours = [strength * float(controlled(i, steps, start, end)) for i in range(steps)]
        assert seen == ours, (steps, start, end)
    assert [controlled(i, 4, 0.25, 0.75) for i in range(4)] == [False, True, True, False]


def test_control_image_is_the_packed_latent_mean():
    spec = SPEC
    state = ae_state(spec)
    vp = AutoEncoderParams.from_shapes({k: tuple(v.shape) for k, v in state.items()})
    with torch.device("meta"):
        ae = AutoEncoder(vp)
    load_into(ae, dict(state), {}, torch.float32)
    theirs = _diffusers_vae(state, vp)
    instantx = build_controlnet(diffusers_controlnet_state(SPEC, 1, 0), {}, torch.float32)
    xlabs = build_controlnet(xlabs_controlnet_state(SPEC, 1), {}, torch.float32)
    pixels = _cond(True)
    with torch.inference_mode():
        ours = instantx.condition(pixels, ae)
        mean = theirs.encode(pixels).latent_dist.mode()
        latent = (mean - theirs.config.shift_factor) * theirs.config.scaling_factor
        expected = FluxControlNetPipeline._pack_latents(latent, 1, 16, HEIGHT // 8, WIDTH // 8)
        assert torch.equal(xlabs.condition(pixels, ae), pixels)
    assert ours.shape == (1, (HEIGHT // 16) * (WIDTH // 16), 64)
    assert _rel_err(ours, expected) < TOLERANCE


def test_streams_block_by_block_with_identical_residuals(base):
    p = base[0]
    for state in (LAYOUTS["union"](), LAYOUTS["xlabs"]()):
        net, _ = _controlnet_pair(state)
        pairs = [*net._double(), *net._single()]
        assert blocks_of(net) == [m for pair in pairs for m in pair]  # each block, then its projection
        inputs, cond = _inputs(p), _cond(net.params.pixel_hint)
        mode = 1 if net.params.num_modes else None
        with torch.inference_mode():
            expected = net(*inputs, cond, base=p, mode=mode)
            memory = MemoryManager(torch.device("cpu"), 1)  # a budget of one byte: every block streams
            memory.manage(net)
            plan = memory.activate(net)
            assert plan.resident == set()
            got = net(*inputs, cond, base=p, mode=mode)
            assert memory.stats_of(net).bytes_streamed > 0
            memory.forget(net)
        for a, b in zip(got.double + list(got.single), expected.double + list(expected.single)):
            assert torch.equal(a, b)


def test_refusals(base):
    p = base[0]
    shapes = {k: tuple(v.shape) for k, v in LAYOUTS["instantx"]().items()}
    assert layout_of(flux_state(TinySpec())) is None
    with pytest.raises(ValueError, match="no FLUX ControlNet"):
        ControlNetParams.from_shapes({k: tuple(v.shape) for k, v in flux_state(TinySpec()).items()})
    with pytest.raises(ValueError, match="inpainting"):
        ControlNetParams.from_shapes({**shapes, "controlnet_x_embedder.weight": (64, 68)})
    with pytest.raises(ValueError, match="diffusers conversion of an XLabs"):
        ControlNetParams.from_shapes({**shapes, "input_hint_block.conv_in.weight": (16, 3, 3, 3)})
    narrow = ControlNetParams.from_shapes(shapes)
    narrow.check_base(p)
    wide = FluxParams(**{**p.__dict__, "hidden_size": 128})
    with pytest.raises(ValueError, match="hidden_size is 64, the transformer's 128"):
        narrow.check_base(wide)
