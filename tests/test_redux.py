"""FLUX.1 Redux through the CLI (--redux-image IMG[:STRENGTH]) against diffusers' FluxPriorReduxPipeline +
FluxPipeline, on a tiny random SigLIP written as ComfyUI's clip_vision file (transformers' SiglipVisionModel names
under `vision_model.`, its pooling head included) and a tiny Redux embedder in BFL's layout (redux_up/redux_down),
same noise. Several images: FluxDeck concatenates each image's tokens (times its strength) after the prompt's
(engine/generation/redux.py); the oracle builds the same from the prior's own tokens for each image."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import FluxPriorReduxPipeline
from diffusers.pipelines.flux.modeling_flux import ReduxImageEncoder
from PIL import Image
from safetensors.torch import save_file
from transformers import SiglipImageProcessor, SiglipVisionConfig, SiglipVisionModel

from engine import fixtures
from engine.cli import main
from engine.contract import layout
from engine.generation.sampling import make_noise, pack
from tests.conftest import _make_set
from tests.oracle import build_pipeline, psnr
from tests.test_engine_matches_diffusers import FP32, MIN_PSNR, assert_close

PROMPT, SEED, STEPS, SIZE = "a red door", 5, 2, 64
T5_LENGTH = 16  # short, so that the 16 Redux tokens weigh as much in attention as 729 do after 512
SIGLIP = SiglipVisionConfig(
    hidden_size=144, intermediate_size=96, num_hidden_layers=2, num_attention_heads=2, image_size=16,
    patch_size=4, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6,
)  # fmt: skip


def _photo(seed: int) -> Image.Image:
    g = np.random.default_rng(seed)
    return Image.fromarray(g.integers(0, 256, (8, 10, 3), dtype=np.uint8)).resize(
        (50, 40), Image.Resampling.BICUBIC
    )


@pytest.fixture(scope="module")
def redux_set(tmp_path_factory):
    tiny = _make_set(tmp_path_factory.mktemp("redux"), fixtures.TinySpec())
    torch.manual_seed(0)
    siglip = SiglipVisionModel(SIGLIP).eval()
    for p in siglip.parameters():  # livelier than the default init, so that the tokens carry the image
        p.data += 0.05 * torch.randn_like(p)
    embedder = ReduxImageEncoder(redux_dim=SIGLIP.hidden_size, txt_in_features=tiny.spec.t5_dim).eval()
    for p in embedder.parameters():
        p.data.normal_(0, 0.5)  # tokens as loud as T5's, so that 16 of them after 512 show
    (tiny.models_dir / layout.CLIP_VISION).mkdir()
    (tiny.models_dir / layout.STYLE_MODELS).mkdir()
    # ComfyUI's file: fp16, transformers' names under `vision_model.` (the base_model_prefix), the head included
    state = {f"vision_model.{k}": v.half() for k, v in siglip.state_dict().items()}
    assert any(k.startswith("vision_model.head.") for k in state)
    save_file(state, str(tiny.models_dir / layout.CLIP_VISION / "sigclip_vision_patch14_384.safetensors"))
    save_file(
        embedder.state_dict(), str(tiny.models_dir / layout.STYLE_MODELS / "flux1-redux-dev.safetensors")
    )
    siglip.load_state_dict(
        {k.removeprefix("vision_model."): v.float() for k, v in state.items()}
    )  # the oracle computes what the file holds
    images = []
    for i in range(2):
        _photo(10 + i).save(tiny.models_dir.parent / f"r{i}.png")
        images.append(str(tiny.models_dir.parent / f"r{i}.png"))
    return tiny, siglip, embedder, images


def ours(tiny, tmp_path: Path, *args: str) -> np.ndarray:
    out = tmp_path / f"out{len(list(tmp_path.glob('out*.png')))}.png"
    assert main(["generate", "--models-dir", str(tiny.models_dir), "--prompt", PROMPT, "--seed", str(SEED),
                 "--steps", str(STEPS), "--width", str(SIZE), "--height", str(SIZE), "--guidance", "3.5", "--t5-max-length", str(T5_LENGTH), *args,
                 *FP32, "--out", str(out)]) == 0  # fmt: skip
    return np.asarray(Image.open(out).convert("RGB"))


def theirs(redux_set, images: list[tuple[str, float]]) -> np.ndarray:
    """FluxPriorReduxPipeline per image on the prompt, its Redux tokens × strength concatenated after the prompt's
    T5 tokens; then FluxPipeline on those embeddings."""
    tiny, siglip, embedder, _ = redux_set
    pipe = build_pipeline(tiny.stored_as_float(), tiny.clip_tokenizer, tiny.t5_tokenizer)
    processor = SiglipImageProcessor(size={"height": 16, "width": 16}, resample=Image.Resampling.BICUBIC)
    prior = FluxPriorReduxPipeline(
        image_encoder=siglip, feature_extractor=processor, image_embedder=embedder,
        text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer, text_encoder_2=pipe.text_encoder_2,
        tokenizer_2=pipe.tokenizer_2,
    )  # fmt: skip
    with torch.inference_mode():
        text, pooled, _ = pipe.encode_prompt(PROMPT, PROMPT, max_sequence_length=T5_LENGTH)
        parts = []
        for path, strength in images:
            out = prior(
                image=Image.open(path).convert("RGB"), prompt_embeds=text, pooled_prompt_embeds=pooled
            )
            if not parts:
                parts.append(out.prompt_embeds[:, :T5_LENGTH])
            parts.append(out.prompt_embeds[:, T5_LENGTH:] * strength)
            assert torch.equal(out.pooled_prompt_embeds, pooled)  # CLIP's pooled vector stays the prompt's
        if len(images) == 1 and images[0][1] == 1.0:  # one image at strength 1: the prior's output as it is
            parts = [out.prompt_embeds]
        image = pipe(prompt_embeds=torch.cat(parts, 1), pooled_prompt_embeds=pooled,
                     latents=pack(make_noise(SEED, 1, SIZE, SIZE)), width=SIZE, height=SIZE,
                     num_inference_steps=STEPS, guidance_scale=3.5, output_type="np").images[0]  # fmt: skip
    return (image * 255).round().astype(np.uint8)


def test_one_redux_image_matches_diffusers_and_dropping_it_is_caught(redux_set, tmp_path):
    tiny, _, _, images = redux_set
    image = ours(tiny, tmp_path, "--redux-image", images[0])
    expected = theirs(redux_set, [(images[0], 1.0)])
    assert_close(image, expected)
    plain = ours(tiny, tmp_path)
    print(f"without Redux: {psnr(plain, expected):.1f} dB")
    assert psnr(plain, expected) < MIN_PSNR - 5


def test_two_images_with_strengths_are_concatenated(redux_set, tmp_path):
    tiny, _, _, images = redux_set
    image = ours(tiny, tmp_path, "--redux-image", f"{images[0]}:0.2", "--redux-image", f"{images[1]}:2.0")
    expected = theirs(redux_set, [(images[0], 0.2), (images[1], 2.0)])
    assert_close(image, expected)
    unscaled = theirs(redux_set, [(images[0], 1.0), (images[1], 1.0)])
    # FLUX layer-normalizes every token before attention, so a token's scale mostly cancels (only txt_in's bias
    # does not scale): the strengths move the image less than dropping Redux does, but clearly
    print(f"strengths ignored: {psnr(image, unscaled):.1f} dB")
    assert psnr(image, unscaled) < psnr(image, expected) - 10


def _refused(capsys, tiny, tmp_path: Path, *args: str) -> str:
    out = tmp_path / "refused.png"
    code = main(["generate", "--prompt", PROMPT, "--steps", "1", *args, "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and not out.exists() and "Traceback" not in err and err.count("\n") == 0, err
    return err


def test_bad_redux_requests(redux_set, tmp_path, tmp_path_factory, capsys):
    tiny, _, _, images = redux_set
    models = ("--models-dir", str(tiny.models_dir))
    for strength in ("nan", "inf", "-1", "11"):
        message = _refused(capsys, tiny, tmp_path, *models, "--redux-image", f"{images[0]}:{strength}")
        assert "--redux-image" in message and "0 to 10" in message, message
    bare = _make_set(tmp_path_factory.mktemp("bare"), fixtures.TinySpec())
    message = _refused(
        capsys, bare, tmp_path, "--models-dir", str(bare.models_dir), "--redux-image", images[0]
    )
    assert "FLUX.1 Redux embedder" in message and "style_models" in message, message
    (bare.models_dir / layout.STYLE_MODELS).mkdir()
    source = tiny.models_dir / layout.STYLE_MODELS / "flux1-redux-dev.safetensors"
    (bare.models_dir / layout.STYLE_MODELS / "x.safetensors").write_bytes(source.read_bytes())
    message = _refused(
        capsys, bare, tmp_path, "--models-dir", str(bare.models_dir), "--redux-image", images[0]
    )
    assert "SigLIP image encoder" in message and "clip_vision" in message, message
    message = _refused(
        capsys, tiny, tmp_path, *models, "--redux-image", images[0], "--negative", "blur", "--cfg", "2"
    )
    assert "true CFG" in message
    not_image = tmp_path / "x.png"
    not_image.write_text("no")
    assert "--redux-image" in _refused(capsys, tiny, tmp_path, *models, "--redux-image", str(not_image))
