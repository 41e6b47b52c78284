"""The contract between the launcher and the engine (engine/contract/): torch-free, and the one place the request,
its flags, the events and the folder layout are written."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from engine.cli import build_parser, request_from_args
from engine.contract import layout, protocol
from engine.contract.errors import UserError
from engine.contract.request import GenerateRequest, LoraSpec, ModelFiles

ROOT = Path(__file__).resolve().parent.parent


def test_the_contract_and_the_launcher_never_import_torch():
    """Every contract module and every launcher module, imported in a fresh interpreter, leave torch out."""
    code = (
        "import importlib, pkgutil, sys\n"
        "import engine.contract, launcher\n"
        "for package in (engine.contract, launcher):\n"
        "    for module in pkgutil.walk_packages(package.__path__, package.__name__ + '.'):\n"
        "        if module.name != 'launcher.__main__':\n"
        "            importlib.import_module(module.name)\n"
        "print(sorted(m for m in sys.modules if m.startswith('engine.contract.')))\n"
        "print('torch' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    modules, torch = done.stdout.strip().splitlines()
    assert "engine.contract.request" in modules and "engine.contract.layout" in modules
    assert torch == "False", "a contract or launcher module imported torch"


def test_every_request_field_has_its_flag_and_comes_back_from_it(tmp_path):
    """Each field of GenerateRequest (and of its ModelFiles) is set from its flag: a field added with a flag
    needs nothing else in the CLI."""
    given = {"--prompt": "a cat", "--out": "o.png", "--clip-prompt": "c", "--negative": "n", "--cfg": "2.5",
             "--width": "512", "--height": "768", "--steps": "9", "--guidance": "4", "--seed": "18446744073709551615",
             "--batch": "2", "--shift": "1.5", "--init-image": "i.png", "--denoise": "0.5", "--t5-max-length": "77",
             "--device": "cpu", "--dtype": "bf16", "--vram-budget": "6", "--cache": "first-block:0.1",
             "--checkpoint": "ck", "--transformer": "tr", "--clip": "cl", "--t5": "t5", "--vae": "va",
             "--models-dir": "md", "--clip-tokenizer": "ct", "--t5-tokenizer": "tt"}  # fmt: skip
    argv = ["generate", *(part for item in given.items() for part in item)]
    argv += ["--lora", "a.safetensors:0.5", "--lora", r"C:\l\b.safetensors"]
    request = request_from_args(build_parser().parse_args(argv))
    assert request == GenerateRequest(
        prompt="a cat", out="o.png", clip_prompt="c", negative="n", cfg=2.5, width=512, height=768, steps=9,
        guidance=4.0, seed=2**64 - 1, batch=2, shift="1.5", init_image="i.png", denoise=0.5, t5_max_length=77,
        device="cpu", dtype="bf16", vram_budget=6.0, cache="first-block:0.1",
        loras=[LoraSpec("a.safetensors", 0.5), LoraSpec(r"C:\l\b.safetensors", 1.0)],
        files=ModelFiles("ck", "tr", "cl", "t5", "va", "md", "ct", "tt"),
    )  # fmt: skip
    fields = [*dataclasses.fields(GenerateRequest), *dataclasses.fields(ModelFiles)]
    assert [f.name for f in fields if "flag" not in f.metadata] == ["files"]  # every other field has its flag
    defaults = request_from_args(build_parser().parse_args(["generate", "--prompt", "p", "--out", "o.png",
                                                            "--models-dir", "m"]))  # fmt: skip
    assert defaults == GenerateRequest(prompt="p", out="o.png", files=ModelFiles(models_dir="m"))


def test_the_cli_still_asks_where_the_model_is():
    with pytest.raises(UserError, match="Say where the model is"):
        request_from_args(build_parser().parse_args(["generate", "--prompt", "p", "--out", "o.png"]))


def test_commands_round_trip_and_bad_ones_are_one_sentence():
    for command in (protocol.Generate("j1", {"prompt": "p"}), protocol.Cancel("j1"), protocol.Shutdown()):
        assert (
            protocol.decode_command(protocol.decode_line(protocol.encode_line(command.to_dict()))) == command
        )
    assert protocol.decode_command({"type": "cancel", "id": 7}) == protocol.Cancel("7")
    for bad, sentence in (
        (None, "A line was not a JSON object"),
        ({"type": "job", "id": True}, "A job command needs an id"),
        ({"type": "cancel"}, "A cancel command needs an id"),
        ({"type": ["x"]}, "Unknown command type 'list'"),
    ):
        with pytest.raises(UserError, match=sentence):
            protocol.decode_command(bad)


def test_the_layout_names_every_folder():
    comfy = {"checkpoints", "diffusion_models", "unet", "text_encoders", "clip", "vae", "loras"}
    extra = {"style_models", "clip_vision", "controlnet", "model_patches", "depth"}
    forge = {"Stable-diffusion", "text_encoder", "VAE", "Lora"}
    assert set(layout.LISTED_FOLDERS) == comfy | forge and set(layout.EXTRA_FOLDERS) == extra
    assert set(layout.ROLE_FOLDERS + layout.FORGE_ROLE_FOLDERS) == (comfy | forge) - {"loras", "Lora"}
    tokenizers = (layout.CLIP_TOKENIZER, layout.T5_TOKENIZER, layout.QWEN3_TOKENIZER)
    assert tokenizers == ("tokenizers/clip_l", "tokenizers/t5xxl", "tokenizers/qwen3")
