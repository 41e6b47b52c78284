"""What the engine reports: the generation's events and the server's own, one set of classes for both sides.

The pipeline emits Stage, Step, Preview, Message and Done; the CLI prints them (engine/progress.py); the server
(engine/server.py) adds its own (Ready, Started, Stats, JobCancelled, Failed, UnknownJob, Bye) and writes each
as one JSON object a line with `to_dict`; the launcher turns each line back into the same class with `decode`.
The wire format: {"type": TYPE, "id": job id, ...the fields}; Ready and Bye carry no id. Torch-free.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar


@dataclass(frozen=True)
class Event:
    TYPE: ClassVar[str] = ""
    ABOUT_A_JOB: ClassVar[bool] = True  # its line carries an "id" (null when the engine itself is meant)

    job: str | None = field(default=None, kw_only=True)  # the job it is about; None: the engine itself

    def to_dict(self) -> dict:
        """The protocol object of this event (json.dumps writes it)."""
        data: dict = {"type": self.TYPE}
        if self.ABOUT_A_JOB:
            data["id"] = self.job
        for item in dataclasses.fields(self):
            if item.name != "job":
                value = getattr(self, item.name)
                data[item.name] = _wire(value)
        return data


def _wire(value):
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, tuple):
        return list(value)
    return value


# -- the generation's events (engine/generation/pipeline.py emits them) -------------------------------------
@dataclass(frozen=True)
class Stage(Event):
    TYPE = "stage"
    stage: str  # loading, encoding, denoising, decoding, saving
    detail: str = ""


@dataclass(frozen=True)
class Step(Event):
    TYPE = "step"
    step: int  # 1-based
    total: int
    seconds_per_it: float = 0.0  # of this step
    cached: bool = False  # the step cache reused an earlier step's blocks


@dataclass(frozen=True)
class Preview(Event):
    """A cheap RGB look at the latent after a step: width × height × 3 bytes, row-major (hex on the wire)."""

    TYPE = "preview"
    step: int
    width: int
    height: int
    rgb: bytes


@dataclass(frozen=True)
class Message(Event):
    """Something the user should know that is not an error (e.g. a tiled decode after an out-of-memory)."""

    TYPE = "message"
    text: str


@dataclass(frozen=True)
class Done(Event):
    TYPE = "done"
    paths: tuple[str, ...]  # a list given is kept as a tuple
    seconds: float | None = None  # the whole job
    mean_seconds_per_it: float | None = None  # over the denoising steps

    def __post_init__(self) -> None:
        object.__setattr__(self, "paths", tuple(str(path) for path in self.paths))


# -- the server's own events (engine/server.py) ---------------------------------------------------------------
@dataclass(frozen=True)
class Ready(Event):
    """The engine started and reads commands (once, first)."""

    TYPE = "ready"
    ABOUT_A_JOB = False
    pid: int | None = None


@dataclass(frozen=True)
class Bye(Event):
    """The engine is about to exit cleanly (last)."""

    TYPE = "bye"
    ABOUT_A_JOB = False


@dataclass(frozen=True)
class Started(Event):
    """A job runs now."""

    TYPE = "started"


@dataclass(frozen=True)
class Stats(Event):
    """The engine process's memory, after each step and at the end (MB; None where unknown)."""

    TYPE = "stats"
    rss_mb: float | None = None
    vram_mb: float | None = None
    vram_total_mb: float | None = None


@dataclass(frozen=True)
class JobCancelled(Event):
    TYPE = "cancelled"


@dataclass(frozen=True)
class Failed(Event):
    """A job failed, or (job None) a command the engine could not read: one sentence for the user."""

    TYPE = "error"
    message: str = "Engine error."


@dataclass(frozen=True)
class UnknownJob(Event):
    """A cancel for a job that is neither queued nor running."""

    TYPE = "unknown-job"
    message: str = ""


GenerationEvent = Stage | Step | Preview | Message | Done  # what Engine.generate reports
EventSink = Callable[[GenerationEvent], None]
KINDS: dict[str, type[Event]] = {
    kind.TYPE: kind
    for kind in (
        Stage,
        Step,
        Preview,
        Message,
        Done,
        Ready,
        Bye,
        Started,
        Stats,
        JobCancelled,
        Failed,
        UnknownJob,
    )
}


def decode(data: dict) -> Event | None:
    """The event a protocol object describes; None for an unknown type or fields that do not fit it (keys that
    are not fields are ignored)."""
    kind = KINDS.get(str(data.get("type")))
    if kind is None:
        return None
    names = {item.name for item in dataclasses.fields(kind)} - {"job"}
    values = {name: data[name] for name in names & data.keys()}
    job = data.get("id")
    try:
        if kind is Preview:
            values["rgb"] = bytes.fromhex(str(values.get("rgb", "")))
        if kind is Done and not isinstance(values.get("paths", ()), list | tuple):
            return None
        event = kind(job=None if job is None else str(job), **values)
    except (TypeError, ValueError):
        return None
    if isinstance(event, Preview) and len(event.rgb) != event.width * event.height * 3:
        return None
    return event


def ignore(_event: Event) -> None:
    pass
