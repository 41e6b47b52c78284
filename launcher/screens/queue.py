"""The job queue: what waits, what runs, what came of each; cancel one or all."""

from __future__ import annotations

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Static

from launcher.jobs import Job, JobQueue
from launcher.keymap import KEYS
from launcher.messages import JobCancelRequested, JobFinished, JobProgress, JobsChanged, JobStarted


class QueueScreen(Screen):
    BINDINGS = [KEYS.binding("cancel_selected", "cancel_selected", "Cancel job")]
    DEFAULT_CSS = """
    QueueScreen #title { height: 1; padding: 0 1; background: $panel; }
    QueueScreen DataTable { height: 1fr; }
    """

    def __init__(self, jobs: JobQueue, **kwargs) -> None:
        super().__init__(**kwargs)
        self._jobs = jobs

    def compose(self) -> ComposeResult:
        yield Static("Queue", id="title")
        yield DataTable(id="jobs", cursor_type="row", zebra_stripes=True)
        yield Footer()

    def on_mount(self) -> None:
        self.query_one(DataTable).add_columns("Job", "State", "Seed", "Size", "Steps", "Prompt", "Result")
        self.refresh_jobs()

    def on_screen_resume(self) -> None:
        self.refresh_jobs()

    @on(JobsChanged)
    @on(JobStarted)
    @on(JobProgress)
    @on(JobFinished)
    def _jobs_changed(self) -> None:
        if self.is_current:  # shown again: on_screen_resume reads the queue
            self.refresh_jobs()

    def refresh_jobs(self) -> None:
        table = self.query_one(DataTable)
        row = table.cursor_row
        table.clear()
        for job in self._jobs.jobs:
            table.add_row(*(Text(cell) for cell in self._row(job)), key=job.id)
        if table.row_count:
            table.move_cursor(row=min(row, table.row_count - 1))

    @staticmethod
    def _row(job: Job) -> tuple[str, ...]:
        r = job.request
        prompt = " ".join(str(r.get("prompt", "")).split())[:48]
        state = job.state.value + (
            f" {job.step}/{job.total}" if job.total and job.state.value == "running" else ""
        )
        result = ", ".join(job.paths) if job.paths else (job.error or "")
        return (
            job.id,
            state,
            str(r.get("seed")),
            f"{r.get('width')}x{r.get('height')}",
            str(r.get("steps")),
            prompt,
            result,
        )

    def selected_job(self) -> str | None:
        table = self.query_one(DataTable)
        if not table.row_count:
            return None
        return table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value

    def action_cancel_selected(self) -> None:
        job_id = self.selected_job()
        if job_id:
            self.post_message(JobCancelRequested(job_id))
