"""The transformer's seams against diffusers on the same weights: Fill's conditioning channels, Kontext's
reference tokens and ControlNet residuals each give diffusers' output for the same inputs."""

from __future__ import annotations

import torch

from engine.fixtures import TinySpec, flux_state
from engine.generation.sampling import image_ids
from engine.models.flux1 import ControlResiduals, Flux, FluxParams
from engine.runtime.memory import MemoryManager, blocks_of
from engine.runtime.ops import load_into
from tests.oracle import diffusers_transformer, transformer_to_diffusers

TOLERANCE = 2e-5


def _pair(spec: TinySpec):
    state = flux_state(spec)
    p = FluxParams.from_shapes({k: tuple(v.shape) for k, v in state.items()})
    with torch.device("meta"):
        ours = Flux(p)
    load_into(ours, dict(state), {}, torch.float32)
    theirs = diffusers_transformer(p).eval()
    theirs.load_state_dict(transformer_to_diffusers(state, p), strict=True)
    return p, ours, theirs


def _inputs(p: FluxParams, height=32, width=48, txt_len=5):
    g = torch.Generator().manual_seed(0)
    img = torch.randn(1, (height // 16) * (width // 16), 64, generator=g)
    txt = torch.randn(1, txt_len, p.context_in_dim, generator=g)
    y = torch.randn(1, p.vec_in_dim, generator=g)
    t, guidance = torch.tensor([0.7]), torch.tensor([3.5])
    return img, image_ids(1, height, width), txt, torch.zeros(1, txt_len, 3), t, y, guidance


def _theirs(theirs, img, ids, txt, txt_ids, t, y, guidance, **extra):
    with torch.inference_mode():
        return theirs(hidden_states=img, encoder_hidden_states=txt, pooled_projections=y, timestep=t,
                      img_ids=ids[0], txt_ids=txt_ids[0], guidance=guidance, return_dict=False, **extra)[0]  # fmt: skip


def _rel_err(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max())


def test_fill_conditioning_channels_match_diffusers():
    p, ours, theirs = _pair(TinySpec(in_channels=384, depth=1, depth_single=1))
    assert (p.in_channels, p.out_channels) == (384, 64)  # read off img_in and final_layer
    img, ids, txt, txt_ids, t, y, guidance = _inputs(p)
    cond = torch.randn(1, img.shape[1], 320, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        a = ours(img, ids, txt, txt_ids, t, y, guidance, img_cond=cond)
    b = _theirs(theirs, torch.cat((img, cond), -1), ids, txt, txt_ids, t, y, guidance)
    assert a.shape == img.shape
    assert _rel_err(a, b) < TOLERANCE


def test_reference_tokens_are_attended_not_predicted():
    p, ours, theirs = _pair(TinySpec(depth=1, depth_single=2))
    img, ids, txt, txt_ids, t, y, guidance = _inputs(p)
    ref = torch.randn(1, 6, 64, generator=torch.Generator().manual_seed(3))
    ref_ids = image_ids(1, 32, 48)[:, :6].clone()
    ref_ids[..., 0] = 1  # Kontext's first index marks the reference
    with torch.inference_mode():
        a = ours(img, ids, txt, txt_ids, t, y, guidance, ref_img=ref, ref_ids=ref_ids)
        alone = ours(img, ids, txt, txt_ids, t, y, guidance)
    b = _theirs(theirs, torch.cat((img, ref), 1), torch.cat((ids, ref_ids), 1), txt, txt_ids, t, y, guidance)
    assert a.shape == img.shape
    assert _rel_err(a, b[:, : img.shape[1]]) < TOLERANCE
    assert _rel_err(a, alone) > 1e-3  # the reference changed the prediction


def test_control_residuals_match_diffusers():
    p, ours, theirs = _pair(TinySpec(depth=2, depth_single=2))
    img, ids, txt, txt_ids, t, y, guidance = _inputs(p)
    g = torch.Generator().manual_seed(4)
    double = [torch.randn(1, img.shape[1], p.hidden_size, generator=g) for _ in range(p.depth)]
    single = [torch.randn(1, img.shape[1], p.hidden_size, generator=g) for _ in range(p.depth_single)]
    with torch.inference_mode():
        a = ours(img, ids, txt, txt_ids, t, y, guidance, control=ControlResiduals(double, single))
        none = ours(img, ids, txt, txt_ids, t, y, guidance, control=ControlResiduals())
        plain = ours(img, ids, txt, txt_ids, t, y, guidance)
    b = _theirs(theirs, img, ids, txt, txt_ids, t, y, guidance,
                controlnet_block_samples=double, controlnet_single_block_samples=single)  # fmt: skip
    assert _rel_err(a, b) < TOLERANCE
    assert torch.equal(none, plain)
    assert _rel_err(a, plain) > 1e-3


def test_the_model_declares_its_streamed_blocks():
    _, ours, _ = _pair(TinySpec(depth=2, depth_single=3))
    assert blocks_of(ours) == [*ours.double_blocks, *ours.single_blocks]


def test_lower_budget_forgets_the_models_it_releases():
    spec = TinySpec(depth=1, depth_single=1)
    _, a, _ = _pair(spec)
    _, b, _ = _pair(spec)
    memory = MemoryManager(torch.device("cpu"), None)
    for model in (a, b):
        memory.manage(model)
        memory.activate(model)
    memory.lower_budget(b)
    assert memory._active == [id(b)]  # a was released: it must not count as active (its plan is gone)
    memory.activate(a)
    assert memory._active == [id(b), id(a)]
