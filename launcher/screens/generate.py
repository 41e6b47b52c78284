"""The main screen: the form on the left, progress and the picture on the right."""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.screen import Screen
from textual.widgets import Footer, Static

from launcher.form import FormValues
from launcher.jobs import Job
from launcher.keymap import KEYS
from launcher.loras import LoraFile, lora_folders, scan_loras
from launcher.models import ModelFile
from launcher.screens.loras import LoraScreen
from launcher.seeds import MAX_SEED
from launcher.widgets.image_pane import ImagePane, preview_image
from launcher.widgets.progress_panel import ProgressPanel
from launcher.widgets.prompt_form import PromptForm


class GenerateScreen(Screen):
    BINDINGS = [
        KEYS.binding("random_seed", "random_seed", "New seed"),
        KEYS.binding("toggle_hunt", "toggle_hunt", "Hunt"),
        KEYS.binding("loras", "loras", "LoRAs"),
    ]
    DEFAULT_CSS = """
    GenerateScreen #right { width: 1fr; }
    GenerateScreen #status { height: 1; padding: 0 1; background: $panel; }
    """

    def __init__(
        self,
        values: FormValues,
        models: list[ModelFile],
        renderer: str,
        model_roots: Callable[[], list[Path]] = list,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self._values = values
        self._models = models
        self._renderer = renderer
        self._model_roots = model_roots  # read when needed: the settings screen can change the folders

    def compose(self) -> ComposeResult:
        with Horizontal():
            yield PromptForm(self._values, self._models, self._find_loras, id="form")
            with Vertical(id="right"):
                yield ProgressPanel(id="progress")
                yield ImagePane(self._renderer, id="image")
        yield Static("", id="status", markup=False)
        yield Footer()

    @property
    def form(self) -> PromptForm:
        return self.query_one(PromptForm)

    @property
    def progress(self) -> ProgressPanel:
        return self.query_one(ProgressPanel)

    def set_status(self, text: str) -> None:
        self.query_one("#status", Static).update(text)

    def action_random_seed(self) -> None:
        self.form.set_seed(random.randint(0, MAX_SEED))

    def _find_loras(self) -> list[LoraFile]:
        return scan_loras(self._model_roots())

    def action_loras(self) -> None:
        """The LoRA panel: turn LoRAs on or off and set their strengths (kept for the session)."""
        form = self.form
        files = self._find_loras()
        self.app.push_screen(
            LoraScreen(files, form.lora_choices, lora_folders(self._model_roots()), form.refresh_loras),
            lambda _: form.refresh_loras(),
        )

    def action_toggle_hunt(self) -> None:
        self.form.set_hunt(not self.form.hunt)
        self.notify(
            "Seed hunt on: images keep coming until escape." if self.form.hunt else "Seed hunt off.",
            markup=False,
        )

    # -- called by the app -----------------------------------------------------------------------------
    def job_started(self, job: Job) -> None:
        self.progress.start(job.summary)

    def job_event(self, job: Job, data: dict, tui_mb: float) -> None:
        kind = data.get("type")
        if kind == "stage":
            self.progress.stage(data.get("stage", ""), data.get("detail", ""))
        elif kind == "step":
            self.progress.step(data["step"], data["total"], data.get("seconds_per_it", 0.0))
        elif kind == "stats":
            self.progress.memory(data.get("rss_mb"), data.get("vram_mb"), data.get("vram_total_mb"), tui_mb)
        elif kind == "preview":
            image = preview_image(data["width"], data["height"], bytes.fromhex(data["rgb"]))
            self.query_one(ImagePane).show(image, f"preview · step {data.get('step')}")
        elif kind == "message":
            self.notify(data.get("text", ""), markup=False)

    def job_finished(self, job: Job) -> None:
        if job.paths:
            self.query_one(ImagePane).show(job.paths[-1], job.paths[-1])
            seconds = f" in {job.seconds:.1f} s" if job.seconds is not None else ""
            self.progress.finish(f"Done{seconds}: {len(job.paths)} image(s) saved.")
        elif job.error:
            self.progress.finish(f"Failed: {job.error}")
        else:
            self.progress.finish("Cancelled.")
