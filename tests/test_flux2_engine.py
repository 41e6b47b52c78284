"""FLUX.2 [klein] txt2img through Engine.generate against diffusers' Flux2KleinPipeline on the same tiny random
models (written to a ComfyUI models folder in the real layouts), same seed, ≥ 45 dB; the CFG variant; that the
comparison catches a wrong text-encoder layer choice and a wrong shift; and mismatched families refused.

Scheduler settings (klein's scheduler_config.json, not readable offline here; both sides use these):
FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
base_image_seq_len=256, max_image_seq_len=4096, base_shift=0.5, max_shift=1.15, time_shift_type="exponential").
With sigmas given and mu passed, only use_dynamic_shifting and the exponential shift act.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline
from PIL import Image
from safetensors.torch import save_file
from transformers import AutoTokenizer, Qwen3ForCausalLM

from engine.cli import main as cli_main
from engine.contract.request import GenerateRequest, ModelFiles
from engine.fixtures import write_tiny_model_set
from engine.fixtures_flux2 import Flux2Spec, flux2_ae_state, flux2_state, qwen3_state, write_qwen3_tokenizer
from engine.generation import flux2_stages
from engine.generation.pipeline import Engine, EngineOptions
from engine.models.autoencoder import AutoEncoderParams
from engine.models.flux2 import Flux2Params
from engine.models.flux2_autoencoder import canonical_names
from tests.metrics import psnr
from tests.test_flux2_parity import (
    ae_to_diffusers,
    diffusers_autoencoder,
    diffusers_transformer,
    transformer_to_diffusers,
)

MIN_PSNR = 45.0
SIZE = 64
SEED = 7
PROMPT = "a cat under a red sky"


def _shapes(state):
    return {k: tuple(v.shape) for k, v in state.items()}


@pytest.fixture(scope="module")
def klein(tmp_path_factory):
    """A models folder with the tiny FLUX.2 set, and diffusers' pipeline built from the same weights."""
    root = tmp_path_factory.mktemp("klein_models")
    spec = Flux2Spec()
    vocab = write_qwen3_tokenizer(root / "tokenizers" / "qwen3")
    transformer, ae, qwen = flux2_state(spec), flux2_ae_state(spec), qwen3_state(spec, vocab)
    for folder, name, state in (
        ("diffusion_models", "flux-2-klein-tiny.safetensors", transformer),
        ("vae", "flux2-vae.safetensors", ae),
        ("text_encoders", "qwen_3_tiny.safetensors", qwen),
    ):
        (root / folder).mkdir()
        save_file({k: v.contiguous() for k, v in state.items()}, str(root / folder / name))

    p = Flux2Params.from_shapes(_shapes(transformer))
    their_transformer = diffusers_transformer(p)
    their_transformer.load_state_dict(transformer_to_diffusers(transformer, p), strict=True)
    ae_params = AutoEncoderParams.from_shapes(_shapes(canonical_names(ae)))
    their_vae = diffusers_autoencoder(ae_params)
    their_vae.load_state_dict(ae_to_diffusers(ae, ae_params), strict=True)
    text_encoder = Qwen3ForCausalLM(spec.qwen3_config(vocab))
    text_encoder.load_state_dict(qwen, strict=False)  # lm_head is tied to the embeddings
    text_encoder.tie_weights()
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_image_seq_len=256,
        max_image_seq_len=4096,
        base_shift=0.5,
        max_shift=1.15,
        time_shift_type="exponential",
    )
    pipe = Flux2KleinPipeline(
        scheduler=scheduler,
        vae=their_vae,
        text_encoder=text_encoder.eval(),
        tokenizer=AutoTokenizer.from_pretrained(str(root / "tokenizers" / "qwen3")),
        transformer=their_transformer,
        is_distilled=False,  # so guidance_scale > 1 runs CFG, as klein base does
    )
    return root, pipe


def _theirs(pipe, steps: int, cfg: float) -> np.ndarray:
    with torch.inference_mode():
        out = pipe(
            prompt=PROMPT,
            height=SIZE,
            width=SIZE,
            num_inference_steps=steps,
            guidance_scale=cfg,
            generator=torch.Generator("cpu").manual_seed(SEED),
            output_type="np",
            max_sequence_length=512,
        ).images[0]
    return (out * 255).round().astype(np.uint8)


def _ours(root, out_dir, **overrides) -> np.ndarray:
    request = GenerateRequest(
        prompt=PROMPT,
        width=SIZE,
        height=SIZE,
        seed=SEED,
        device="cpu",
        dtype="fp32",
        out=str(out_dir / "klein.png"),
        files=ModelFiles(models_dir=str(root)),
        **overrides,
    )
    (path,) = Engine(EngineOptions(keep_models="never")).generate(request)
    return np.asarray(Image.open(path).convert("RGB"))


def test_txt2img_matches_the_pipeline(klein, tmp_path):
    root, pipe = klein
    ours = _ours(root, tmp_path)  # steps: klein's default 4
    theirs = _theirs(pipe, 4, 1.0)
    print(f"PSNR {psnr(ours, theirs):.1f} dB, oracle std {theirs.std():.1f}")
    assert theirs.std() > 5  # an image with content, not a flat colour
    assert psnr(ours, theirs) >= MIN_PSNR


def test_cfg_matches_the_pipeline(klein, tmp_path):
    """--cfg above 1 without --negative: true CFG against "", as the pipeline always does."""
    root, pipe = klein
    ours = _ours(root, tmp_path, cfg=4.0, steps=3)
    theirs = _theirs(pipe, 3, 4.0)
    print(f"PSNR CFG {psnr(ours, theirs):.1f} dB")
    assert psnr(ours, theirs) >= MIN_PSNR
    assert psnr(ours, _theirs(pipe, 3, 1.0)) < MIN_PSNR - 10  # CFG changes the image


def test_the_comparison_catches_a_wrong_layer_and_a_wrong_shift(klein, tmp_path, monkeypatch):
    root, pipe = klein
    theirs = _theirs(pipe, 4, 1.0)
    import engine.generation.flux2_stages as stages

    right = stages.encode_qwen3
    monkeypatch.setattr(stages, "encode_qwen3", lambda *a, **k: right(*a, layers=(8, 17, 26), **k))
    wrong_layers = _ours(root, tmp_path / "l")  # Engine without cache_dir: no embedding cache
    monkeypatch.undo()
    monkeypatch.setattr(stages, "empirical_mu", lambda tokens, steps: 1.15)  # [dev]'s shift at 4096 tokens
    wrong_shift = _ours(root, tmp_path / "s")
    print(
        f"PSNR wrong layers {psnr(wrong_layers, theirs):.1f} dB, wrong shift {psnr(wrong_shift, theirs):.1f}"
    )
    assert psnr(wrong_layers, theirs) < MIN_PSNR - 3  # the tiny transformer reads text weakly
    assert psnr(wrong_shift, theirs) < MIN_PSNR - 3


def test_schedule_is_the_pipelines():
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, time_shift_type="exponential")
    for steps, tokens in ((4, 16), (4, 4096), (28, 1024), (50, 8192)):
        mu = flux2_stages.empirical_mu(tokens, steps)
        scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
        assert flux2_stages.schedule(steps, tokens) == pytest.approx(scheduler.sigmas.tolist(), abs=1e-6)


def test_noise_is_the_convention():
    noise = flux2_stages.make_noise(3, 2, 32, 48)
    expected = torch.randn(
        (2, 128, 2, 3), generator=torch.Generator("cpu").manual_seed(3), dtype=torch.float32
    )
    assert torch.equal(noise, expected)


# ---- bad input: exit 2, one sentence, no PNG ----


@pytest.fixture(scope="module")
def flux1(tmp_path_factory):
    return {role: str(path) for role, path in write_tiny_model_set(tmp_path_factory.mktemp("flux1")).items()}


def _files(folder, ext=".safetensors"):
    return sorted(p for p in folder.rglob("*" + ext))


def _run(tmp_path, capsys, args) -> str:
    out = tmp_path / "bad.png"
    code = cli_main(
        ["generate", "--prompt", "x", "--width", "64", "--height", "64", "--out", str(out), *args]
    )
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert code == 2
    assert not out.exists() and not list(tmp_path.glob("*.png"))
    assert len(errors) == 1 and errors[0].endswith(".")
    return errors[0]


def test_mismatched_families_are_refused(klein, flux1, tmp_path, capsys):
    root, _ = klein
    transformer = str(_files(root / "diffusion_models")[0])
    qwen = str(_files(root / "text_encoders")[0])
    vae2 = str(_files(root / "vae")[0])
    flux1_vae, flux1_t5, flux1_transformer = flux1["vae"], flux1["t5"], flux1["transformer"]
    err = _run(tmp_path, capsys, ["--transformer", transformer, "--text-encoder", qwen, "--vae", flux1_vae])
    assert flux1_vae in err and "FLUX.1" in err
    err = _run(tmp_path, capsys, ["--transformer", transformer, "--t5", flux1_t5, "--vae", vae2,
                                  "--text-encoder", qwen])  # fmt: skip
    assert flux1_t5 in err
    err = _run(tmp_path, capsys, ["--transformer", flux1_transformer, "--clip", flux1["clip"], "--t5", flux1_t5,
                                  "--vae", vae2])  # fmt: skip
    assert vae2 in err and "FLUX.2" in err
    err = _run(tmp_path, capsys, ["--transformer", flux1_transformer, "--clip", flux1["clip"], "--t5", flux1_t5,
                                  "--vae", flux1_vae, "--text-encoder", qwen])  # fmt: skip
    assert qwen in err


def test_unsupported_flags_are_refused(klein, tmp_path, tmp_path_factory, capsys):
    root, _ = klein
    init = tmp_path_factory.mktemp("init") / "init.png"
    Image.new("RGB", (64, 64)).save(init)
    err = _run(tmp_path, capsys, ["--models-dir", str(root), "--init-image", str(init), "--device", "cpu"])
    assert "--init-image" in err and "FLUX.2" in err
