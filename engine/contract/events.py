"""What the engine reports while it works. The CLI prints these to stderr; the engine server sends them as JSON lines."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

STAGES = ("loading", "encoding", "denoising", "decoding", "saving")


@dataclass
class Stage:
    stage: str  # one of STAGES
    detail: str = ""


@dataclass
class Step:
    step: int  # 1-based
    total: int
    seconds_per_it: float  # of this step
    cached: bool = False  # the step cache reused an earlier step's blocks


@dataclass
class Preview:
    """A cheap RGB look at the latent after a step: width × height × 3 bytes, row-major."""

    step: int
    width: int
    height: int
    rgb: bytes


@dataclass
class Done:
    paths: list[str]
    seconds: float  # the whole job
    mean_seconds_per_it: float  # over the denoising steps


@dataclass
class Message:
    """Something the user should know that is not an error (e.g. a tiled decode after an out-of-memory)."""

    text: str


Event = Stage | Step | Preview | Done | Message
EventSink = Callable[[Event], None]


def event_to_dict(event: Event) -> dict:
    data = dataclasses.asdict(event)
    if isinstance(event, Preview):
        data["rgb"] = event.rgb.hex()
    data["type"] = type(event).__name__.lower()
    return data


def ignore(_event: Event) -> None:
    pass
