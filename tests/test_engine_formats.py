"""Same weights in other packagings give the same image: all-in-one checkpoints, tokenizer formats, img2img at 1.0."""

from __future__ import annotations

import shutil

import numpy as np
from PIL import Image
from safetensors.torch import save_file
from transformers import CLIPTokenizer, T5Tokenizer

from engine import fixtures
from engine.cli import main
from engine.contract.request import GenerateRequest
from engine.formats.weights import SafetensorsFile
from engine.generation.png_output import read_request

BASE = ["--prompt", "a photo of a cat", "--width", "64", "--height", "64", "--steps", "2", "--seed", "9"]


def generate(out, *args: str) -> np.ndarray:
    assert main(["generate", *args, "--out", str(out)]) == 0
    return np.asarray(Image.open(out).convert("RGB"))


def split_args(tiny) -> list[str]:
    return [
        "--transformer", str(tiny.paths["transformer"]), "--clip", str(tiny.paths["clip"]),
        "--t5", str(tiny.paths["t5"]), "--vae", str(tiny.paths["vae"]),
        "--clip-tokenizer", str(tiny.clip_tokenizer), "--t5-tokenizer", str(tiny.t5_tokenizer),
    ]  # fmt: skip


def stored(path) -> dict:
    file = SafetensorsFile(path)
    return file.load(file.names())


def test_all_in_one_checkpoint_equals_split_files(dev_set, tmp_path):
    split = generate(tmp_path / "split.png", *split_args(dev_set), *BASE)
    parts = {role: stored(path) for role, path in dev_set.paths.items()}
    checkpoint = fixtures.write_checkpoint(tmp_path / "flux1-dev-tiny.safetensors", parts)
    tokenizers = [
        "--clip-tokenizer",
        str(dev_set.clip_tokenizer),
        "--t5-tokenizer",
        str(dev_set.t5_tokenizer),
    ]
    aio = generate(tmp_path / "aio.png", "--checkpoint", str(checkpoint), *tokenizers, *BASE)
    assert np.array_equal(split, aio)


def test_checkpoint_in_models_dir_is_found_by_its_tensor_names(dev_set, tmp_path):
    split = generate(tmp_path / "split.png", *split_args(dev_set), *BASE)
    models = tmp_path / "models"
    parts = {role: stored(path) for role, path in dev_set.paths.items()}
    fixtures.write_checkpoint(models / "checkpoints" / "any-name.safetensors", parts)
    shutil.copytree(dev_set.models_dir / "tokenizers", models / "tokenizers")
    found = generate(tmp_path / "dir.png", "--models-dir", str(models), *BASE)
    assert np.array_equal(split, found)


def test_fp8_checkpoint_stays_fp8_in_memory(dev_set, tmp_path):
    """An fp8 file's matrices are kept as fp8 in RAM (cast per layer at compute time), not blown up."""
    import torch

    from engine.formats.weights import component_from
    from engine.models.build import build_model

    path = tmp_path / "fp8.safetensors"
    save_file(fixtures.to_fp8(dev_set.states.transformer, scaled=True), str(path))
    model = build_model(component_from(path, "transformer", "--transformer"), torch.float32)
    qkv = model.double_blocks[0].img_attn.qkv
    assert qkv.weight.dtype == torch.float8_e4m3fn
    assert qkv.scale_weight is not None
    matrices = [p for p in model.parameters() if p.ndim == 2]
    assert all(p.dtype == torch.float8_e4m3fn for p in matrices)


def test_tokenizer_json_folders_give_the_same_image(dev_set, tmp_path):
    """tokenizer.json (as the BFL repos ship) instead of vocab.json+merges.txt and spiece.model."""
    reference = generate(tmp_path / "a.png", "--models-dir", str(dev_set.models_dir), *BASE)
    clip_dir, t5_dir = tmp_path / "clip_json", tmp_path / "t5_json"
    CLIPTokenizer.from_pretrained(str(dev_set.clip_tokenizer)).save_pretrained(str(clip_dir))
    T5Tokenizer.from_pretrained(str(dev_set.t5_tokenizer)).save_pretrained(str(t5_dir))
    for folder, kept in ((clip_dir, "tokenizer.json"), (t5_dir, "tokenizer.json")):
        for f in folder.iterdir():
            if f.name not in (kept, "tokenizer_config.json", "special_tokens_map.json"):
                f.unlink()
    image = generate(
        tmp_path / "b.png", "--models-dir", str(dev_set.models_dir), "--clip-tokenizer", str(clip_dir),
        "--t5-tokenizer", str(t5_dir), *BASE,
    )  # fmt: skip
    assert np.array_equal(reference, image)


def test_img2img_at_full_denoise_equals_txt2img(dev_set, tmp_path):
    txt2img = generate(tmp_path / "t.png", "--models-dir", str(dev_set.models_dir), *BASE)
    init = tmp_path / "init.png"
    Image.fromarray((np.random.default_rng(0).random((80, 80, 3)) * 255).astype(np.uint8)).save(init)
    img2img = generate(
        tmp_path / "i.png",
        "--models-dir",
        str(dev_set.models_dir),
        *BASE,
        "--init-image",
        str(init),
        "--denoise",
        "1.0",
    )
    assert np.array_equal(txt2img, img2img)


def test_img2img_starts_from_the_init_image(dev_set, tmp_path):
    """At denoise 0.5 half the steps run, from a latent that mixes noise with the encoded init image."""
    models = ["--models-dir", str(dev_set.models_dir)]
    inits = []
    for i in range(2):
        inits.append(tmp_path / f"init{i}.png")
        Image.fromarray((np.random.default_rng(i).random((64, 64, 3)) * 255).astype(np.uint8)).save(inits[-1])
    images = [
        generate(tmp_path / f"r{i}.png", *models, *BASE, "--init-image", str(init), "--denoise", "0.5")
        for i, init in enumerate(inits)
    ]
    assert not np.array_equal(images[0], images[1])


def test_img2img_schedule_skips_the_first_steps():
    import torch

    from engine.generation.sampling import img2img_start, schedule

    times = schedule(10, mu=None)
    noise, x0 = torch.ones(1, 4), torch.zeros(1, 4)
    start, kept = img2img_start(noise, x0, times, denoise=0.3)
    assert len(kept) - 1 == 3  # int(10 − min(10·0.3, 10)) = 7 steps skipped
    assert kept[0] == times[7]
    assert torch.allclose(start, torch.full((1, 4), times[7]))
    _, kept = img2img_start(noise, x0, schedule(20, mu=None), denoise=0.8)
    assert len(kept) - 1 == 16  # 4 skipped, as diffusers (int(20·(1−0.8)) would skip 3)
    _, kept = img2img_start(noise, x0, times, denoise=0.01)
    assert kept == times[-2:]  # a denoise too small for a whole step still runs one


def test_png_metadata_round_trips(dev_set, tmp_path):
    out = tmp_path / "meta.png"
    args = ["--models-dir", str(dev_set.models_dir), "--prompt", "a dog", "--clip-prompt", "old painting",
            "--negative", "blurry", "--cfg", "1.5", "--width", "64", "--height", "80", "--steps", "2",
            "--seed", "1234", "--guidance", "4", "--shift", "none"]  # fmt: skip
    generate(out, *args)
    stored_request = read_request(out)
    request = GenerateRequest.from_dict(stored_request)
    assert (request.prompt, request.clip_prompt, request.negative) == ("a dog", "old painting", "blurry")
    assert (request.cfg, request.width, request.height, request.steps, request.seed) == (1.5, 64, 80, 2, 1234)
    assert (request.guidance, request.shift, request.t5_max_length) == (4.0, "none", 512)
    text = Image.open(out).text["parameters"]
    assert text.startswith("a dog\nNegative prompt: blurry\nSteps: 2, Sampler: Euler")
    assert "Seed: 1234" in text and "Size: 64x80" in text and "Distilled CFG Scale: 4" in text
    # and the stored request reproduces the image exactly
    again = tmp_path / "again.png"
    request.out = str(again)
    from engine.generation.pipeline import Engine

    Engine().generate(request)
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(again)))


def test_outputs_never_overwrite_and_batches_get_their_own_files(dev_set, tmp_path):
    out = tmp_path / "img.png"
    out.write_bytes(b"precious")
    assert (
        main(["generate", "--models-dir", str(dev_set.models_dir), *BASE, "--batch", "2", "--out", str(out)])
        == 0
    )
    assert out.read_bytes() == b"precious"
    made = sorted(p.name for p in tmp_path.glob("img-*.png"))
    assert made == ["img-1.png", "img-2.png"]
    a, b = (np.asarray(Image.open(tmp_path / n)) for n in made)
    assert not np.array_equal(a, b)  # two different noises of the same seed's batch


def test_a_forge_models_folder_is_read_too(dev_set, tmp_path):
    """Forge keeps FLUX files in Stable-diffusion/, text_encoder/ and VAE/: found by their tensor names."""
    split = generate(tmp_path / "split.png", *split_args(dev_set), *BASE)
    models = tmp_path / "forge-models"
    for role, folder in (
        ("transformer", "Stable-diffusion"),
        ("clip", "text_encoder"),
        ("t5", "text_encoder"),
        ("vae", "VAE"),
    ):
        (models / folder).mkdir(parents=True, exist_ok=True)
        shutil.copy(dev_set.paths[role], models / folder)
    shutil.copytree(dev_set.models_dir / "tokenizers", models / "tokenizers")
    assert np.array_equal(split, generate(tmp_path / "forge.png", "--models-dir", str(models), *BASE))
