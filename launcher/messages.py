"""The typed messages of the TUI.

Up (posted by the engine client's threads and by screens, handled by the app with `@on`): the engine's events,
its exit and log lines, and what the user asked for on a screen. Down (posted by the app to its screens, which
handle the ones they show; they do not bubble back): what happened to jobs and the log. State that several
screens show (the model files, the folders, the status line) is not a message: it is a reactive on the app
that the screens bind to (launcher/app.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from textual.message import Message

from engine.contract.events import Event
from launcher.config import Settings
from launcher.engine_client import EngineExit
from launcher.form import FormValues
from launcher.jobs import Job
from launcher.metadata import ImageParams
from launcher.models import InstalledFile


# -- up: from the engine client's threads to the app --------------------------------------------------------
@dataclass
class EngineReported(Message):
    """One protocol line from the engine, decoded (engine/contract/events.py)."""

    event: Event


@dataclass
class EngineExited(Message):
    exit: EngineExit


@dataclass
class EngineLog(Message):
    line: str


# -- up: from screens (and the app's own keys) to the app --------------------------------------------------
@dataclass
class GenerateRequested(Message):
    """Queue these requests; `hunt` keeps going with the next seed until cancelled."""

    requests: list[dict]
    hunt: bool
    values: FormValues


@dataclass
class UseParams(Message):
    """Fill the generate form from an image's parameters; `refine_from` makes it img2img from that image."""

    params: ImageParams
    refine_from: str | None = None
    image: str | None = None  # the image they were read from (an edit's inputs are looked for beside it)


@dataclass
class EditRequested(Message):
    """Open this image in the Edit screen."""

    path: str


@dataclass
class SettingsSaved(Message):
    """The settings screen's values, to write to config.toml and use from now on."""

    settings: Settings


@dataclass
class JobCancelRequested(Message):
    """Cancel this job: dropped when queued, stopped between steps when running."""

    job_id: str


@dataclass
class ModelsChanged(Message):
    """The models screen scanned the folders (after a download, the wizard, a rescan)."""

    models: list[InstalledFile]


# -- down: from the app to its screens ---------------------------------------------------------------------
@dataclass
class JobStarted(Message, bubble=False):
    job: Job


@dataclass
class JobProgress(Message, bubble=False):
    """An engine event about the running job (stage, step, preview, stats, note)."""

    job: Job
    event: Event


@dataclass
class JobFinished(Message, bubble=False):
    """The job is done, failed or cancelled (its state says which)."""

    job: Job


@dataclass
class JobsChanged(Message, bubble=False):
    """Jobs were added to or dropped from the queue."""


@dataclass
class LogLine(Message, bubble=False):
    line: str
