"""The ranges of the generate form's numbers: the form refuses values outside them, and values read from an
image's metadata are checked against the same ranges before they reach the form."""

from __future__ import annotations

from launcher.seeds import MAX_SEED

# field -> (kind, lowest, highest)
RANGES: dict[str, tuple[type, float, float]] = {
    "width": (int, 64, 4096),
    "height": (int, 64, 4096),
    "steps": (int, 1, 1000),
    "guidance": (float, 0, 100),
    "cfg": (float, 1, 30),
    "seed": (int, 0, MAX_SEED),
    "batch": (int, 1, 1000),
    "denoise": (float, 0.01, 1),
}
MAX_PROMPT_CHARS = 20_000  # T5 reads 512 tokens (about 2,000 characters); longer text from an image is cut
MAX_NAME_CHARS = 255
