"""The ranges of the generate form's numbers: the form refuses values outside them, and values read from an
image's metadata are checked against the same ranges before they reach the form. They are the engine's request
limits (engine/contract/request.py), but for the two fields that mean something else in the form."""

from __future__ import annotations

import math

from engine.contract.request import MAX_CFG, MAX_GUIDANCE, MAX_SEED, MAX_SIZE, MAX_STEPS, MIN_SIZE

MAX_IMAGES_PER_PRESS = 1000  # the form's batch: one job per image, each a request of batch 1
MIN_DENOISE = 0.01  # the engine takes anything above 0; below 0.01 the image would barely change

# field -> (kind, lowest, highest)
RANGES: dict[str, tuple[type, float, float]] = {
    "width": (int, MIN_SIZE, MAX_SIZE),
    "height": (int, MIN_SIZE, MAX_SIZE),
    "steps": (int, 1, MAX_STEPS),
    "guidance": (float, 0, MAX_GUIDANCE),
    "cfg": (float, 1, MAX_CFG),
    "seed": (int, 0, MAX_SEED),
    "batch": (int, 1, MAX_IMAGES_PER_PRESS),
    "denoise": (float, MIN_DENOISE, 1),
}
MAX_PROMPT_CHARS = 20_000  # T5 reads 512 tokens (about 2,000 characters); longer text from an image is cut
MAX_NAME_CHARS = 255


class FormError(ValueError):
    """A field that does not parse; the message names the field and what to type."""


def parse_number(
    text: str, kind: type, field_name: str, low: float, high: float | None = None
) -> int | float:
    try:
        value = kind(text.strip())
    except ValueError:
        kind_name = "a whole number" if kind is int else "a number"
        raise FormError(f"{field_name} must be {kind_name}, not {text.strip()!r}.") from None
    if not math.isfinite(value):
        raise FormError(f"{field_name} must be a finite number, not {text.strip()!r}.")
    if value < low or (high is not None and value > high):
        upper = f" to {high}" if high is not None else " or more"
        raise FormError(f"{field_name} {value} is out of range: use {low}{upper}.")
    return value
