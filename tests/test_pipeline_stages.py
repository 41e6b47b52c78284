"""The staged pipeline's seams: what denoise hands the transformer (edit conditioning, control, the step cache,
CFG rows), cancel and NaN, references' positions, and the ModelCache's RAM policy within a job."""

from __future__ import annotations

import threading

import pytest
import torch
from torch import nn

from engine.contract.errors import Cancelled, UserError
from engine.generation import model_cache
from engine.generation.denoise import denoise
from engine.generation.model_cache import ModelCache
from engine.generation.prepare import Inputs, with_references
from engine.models.flux1 import ControlResiduals, FluxParams, position_embedding
from engine.runtime.memory import MemoryManager

L_IMG, L_TXT = 6, 4


class Recorder(nn.Module):
    """A stand-in transformer: records what it is given and predicts a constant velocity."""

    def __init__(self, velocity: float = 0.0):
        super().__init__()
        self.velocity = velocity
        self.calls: list[dict] = []

    def forward(self, img, img_ids, txt, txt_ids, timesteps, y, guidance, pe, **kwargs):
        self.calls.append({"img": img, "txt": txt, "timesteps": timesteps, "pe": pe, **kwargs})
        return torch.full_like(img, self.velocity)


def inputs(passes: int = 1, batch: int = 1, **slots) -> Inputs:
    rows = passes * batch
    return Inputs(
        x=torch.randn(batch, L_IMG, 64), times=[1.0, 0.5, 0.0], img_ids=torch.zeros(1, L_IMG, 3),
        txt_ids=torch.zeros(1, L_TXT, 3), pe=torch.zeros(1), txt=torch.randn(rows, L_TXT, 8), y=torch.randn(rows, 4),
        guidance=None, passes=passes, cfg=3.0, height=32, width=48, **slots,
    )  # fmt: skip


def run(transformer, job: Inputs, cache=None, cancel=None) -> torch.Tensor:
    return denoise(
        transformer, job, cache, lambda report: None, cancel or threading.Event(),
        memory=MemoryManager(torch.device("cpu")), on_event=lambda e: None, nonfinite_cause=lambda: "the test's cause",
    )  # fmt: skip


def test_edit_slots_and_control_reach_the_transformer_for_every_cfg_row():
    img_cond = torch.randn(2, L_IMG, 4)
    ref_img, ref_ids = torch.randn(2, 3, 64), torch.ones(1, 3, 3)
    seen_control = []

    def control(img, timesteps):
        seen_control.append((img.shape, timesteps.tolist()))
        return ControlResiduals()

    cache = object()
    job = inputs(passes=2, batch=2, img_cond=img_cond, ref_img=ref_img, ref_ids=ref_ids, control=control)
    model = Recorder()
    out = run(model, job, cache=cache)
    assert torch.equal(out, job.x)  # zero velocity: the latents stay
    assert len(model.calls) == 2
    first = model.calls[0]
    assert torch.equal(first["img_cond"], torch.cat([img_cond, img_cond]))  # prompt rows, then negative rows
    assert torch.equal(first["ref_img"], torch.cat([ref_img, ref_img]))
    assert first["ref_ids"] is ref_ids and first["cache"] is cache
    assert isinstance(first["control"], ControlResiduals)
    assert seen_control == [((4, L_IMG, 64), [1.0] * 4), ((4, L_IMG, 64), [0.5] * 4)]
    assert first["timesteps"].dtype == torch.float32


def test_without_edit_features_the_slots_stay_empty():
    model = Recorder()
    run(model, inputs())
    assert all(model.calls[0][k] is None for k in ("img_cond", "ref_img", "ref_ids", "control", "cache"))


def test_true_cfg_combines_the_two_passes():
    class Split(Recorder):
        def forward(self, img, *args, **kwargs):
            return torch.cat([torch.full_like(img[:1], 2.0), torch.full_like(img[1:], 1.0)])

    job = inputs(passes=2)
    out = run(Split(), job)
    # v = 1 + 3·(2 − 1) = 4 over t 1 → 0
    assert torch.allclose(out, job.x - 4.0)


def test_cancel_stops_before_a_step():
    cancel = threading.Event()
    cancel.set()
    model = Recorder()
    with pytest.raises(Cancelled):
        run(model, inputs(), cancel=cancel)
    assert model.calls == []


def test_nonfinite_latents_name_their_cause_after_the_step():
    with pytest.raises(UserError, match=r"at step 1 of 2.*the likely cause is the test's cause\."):
        run(Recorder(velocity=float("nan")), inputs())


def test_references_get_their_own_positions():
    params = FluxParams(64, 8, 4, 16, 32, 2, 1, 1, (2, 2, 4), True, True)
    job = inputs()
    ref_ids = torch.tensor([[[1.0, 0, 0], [1, 0, 1]]])
    with_refs = with_references(job, torch.randn(1, 2, 64), ref_ids, params)
    expected = position_embedding(
        torch.cat((job.txt_ids, job.img_ids, ref_ids), 1), params.axes_dim, params.theta
    )
    assert torch.equal(with_refs.pe, expected) and with_refs.ref_ids is ref_ids and job.ref_ids is None


def test_a_model_the_job_still_uses_is_never_let_go(dev_set, monkeypatch):
    """RAM for the transformer and half the autoencoder: the autoencoder an img2img job loads before denoising
    leaves the transformer loaded; once the transformer's stage is done, a load may let it go."""
    from engine.formats.weights import find_components, open_weights

    components = {r: find_components(open_weights(p))[r] for r, p in dev_set.paths.items()}
    room = components["transformer"].nbytes + components["vae"].nbytes // 2
    monkeypatch.setattr(model_cache, "_total_ram", lambda: int(room / model_cache.RAM_SHARE))
    cpu = torch.device("cpu")
    models = ModelCache("auto")
    models.start_job(cpu, None)
    transformer = models.use(components["transformer"], torch.float32, cpu)
    models.use(components["vae"], torch.float32, cpu)
    assert models.roles == ["transformer", "vae"] and models.loaded("transformer") is transformer
    models.release(("transformer",))
    models.use(components["vae"], torch.bfloat16, cpu)  # another precision: loaded again
    assert models.roles == ["vae"]
    assert models.loads == {"transformer": 1, "vae": 2}
    assert models.key("vae").dtype == torch.bfloat16
