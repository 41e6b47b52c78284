"""Canny/Depth control LoRAs through --lora onto a plain [dev] transformer (issue 14): written in BFL's real layout
(unprefixed BFL names, `.lora_A.weight` / `.lora_B.weight` / `.lora_B.bias` on every linear, `img_in.lora_A` with
128 inputs, `*_norm.scale` tensors that replace the norms' scales, no alpha), then `--control-image` as with the
full Canny/Depth model, against diffusers' FluxControlPipeline on the same noise.

The oracle's transformer is the LoRA merged the way BFL's `LinearLora` computes it (written here from the layout,
independently of engine/formats/lora): img_in's weight padded with zero columns to 128 inputs, every weight
W + B·A, every bias b + B's bias, the norms' scales replaced; then laid out in diffusers' names by the oracle's
own BFL→diffusers map, whose final modulation swaps the (shift, scale) halves of the *rows* (B and its bias).
Not diffusers' `load_lora_weights`: it needs PEFT (and accelerate), which the test environment does not carry, and
diffusers 0.42.1's converter for these files (`_convert_bfl_flux_control_lora_to_diffusers`) hard-codes the 12B
shapes (19 + 38 blocks, width 3072) and, besides B's rows, swaps the halves of final_layer.adaLN_modulation.1's
lora_A (its rank axis), the bug diffusers PR #14001 fixed for kohya files (shown by the last test): FluxDeck
follows BFL.
"""

from __future__ import annotations

import inspect
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import FluxControlPipeline
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from PIL import Image
from safetensors.torch import save_file

from engine import fixtures
from engine.cli import main
from engine.contract.request import LoraSpec
from engine.formats import lora as lora_formats
from engine.generation.png_output import read_request
from engine.generation.sampling import make_noise, pack
from engine.runtime import ops
from tests.conftest import _make_set
from tests.oracle import build_pipeline, psnr
from tests.test_engine_matches_diffusers import FP32, MIN_PSNR, assert_close
from tests.test_gguf_engine import dequantized_back, gguf_models, t5_gguf_to_hf_names  # noqa: F401 (a fixture)
from tests.test_lora import flux_from

PROMPT, SEED, STEPS, WIDTH, HEIGHT, RANK = "a red door", 5, 2, 80, 64, 4


@pytest.fixture(autouse=True)
def posterior_mean(monkeypatch):
    monkeypatch.setattr(DiagonalGaussianDistribution, "sample", lambda self, generator=None: self.mean)


def control_lora(
    state: dict[str, torch.Tensor], control_in: int = 128, seed: int = 11
) -> dict[str, torch.Tensor]:
    """A tiny control LoRA in BFL's layout for this transformer state."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, weight in state.items():
        if name.endswith(".weight") and weight.ndim == 2:
            layer = name.removesuffix(".weight")
            rows, cols = weight.shape
            cols = control_in if layer == "img_in" else cols
            out[f"{layer}.lora_A.weight"] = torch.randn(RANK, cols, generator=g) / cols**0.5
            size = 2.0 if layer == "img_in" else 0.3  # img_in carries the whole control signal
            out[f"{layer}.lora_B.weight"] = torch.randn(rows, RANK, generator=g) * size / RANK**0.5
            out[f"{layer}.lora_B.bias"] = torch.randn(rows, generator=g) * 0.05
        elif name.endswith("_norm.scale"):
            out[name] = 0.2 + 6.0 * torch.rand(weight.shape, generator=g)  # sharper attention than the base
    return out


def merged_bfl(state: dict[str, torch.Tensor], lora: dict[str, torch.Tensor], strength: float = 1.0) -> dict:
    """BFL's LinearLora merged: pad, W + s·B·A, b + s·B's bias; norm scales replaced (whatever the strength)."""
    out = {k: v.float().clone() for k, v in state.items()}
    for name in lora:
        if name.endswith(".lora_A.weight"):
            layer = name.removesuffix(".lora_A.weight")
            down, up = lora[name].double(), lora[f"{layer}.lora_B.weight"].double()
            weight = out[f"{layer}.weight"].double()
            weight = F.pad(weight, (0, down.shape[1] - weight.shape[1]))
            out[f"{layer}.weight"] = (weight + strength * up @ down).float()
            out[f"{layer}.bias"] = out[f"{layer}.bias"] + strength * lora[f"{layer}.lora_B.bias"]
        elif name.endswith("_norm.scale"):
            out[name] = lora[name].float().clone()
    return out


@pytest.fixture(scope="module")
def case(dev_set, tmp_path_factory):
    root = tmp_path_factory.mktemp("control_lora")
    state = dev_set.stored_as_float()["transformer"]
    tensors = control_lora(state)
    path = root / "flux1-canny-dev-lora.safetensors"
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in tensors.items()}, str(path))
    as_stored = {k: v.to(torch.bfloat16).float() for k, v in tensors.items()}  # what the engine reads
    g = np.random.default_rng(3)
    small = g.integers(0, 256, (HEIGHT // 8, WIDTH // 8, 3), dtype=np.uint8)
    control = Image.fromarray(small).resize((WIDTH, HEIGHT), Image.Resampling.BICUBIC)
    control.save(root / "c.png")
    return dev_set, path, as_stored, str(root / "c.png"), control


def ours(tiny, tmp_path: Path, *args: str, models: Path | None = None) -> tuple[np.ndarray, dict]:
    out = tmp_path / f"out{len(list(tmp_path.glob('out*.png')))}.png"
    assert main(["generate", "--models-dir", str(models or tiny.models_dir), "--prompt", PROMPT, "--seed", str(SEED),
                 "--steps", str(STEPS), *args, *FP32, "--out", str(out)]) == 0  # fmt: skip
    return np.asarray(Image.open(out).convert("RGB")), read_request(out)


def theirs(
    tiny, transformer: dict[str, torch.Tensor], control: Image.Image, guidance: float = 30.0, **states
) -> np.ndarray:
    states = dict(tiny.stored_as_float(), transformer=transformer, **states)
    base = build_pipeline(states, tiny.clip_tokenizer, tiny.t5_tokenizer)
    wanted = inspect.signature(FluxControlPipeline.__init__).parameters
    pipe = FluxControlPipeline(**{k: v for k, v in base.components.items() if k in wanted})
    pipe.set_progress_bar_config(disable=True)
    noise = pack(make_noise(SEED, 1, HEIGHT, WIDTH))
    with torch.inference_mode():
        image = pipe(prompt=PROMPT, latents=noise, width=WIDTH, height=HEIGHT, num_inference_steps=STEPS,
                     max_sequence_length=512, output_type="np", control_image=control,
                     guidance_scale=guidance).images[0]  # fmt: skip
    return (image * 255).round().astype(np.uint8)


def test_control_lora_matches_diffusers_and_a_dropped_part_is_caught(case, tmp_path):
    tiny, path, lora, control_path, control = case
    base = tiny.stored_as_float()["transformer"]
    image, record = ours(tiny, tmp_path, "--lora", str(path), "--control-image", control_path)
    assert (record["width"], record["height"], record["guidance"]) == (WIDTH, HEIGHT, 30.0)  # Canny's
    expected = theirs(tiny, merged_bfl(base, lora), control)
    assert_close(image, expected)
    # the comparison would catch each part dropped: the control columns of img_in (the widening), the norm
    # scales, the LoRA's biases
    no_widening = dict(lora, **{"img_in.lora_A.weight": F.pad(lora["img_in.lora_A.weight"][:, :64], (0, 64))})
    no_norms = {k: v for k, v in lora.items() if not k.endswith("_norm.scale")}
    no_biases = {k: (v * 0 if k.endswith(".lora_B.bias") else v) for k, v in lora.items()}
    for name, broken in (("widening", no_widening), ("norms", no_norms), ("biases", no_biases)):
        wrong = theirs(tiny, merged_bfl(base, broken), control)
        print(f"without the {name}: {psnr(image, wrong):.1f} dB")
        assert psnr(image, wrong) < MIN_PSNR - 10, name


def test_control_lora_on_a_gguf_base(case, request, tmp_path):
    """The control preset's combination: a GGUF [dev] (img_in quantized here too: Q8_0/Q5_1/Q4_0 cycled) with the
    control LoRA; the oracle merges the LoRA into the file's dequantized weights (the gguf package's own)."""
    tiny, path, lora, control_path, control = case
    models = request.getfixturevalue("gguf_models")  # test_gguf_engine's folder: Q8_0/Q5_1/Q4_0 + Q8_0 T5
    image, _ = ours(tiny, tmp_path, "--lora", str(path), "--control-image", control_path, models=models)
    transformer = dequantized_back(models / "unet" / "flux1-dev-tiny-Q4_0.gguf")
    t5 = dequantized_back(models / "clip" / "t5-v1_1-xxl-encoder-Q8_0.gguf", t5_gguf_to_hf_names)
    assert_close(image, theirs(tiny, merged_bfl(transformer, lora), control, t5=t5))


def test_patched_weights_are_blf_linear_lora_and_clearing_restores_the_base(case):
    tiny, path, lora, _, _ = case
    base = tiny.stored_as_float()["transformer"]
    model = flux_from(base)
    notes = lora_formats.apply_loras(model, None, [LoraSpec(str(path), 0.6)])
    expected = merged_bfl(base, lora, 0.6)
    cpu = torch.device("cpu")
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            weight, bias = ops.fetch(module, torch.float32, cpu)
            torch.testing.assert_close(weight, expected[f"{name}.weight"], atol=2e-5, rtol=1e-4, msg=name)
            torch.testing.assert_close(bias, expected[f"{name}.bias"], atol=2e-5, rtol=1e-4, msg=name)
    assert ops.fetch(model.img_in, torch.float32, cpu)[0].shape[1] == 128
    norm = model.double_blocks[0].img_attn.norm.query_norm
    x = torch.randn(3, norm.scale.shape[0])
    replaced = lora["double_blocks.0.img_attn.norm.query_norm.scale"]
    torch.testing.assert_close(norm(x), x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * replaced)
    assert any("norm scales replaced" in n for n in notes) and not any("left out" in n for n in notes), notes
    lora_formats.apply_loras(model, None, [])
    assert ops.fetch(model.img_in, torch.float32, cpu)[0].shape[1] == 64
    torch.testing.assert_close(norm(x), x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * norm.scale)


def _refused(capsys, tiny, tmp_path: Path, *args: str) -> str:
    out = tmp_path / "refused.png"
    code = main(["generate", "--models-dir", str(tiny.models_dir), "--prompt", PROMPT, "--steps", "1", *args,
                 "--out", str(out)])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code == 2 and not out.exists() and "Traceback" not in err
    assert err.count("\n") == 0, err
    return err


def test_bad_control_lora_requests(case, tmp_path, tmp_path_factory, capsys):
    tiny, path, lora, control_path, _ = case
    assert "give --control-image" in _refused(capsys, tiny, tmp_path, "--lora", str(path))
    fill = _make_set(tmp_path_factory.mktemp("fill"), replace(fixtures.TinySpec(), in_channels=384))
    fill_file = next((fill.models_dir / "diffusion_models").glob("*.safetensors"))
    message = _refused(capsys, tiny, tmp_path, "--lora", str(fill_file), "--control-image", control_path)
    assert "FLUX.1 Fill transformer, not a LoRA" in message
    canny = _make_set(tmp_path_factory.mktemp("canny"), replace(fixtures.TinySpec(), in_channels=128))
    message = _refused(capsys, canny, tmp_path, "--lora", str(path), "--control-image", control_path)
    assert "goes on a plain FLUX.1 [dev] transformer" in message
    wide = tmp_path / "wide.safetensors"
    save_file({**lora, "img_in.lora_A.weight": torch.zeros(RANK, 384)}, str(wide))
    assert "only for the Canny/Depth" in _refused(
        capsys, tiny, tmp_path, "--lora", str(wide), "--control-image", control_path
    )


def test_diffusers_converter_swaps_lora_a_of_the_final_modulation(tmp_path):
    """Why the oracle above merges the LoRA itself: diffusers 0.42.1's converter for these files, on a file of the
    real 12B names and widths (rank 2, so it stays small), swaps B's rows and bias into diffusers' (scale, shift)
    order, rightly, but also the halves of final_layer.adaLN_modulation.1's lora_A — its rank axis — which pairs
    B's columns with the wrong rows of A. The right conversion swaps only B's rows and bias (what the oracle does
    through transformer_to_diffusers on merged weights) and FluxDeck follows BFL. When diffusers fixes this (as PR #14001
    did for kohya files) this test fails and the oracle may use load_lora_weights (with PEFT installed)."""
    from diffusers.loaders.lora_conversion_utils import _convert_bfl_flux_control_lora_to_diffusers

    h, mlp, rank = 3072, 12288, 2
    layers = {"img_in": (h, 128), "txt_in": (h, 4096), "final_layer.linear": (64, h)}
    layers |= {"final_layer.adaLN_modulation.1": (2 * h, h)}
    for name, inn in (("time_in", 256), ("vector_in", 768), ("guidance_in", 256)):
        layers |= {f"{name}.in_layer": (h, inn), f"{name}.out_layer": (h, h)}
    for i in range(19):
        for s in ("img", "txt"):
            b = f"double_blocks.{i}.{s}"
            layers |= {f"{b}_mod.lin": (6 * h, h), f"{b}_attn.qkv": (3 * h, h), f"{b}_attn.proj": (h, h)}
            layers |= {f"{b}_mlp.0": (mlp, h), f"{b}_mlp.2": (h, mlp)}
    for i in range(38):
        b = f"single_blocks.{i}"
        layers |= {
            f"{b}.modulation.lin": (3 * h, h),
            f"{b}.linear1": (3 * h + mlp, h),
            f"{b}.linear2": (h, h + mlp),
        }
    g = torch.Generator().manual_seed(0)
    sd = {}
    for name, (out, inn) in layers.items():
        sd[f"{name}.lora_A.weight"] = torch.randn(rank, inn, generator=g)
        sd[f"{name}.lora_B.weight"] = torch.randn(out, rank, generator=g)
        sd[f"{name}.lora_B.bias"] = torch.randn(out, generator=g)
    for i in range(19):
        for s in ("img", "txt"):
            for n in ("query", "key"):
                sd[f"double_blocks.{i}.{s}_attn.norm.{n}_norm.scale"] = torch.ones(128)
    for i in range(38):
        for n in ("query", "key"):
            sd[f"single_blocks.{i}.norm.{n}_norm.scale"] = torch.ones(128)
    final = "final_layer.adaLN_modulation.1"
    down, up, bias = sd[f"{final}.lora_A.weight"], sd[f"{final}.lora_B.weight"], sd[f"{final}.lora_B.bias"]
    converted = _convert_bfl_flux_control_lora_to_diffusers(dict(sd))
    theirs_down = converted["transformer.norm_out.linear.lora_A.weight"]
    theirs_up = converted["transformer.norm_out.linear.lora_B.weight"]
    theirs_bias = converted["transformer.norm_out.linear.lora_B.bias"]
    assert torch.equal(theirs_down, torch.cat([down[1:], down[:1]]))  # the rank axis swapped
    swap = lambda t: torch.cat([t[h:], t[:h]])  # noqa: E731  (shift, scale) → (scale, shift)
    assert torch.equal(theirs_up, swap(up)) and torch.equal(theirs_bias, swap(bias))  # these are right
    assert not torch.allclose(theirs_up @ theirs_down, swap(up) @ down)  # the product is not
