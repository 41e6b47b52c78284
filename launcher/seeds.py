"""Seeds for a press of ctrl+g: fixed, random, or +1 per image (and the seed hunt that keeps going)."""

from __future__ import annotations

import random
from enum import Enum

from engine.contract.request import (
    MAX_SEED,  # any seed the engine takes, so a ComfyUI image's seed regenerates
)

# Random seeds are drawn below 2^32, like A1111/Forge: short enough to read and type back.
MAX_RANDOM_SEED = 2**32 - 1


class SeedMode(str, Enum):
    FIXED = "fixed"
    RANDOM = "random"
    INCREMENT = "increment"


def seeds_for(mode: SeedMode, seed: int, count: int, rng: random.Random) -> list[int]:
    """The seeds of `count` images starting from `seed`."""
    if mode is SeedMode.FIXED:
        return [seed] * count
    if mode is SeedMode.RANDOM:
        return [rng.randint(0, MAX_RANDOM_SEED) for _ in range(count)]
    return [(seed + i) % (MAX_SEED + 1) for i in range(count)]


def next_seed(mode: SeedMode, last: int, rng: random.Random) -> int:
    """The seed after `last` in a seed hunt: a fixed seed would repeat one image, so it counts up too."""
    if mode is SeedMode.RANDOM:
        return rng.randint(0, MAX_RANDOM_SEED)
    return (last + 1) % (MAX_SEED + 1)
