"""First-Block-Cache: the same skip decisions and outputs as diffusers' FirstBlockCache on the same weights and
inputs (one pass, and true CFG's two passes deciding each for itself); threshold 0 changes no pixel."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import FirstBlockCacheConfig
from diffusers.hooks import first_block_cache as fbc
from PIL import Image

from engine.contract.request import GenerateRequest, ModelFiles, parse_cache
from engine.fixtures import TinySpec, flux_state
from engine.generation.pipeline import Engine
from engine.generation.sampling import image_ids, schedule
from engine.generation.step_cache import FirstBlockCache
from engine.models.flux1 import Flux, FluxParams
from engine.runtime.ops import load_into
from tests.oracle import diffusers_transformer, transformer_to_diffusers

STEPS = 12


def _models():
    state = flux_state(TinySpec(depth=2, depth_single=2, seed=7))
    p = FluxParams.from_shapes({k: tuple(v.shape) for k, v in state.items()})
    with torch.device("meta"):
        ours = Flux(p)
    load_into(ours, dict(state), {}, torch.float32)
    theirs = diffusers_transformer(p).eval()
    theirs.load_state_dict(transformer_to_diffusers(state, p), strict=True)
    return p, ours, theirs


def _run(p, ours, theirs, threshold: float, passes: int, monkeypatch):
    """An Euler loop on both models; returns (our cache, diffusers' decisions per pass, max relative v error)."""
    g = torch.Generator().manual_seed(0)
    height, width, txt_len = 32, 32, 5
    x = torch.randn(1, (height // 16) * (width // 16), 64, generator=g)
    txts = [torch.randn(1, txt_len, p.context_in_dim, generator=g) for _ in range(passes)]
    ys = [torch.randn(1, p.vec_in_dim, generator=g) for _ in range(passes)]
    ids, txt_ids = image_ids(1, height, width), torch.zeros(1, txt_len, 3)

    theirs_decisions: list[bool] = []
    original = fbc.FBCHeadBlockHook._should_compute_remaining_blocks

    def record(self, residual):
        theirs_decisions.append(original(self, residual))
        return theirs_decisions[-1]

    monkeypatch.setattr(fbc.FBCHeadBlockHook, "_should_compute_remaining_blocks", record)
    theirs.enable_cache(FirstBlockCacheConfig(threshold=threshold))
    cache = FirstBlockCache(threshold, groups=passes)
    worst = 0.0
    times = schedule(STEPS, 0.5)
    x_ours = x_theirs = x
    with torch.inference_mode():
        for t, t_next in zip(times[:-1], times[1:]):
            batch = passes
            v_ours = ours(x_ours.repeat(batch, 1, 1), ids, torch.cat(txts), txt_ids, torch.full((batch,), t),
                          torch.cat(ys), torch.full((batch,), 3.5), cache=cache)  # fmt: skip
            v_theirs = []
            for name, txt, y in zip(("cond", "uncond"), txts, ys):
                with theirs.cache_context(name):
                    v_theirs.append(theirs(hidden_states=x_theirs, encoder_hidden_states=txt, pooled_projections=y,
                                           timestep=torch.tensor([t]), img_ids=ids[0], txt_ids=txt_ids[0],
                                           guidance=torch.tensor([3.5]), return_dict=False)[0])  # fmt: skip
            v_theirs = torch.cat(v_theirs)
            worst = max(worst, float((v_ours - v_theirs).abs().max() / v_theirs.abs().max()))
            x_ours = x_ours + (t_next - t) * v_ours[:1]
            x_theirs = x_theirs + (t_next - t) * v_theirs[:1]
    theirs.disable_cache()
    per_pass = [tuple(theirs_decisions[i::passes]) for i in range(passes)]
    return cache, per_pass, worst


@pytest.mark.parametrize("passes", [1, 2])
def test_skip_decisions_and_outputs_match_diffusers(passes, monkeypatch):
    p, ours, theirs = _models()
    # thresholds between the changes this model shows, so that some steps are skipped and some computed
    with monkeypatch.context() as m:
        probe, _, _ = _run(p, ours, theirs, 0.0, passes, m)
    seen = sorted(c for step in probe.changes for c in step if c != float("inf"))
    for threshold in (seen[len(seen) // 4], seen[len(seen) // 2], seen[3 * len(seen) // 4]):
        with monkeypatch.context() as m:
            cache, theirs_per_pass, worst = _run(p, ours, theirs, threshold, passes, m)
        margins = [
            abs(c - threshold) / threshold for step in cache.changes for c in step if c != float("inf")
        ]
        flat = [d for step in cache.decisions for d in step]
        if not all(flat) and sum(flat) > passes and min(margins) > 1e-3:
            break
    else:
        pytest.fail(f"no threshold skips some steps of this model: changes {seen}")
    ours_per_pass = [tuple(step[g] for step in cache.decisions) for g in range(passes)]
    assert ours_per_pass == theirs_per_pass
    assert worst < 1e-4  # the reused residuals are the same residuals


def test_threshold_zero_changes_no_pixel_and_a_large_one_skips(dev_set, tmp_path):
    engine = Engine()
    events = []

    def generate(cache: str, name: str) -> np.ndarray:
        request = GenerateRequest(prompt="a cat", width=64, height=64, steps=6, seed=1, cache=cache,
                                  files=ModelFiles(models_dir=str(dev_set.models_dir)), out=str(tmp_path / name))  # fmt: skip
        path = engine.generate(request, on_event=events.append)[0]
        return np.asarray(Image.open(path)), Image.open(path).text["parameters"]

    plain, plain_text = generate("none", "a.png")
    zero, zero_text = generate("first-block:0", "b.png")
    events.clear()
    loose, loose_text = generate("first-block:1", "c.png")
    assert np.array_equal(plain, zero)
    assert "Cache: first-block:0" in zero_text and "Cache" not in plain_text
    cached = [e.step for e in events if getattr(e, "cached", False)]
    assert cached == [2, 3, 4, 5, 6]  # the first step always computes; at 1 every later one reuses it
    assert not np.array_equal(plain, loose)


@pytest.mark.parametrize("text", ["first-block:-0.1", "first-block:nan", "first-block:2", "fast", "none:1"])
def test_bad_cache_settings_are_refused(text):
    with pytest.raises(ValueError):
        parse_cache(text)
    assert parse_cache("first-block") == 0.12 and parse_cache("first-block:0.3") == 0.3
