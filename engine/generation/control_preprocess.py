"""`--control-preprocess`: turn a photo into the control map FLUX.1 Canny [dev] was trained on.

canny: OpenCV's Canny edge detector with BFL's thresholds (50, 200; `CannyImageEncoder` in BFL's
flux/modules/image_embedders.py, and diffusers' FluxControlPipeline example), on the RGB image at the size it
will be encoded at, white edges on black as three equal channels. OpenCV (opencv-python-headless) is imported
only when asked for.

depth: Depth Anything V2 (Small: depth-anything/Depth-Anything-V2-Small-hf) through transformers'
`AutoModelForDepthEstimation`, from `<models-dir>/depth/` or a folder in it (the manifest's depth/depth-anything-v2-small/) as the hub has it (config.json, model.safetensors and,
if there, preprocessor_config.json; without it the hub's own settings below). The map is made as the
preprocessor diffusers' FluxControlPipeline example uses (huggingface/image_gen_aux's DepthPreprocessor, the same
transformers model and processor) and ComfyUI's controlnet_aux DepthAnythingV2 node make it: the relative depth
(near = bright) resized to the output size (bicubic), then min-max normalised to 0..255, three equal channels.
(BFL's DepthImageEncoder maps the raw prediction linearly instead, without normalising; a model's raw scale is
arbitrary, so the normalised map is what people feed the Depth model in practice.) The model is loaded for the
job, in float32 on the job's device, and released right after.

torch is imported inside the depth functions only: the TUI computes its Canny preview with `canny` here, and the
TUI process never imports torch (tests/test_launcher_terminal.py checks it with a preview computed).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from engine.contract import layout
from engine.contract.errors import UserError

if TYPE_CHECKING:
    import torch

DEPTH_FILES = ("config.json", "model.safetensors")
# depth-anything/Depth-Anything-V2-Small-hf's preprocessor_config.json, for a folder without one
DEPTH_PROCESSOR = {
    "do_resize": True,
    "size": {"height": 518, "width": 518},
    "keep_aspect_ratio": True,
    "ensure_multiple_of": 14,
    "resample": 3,  # bicubic
    "do_rescale": True,
    "rescale_factor": 1 / 255,
    "do_normalize": True,
    "image_mean": [0.485, 0.456, 0.406],
    "image_std": [0.229, 0.224, 0.225],
    "do_pad": False,
}

CANNY_LOW, CANNY_HIGH = 50, 200


def _cv2():
    try:
        import cv2
    except ImportError:
        raise UserError(
            "--control-preprocess canny needs OpenCV, which is not installed: "
            "run `pip install opencv-python-headless` in the engine's environment, or give an edge map "
            "with --control-preprocess none."
        ) from None
    return cv2


def canny(
    image: Image.Image, width: int, height: int, low: int = CANNY_LOW, high: int = CANNY_HIGH
) -> Image.Image:
    """The image resized (Lanczos) to width × height, its Canny edges as an RGB image (255 on edges, else 0),
    as BFL's `prepare_control` makes it: resize, then `cv2.Canny` on the 8-bit RGB array."""
    cv2 = _cv2()
    image = image.convert("RGB")
    if image.size != (width, height):
        image = image.resize((width, height), Image.Resampling.LANCZOS)
    edges = cv2.Canny(np.ascontiguousarray(np.asarray(image)), low, high)
    return Image.fromarray(np.repeat(edges[..., None], 3, axis=2))


def depth_folder(models_dir: str | None, what: str = "--control-preprocess depth") -> Path:
    """`<models-dir>/depth/` with a Depth Anything model in it; one sentence (`what` asked for it) saying what is
    missing and where."""
    if not models_dir:
        raise UserError(
            f"{what} needs a Depth Anything model from a models folder: give --models-dir "
            f"with {layout.DEPTH}/ holding Depth-Anything-V2-Small-hf's config.json and model.safetensors."
        )
    root = Path(models_dir) / layout.DEPTH
    subfolders = sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    for folder in (root, *subfolders):  # the manifest puts it in depth/depth-anything-v2-small/
        if all((folder / name).is_file() for name in DEPTH_FILES):
            return folder
    near = next((f for f in (root, *subfolders) if any((f / name).is_file() for name in DEPTH_FILES)), root)
    missing = [name for name in DEPTH_FILES if not (near / name).is_file()]
    raise UserError(
        f"{what} needs Depth Anything V2 Small in {near}, which lacks "
        f"{' and '.join(missing)}: put depth-anything/Depth-Anything-V2-Small-hf's config.json and "
        "model.safetensors there (the wizard's control preset downloads them)."
    )


def load_depth_model(folder: Path):
    """(processor, model) from the folder; one sentence when the files are not a depth model transformers reads."""
    import torch
    from transformers import AutoModelForDepthEstimation, DPTImageProcessor

    try:
        model = AutoModelForDepthEstimation.from_pretrained(
            str(folder), local_files_only=True, dtype=torch.float32
        )
        config_file = folder / "preprocessor_config.json"
        settings = json.loads(config_file.read_text()) if config_file.is_file() else DEPTH_PROCESSOR
        settings = {k: v for k, v in settings.items() if k not in ("image_processor_type", "processor_class")}
        processor = DPTImageProcessor(**settings)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(
            f"{folder} does not hold a depth model transformers can read ({str(e).splitlines()[0][:120]}): put "
            "depth-anything/Depth-Anything-V2-Small-hf's files there."
        ) from None
    return processor, model.eval()


def preprocess(
    kind: str, image: Image.Image, width: int, height: int, models_dir: str | None, device: torch.device
) -> Image.Image:
    """The control map `kind` ("none", "canny", "depth") makes of `image` at width × height ("none": as given)."""
    if kind == "canny":
        return canny(image, width, height)
    if kind == "depth":
        return depth(image, width, height, models_dir, device)
    return image


def depth(
    image: Image.Image, width: int, height: int, models_dir: str | None, device: torch.device
) -> Image.Image:
    """The image's depth map at width × height as an RGB image (near bright, min-max normalised to 0..255)."""
    import torch

    processor, model = load_depth_model(depth_folder(models_dir))
    try:
        model.to(device)
        image = image.convert("RGB")
        if image.size != (width, height):
            image = image.resize((width, height), Image.Resampling.LANCZOS)
        inputs = processor(images=image, return_tensors="pt")
        with torch.inference_mode():
            predicted = model(pixel_values=inputs["pixel_values"].to(device)).predicted_depth.float().cpu()
    finally:
        del model
    return depth_map(predicted, width, height)


def depth_map(predicted: torch.Tensor, width: int, height: int) -> Image.Image:
    """(1, h, w) relative depth → RGB image: bicubic to height × width, min-max to 0..255 (a flat map: black)."""
    import torch
    import torch.nn.functional as F

    resized = F.interpolate(predicted[:, None], size=(height, width), mode="bicubic", align_corners=False)[
        0, 0
    ]
    low, high = resized.min(), resized.max()
    if not torch.isfinite(resized).all():
        raise UserError(
            "The depth model's output holds NaN/infinity: its files are damaged; download them again."
        )
    scaled = (resized - low) / (high - low) if high > low else torch.zeros_like(resized)
    gray = (scaled * 255.0).round().clamp(0, 255).to(torch.uint8).numpy()
    return Image.fromarray(np.repeat(gray[..., None], 3, axis=2))
