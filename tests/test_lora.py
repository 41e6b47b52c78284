"""LoRAs: every layout lands on the right weights (and rows), the CLI's images equal diffusers' with the deltas
merged into the same weights, stacking, fp8 bases, streamed weights, exact removal, bad input, PNG metadata."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from engine import fixtures
from engine.cli import main
from engine.contract.errors import UserError
from engine.contract.request import GenerateRequest, LoraSpec, ModelFiles
from engine.formats import lora
from engine.generation.pipeline import Engine
from engine.generation.png_output import parameters_text
from engine.generation.sampling import make_noise
from engine.models.flux1 import Flux, FluxParams
from engine.runtime import ops
from tests import lora_layouts as layouts
from tests.oracle import build_pipeline, psnr, run_pipeline, transformer_to_diffusers

MIN_PSNR = 45.0
PROMPT, SEED, SIZE, STEPS = "a photo of a cat", 7, 64, 2
IMAGE_ARGS = [
    "--prompt",
    PROMPT,
    "--width",
    str(SIZE),
    "--height",
    str(SIZE),
    "--steps",
    str(STEPS),
    "--dtype",
    "fp32",
]
IMAGE_ARGS += ["--seed", str(SEED)]


# ---- helpers ----


def flux_from(state: dict[str, torch.Tensor]) -> Flux:
    p = FluxParams.from_shapes({k: tuple(v.shape) for k, v in state.items()})
    with torch.device("meta"):
        model = Flux(p)
    return ops.load_into(model, dict(state), {}, torch.float32)


def fetched(model: torch.nn.Module, dtype=torch.float32) -> dict[str, torch.Tensor]:
    """Every linear layer's weight as the chokepoint hands it to the layer (patches applied)."""
    return {
        f"{name}.weight": ops.fetch(m, dtype, torch.device("cpu"))[0]
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear)
    }


def assert_weights(ours: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], atol=2e-5) -> None:
    assert ours, "no weights compared"
    for name, weight in ours.items():
        torch.testing.assert_close(weight.float(), expected[name].float(), atol=atol, rtol=1e-4, msg=name)


def transformer_float(tiny) -> dict[str, torch.Tensor]:
    return tiny.stored_as_float()["transformer"]


def to_diffusers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    p = FluxParams.from_shapes({k: tuple(v.shape) for k, v in state.items()})
    return transformer_to_diffusers(state, p)


def png(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def cli_image(tmp_path: Path, name: str, *args: str) -> tuple[np.ndarray, Path]:
    out = tmp_path / f"{name}.png"
    assert main(["generate", *args, *IMAGE_ARGS, "--out", str(out)]) == 0
    return png(out), out


class Oracle:
    """One FluxPipeline on the tiny set's weights; each image loads its own (merged) transformer weights."""

    def __init__(self, tiny):
        self.tiny = tiny
        self.pipe = build_pipeline(tiny.stored_as_float(), tiny.clip_tokenizer, tiny.t5_tokenizer)

    def image(self, bfl_transformer: dict[str, torch.Tensor], diffusers_loras=()) -> np.ndarray:
        state = layouts.merged(to_diffusers(bfl_transformer), list(diffusers_loras))
        self.pipe.transformer.load_state_dict(state, strict=True)
        noise = make_noise(SEED, 1, SIZE, SIZE)
        kwargs = dict(width=SIZE, height=SIZE, num_inference_steps=STEPS, guidance_scale=3.5)
        return run_pipeline(self.pipe, noise, prompt=PROMPT, max_sequence_length=512, **kwargs)[0]


def assert_close(ours: np.ndarray, theirs: np.ndarray) -> None:
    assert theirs.std() > 2.0, "the oracle's image is flat: the tiny model draws nothing to compare"
    print(f"PSNR {psnr(ours, theirs):.1f} dB")
    assert psnr(ours, theirs) >= MIN_PSNR


@pytest.fixture(scope="module")
def oracle(dev_set) -> Oracle:
    return Oracle(dev_set)


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("loras")


@pytest.fixture(scope="module")
def base_image(dev_set, tmp_path_factory) -> np.ndarray:
    return cli_image(tmp_path_factory.mktemp("base"), "base", "--models-dir", str(dev_set.models_dir))[0]


@pytest.fixture(scope="module")
def peft_case(dev_set, oracle, lora_dir):
    """A diffusers/PEFT LoRA on every layer at strength 0.7, and the oracle's image for it (merged by diffusers'
    own names into diffusers' own modules: no BFL mapping involved)."""
    base = transformer_float(dev_set)
    tiny_lora = layouts.peft(lora_dir / "peft_style.safetensors", to_diffusers(base))
    return tiny_lora, oracle.image(base, [(tiny_lora, 0.7)])


# ---- each layout on the right weights and rows ----


@pytest.mark.parametrize("layout", ["kohya", "comfy", "peft", "peft-bare", "xlabs"])
def test_each_layout_lands_on_the_right_weights(dev_set, tmp_path, layout):
    base = transformer_float(dev_set)
    path = tmp_path / f"{layout}.safetensors"
    if layout == "kohya":
        tiny_lora = layouts.kohya(path, base)
    elif layout == "comfy":
        tiny_lora = layouts.comfy(path, base)
    elif layout == "xlabs":
        tiny_lora = layouts.xlabs(path, dev_set.spec.flux_params())
    else:
        prefix = "transformer." if layout == "peft" else ""
        tiny_lora = layouts.peft(path, to_diffusers(base), prefix=prefix)
    model = flux_from(base)
    notes = lora.apply_loras(model, None, [LoraSpec(str(path), 0.8)])
    assert len(notes) == 1 and notes[0].startswith(f"LoRA {layout} at strength 0.8: ")  # nothing left over
    ours = fetched(model)
    if tiny_lora.space == "diffusers":  # compared in diffusers' layout: q/k/v/proj_mlp rows, norm_out halves
        assert_weights(to_diffusers(base | ours), layouts.merged(to_diffusers(base), [(tiny_lora, 0.8)]))
    else:
        assert_weights(ours, layouts.merged(base, [(tiny_lora, 0.8)]))
    changed = {n for n in ours if not torch.equal(ours[n], base[n])}
    if tiny_lora.space == "bfl":
        assert changed == {f"{d.name}.weight" for d in tiny_lora.deltas}
    else:
        assert changed == set(ours)


def test_kohya_names_of_diffusers_modules_and_old_diffusers_pairs(dev_set, tmp_path):
    """`lora_transformer_<diffusers name>` (OneTrainer/SimpleTuner kohya export) and `.lora.down/.lora.up`."""
    base = transformer_float(dev_set)
    tiny_lora = layouts.peft(tmp_path / "src.safetensors", to_diffusers(base), prefix="", alpha=4.0)
    tensors = {}
    for d in tiny_lora.deltas:
        kohya_key = "lora_transformer_" + d.name.replace(".", "_")
        tensors[f"{kohya_key}.lora_down.weight"] = d.down
        tensors[f"{kohya_key}.lora_up.weight"] = d.up
        tensors[f"{kohya_key}.alpha"] = torch.tensor(4.0)
    path = layouts.write_raw(tmp_path / "kohya_diffusers.safetensors", tensors)
    model = flux_from(base)
    lora.apply_loras(model, None, [LoraSpec(str(path), 1.0)])
    assert_weights(
        to_diffusers(base | fetched(model)), layouts.merged(to_diffusers(base), [(tiny_lora, 1.0)])
    )

    old = {f"transformer.{d.name}.lora.down.weight": d.down for d in tiny_lora.deltas}
    old |= {f"transformer.{d.name}.lora.up.weight": d.up for d in tiny_lora.deltas}
    path = layouts.write_raw(tmp_path / "old_diffusers.safetensors", old)  # no alpha: scale 1
    lora.apply_loras(model, None, [LoraSpec(str(path), 1.0)])
    for d in tiny_lora.deltas:
        d.scale = 1.0
    assert_weights(
        to_diffusers(base | fetched(model)), layouts.merged(to_diffusers(base), [(tiny_lora, 1.0)])
    )


def test_clip_lora(dev_set, tmp_path):
    from engine.models.text_encoders import build_clip

    clip_state = dev_set.stored_as_float()["clip"]
    kohya_lora = layouts.clip_kohya(tmp_path / "te.safetensors", clip_state)
    clip = build_clip(dict(clip_state), {}, torch.float32)
    notes = lora.apply_loras(None, clip, [LoraSpec(str(kohya_lora.path), 0.5)])
    assert notes == [f"LoRA te at strength 0.5: {len(kohya_lora.deltas)} CLIP-L layers"]
    expected = {
        k.removeprefix("text_model."): v for k, v in layouts.merged(clip_state, [(kohya_lora, 0.5)]).items()
    }
    ours = fetched(clip)
    assert len(ours) == len(kohya_lora.deltas)
    assert_weights(ours, expected)

    # PEFT names of the same pairs (text_encoder.text_model....lora_A/lora_B, alpha as an .alpha key)
    peft = {}
    for d in kohya_lora.deltas:
        peft[f"text_encoder.{d.name}.lora_A.weight"] = d.down
        peft[f"text_encoder.{d.name}.lora_B.weight"] = d.up
        peft[f"text_encoder.{d.name}.alpha"] = torch.tensor(4.0)
    path = layouts.write_raw(tmp_path / "te_peft.safetensors", peft)
    lora.apply_loras(None, clip, [LoraSpec(str(path), 0.5)])
    assert_weights(fetched(clip), expected)

    # without CLIP-L in the job, its part is reported, not dropped silently
    model = flux_from(transformer_float(dev_set))
    notes = lora.apply_loras(model, None, [LoraSpec(str(kohya_lora.path), 0.5)])
    assert any("CLIP-L part" in n and f"({len(kohya_lora.deltas)} layers)" in n for n in notes)


def test_clip_and_transformer_parts_in_two_calls(dev_set, tmp_path):
    """The protocol for a pipeline that patches CLIP-L before encoding and the transformer after: each call
    applies its part, says nothing of the other's, and the CLIP-L part has a key for the embedding cache."""
    from safetensors.torch import load_file

    from engine.models.text_encoders import build_clip

    base, clip_state = transformer_float(dev_set), dev_set.stored_as_float()["clip"]
    unet = layouts.kohya(tmp_path / "unet.safetensors", base)
    te = layouts.clip_kohya(tmp_path / "te.safetensors", clip_state)
    both = layouts.write_raw(
        tmp_path / "both.safetensors", load_file(str(unet.path)) | load_file(str(te.path))
    )
    spec = LoraSpec(str(both), 0.9)
    clip, model = build_clip(dict(clip_state), {}, torch.float32), flux_from(base)
    assert lora.apply_loras(None, clip, [spec], parts=("clip",)) == [
        f"LoRA both at strength 0.9: {len(te.deltas)} CLIP-L layers"
    ]
    assert lora.apply_loras(model, None, [spec], parts=("transformer",)) == [
        f"LoRA both at strength 0.9: {len(unet.deltas)} transformer layers"
    ]
    expected = layouts.merged(clip_state, [(te, 0.9)])
    assert_weights(fetched(clip), {k.removeprefix("text_model."): v for k, v in expected.items()})
    assert_weights(fetched(model), layouts.merged(base, [(unet, 0.9)]))

    assert lora.clip_lora_key([LoraSpec(str(unet.path), 0.9)]) == ""
    key = lora.clip_lora_key([spec])
    assert key and key != lora.clip_lora_key([LoraSpec(str(both), 0.5)])
    assert lora.clip_lora_key([LoraSpec(str(both), 0.0)]) == ""


def test_patches_never_touch_stored_weights_and_clearing_restores_them(dev_set, tmp_path):
    """fp32 storage with fp32 compute: the weight `fetch` hands over IS the stored tensor; the patch must not
    write to it. An empty list removes the LoRA patches and keeps patches that are not LoRAs."""
    base = transformer_float(dev_set)
    tiny_lora = layouts.xlabs(tmp_path / "x.safetensors", dev_set.spec.flux_params())
    model = flux_from(base)
    layer = model.single_blocks[0].linear1
    other = lambda w: w * 1.0  # noqa: E731 - another feature's patch
    layer.patches = (other,)
    before = fetched(model)
    lora.apply_loras(model, None, [LoraSpec(str(tiny_lora.path), 1.5)])
    patched = fetched(model)
    assert not torch.equal(
        patched["single_blocks.0.linear1.weight"], before["single_blocks.0.linear1.weight"]
    )
    assert torch.equal(
        patched["single_blocks.0.linear1.weight"][3 * 64 :],
        before["single_blocks.0.linear1.weight"][3 * 64 :],
    )  # XLabs' single-block LoRA covers the qkv rows only
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, base[name]), name
    lora.apply_loras(model, None, [])
    assert layer.patches == (other,)
    for name, weight in fetched(model).items():
        assert torch.equal(weight, before[name]), name


def test_patch_computes_in_the_compute_dtype(dev_set, tmp_path):
    base = transformer_float(dev_set)
    tiny_lora = layouts.comfy(tmp_path / "c.safetensors", base)
    model = flux_from(base)
    lora.apply_loras(model, None, [LoraSpec(str(tiny_lora.path), 1.0)])
    ours = fetched(model, torch.bfloat16)
    assert all(w.dtype == torch.bfloat16 for w in ours.values())
    assert_weights(ours, layouts.merged(base, [(tiny_lora, 1.0)]), atol=3e-2)


def test_files_are_read_once_per_modification(dev_set, tmp_path):
    tiny_lora = layouts.xlabs(tmp_path / "x.safetensors", dev_set.spec.flux_params())
    library = lora.LoraLibrary()  # an engine's (its ModelCache holds one)
    first = library.load(tiny_lora.path)
    assert library.load(tiny_lora.path) is first
    stat = tiny_lora.path.stat()
    os.utime(tiny_lora.path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert library.load(tiny_lora.path) is not first


# ---- images: the CLI against diffusers with the deltas merged ----


def test_one_lora_through_the_cli_matches_diffusers(dev_set, peft_case, base_image, tmp_path):
    tiny_lora, theirs = peft_case
    ours, out = cli_image(
        tmp_path, "one", "--models-dir", str(dev_set.models_dir), "--lora", f"{tiny_lora.path}:0.7"
    )
    assert_close(ours, theirs)
    assert psnr(ours, base_image) < 35.0, "the LoRA barely changes the image: the comparison would not see it"

    from launcher.metadata import parse_a1111

    params = parse_a1111(Image.open(out).text["parameters"])
    sha = hashlib.sha256(tiny_lora.path.read_bytes()).hexdigest()
    assert params.prompt == f"{PROMPT} <lora:peft_style:0.7>"
    assert params.extra["Lora hashes"] == f"peft_style: {sha[:10]}"


def test_two_stacked_loras_with_strengths_match_diffusers(dev_set, oracle, lora_dir, base_image, tmp_path):
    base = transformer_float(dev_set)
    first = layouts.kohya(lora_dir / "kohya_style.safetensors", base, size=0.3)
    second = layouts.xlabs(lora_dir / "xlabs_style.safetensors", dev_set.spec.flux_params(), size=0.4)
    ours, out = cli_image(
        tmp_path,
        "two",
        "--models-dir",
        str(dev_set.models_dir),
        "--lora",
        f"{first.path}:0.6",
        "--lora",
        f"{second.path}:-0.8",
    )
    assert_close(ours, oracle.image(layouts.merged(base, [(first, 0.6), (second, -0.8)])))
    assert psnr(ours, base_image) < 35.0
    text = Image.open(out).text["parameters"]
    assert "<lora:kohya_style:0.6> <lora:xlabs_style:-0.8>" in text
    assert 'Lora hashes: "kohya_style: ' in text and ", xlabs_style: " in text


def test_lora_on_an_fp8_base_matches_diffusers(dev_set, oracle, lora_dir, base_image, tmp_path):
    fp8 = fixtures.to_fp8(dev_set.states.transformer, torch.float8_e4m3fn, scaled=True)
    path = tmp_path / "flux-fp8.safetensors"
    save_file(fp8, str(path))
    base = fixtures.dequantized(fp8)
    tiny_lora = layouts.comfy(lora_dir / "comfy_style.safetensors", base, size=0.3)
    ours, _ = cli_image(
        tmp_path,
        "fp8",
        "--transformer",
        str(path),
        "--clip",
        str(dev_set.paths["clip"]),
        "--t5",
        str(dev_set.paths["t5"]),
        "--vae",
        str(dev_set.paths["vae"]),
        "--clip-tokenizer",
        str(dev_set.clip_tokenizer),
        "--t5-tokenizer",
        str(dev_set.t5_tokenizer),
        "--lora",
        str(tiny_lora.path),  # strength 1 by default
    )
    assert_close(ours, oracle.image(layouts.merged(base, [(tiny_lora, 1.0)])))
    assert psnr(ours, base_image) < 35.0


def request(tiny, out: Path, loras=(), **kw) -> GenerateRequest:
    return GenerateRequest(
        prompt=PROMPT,
        out=str(out),
        width=SIZE,
        height=SIZE,
        steps=STEPS,
        seed=SEED,
        loras=list(loras),
        files=ModelFiles(models_dir=str(tiny.models_dir)),
        **kw,
    )


def test_lora_with_every_block_streamed_matches_diffusers(dev_set, peft_case, tmp_path):
    """vram_budget=0: every block is staged (copied) just before it runs and dropped after; the patches apply to
    the staged copies. Same pixels as resident weights, and diffusers' image."""
    tiny_lora, theirs = peft_case
    engine = Engine()
    spec = LoraSpec(str(tiny_lora.path), 0.7)
    resident = engine.generate(request(dev_set, tmp_path / "resident.png", [spec]))[0]
    streamed = engine.generate(request(dev_set, tmp_path / "streamed.png", [spec], vram_budget=0))[0]
    transformer = engine.models.loaded("transformer")
    assert engine.memory.stats_of(transformer).bytes_streamed > 0
    assert np.array_equal(png(resident), png(streamed))
    assert_close(png(streamed), theirs)


def test_a_long_lived_engine_restores_the_base_exactly(dev_set, peft_case, lora_dir, tmp_path):
    """One engine: base, LoRAs with strengths, other strengths, base again (bit for bit), and the transformer is
    loaded once; the files once."""
    tiny_lora, _ = peft_case
    xlabs = layouts.xlabs(lora_dir / "xlabs_again.safetensors", dev_set.spec.flux_params())
    engine = Engine()
    events = []
    first = png(engine.generate(request(dev_set, tmp_path / "a.png"))[0])
    both = [LoraSpec(str(tiny_lora.path), 0.7), LoraSpec(str(xlabs.path), 0.5)]
    with_loras = png(engine.generate(request(dev_set, tmp_path / "b.png", both), events.append)[0])
    loaded = engine.models.loras.load(xlabs.path)  # the engine's library: read once, kept
    other = [LoraSpec(str(tiny_lora.path), -0.4), LoraSpec(str(xlabs.path), 0.5)]
    other_strengths = png(engine.generate(request(dev_set, tmp_path / "c.png", other))[0])
    assert engine.models.loras.load(xlabs.path) is loaded
    again = png(engine.generate(request(dev_set, tmp_path / "d.png"))[0])
    assert np.array_equal(first, again)
    assert not np.array_equal(first, with_loras) and not np.array_equal(with_loras, other_strengths)
    assert engine.loads["transformer"] == 1
    notes = [e.text for e in events if hasattr(e, "text")]
    assert notes == [
        f"LoRA peft_style at strength 0.7: {len(layouts.bfl_linears(transformer_float(dev_set)))} transformer layers",
        f"LoRA xlabs_again at strength 0.5: {len(xlabs.deltas)} transformer layers",
    ]


# ---- bad input ----


def test_an_sdxl_lora_is_refused_in_one_sentence(dev_set, tmp_path, capsys):
    r = torch.zeros(4, 8)
    path = layouts.write_raw(
        tmp_path / "sdxl.safetensors",
        {
            "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight": r,
            "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_up.weight": r.T,
            "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": r.clone(),
            "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": r.T.clone(),
        },
    )
    code = main(
        ["generate", "--models-dir", str(dev_set.models_dir), *IMAGE_ARGS, "--lora", str(path)]
        + ["--out", str(tmp_path / "x.png")]
    )
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == f"error: {path} is a LoRA for SDXL, not for FLUX: remove it or use a FLUX LoRA."
    assert not (tmp_path / "x.png").exists()


def _refusal(model, path) -> str:
    with pytest.raises(UserError) as info:
        lora.apply_loras(model, None, [LoraSpec(str(path))])
    return str(info.value)


def test_other_architectures_sizes_and_files_are_refused(dev_set, tmp_path):
    model = flux_from(transformer_float(dev_set))
    r = torch.zeros(4, 64)
    sd3 = {"lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down.weight": r}
    sd3 |= {"lora_unet_joint_blocks_0_x_block_attn_qkv.lora_up.weight": torch.zeros(192, 4)}
    assert "is a LoRA for Stable Diffusion 3, not for FLUX" in _refusal(
        model, layouts.write_raw(tmp_path / "sd3.safetensors", sd3)
    )
    sd3_diffusers = {"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 1536)}
    sd3_diffusers |= {"transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(1536, 4)}
    assert "is a LoRA for Stable Diffusion 3" in _refusal(
        model, layouts.write_raw(tmp_path / "sd3d.safetensors", sd3_diffusers)
    )
    big = {"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.zeros(4, 3072)}
    big |= {"lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": torch.zeros(9216, 4)}
    message = _refusal(model, layouts.write_raw(tmp_path / "big.safetensors", big))
    assert "a FLUX model of another size" in message and "3072→9216" in message
    message = _refusal(model, dev_set.paths["transformer"])
    assert "is not a LoRA: it looks like a FLUX transformer" in message
    assert "does not exist" in _refusal(model, tmp_path / "missing.safetensors")


def test_keys_that_match_nothing_are_reported(dev_set, tmp_path):
    base = transformer_float(dev_set)
    tiny_lora = layouts.kohya(tmp_path / "good.safetensors", base)
    from safetensors.torch import load_file

    tensors = load_file(str(tiny_lora.path))
    junk = {
        "lora_unet_double_blocks_7_img_attn_qkv.lora_down.weight": torch.zeros(4, 64),
        "lora_unet_double_blocks_7_img_attn_qkv.lora_up.weight": torch.zeros(192, 4),
        "lora_unet_not_a_layer.lora_down.weight": torch.zeros(4, 64),
        "lora_unet_not_a_layer.lora_up.weight": torch.zeros(64, 4),
        "lora_unet_img_in.dora_scale": torch.ones(1, 64),
        "lora_te2_encoder_block_0_layer_0_SelfAttention_q.lora_down.weight": torch.zeros(4, 64),
        "lora_te2_encoder_block_0_layer_0_SelfAttention_q.lora_up.weight": torch.zeros(64, 4),
    }
    path = layouts.write_raw(tmp_path / "mixed.safetensors", tensors | junk)
    model = flux_from(base)
    notes = lora.apply_loras(model, None, [LoraSpec(str(path), 1.0)])
    assert notes[0] == f"LoRA mixed at strength 1: {len(tiny_lora.deltas)} transformer layers"
    unmatched = next(n for n in notes if "match no layer" in n)
    assert "4 tensors" in unmatched and "lora_unet_double_blocks_7_img_attn_qkv.lora_" in unmatched
    assert any("1 tensors are of kinds" in n and "lora_unet_img_in.dora_scale" in n for n in notes)
    assert any("its T5 part (1 layers) was not applied" in n for n in notes)
    assert_weights(fetched(model), layouts.merged(base, [(tiny_lora, 1.0)]))


# ---- PNG metadata and prompt tags ----


def test_parameters_text_records_each_lora(tmp_path):
    a = layouts.write_raw(tmp_path / "Style A.safetensors", {"x.lora_down.weight": torch.ones(1, 2)})
    b = layouts.write_raw(tmp_path / "detail.safetensors", {"y.lora_down.weight": torch.zeros(1, 2)})
    req = GenerateRequest(
        prompt="a cat <lora:detail:0.5>",
        out="o.png",
        loras=[LoraSpec(str(a), 0.8), LoraSpec(str(b), 0.5)],
    )
    text = parameters_text(req, steps=4, model="flux-tiny")
    first, settings = text.splitlines()
    assert first == "a cat <lora:detail:0.5> <lora:Style A:0.8>"
    ha = hashlib.sha256(a.read_bytes()).hexdigest()[:10]
    hb = hashlib.sha256(b.read_bytes()).hexdigest()[:10]
    assert f'Lora hashes: "Style A: {ha}, detail: {hb}", Version: ' in settings
    assert "Lora hashes" not in parameters_text(GenerateRequest(prompt="x", out="o.png"), steps=4, model="m")


def test_prompt_tags_name_loras_in_the_loras_folder(tmp_path):
    folder = tmp_path / "loras"
    (folder / "styles").mkdir(parents=True)
    (folder / "styles" / "Ink.safetensors").write_bytes(b"")
    (folder / "detail.safetensors").write_bytes(b"")
    prompt, specs = lora.prompt_loras("a cat <lora:ink:0.8>, in the rain <lora:detail>", folder)
    assert prompt == "a cat, in the rain"
    assert specs == [
        LoraSpec(str(folder / "styles" / "Ink.safetensors"), 0.8),
        LoraSpec(str(folder / "detail.safetensors"), 1.0),
    ]
    assert lora.prompt_loras("no tags here", None) == ("no tags here", [])
    with pytest.raises(UserError, match="names no LoRA in"):
        lora.prompt_loras("<lora:missing:1>", folder)
    with pytest.raises(UserError, match="no number for its strength"):
        lora.prompt_loras("<lora:detail:strong>", folder)


# ---- the pipeline's CLIP-L part and prompt tags ----


def test_clip_lora_changes_the_image_through_the_pipeline_and_the_cache_keeps_them_apart(dev_set, tmp_path):
    """A CLIP-only LoRA reaches CLIP before it encodes; the embedding cache keys on it, so the same prompt with
    and without the LoRA gives two images, and the same LoRA again gives the first one back."""
    from engine.formats.weights import SafetensorsFile
    from engine.generation.pipeline import EngineOptions

    clip_file = SafetensorsFile(dev_set.paths["clip"])
    clip_state = {k: v.float() for k, v in clip_file.load(clip_file.names()).items()}
    lora = layouts.clip_kohya(tmp_path / "clip_only.safetensors", clip_state)
    engine = Engine(EngineOptions(cache_dir=str(tmp_path / "cache")))
    base = png(engine.generate(request(dev_set, tmp_path / "a.png"))[0])
    with_lora = png(engine.generate(request(dev_set, tmp_path / "b.png", [LoraSpec(str(lora.path), 1.0)]))[0])
    again = png(engine.generate(request(dev_set, tmp_path / "c.png"))[0])
    assert psnr(base, with_lora) < 40
    assert np.array_equal(base, again)


def test_prompt_tag_equals_the_lora_flag(dev_set, peft_case, tmp_path):
    """`<lora:name:0.7>` in the prompt, found in <models-dir>/loras, is the same as --lora FILE:0.7."""
    import shutil

    models = tmp_path / "models"
    shutil.copytree(dev_set.models_dir, models)
    (models / "loras").mkdir()
    shutil.copy(peft_case[0].path, models / "loras" / "style.safetensors")
    flagged = request(
        dev_set, tmp_path / "flag.png", [LoraSpec(str(models / "loras" / "style.safetensors"), 0.7)]
    )
    tagged = request(dev_set, tmp_path / "tag.png")
    tagged.prompt = f"{PROMPT} <lora:style:0.7>"
    tagged.files = ModelFiles(models_dir=str(models))
    a, b = (png(Engine().generate(r)[0]) for r in (flagged, tagged))
    assert np.array_equal(a, b)
