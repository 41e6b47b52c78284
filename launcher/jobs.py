"""The queue of generation jobs, as plain state: what waits, what runs, what came of each."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from enum import Enum


class JobState(str, Enum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


@dataclass
class Job:
    id: str
    request: dict  # GenerateRequest.to_dict()
    state: JobState = JobState.QUEUED
    paths: list[str] = field(default_factory=list)
    error: str | None = None
    step: int = 0
    total: int = 0
    seconds: float | None = None
    hunt: bool = False  # part of an endless seed hunt

    @property
    def finished(self) -> bool:
        return self.state in (JobState.DONE, JobState.FAILED, JobState.CANCELLED)

    @property
    def summary(self) -> str:
        r = self.request
        prompt = " ".join(str(r.get("prompt", "")).split())
        prompt = prompt if len(prompt) <= 40 else prompt[:39] + "…"
        return f"seed {r.get('seed')} · {r.get('width')}x{r.get('height')} · {prompt}"


@dataclass
class JobQueue:
    jobs: list[Job] = field(default_factory=list)
    keep_finished: int = 200
    _ids: itertools.count = field(default_factory=lambda: itertools.count(1), repr=False)

    def add(self, request: dict, hunt: bool = False) -> Job:
        job = Job(id=f"job-{next(self._ids)}", request=request, hunt=hunt)
        self.jobs.append(job)
        self._trim()
        return job

    def get(self, job_id: str) -> Job | None:
        return next((job for job in self.jobs if job.id == job_id), None)

    def running(self) -> Job | None:
        return next((job for job in self.jobs if job.state is JobState.RUNNING), None)

    def queued(self) -> list[Job]:
        return [job for job in self.jobs if job.state is JobState.QUEUED]

    def next_queued(self) -> Job | None:
        return next((job for job in self.jobs if job.state is JobState.QUEUED), None)

    def cancel_queued(self, job_id: str | None = None) -> list[Job]:
        """Drop one queued job (or all of them); the running job is the engine's to cancel."""
        dropped = [j for j in self.queued() if job_id is None or j.id == job_id]
        for job in dropped:
            job.state = JobState.CANCELLED
        return dropped

    def _trim(self) -> None:
        finished = [job for job in self.jobs if job.finished]
        for job in finished[: max(0, len(finished) - self.keep_finished)]:
            self.jobs.remove(job)
