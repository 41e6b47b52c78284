"""What the engine process says on its stdout (engine/server.py), decoded once into typed events.

One JSON object per line (launcher/engine_client.py reads the lines); `decode` turns the object into one of the
dataclasses below, or None when it is not one of them, so the app and its screens match on types instead of
`data["type"]` strings.
Plain data: no Textual, no torch, so it can move into the contract module engine and launcher will share.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True)
class Event:
    job: str | None = None  # the id of the job it is about; None: the engine itself


@dataclass(frozen=True, kw_only=True)
class Ready(Event):
    """The engine started and reads commands."""

    pid: int | None = None


@dataclass(frozen=True, kw_only=True)
class Bye(Event):
    """The engine is about to exit cleanly."""


@dataclass(frozen=True, kw_only=True)
class Started(Event):
    """A job left the engine's queue and runs now."""


@dataclass(frozen=True, kw_only=True)
class Stage(Event):
    stage: str  # loading, encoding, denoising, decoding, saving
    detail: str = ""


@dataclass(frozen=True, kw_only=True)
class Step(Event):
    step: int  # 1-based
    total: int
    seconds_per_it: float = 0.0
    cached: bool = False  # the engine's step cache reused an earlier step's blocks


@dataclass(frozen=True, kw_only=True)
class Preview(Event):
    """A cheap look at the latent after a step: width × height × 3 RGB bytes, row-major."""

    step: int
    width: int
    height: int
    rgb: bytes


@dataclass(frozen=True, kw_only=True)
class Stats(Event):
    rss_mb: float | None = None
    vram_mb: float | None = None
    vram_total_mb: float | None = None


@dataclass(frozen=True, kw_only=True)
class Note(Event):
    """Something the user should know that is not an error (the engine's `message` event)."""

    text: str


@dataclass(frozen=True, kw_only=True)
class Done(Event):
    paths: tuple[str, ...]
    seconds: float | None = None
    mean_seconds_per_it: float | None = None


@dataclass(frozen=True, kw_only=True)
class Cancelled(Event):
    pass


@dataclass(frozen=True, kw_only=True)
class Failed(Event):
    """The engine's `error`: a job failed, or (job None) a command it could not read."""

    message: str = "Engine error."


# The protocol's "type" of each event.
KINDS: dict[str, type[Event]] = {
    "ready": Ready,
    "bye": Bye,
    "started": Started,
    "stage": Stage,
    "step": Step,
    "preview": Preview,
    "stats": Stats,
    "message": Note,
    "done": Done,
    "cancelled": Cancelled,
    "error": Failed,
}


def decode(data: dict) -> Event | None:
    """The event a protocol object describes; None for an unknown type or fields that do not fit it."""
    kind = KINDS.get(str(data.get("type")))
    if kind is None:
        return None
    names = {field.name for field in dataclasses.fields(kind)}
    values = {name: data[name] for name in names & data.keys() if name != "job"}
    job = data.get("id")
    try:
        if kind is Preview:
            values["rgb"] = bytes.fromhex(str(values.get("rgb", "")))
        if kind is Done:
            values["paths"] = tuple(str(path) for path in values.get("paths") or ())
        event = kind(job=None if job is None else str(job), **values)
    except (TypeError, ValueError):
        return None
    if isinstance(event, Preview) and len(event.rgb) != event.width * event.height * 3:
        return None
    return event
