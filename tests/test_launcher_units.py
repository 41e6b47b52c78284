"""The launcher's plain-data parts: sizes, seeds, PNG metadata, config, queue, form, progress parsing."""

from __future__ import annotations

import json
import random

import pytest

from engine.contract.protocol import Cancel, decode_line, encode_line
from launcher.config import ConfigFile, Settings, dump_toml
from launcher.engine_client import EngineExit
from launcher.form import FormValues, build_requests
from launcher.jobs import JobQueue, JobState
from launcher.metadata import parse_a1111, parse_comfyui, read_png_params
from launcher.models import defaults_for, scan_models
from launcher.screens.models import percent_in, split_output
from launcher.seeds import MAX_SEED, SeedMode, next_seed, seeds_for
from launcher.sizes import ASPECTS, MEGAPIXELS, size_for
from tests.launcher_helpers import A1111_TEXT, COMFY_PROMPT, fluxdeck_png, write_png


@pytest.mark.parametrize("aspect", ASPECTS)
@pytest.mark.parametrize("megapixels", MEGAPIXELS)
def test_size_presets_are_multiples_of_16_near_the_asked_area(aspect, megapixels):
    width, height = size_for(aspect, megapixels)
    assert width % 16 == 0 and height % 16 == 0
    assert abs(width * height / (megapixels * 2**20) - 1) < 0.08
    assert abs(width / height - aspect[0] / aspect[1]) < 0.06


def test_size_for_common_presets():
    assert size_for((1, 1), 1.0) == (1024, 1024)
    assert size_for((1, 1), 0.25) == (512, 512)
    assert size_for((16, 9), 1.0) == (1360, 768)


def test_seed_modes():
    rng = random.Random(1)
    assert seeds_for(SeedMode.FIXED, 5, 3, rng) == [5, 5, 5]
    assert seeds_for(SeedMode.INCREMENT, 5, 3, rng) == [5, 6, 7]
    assert seeds_for(SeedMode.INCREMENT, 2**32 - 1, 2, rng) == [2**32 - 1, 2**32]  # the engine's range
    assert seeds_for(SeedMode.INCREMENT, 2**64 - 1, 2, rng) == [2**64 - 1, 0]
    randoms = seeds_for(SeedMode.RANDOM, 5, 3, rng)
    assert len(set(randoms)) == 3 and all(0 <= s < 2**32 for s in randoms)
    assert next_seed(SeedMode.FIXED, 9, rng) == 10  # a hunt never repeats an image
    assert next_seed(SeedMode.INCREMENT, 2**64 - 1, rng) == 0


def test_the_seed_range_is_the_engines():
    from engine.contract.errors import UserError
    from engine.contract.request import GenerateRequest

    for seed in (0, MAX_SEED):
        GenerateRequest(prompt="p", out="o.png", seed=seed).validate()
    with pytest.raises(UserError):
        GenerateRequest(prompt="p", out="o.png", seed=MAX_SEED + 1).validate()


def test_a1111_parameters():
    p = parse_a1111(A1111_TEXT)
    assert p.prompt == "a lighthouse at dusk, oil painting\nwith thick brush strokes"
    assert p.negative == "blurry, text"
    assert (p.steps, p.seed, p.width, p.height) == (20, 1234, 832, 1216)
    assert (p.guidance, p.cfg, p.model) == (3.0, 1.5, "flux1-dev-fp8")
    assert p.extra["Lora hashes"] == "a: 1, b: 2"


def test_a1111_without_negative_or_settings():
    assert parse_a1111("just a prompt").prompt == "just a prompt"
    p = parse_a1111("cat\nSteps: 4, Seed: 3, Size: 512x512")
    assert (p.prompt, p.negative, p.steps, p.guidance) == ("cat", None, 4, None)


def test_comfyui_prompt_follows_links():
    p = parse_comfyui(COMFY_PROMPT)
    assert p.prompt == "a red fox in snow"
    assert p.negative is None  # empty negative text
    assert (p.seed, p.steps, p.guidance, p.width, p.height) == (987654, 12, 2.5, 768, 512)
    assert p.model == "flux1-schnell.safetensors"


def test_comfyui_custom_sampler_and_flux_text_node():
    workflow = {
        "1": {
            "class_type": "CLIPTextEncodeFlux",
            "inputs": {"clip_l": "tags", "t5xxl": "long text", "guidance": 4.0},
        },
        "2": {"class_type": "BasicGuider", "inputs": {"conditioning": ["1", 0], "model": ["9", 0]}},
        "3": {"class_type": "RandomNoise", "inputs": {"noise_seed": ["8", 0]}},
        "8": {"class_type": "PrimitiveInt", "inputs": {"value": 42}},
        "4": {"class_type": "BasicScheduler", "inputs": {"steps": 20, "denoise": 1.0}},
        "5": {"class_type": "SamplerCustomAdvanced", "inputs": {"guider": ["2", 0], "noise": ["3", 0]}},
        "6": {"class_type": "EmptyLatentImage", "inputs": {"width": 1024, "height": 768}},
    }
    p = parse_comfyui(workflow)
    assert (p.prompt, p.clip_prompt, p.guidance) == ("long text", "tags", 4.0)
    assert (p.seed, p.steps, p.width, p.height) == (42, 20, 1024, 768)


def test_read_png_prefers_our_own_chunk(tmp_path):
    path = fluxdeck_png(tmp_path / "ours.png", "our prompt", 77)
    p = read_png_params(path)
    assert (p.source, p.prompt, p.seed, p.width) == ("fluxdeck", "our prompt", 77, 64)
    assert read_png_params(path, full=False).seed == 77
    a1111 = read_png_params(write_png(tmp_path / "a.png", parameters=A1111_TEXT))
    assert (a1111.source, a1111.seed) == ("a1111", 1234)
    comfy = read_png_params(write_png(tmp_path / "c.png", prompt=json.dumps(COMFY_PROMPT), workflow="{}"))
    assert (comfy.source, comfy.seed) == ("comfyui", 987654)
    assert read_png_params(write_png(tmp_path / "plain.png")) is None


def test_config_round_trip_keeps_other_tools_keys(tmp_path):
    path = tmp_path / "config.toml"
    path.write_text(
        'models_dir = "D:/models"\nwizard_done = true\n[download]\nmirror = "x"\n[keys]\ngenerate = "f9"\n'
    )
    config = ConfigFile.load(path)
    assert config.settings.models_dir == "D:/models" and config.keys == {"generate": "f9"}
    config.settings.vram_budget = 6.5
    config.settings.extra_model_paths = ["E:/ComfyUI/models", 'C:\\with "quotes"']
    config.save()
    again = ConfigFile.load(path)
    assert again.settings == config.settings
    assert again.other == {"wizard_done": True, "download": {"mirror": "x"}}
    assert again.keys == {"generate": "f9"}


def test_app_without_a_config_object_loads_the_file_and_keeps_its_other_keys(tmp_path):
    from launcher.app import FluxDeckApp
    from launcher.cli import LaunchOptions

    path = tmp_path / "config.toml"
    path.write_text('models_dir = "elsewhere"\nwizard_done = true\n[keys]\ngenerate = "f9"\n')
    app = FluxDeckApp(LaunchOptions(config=path), start_engine=False, root=tmp_path)
    assert app.settings.models_dir == "elsewhere" and app.key_for("generate") == "f9"
    app.config_file.save()
    again = ConfigFile.load(path)
    assert again.other == {"wizard_done": True} and again.keys == {"generate": "f9"}
    assert again.settings.models_dir == "elsewhere"


def test_dump_toml_nested_tables():
    text = dump_toml({"a": 1, "t": {"b": "x", "u": {"c": [1, 2]}}})
    assert "[t]" in text and "[t.u]" in text and "c = [1, 2]" in text


def test_settings_resolve_relative_to_root(tmp_path):
    s = Settings(models_dir="models", extra_model_paths=[str(tmp_path / "extra")])
    assert s.model_roots(tmp_path) == [tmp_path / "models", tmp_path / "extra"]


def test_queue_states():
    queue = JobQueue()
    a, b, c = (queue.add({"seed": i, "prompt": "p", "width": 64, "height": 64}) for i in range(3))
    assert queue.next_queued() is a
    a.state = JobState.RUNNING
    assert queue.running() is a and queue.next_queued() is b
    assert queue.cancel_queued(b.id) == [b] and b.state is JobState.CANCELLED
    assert queue.cancel_queued() == [c]
    assert queue.queued() == [] and "seed 0 · 64x64 · p" == a.summary


def test_build_requests_batch_and_models(tmp_path):
    values = FormValues(prompt="p", width=64, height=64, steps=2, seed=10, batch=3, negative="ugly", cfg=1.0)
    requests = build_requests(
        values, Settings(device="cpu"), tmp_path / "out", tmp_path / "models", random.Random(0)
    )
    assert [r["seed"] for r in requests] == [10, 11, 12]
    assert len({r["out"] for r in requests}) == 3
    assert all(r["negative"] is None and r["device"] == "cpu" for r in requests)  # CFG 1: negative unused
    from engine.contract.request import GenerateRequest  # the engine accepts what the form builds

    request = GenerateRequest.from_dict(requests[0])
    request.validate()
    model = tmp_path / "models" / "checkpoints" / "flux1-schnell.safetensors"
    values.model, values.cfg = str(model), 2.0
    r = build_requests(values, Settings(), tmp_path, tmp_path / "models", random.Random(0))[0]
    assert r["files"]["checkpoint"] == str(model) and r["negative"] == "ugly"


def test_model_defaults_and_scan(tmp_path):
    assert defaults_for("flux1-schnell-fp8.safetensors").steps == 4
    assert defaults_for("flux1-dev.safetensors").guidance == 3.5
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "flux1-dev-Q4_0.gguf").write_bytes(b"x")
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "ae.safetensors").write_bytes(b"xy")
    (tmp_path / "vae" / "notes.txt").write_text("no")
    found = scan_models([tmp_path, tmp_path])  # the same folder twice lists files once
    assert [(f.folder, f.path.name, f.is_model) for f in found] == [
        ("unet", "flux1-dev-Q4_0.gguf", True),
        ("vae", "ae.safetensors", False),
    ]


def test_progress_parsing():
    assert percent_in("clip_l.safetensors  42% 100 MB") == 42.0
    assert percent_in("done 12.5% then 99.9%") == 99.9
    assert percent_in("no progress here") is None
    assert split_output("a 1%\rb 2%\r\nc\n") == ["a 1%", "b 2%", "c"]


def test_protocol_lines_and_exit_reasons():
    assert decode_line(encode_line(Cancel("a").to_dict())) == {"type": "cancel", "id": "a"}
    assert decode_line("a stray print") is None and decode_line("[1, 2]") is None
    oom = EngineExit(-9, ["loading", "Killed"], expected=False).describe()
    assert "out of memory" in oom and "Killed" in oom
    assert "exit code 1" in EngineExit(1, [], expected=False).describe()


def test_a_forge_models_folder_is_listed_and_its_files_go_together(tmp_path):
    """Forge's Stable-diffusion/ text_encoder/ VAE/ are listed; an all-in-one file there goes as --checkpoint and
    its models folder comes with it (for the text encoders beside it)."""
    import numpy as np
    from safetensors.numpy import save_file

    from launcher.models import is_all_in_one, root_of

    ours, forge = tmp_path / "models", tmp_path / "forge" / "models"
    (ours / "diffusion_models").mkdir(parents=True)
    for folder in ("Stable-diffusion", "text_encoder", "VAE"):
        (forge / folder).mkdir(parents=True)
    tiny = np.zeros(2, dtype=np.float32)
    aio = forge / "Stable-diffusion" / "flux1-dev-fp8.safetensors"
    save_file({"model.diffusion_model.img_in.weight": tiny, "vae.decoder.conv_in.weight": tiny}, str(aio))
    save_file(
        {"encoder.block.0.layer.0.SelfAttention.q.weight": tiny},
        str(forge / "text_encoder" / "t5.safetensors"),
    )
    bare = ours / "diffusion_models" / "flux1-dev.safetensors"
    save_file({"double_blocks.0.img_attn.qkv.weight": tiny}, str(bare))

    listed = {(f.folder, f.path.name) for f in scan_models([ours, forge])}
    assert ("Stable-diffusion", aio.name) in listed and ("text_encoder", "t5.safetensors") in listed
    assert is_all_in_one(aio) and not is_all_in_one(bare)
    assert root_of(aio, [ours, forge]) == forge and root_of(bare, [ours, forge]) == ours

    request = build_requests(
        FormValues(model=str(aio)), Settings(), tmp_path / "out", forge, random.Random(0)
    )[0]
    assert request["files"]["checkpoint"] == str(aio) and request["files"]["models_dir"] == str(forge)
