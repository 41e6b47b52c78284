"""LoRAs on FLUX.2 [klein] through the CLI, at the FLUX.1 chokepoint, against an explicit oracle: the engine's run of
a transformer file whose every patched weight is W + strength · (alpha/rank) · up @ down (diffusers' own
load_lora_weights needs PEFT, which is not installed here).

One random LoRA on every linear layer of the tiny klein transformer, in BFL terms, written in the layouts klein
trainers publish: diffusers/PEFT (diffusers' Flux2Transformer2DModel module names under `transformer.`, lora_A /
lora_B, alpha in `lora_adapter_metadata`; derived from the BFL pairs through the renaming checked against diffusers'
converter in tests/test_flux2_parity.py, so fused q/k/v rows and the swapped final modulation are exercised), BFL
names under `diffusion_model.` with lora_A / lora_B, and kohya (`lora_unet_` + underscored BFL names, lora_down /
lora_up / alpha). Each gives the oracle's image (≥ 45 dB) and not the base model's; a tensor that fits no layer
refuses the LoRA by name (exit 2, no PNG)."""

from __future__ import annotations

import json

import pytest
import torch

from engine.formats.lora.flux2_layouts import FLUX2_LAYOUTS
from engine.models.flux2 import Flux2Params
from tests.metrics import psnr
from tests.test_flux2_engine import _run
from tests.test_flux2_formats import _png, _save, klein  # noqa: F401 (the fixture)
from tests.test_flux2_parity import transformer_to_diffusers

MIN_PSNR = 45.0
RANK, ALPHA, STRENGTH = 4, 8.0, 0.7


def _linear_weights(state) -> list[str]:
    return [k for k, v in state.items() if k.endswith(".weight") and v.ndim == 2]


def _bfl_pairs(state) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{BFL layer: (down rank×in, up out×rank)}, sized so each delta is comparable to the weight it patches."""
    g = torch.Generator().manual_seed(3)
    pairs = {}
    for name in _linear_weights(state):
        out_f, in_f = state[name].shape
        down = torch.randn(RANK, in_f, generator=g) / in_f**0.5
        up = torch.randn(out_f, RANK, generator=g) * float(state[name].float().std()) / 2
        pairs[name.removesuffix(".weight")] = (down, up)
    return pairs


def _merged(state, pairs) -> dict[str, torch.Tensor]:
    out = {k: v.float().clone() for k, v in state.items()}
    for layer, (down, up) in pairs.items():
        out[layer + ".weight"] += STRENGTH * (ALPHA / RANK) * up @ down
    return out


def _peft_diffusers(state, pairs) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The same LoRA under diffusers' module names: each module's up is the rows the renaming gives its weight
    (split q/k/v, swapped final-modulation halves), its down the down of the BFL layer its rows came from."""
    p = Flux2Params.from_shapes({k: tuple(v.shape) for k, v in state.items()})
    layers = list(pairs)
    ups = transformer_to_diffusers({f"{layer}.weight": pairs[layer][1] for layer in layers}, p)
    origin = transformer_to_diffusers(
        {f"{layer}.weight": torch.full((state[f"{layer}.weight"].shape[0], 1), float(i)) for i, layer in
         enumerate(layers)}, p)  # fmt: skip
    tensors = {}
    for name, up in ups.items():
        module = name.removesuffix(".weight")
        down = pairs[layers[int(origin[name][0, 0])]][0]
        tensors[f"transformer.{module}.lora_A.weight"] = down.clone()  # q, k, v share it: stored once each
        tensors[f"transformer.{module}.lora_B.weight"] = up
    metadata = {"lora_adapter_metadata": json.dumps({"transformer.r": RANK, "transformer.lora_alpha": ALPHA})}
    return tensors, metadata


def _bfl_peft(pairs):
    tensors = {}
    for layer, (down, up) in pairs.items():
        tensors[f"diffusion_model.{layer}.lora_A.weight"] = down
        tensors[f"diffusion_model.{layer}.lora_B.weight"] = up
        tensors[f"diffusion_model.{layer}.alpha"] = torch.tensor(ALPHA)
    return tensors, {}


def _kohya(pairs):
    tensors = {}
    for layer, (down, up) in pairs.items():
        key = "lora_unet_" + layer.replace(".", "_")
        tensors[f"{key}.lora_down.weight"] = down.to(torch.bfloat16).float()
        tensors[f"{key}.lora_up.weight"] = up.to(torch.bfloat16).float()
        tensors[f"{key}.alpha"] = torch.tensor(ALPHA)
    return tensors, {}


@pytest.fixture(scope="module")
def lora_setup(klein, tmp_path_factory):  # noqa: F811
    root, tokenizer, states, paths = klein
    folder = tmp_path_factory.mktemp("klein_loras")
    pairs = _bfl_pairs(states["transformer"])
    merged = _save(folder / "merged.safetensors", _merged(states["transformer"], pairs))
    oracle = _png(folder, "oracle", paths | {"transformer": merged}, tokenizer)
    base = _png(folder, "base", paths, tokenizer)
    return pairs, oracle, base


@pytest.mark.parametrize("layout", ["diffusers_peft", "bfl_peft", "kohya"])
def test_klein_lora_equals_the_merged_weights(klein, lora_setup, tmp_path, layout):  # noqa: F811
    root, tokenizer, states, paths = klein
    pairs, oracle, base = lora_setup
    if layout == "diffusers_peft":
        tensors, metadata = _peft_diffusers(states["transformer"], pairs)
    elif layout == "bfl_peft":
        tensors, metadata = _bfl_peft(pairs)
    else:
        pairs = {
            k: (d.to(torch.bfloat16).float(), u.to(torch.bfloat16).float()) for k, (d, u) in pairs.items()
        }
        oracle_path = _save(tmp_path / "merged.safetensors", _merged(states["transformer"], pairs))
        oracle = _png(tmp_path, "oracle_bf16", paths | {"transformer": oracle_path}, tokenizer)
        tensors, metadata = _kohya(pairs)
    lora = _save(tmp_path / f"klein_{layout}.safetensors", tensors, metadata)
    ours = _png(tmp_path, layout, paths, tokenizer, "--lora", f"{lora}:{STRENGTH}")
    print(f"{layout}: {psnr(ours, oracle):.1f} dB vs the merged weights, {psnr(ours, base):.1f} vs no LoRA")
    assert psnr(ours, oracle) >= MIN_PSNR
    assert psnr(ours, base) < MIN_PSNR - 10  # the LoRA matters: a dropped one is caught


def test_the_diffusers_names_cover_every_layer(klein):  # noqa: F811
    """Every linear layer of the FLUX.2 transformer has a diffusers name, every row of a fused one exactly once."""
    _, _, states, _ = klein
    state = states["transformer"]
    p = Flux2Params.from_shapes({k: tuple(v.shape) for k, v in state.items()})
    layers = [k.removesuffix(".weight") for k in _linear_weights(state)]
    names = FLUX2_LAYOUTS[0].names(layers, p)
    rows_of = {}
    for key, targets in names.items():
        if not key.startswith("sformer_blocks."):  # the alias some exports write, counted once
            for t in (t for t in targets if t.layer in layers):
                start, end = t.rows or (0, state[t.layer + ".weight"].shape[0])
                rows_of[t.layer] = rows_of.get(t.layer, 0) + end - start
    assert rows_of == {layer: state[layer + ".weight"].shape[0] for layer in layers}
    assert names["sformer_blocks.0.attn.to_q"] == names["transformer_blocks.0.attn.to_q"]
    assert set(FLUX2_LAYOUTS[0].names(layers, None)) == set()


def test_an_unknown_key_refuses_the_lora_by_name(klein, lora_setup, tmp_path, capsys):  # noqa: F811
    root, tokenizer, states, paths = klein
    pairs, _, _ = lora_setup
    tensors, metadata = _peft_diffusers(states["transformer"], pairs)
    tensors["transformer.transformer_blocks.0.attn.to_z.lora_A.weight"] = torch.zeros(RANK, 64)
    tensors["transformer.transformer_blocks.0.attn.to_z.lora_B.weight"] = torch.zeros(64, RANK)
    lora = _save(tmp_path / "inputs_odd.safetensors", tensors, metadata)
    files = [arg for role, path in paths.items() for arg in (f"--{role.replace('_', '-')}", str(path))]
    err = _run(tmp_path, capsys, [*files, "--text-tokenizer", str(tokenizer), "--device", "cpu",
                                  "--lora", str(lora)])  # fmt: skip
    assert "transformer.transformer_blocks.0.attn.to_z.lora_A.weight" in err and str(lora) in err


def test_flux1_sized_layers_refuse_the_lora(klein, tmp_path, capsys):  # noqa: F811
    """A FLUX.1 LoRA (its single blocks' proj_mlp) on klein: refused by name, not half applied."""
    root, tokenizer, states, paths = klein
    tensors = {
        "transformer.single_transformer_blocks.0.proj_mlp.lora_A.weight": torch.zeros(RANK, 64),
        "transformer.single_transformer_blocks.0.proj_mlp.lora_B.weight": torch.zeros(256, RANK),
    }
    lora = _save(tmp_path / "flux1_lora.safetensors", tensors)
    files = [arg for role, path in paths.items() for arg in (f"--{role.replace('_', '-')}", str(path))]
    err = _run(tmp_path, capsys, [*files, "--text-tokenizer", str(tokenizer), "--device", "cpu",
                                  "--lora", str(lora)])  # fmt: skip
    assert "proj_mlp" in err and "FLUX.2" in err


def test_the_comparison_catches_crossed_blocks(klein, lora_setup, tmp_path, monkeypatch):  # noqa: F811
    """Single blocks 0 and 1 mapped to each other (klein-only names): the image shows it."""
    from engine.formats.lora import flux2_layouts

    root, tokenizer, states, paths = klein
    pairs, oracle, _ = lora_setup
    right = flux2_layouts.Flux2Diffusers.names

    def crossed(self, layers, params):
        names = right(self, layers, params)
        for key in [k for k in names if k.startswith("single_transformer_blocks.0.")]:
            other = key.replace(".0.", ".1.", 1)
            names[key], names[other] = names[other], names[key]
        return names

    monkeypatch.setattr(flux2_layouts.Flux2Diffusers, "names", crossed)
    lora = _save(tmp_path / "klein.safetensors", *_peft_diffusers(states["transformer"], pairs))
    wrong = _png(tmp_path, "crossed", paths, tokenizer, "--lora", f"{lora}:{STRENGTH}")
    print(f"single blocks crossed: {psnr(wrong, oracle):.1f} dB")
    assert psnr(wrong, oracle) < MIN_PSNR - 3
