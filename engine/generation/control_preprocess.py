"""`--control-preprocess`: turn a photo into the control map FLUX.1 Canny [dev] was trained on.

canny: OpenCV's Canny edge detector with BFL's thresholds (50, 200; `CannyImageEncoder` in BFL's
flux/modules/image_embedders.py, and diffusers' FluxControlPipeline example), on the RGB image at the size it
will be encoded at, white edges on black as three equal channels. OpenCV (opencv-python-headless) is imported
only when asked for. depth (Depth Anything V2 through transformers) is not built yet.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from engine.contract.errors import UserError

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
