"""Messages between the engine client threads, the app and its screens."""

from __future__ import annotations

from dataclasses import dataclass

from textual.message import Message

from launcher.engine_client import EngineExit
from launcher.form import FormValues
from launcher.jobs import Job
from launcher.metadata import ImageParams


@dataclass
class EngineMessage(Message):
    """One protocol line from the engine (posted from its reader thread)."""

    data: dict


@dataclass
class EngineExited(Message):
    exit: EngineExit


@dataclass
class EngineLog(Message):
    line: str


@dataclass
class GenerateRequested(Message):
    """The form asks for these requests; `hunt` keeps going with the next seed until cancelled."""

    requests: list[dict]
    hunt: bool
    values: FormValues


@dataclass
class JobsChanged(Message):
    """Something in the queue changed state (added, started, finished)."""


@dataclass
class JobProgress(Message):
    """A running job's engine event (stage, step, preview, stats, message)."""

    job: Job
    data: dict


@dataclass
class JobFinished(Message):
    job: Job


@dataclass
class UseParams(Message):
    """Fill the generate form from an image's parameters; `refine_from` makes it img2img from that image."""

    params: ImageParams
    refine_from: str | None = None


@dataclass
class SettingsSaved(Message):
    pass
