"""Image sizes: presets by aspect ratio and megapixels, always multiples of 16 (what FLUX needs)."""

from __future__ import annotations

import math

ASPECTS: tuple[tuple[int, int], ...] = (
    (1, 1),
    (4, 3),
    (3, 2),
    (16, 9),
    (21, 9),
    (3, 4),
    (2, 3),
    (9, 16),
    (9, 21),
)
MEGAPIXELS: tuple[float, ...] = (0.25, 0.5, 1.0, 1.5, 2.0)
MIN_SIDE, MAX_SIDE, MULTIPLE = 64, 4096, 16


def round_to_multiple(value: float, multiple: int = MULTIPLE) -> int:
    return max(MIN_SIDE, min(MAX_SIDE, int(round(value / multiple)) * multiple))


def size_for(aspect: tuple[int, int], megapixels: float) -> tuple[int, int]:
    """Width and height near `megapixels` (1 MP = 1024 x 1024) with the given aspect ratio."""
    pixels = megapixels * 1024 * 1024
    aw, ah = aspect
    width = math.sqrt(pixels * aw / ah)
    return round_to_multiple(width), round_to_multiple(width * ah / aw)


def aspect_label(aspect: tuple[int, int]) -> str:
    return f"{aspect[0]}:{aspect[1]}"


def parse_aspect(label: str) -> tuple[int, int]:
    left, right = label.split(":")
    return int(left), int(right)


def megapixels_of(width: int, height: int) -> float:
    return width * height / (1024 * 1024)
