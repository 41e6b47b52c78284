"""ControlNets through the whole engine (`Engine.generate`) against diffusers' FluxControlNetPipeline on the same
tiny weights and noise, and the refusals of bad --controlnet input (one sentence, exit 2, no PNG).

diffusers encodes an InstantX/Union net's control image with `retrieve_latents`, which samples the posterior
when given a generator; the engine takes the mean (as for init images), so the oracle's `retrieve_latents` is
pointed at the mean, as tests/test_conditioning.py does for the other pipelines."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import FluxControlNetPipeline, FluxMultiControlNetModel
from diffusers.pipelines.flux import pipeline_flux_controlnet
from PIL import Image
from safetensors.torch import save_file

from engine.cli import main
from engine.contract.request import ControlNetSpec, GenerateRequest, ModelFiles
from engine.fixtures import TinySpec
from engine.fixtures_controlnet import diffusers_controlnet_state, xlabs_controlnet_state
from engine.generation.pipeline import Engine
from engine.generation.png_output import read_request
from engine.generation.sampling import make_noise
from tests.oracle import build_pipeline, psnr, run_pipeline
from tests.test_controlnet import diffusers_controlnet, xlabs_to_diffusers
from tests.test_engine_matches_diffusers import MIN_PSNR, init_image

SIZE, SEED, PROMPT = 64, 9, "a glass robot"


def _write(folder: Path, name: str, state: dict[str, torch.Tensor]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.safetensors"
    if not path.exists():
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


NETS = {  # tiny nets for the dev set's transformer (1 double, 2 single blocks): the spread is exercised
    "instantx": lambda spec: diffusers_controlnet_state(spec, depth=2, depth_single=1, seed=31),
    "union": lambda spec: diffusers_controlnet_state(spec, depth=1, depth_single=1, modes=10, seed=32),
    "union-pro": lambda spec: diffusers_controlnet_state(spec, depth=2, depth_single=0, seed=33),
    "xlabs": lambda spec: xlabs_controlnet_state(spec, depth=2, seed=34),
    "second": lambda spec: diffusers_controlnet_state(spec, depth=2, depth_single=1, seed=35),
}


@pytest.fixture(scope="module")
def nets(dev_set):
    folder = dev_set.models_dir / "controlnet"
    states = {name: make(dev_set.spec) for name, make in NETS.items()}
    for name, state in states.items():
        _write(folder, name, state)
    return states


@pytest.fixture(scope="module")
def control_image(tmp_path_factory) -> Path:
    return init_image(tmp_path_factory.mktemp("control") / "map.png", SIZE)


@pytest.fixture
def posterior_mean(monkeypatch):
    mode = lambda encoded, generator=None, sample_mode="sample": encoded.latent_dist.mode()  # noqa: E731
    monkeypatch.setattr(pipeline_flux_controlnet, "retrieve_latents", mode)


def ours(dev_set, tmp_path, specs, engine=None, **fields) -> tuple[np.ndarray, Path]:
    request = GenerateRequest(
        prompt=PROMPT, width=SIZE, height=SIZE, steps=fields.pop("steps", 3), seed=SEED, dtype="fp32",
        files=ModelFiles(models_dir=str(dev_set.models_dir)), controlnets=specs,
        out=str(tmp_path / "out.png"), **fields,
    )  # fmt: skip
    (path,) = (engine or Engine()).generate(request)
    return np.asarray(Image.open(path).convert("RGB")), Path(path)


def theirs(
    dev_set,
    states,
    images,
    *,
    modes=None,
    strengths=None,
    starts=None,
    ends=None,
    steps=3,
    base_states=None,
    **extra,
):
    """FluxControlNetPipeline (one net) or with FluxMultiControlNetModel (several) on the same weights."""
    pipe = build_pipeline(
        base_states or dev_set.stored_as_float(), dev_set.clip_tokenizer, dev_set.t5_tokenizer
    )
    models = []
    for state in states:
        from engine.models.controlnet import ControlNetParams

        p = ControlNetParams.from_shapes({k: tuple(v.shape) for k, v in state.items()})
        net = diffusers_controlnet(p)
        net.load_state_dict(xlabs_to_diffusers(state, p) if p.pixel_hint else state, strict=True)
        models.append(net)
    one = len(models) == 1
    controlnet = models[0] if one else FluxMultiControlNetModel(models)
    cn_pipe = FluxControlNetPipeline(**pipe.components, controlnet=controlnet)
    cn_pipe.set_progress_bar_config(disable=True)
    n = len(states)
    kwargs = dict(
        control_image=images[0] if one else images,
        control_mode=(modes or [None] * n)[0] if one else (modes or [None] * n),
        controlnet_conditioning_scale=(strengths or [1.0] * n)[0] if one else (strengths or [1.0] * n),
        control_guidance_start=(starts or [0.0] * n)[0] if one else (starts or [0.0] * n),
        control_guidance_end=(ends or [1.0] * n)[0] if one else (ends or [1.0] * n),
        **extra,
    )
    return run_pipeline(
        cn_pipe, make_noise(SEED, 1, SIZE, SIZE), prompt=PROMPT, width=SIZE, height=SIZE,
        num_inference_steps=steps, guidance_scale=3.5, max_sequence_length=512, **kwargs,
    )[0]  # fmt: skip


def close(a: np.ndarray, b: np.ndarray) -> float:
    assert b.std() > 2.0, "the oracle's image is flat"
    value = psnr(a, b)
    print(f"PSNR {value:.1f} dB")
    assert value >= MIN_PSNR
    return value


CASES = {  # name: (spec extras, oracle mode)
    "instantx": ({"strength": 0.8}, None),
    "union": ({"mode": "depth"}, 2),
    "union-pro": ({}, None),
    "xlabs": ({"strength": 0.9}, None),
}


@pytest.mark.parametrize("name", CASES)
def test_one_controlnet_matches_diffusers(dev_set, nets, control_image, posterior_mean, tmp_path, name):
    extras, mode = CASES[name]
    spec = ControlNetSpec(name, str(control_image), **extras)  # a bare name: found in models/controlnet/
    image, png = ours(dev_set, tmp_path, [spec])
    oracle = theirs(
        dev_set, [nets[name]], [Image.open(control_image)], modes=[mode], strengths=[spec.strength]
    )
    close(image, oracle)
    plain = ours(dev_set, tmp_path, [])[0]
    assert psnr(plain, oracle) < MIN_PSNR - 5, (
        "the ControlNet changed nothing: the comparison would not catch it"
    )
    assert read_request(png)["controlnets"][0]["path"] == name
    assert "ControlNet: " in Image.open(png).text["parameters"]


def test_start_end_gating_matches_diffusers(dev_set, nets, control_image, posterior_mean, tmp_path):
    spec = ControlNetSpec("instantx", str(control_image), start=0.25, end=0.75)
    image, _ = ours(dev_set, tmp_path, [spec], steps=4)
    oracle = theirs(
        dev_set, [nets["instantx"]], [Image.open(control_image)], starts=[0.25], ends=[0.75], steps=4
    )
    close(image, oracle)
    ungated = ours(dev_set, tmp_path, [ControlNetSpec("instantx", str(control_image))], steps=4)[0]
    assert psnr(ungated, oracle) < MIN_PSNR - 5  # the range mattered


def test_two_stacked_controlnets_match_diffusers_multi(
    dev_set, nets, control_image, posterior_mean, tmp_path
):
    second_image = tmp_path / "second.png"
    Image.open(control_image).transpose(Image.Transpose.ROTATE_90).save(second_image)
    specs = [ControlNetSpec("instantx", str(control_image), strength=0.7),
             ControlNetSpec("second", str(second_image), strength=0.6, end=0.7)]  # fmt: skip
    image, png = ours(dev_set, tmp_path, specs)
    oracle = theirs(dev_set, [nets["instantx"], nets["second"]], [Image.open(control_image), Image.open(second_image)],
                    strengths=[0.7, 0.6], ends=[1.0, 0.7])  # fmt: skip
    close(image, oracle)
    first_only = ours(dev_set, tmp_path, specs[:1])[0]
    assert psnr(first_only, oracle) < MIN_PSNR - 5  # the second net counted
    assert "instantx (strength 0.7, 0-1), second (strength 0.6, 0-0.7)" in Image.open(png).text["parameters"]


def test_streamed_budget_gives_the_same_image(dev_set, nets, control_image, tmp_path):
    specs = [ControlNetSpec("instantx", str(control_image)), ControlNetSpec("xlabs", str(control_image))]
    whole = ours(dev_set, tmp_path, specs)[0]
    engine = Engine()
    streamed = ours(dev_set, tmp_path, specs, engine=engine, vram_budget=1e-9)[0]  # one byte: all streams
    assert np.array_equal(whole, streamed)
    for role in ("controlnet:0", "controlnet:1", "transformer"):
        assert engine.memory.stats_of(engine.models.loaded(role)).bytes_streamed > 0, role
    assert engine.loads["controlnet:0"] == engine.loads["controlnet:1"] == 1


def test_true_cfg_reuses_the_residuals_as_diffusers(dev_set, nets, control_image, posterior_mean, tmp_path):
    """The net sees the positive prompt's rows only; the negative pass gets the same residuals."""
    spec = ControlNetSpec("union", str(control_image), mode="tile")
    image, _ = ours(dev_set, tmp_path, [spec], negative="blurry", cfg=2.0)
    oracle = theirs(dev_set, [nets["union"]], [Image.open(control_image)], modes=[1],
                    negative_prompt="blurry", true_cfg_scale=2.0)  # fmt: skip
    close(image, oracle)


def test_img2img_gates_over_the_steps_it_runs(dev_set, nets, control_image, tmp_path, monkeypatch):
    """FluxControlNetImg2ImgPipeline: the range is of the shortened schedule (diffusers' controlnet_keep over
    the timesteps img2img keeps)."""
    from diffusers import FluxControlNetImg2ImgPipeline
    from diffusers.pipelines.flux import pipeline_flux_controlnet_image_to_image as module

    from engine.models.controlnet import ControlNetParams
    from tests.oracle import run_img2img

    mode = lambda encoded, generator=None, sample_mode="sample": encoded.latent_dist.mode()  # noqa: E731
    monkeypatch.setattr(module, "retrieve_latents", mode)  # the init image and the control image: the mean
    init = init_image(tmp_path / "init.png", SIZE)
    spec = ControlNetSpec("instantx", str(control_image), start=0.3, end=1.0)
    image, _ = ours(dev_set, tmp_path, [spec], init_image=str(init), denoise=0.6, steps=6)
    pipe = build_pipeline(dev_set.stored_as_float(), dev_set.clip_tokenizer, dev_set.t5_tokenizer)
    state = nets["instantx"]
    net = diffusers_controlnet(ControlNetParams.from_shapes({k: tuple(v.shape) for k, v in state.items()}))
    net.load_state_dict(state, strict=True)
    parts = {k: v for k, v in pipe.components.items() if k not in ("image_encoder", "feature_extractor")}
    cn = FluxControlNetImg2ImgPipeline(**parts, controlnet=net)
    cn.set_progress_bar_config(disable=True)
    oracle = run_img2img(
        cn, SEED, prompt=PROMPT, image=Image.open(init), control_image=Image.open(control_image), strength=0.6,
        num_inference_steps=6, width=SIZE, height=SIZE, guidance_scale=3.5, max_sequence_length=512,
        control_guidance_start=0.3, control_guidance_end=1.0,
    )[0]  # fmt: skip
    close(image, oracle)


# ---- bad input: one sentence, exit 2, no PNG ----


@pytest.fixture(scope="module")
def wide_net(dev_set, tmp_path_factory) -> Path:
    spec = TinySpec(hidden=128, heads=2)
    return _write(tmp_path_factory.mktemp("wide"), "wide", diffusers_controlnet_state(spec, 1, 1))


def _refused(dev_set, tmp_path, capsys, *args: str, model: tuple[str, ...] | None = None) -> str:
    out = tmp_path / "refused.png"
    model = model if model is not None else ("--models-dir", str(dev_set.models_dir))
    rc = main(["generate", *model, "--prompt", "x", "--width", "64", "--height", "64", "--steps", "1",
               "--dtype", "fp32", *args, "--out", str(out)])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert not out.exists() and not list(tmp_path.glob("*.png"))
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0] == err.splitlines()[-1], err  # progress lines, then one sentence
    return errors[0]


def test_bad_controlnet_input_is_refused(dev_set, nets, control_image, wide_net, tmp_path, capsys):
    img = f"image={control_image}"
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    cases = {
        f"instantx,{img},color=red": "not a known key",
        f"instantx,{img},strength=lots": "is not a number",
        "instantx,strength=0.5": "has no control image",
        f"instantx,{img},strength=20": "out of range",
        f"instantx,{img},start=0.6,end=0.4": "is not before",
        f"union,{img},mode=scribble": "is not known",
        f"instantx,{img},mode=canny": "has no mode embedding",
        f"union,{img}": "is a Union ControlNet",
        f"union,{img},mode=12": "outside its 10 modes",
        f"{wide_net},{img}": "does not fit the transformer",
        f"instantx,image={tmp_path / 'missing.png'}": "does not exist",
        f"instantx,image={text}": "is not an image file",
        f"nowhere,{img}": "does not exist",
        f"{dev_set.paths['transformer']},{img}": "not a FLUX.1 ControlNet",
        f"instantx,{img},preprocess=sketch": "preprocess='sketch' is not known",
        f"instantx,{img},preprocess=depth": "preprocess=depth needs Depth Anything V2 Small",
    }
    for flag, expected in cases.items():
        assert expected in _refused(dev_set, tmp_path, capsys, "--controlnet", flag), flag


def test_a_controlnet_given_as_transformer_or_lora_is_refused(dev_set, nets, tmp_path, capsys):
    net = str(
        dev_set.models_dir / "controlnet" / "xlabs.safetensors"
    )  # XLabs: the transformer's block names too
    split = ("--transformer", net, "--clip", str(dev_set.paths["clip"]), "--t5", str(dev_set.paths["t5"]),
             "--vae", str(dev_set.paths["vae"]))  # fmt: skip
    err = _refused(dev_set, tmp_path, capsys, model=split)
    assert "looks like a FLUX.1 ControlNet, not a FLUX transformer" in err
    err = _refused(dev_set, tmp_path, capsys, "--lora", net)
    assert "is not a LoRA: it looks like a FLUX.1 ControlNet" in err
    err = _refused(dev_set, tmp_path, capsys, "--checkpoint", net, model=())
    assert "ControlNet" in err


def test_a_photo_preprocessed_by_the_net_equals_its_map(dev_set, nets, tmp_path):
    """preprocess=canny turns the photo into the map --control-preprocess canny makes, at the job's size: the
    same image as giving that map (and not the image the photo itself gives)."""
    from engine.generation.control_preprocess import canny

    photo = tmp_path / "photo.png"
    rng = np.random.default_rng(3)
    blocks = rng.integers(0, 255, (8, 8, 3), dtype=np.uint8).repeat(SIZE // 8, 0).repeat(SIZE // 8, 1)
    Image.fromarray(blocks).save(photo)
    edge_map = tmp_path / "edges.png"
    canny(Image.open(photo), SIZE, SIZE).save(edge_map)
    from_photo = ours(dev_set, tmp_path, [ControlNetSpec("instantx", str(photo), preprocess="canny")])[0]
    from_map = ours(dev_set, tmp_path, [ControlNetSpec("instantx", str(edge_map))])[0]
    raw = ours(dev_set, tmp_path, [ControlNetSpec("instantx", str(photo))])[0]
    assert np.array_equal(from_photo, from_map)
    assert psnr(raw, from_map) < MIN_PSNR  # the preprocessing changes what the net sees


def test_controlnet_flag_parsing():
    spec = ControlNetSpec.parse(
        r"C:\nets\union,pro.safetensors,image=D:\maps\c.png,strength=0.5,end=0.8,mode=pose"
    )
    assert spec == ControlNetSpec(r"C:\nets\union,pro.safetensors", r"D:\maps\c.png", 0.5, 0.0, 0.8, "pose")
    assert ControlNetSpec.parse("n,image=p.png,preprocess=Canny").preprocess == "canny"
    assert spec.mode_index() == 4
    request = GenerateRequest(prompt="x", controlnets=[spec], out="o.png")
    assert GenerateRequest.from_dict(request.to_dict()).controlnets == [spec]


def test_shared_budget_keeps_the_transformer_and_its_nets_active_together():
    """Two models that each fit the budget alone but not together: unshared, activating one evicts the other
    (every step would copy both again); shared, both stay planned within their parts of the one budget."""
    from engine.models.controlnet import build_controlnet
    from engine.runtime.memory import MemoryManager

    spec = TinySpec()
    a = build_controlnet(diffusers_controlnet_state(spec, 3, 3, seed=41), {}, torch.float32)
    b = build_controlnet(diffusers_controlnet_state(spec, 1, 1, seed=42), {}, torch.float32)
    memory = MemoryManager(torch.device("cpu"), None)
    for net in (a, b):
        memory.manage(net)
    sizes = {id(m): memory._models[id(m)].rest_bytes + sum(memory._models[id(m)].block_bytes) for m in (a, b)}
    memory.set_budget(max(sizes.values()) + 1)
    memory.activate(a)
    memory.activate(b)
    assert memory._models[id(a)].plan is None  # evicted for b
    memory.share_budget([a, b])
    plans = [memory.activate(a), memory.activate(b)]
    assert all(memory._models[id(m)].plan is not None for m in (a, b))
    assert sum(p.resident_bytes for p in plans) <= memory.budget
    assert plans[0].streamed_bytes > 0  # the bigger one streams part of its blocks
    memory.share_budget([])  # the next job without nets: whole budgets again, planned anew
    assert memory._models[id(a)].plan is None and memory.activate(a).resident_bytes == sizes[id(a)]


def test_a_lora_keeps_working_with_a_controlnet(dev_set, nets, control_image, posterior_mean, tmp_path):
    """A BFL-named LoRA on the transformer with a ControlNet present, against diffusers on the merged weights."""
    g = torch.Generator().manual_seed(51)
    base = dev_set.stored_as_float()
    lora, merged = {}, dict(base["transformer"])
    for layer in ("double_blocks.0.img_attn.proj", "single_blocks.0.linear2"):
        out_dim, in_dim = merged[f"{layer}.weight"].shape
        down, up = torch.randn(4, in_dim, generator=g) * 0.3, torch.randn(out_dim, 4, generator=g) * 0.3
        lora[f"diffusion_model.{layer}.lora_down.weight"] = down
        lora[f"diffusion_model.{layer}.lora_up.weight"] = up
        merged[f"{layer}.weight"] = merged[f"{layer}.weight"] + up @ down  # no alpha: scale 1
    path = tmp_path / "style.safetensors"
    save_file(lora, str(path))
    from engine.contract.request import LoraSpec

    spec = ControlNetSpec("instantx", str(control_image))
    image, _ = ours(dev_set, tmp_path, [spec], loras=[LoraSpec(str(path))])
    without = ours(dev_set, tmp_path, [spec])[0]
    states = base | {"transformer": merged}
    oracle = theirs(dev_set, [nets["instantx"]], [Image.open(control_image)], base_states=states)
    close(image, oracle)
    assert psnr(without, oracle) < MIN_PSNR - 5  # the LoRA counted
