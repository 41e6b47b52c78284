"""The memory manager: the same image at every budget, the bytes it streams, the embedding cache, OOM retries."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from engine.contract.events import Message
from engine.contract.request import GenerateRequest, ModelFiles
from engine.generation.pipeline import Engine, EngineOptions
from engine.runtime.placement import LOOKAHEAD, make_plan, spread


def request(tiny, out, **kw) -> GenerateRequest:
    base = dict(
        prompt="a photo of a cat",
        width=64,
        height=64,
        steps=2,
        seed=3,
        files=ModelFiles(models_dir=str(tiny.models_dir)),
    )
    return GenerateRequest(out=str(out), **(base | kw))


def image(path) -> np.ndarray:
    return np.asarray(Image.open(path))


def test_spread_and_plan():
    assert spread(10, 0) == [] and spread(10, 10) == list(range(10))
    assert spread(10, 5) == [0, 2, 4, 6, 8]
    sizes = [100] * 10
    assert make_plan(sizes, 50, None).resident == set(range(10))
    assert make_plan(sizes, 50, 10_000).streamed_bytes == 0
    part = make_plan(sizes, 50, 50 + (LOOKAHEAD + 1) * 100 + 400)
    assert len(part.resident) == 4 and part.streamed_bytes == 600
    assert part.resident_bytes == 50 + 400
    none = make_plan(sizes, 50, 0)
    assert none.resident == set() and none.streamed_bytes == 1000


@pytest.mark.parametrize("budget_blocks", [None, 1, 2])
def test_same_image_at_every_budget(deep_set, tmp_path, budget_blocks):
    """Everything resident (no budget), part streamed, everything streamed: the same pixels, and the bytes
    streamed per pass are exactly the non-resident blocks'."""
    tiny = deep_set
    reference = Engine().generate(request(tiny, tmp_path / "ref.png"))[0]
    engine = Engine()
    engine.generate(request(tiny, tmp_path / "warm.png"))  # loads the models; the budget comes next
    transformer = engine.models.loaded("transformer")
    managed = engine.memory._models[id(transformer)]
    block = max(managed.block_bytes)
    budget = 0 if budget_blocks is None else managed.rest_bytes + (LOOKAHEAD + 1 + budget_blocks) * block
    streamed = engine.generate(request(tiny, tmp_path / "s.png", vram_budget=budget / 1024**3))[0]
    assert np.array_equal(image(reference), image(streamed))
    plan = make_plan(managed.block_bytes, managed.rest_bytes, budget)
    assert len(plan.resident) == (budget_blocks or 0)
    stats = engine.memory.stats_of(transformer)
    assert stats.passes == 2  # two steps, one pass each
    per_pass = sum(b for i, b in enumerate(managed.block_bytes) if i not in plan.resident)
    assert stats.bytes_streamed == 2 * per_pass > 0


def test_embedding_cache_skips_the_text_encoders(dev_set, tmp_path):
    options = EngineOptions(cache_dir=str(tmp_path / "cache"))
    first = Engine(options)
    first.generate(request(dev_set, tmp_path / "a.png", seed=1))
    assert first.loads == {"clip": 1, "t5": 1, "transformer": 1, "vae": 1}
    again = Engine(options)  # a new process, as the CLI is: only the cache on disk is shared
    out = again.generate(request(dev_set, tmp_path / "b.png", seed=2))[0]
    assert again.loads == {"transformer": 1, "vae": 1}
    uncached = Engine().generate(request(dev_set, tmp_path / "c.png", seed=2))[0]
    assert np.array_equal(image(out), image(uncached))
    changed = Engine(options)
    changed.generate(request(dev_set, tmp_path / "d.png", seed=2, prompt="a red house"))
    assert "t5" in changed.loads  # another prompt is encoded


def test_out_of_memory_in_a_step_lowers_the_budget_and_retries(dev_set, tmp_path):
    reference = Engine().generate(request(dev_set, tmp_path / "ref.png"))[0]
    engine = Engine()
    engine.generate(request(dev_set, tmp_path / "warm.png"))
    block = engine.models.loaded("transformer").single_blocks[1]
    original = block.forward
    failures = []

    def flaky(*args, **kwargs):
        if not failures:
            failures.append(1)
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return original(*args, **kwargs)

    block.forward = flaky
    events = []
    out = engine.generate(request(dev_set, tmp_path / "oom.png", vram_budget=1.0), events.append)[0]
    assert failures == [1]
    assert np.array_equal(image(reference), image(out))
    assert engine.memory.stats.budget_lowered == 1
    assert any(isinstance(e, Message) and "out of GPU memory" in e.text for e in events)


def test_fp16_compute_saturates_instead_of_overflowing():
    from engine.fixtures import TinySpec, flux_state
    from engine.models.flux1 import Flux, FluxParams
    from engine.runtime.ops import load_into

    state = flux_state(TinySpec())
    p = FluxParams.from_shapes({k: tuple(v.shape) for k, v in state.items()})
    with torch.device("meta"):
        model = Flux(p)
    load_into(model, state, {}, torch.float16)
    block = model.single_blocks[0]
    x = torch.full((1, 8, p.hidden_size), 60000.0, dtype=torch.float16)
    vec = torch.randn(1, p.hidden_size, dtype=torch.float16) * 50
    from engine.models.flux1 import position_embedding

    pe = position_embedding(torch.zeros(1, 8, 3), p.axes_dim, p.theta)
    with torch.inference_mode():
        out = block(x, vec, pe)
    assert torch.isfinite(out).all()


def test_fp16_generation_is_finite_and_close_to_fp32(dev_set, tmp_path):
    fp32 = Engine().generate(request(dev_set, tmp_path / "32.png", dtype="fp32"))[0]
    fp16 = Engine().generate(request(dev_set, tmp_path / "16.png", dtype="fp16"))[0]
    from tests.metrics import psnr

    assert psnr(image(fp32), image(fp16)) > 30


def test_previews_every_step(dev_set, tmp_path):
    from engine.contract.events import Preview

    events = []
    engine = Engine(EngineOptions(previews=True))
    engine.generate(request(dev_set, tmp_path / "p.png", width=128, height=64, steps=3), events.append)
    previews = [e for e in events if isinstance(e, Preview)]
    assert [p.step for p in previews] == [1, 2, 3]
    assert all((p.width, p.height, len(p.rgb)) == (16, 8, 16 * 8 * 3) for p in previews)
    assert previews[0].rgb != previews[-1].rgb


def test_out_of_memory_while_staging_resident_blocks_keeps_fewer(deep_set):
    """A budget that proves too hopeful when the resident copies are made halves the resident blocks."""
    from engine.formats.weights import component_from
    from engine.models.build import build_model
    from engine.runtime.memory import MemoryManager

    model = build_model(
        component_from(deep_set.paths["transformer"], "transformer", "--transformer"), torch.float32
    )
    manager = MemoryManager(torch.device("cpu"), budget_bytes=None)
    manager.manage(model)
    stage, failures = manager._copier.stage, []

    def flaky(layers, resident=False):
        if resident and not failures:
            failures.append(1)
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return stage(layers, resident)

    manager._copier.stage = flaky
    plan = manager.activate(model)
    assert failures == [1] and manager.stats.budget_lowered == 1
    assert 0 < len(plan.resident) <= 5  # of 11, and the rest streamed
    assert plan.streamed_bytes > 0


def test_the_automatic_budget_is_measured_once(dev_set, tmp_path, monkeypatch):
    """Free VRAM read after our own weights are on the card would shrink the budget job after job."""
    import engine.generation.model_cache as model_cache

    readings = iter([3 * 1024**3, 1 * 1024**3, 0])
    monkeypatch.setattr(model_cache, "auto_budget", lambda device: next(readings))
    engine = Engine()
    for i in range(3):
        engine.generate(request(dev_set, tmp_path / f"{i}.png"))
        assert engine.memory.budget == 3 * 1024**3
    engine.generate(request(dev_set, tmp_path / "x.png", vram_budget=0.5))
    assert engine.memory.budget == 1024**3 // 2
    engine.generate(request(dev_set, tmp_path / "y.png"))
    assert engine.memory.budget == 3 * 1024**3


def test_short_ram_lets_the_text_encoders_go_and_keeps_the_transformer(dev_set, tmp_path, monkeypatch):
    """RAM for the transformer and the autoencoder but not the text encoders too: loading the transformer lets
    the encoders go; the next job of a seed hunt (prompt from the cache) loads nothing at all."""
    import engine.generation.model_cache as model_cache
    from engine.formats.weights import find_components, open_weights

    size = {r: find_components(open_weights(p))[r].nbytes for r, p in dev_set.paths.items()}
    room = size["transformer"] + size["vae"] + min(size["clip"], size["t5"]) // 2
    monkeypatch.setattr(model_cache, "_total_ram", lambda: int(room / model_cache.RAM_SHARE))
    engine = Engine(EngineOptions(cache_dir=str(tmp_path / "cache")))
    engine.generate(request(dev_set, tmp_path / "a.png", seed=1))
    assert engine.models.roles == ["transformer", "vae"]
    loads = dict(engine.loads)
    engine.generate(request(dev_set, tmp_path / "b.png", seed=2))
    assert engine.loads == loads  # nothing loaded again


def test_true_cfg_streams_each_weight_once_per_step(deep_set, tmp_path):
    """The prompt and the negative prompt share one pass: with everything streamed, the bytes per step are the
    same as without CFG."""
    engine = Engine()
    plain = request(deep_set, tmp_path / "a.png", vram_budget=0.0)
    engine.generate(plain)
    transformer = engine.models.loaded("transformer")
    without = engine.memory.stats_of(transformer).bytes_streamed
    cfg = request(deep_set, tmp_path / "b.png", vram_budget=0.0, negative="blurry", cfg=2.0)
    engine.generate(cfg)
    stats = engine.memory.stats_of(transformer)
    assert stats.passes == 2 and stats.bytes_streamed == without > 0
