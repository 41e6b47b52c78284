"""The main screen: the form on the left, progress and the picture on the right."""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

from textual import on
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.reactive import var
from textual.screen import Screen
from textual.widgets import Footer, Static

from engine.contract import events
from launcher.controlnets import ControlNetFile, controlnet_folders, controlnets_in_request, scan_controlnets
from launcher.form import FormValues
from launcher.keymap import KEYS
from launcher.limits import FormError
from launcher.loras import LoraFile, lora_folders, scan_loras
from launcher.messages import JobFinished, JobProgress, JobStarted
from launcher.metadata import ImageParams
from launcher.models import InstalledFile
from launcher.screens.controlnets import ControlNetScreen
from launcher.screens.loras import LoraScreen
from launcher.seeds import MAX_RANDOM_SEED, SeedMode
from launcher.widgets.image_pane import ImagePane, preview_image
from launcher.widgets.progress_panel import ProgressPanel, process_rss_mb
from launcher.widgets.prompt_form import PromptForm


class GenerateScreen(Screen):
    BINDINGS = [
        KEYS.binding("random_seed", "random_seed", "New seed"),
        KEYS.binding("toggle_hunt", "toggle_hunt", "Hunt"),
        KEYS.binding("loras", "loras", "LoRAs"),
        KEYS.binding("controlnets", "controlnets", "ControlNets"),
    ]
    DEFAULT_CSS = """
    GenerateScreen #right { width: 1fr; }
    GenerateScreen #status { height: 1; padding: 0 1; background: $panel; }
    """

    # Bound to the app's state (FluxDeckApp.on_mount); the form binds to `models` in turn.
    models: var[list[InstalledFile]] = var(list, init=False)
    model_roots: var[list[Path]] = var(list, init=False)  # where the LoRA panel looks
    status: var[str] = var("", init=False)

    def __init__(
        self,
        values: FormValues,
        models: list[InstalledFile],
        renderer: str,
        key_for: Callable[[str], str] = KEYS.key_for,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self._values = values
        self.set_reactive(GenerateScreen.models, models)
        self._renderer = renderer
        self._key_for = key_for  # the key of a binding (config.toml can remap it), for hints

    def compose(self) -> ComposeResult:
        with Horizontal():
            yield PromptForm(
                self._values,
                self.models,
                self._find_loras,
                lora_key=self._key_for("loras"),
                find_controlnets=self._find_controlnets,
                controlnet_key=self._key_for("controlnets"),
                id="form",
            ).data_bind(GenerateScreen.models)
            with Vertical(id="right"):
                yield ProgressPanel(id="progress")
                yield ImagePane(self._renderer, id="image")
        yield Static(self.status, id="status", markup=False)
        yield Footer()

    @property
    def form(self) -> PromptForm:
        return self.query_one(PromptForm)

    @property
    def progress(self) -> ProgressPanel:
        return self.query_one(ProgressPanel)

    def watch_status(self, status: str) -> None:
        if self.is_mounted:
            self.query_one("#status", Static).update(status)

    def action_random_seed(self) -> None:
        self.form.set_seed(random.randint(0, MAX_RANDOM_SEED))

    def _find_loras(self) -> list[LoraFile]:
        return scan_loras(self.model_roots)

    def action_loras(self) -> None:
        """The LoRA panel: turn LoRAs on or off and set their strengths (kept for the session)."""
        form = self.form
        files = self._find_loras()
        self.app.push_screen(
            LoraScreen(files, form.lora_choices, lora_folders(self.model_roots), form.refresh_loras),
            lambda _: form.refresh_loras(),
        )

    def _find_controlnets(self) -> list[ControlNetFile]:
        return scan_controlnets(self.model_roots)

    def action_controlnets(self) -> None:
        """The ControlNet panel: files, control images, preprocessors, strengths, ranges, modes (for the session)."""
        form = self.form
        self.app.push_screen(
            ControlNetScreen(
                self._find_controlnets(),
                form.controlnet_choices,
                controlnet_folders(self.model_roots),
                self._renderer,
                form.refresh_controlnets,
            ),
            lambda _: form.refresh_controlnets(),
        )

    def action_toggle_hunt(self) -> None:
        self.form.set_hunt(not self.form.hunt)
        self.notify(
            "Seed hunt on: images keep coming until escape." if self.form.hunt else "Seed hunt off.",
            markup=False,
        )

    # -- asked by the app ------------------------------------------------------------------------------
    def submit(self) -> FormValues | None:
        """The form's values for a press of generate (None after saying what is wrong); a +1 seed moves on
        past the images asked for."""
        try:
            values = self.form.values()
        except FormError as error:
            self.notify(str(error), severity="error", markup=False)
            return None
        if not values.prompt:
            self.notify("Write a prompt first.", severity="warning", markup=False)
            return None
        if values.seed_mode is SeedMode.INCREMENT:
            self.form.set_seed(values.seed + values.batch)
        return values

    def use_params(self, params: ImageParams, refine_from: str | None, denoise: float) -> None:
        """Fill the form from an image's parameters; `refine_from`: img2img from that image at `denoise`."""
        try:
            values = self.form.values()
        except FormError:
            values = FormValues()
        values = values.with_params(params)
        if refine_from:
            values.init_image, values.denoise = refine_from, denoise
            values.hunt = False
        missing = self.form.set_values(values)
        missing += self.form.set_controlnets(controlnets_in_request(params.request))
        what = f"Refining {Path(refine_from).name}" if refine_from else "Parameters loaded"
        self.notify(f"{what}: press {self._key_for('generate')} to generate.", markup=False)
        if missing:
            self.notify(
                f"LoRA(s) or ControlNet(s) not found in the models folders, left off: {', '.join(missing)}.",
                severity="warning",
                timeout=10,
                markup=False,
            )

    # -- what the app reports about jobs ---------------------------------------------------------------
    @on(JobStarted)
    def _job_started(self, message: JobStarted) -> None:
        self.progress.start(message.job.summary)

    @on(JobProgress)
    def _job_progress(self, message: JobProgress) -> None:
        match message.event:
            case events.Stage(stage=stage, detail=detail):
                self.progress.stage(stage, detail)
            case events.Step(step=step, total=total, seconds_per_it=seconds, cached=cached):
                self.progress.step(step, total, seconds, cached)
            case events.Stats(rss_mb=rss, vram_mb=vram, vram_total_mb=vram_total):
                self.progress.memory(rss, vram, vram_total, process_rss_mb())
            case events.Preview(width=width, height=height, rgb=rgb, step=step):
                self.query_one(ImagePane).show(preview_image(width, height, rgb), f"preview · step {step}")
            case events.Message(text=text):
                self.notify(text, markup=False)

    @on(JobFinished)
    def _job_finished(self, message: JobFinished) -> None:
        job = message.job
        if job.paths:
            self.query_one(ImagePane).show(job.paths[-1], job.paths[-1])
            seconds = f" in {job.seconds:.1f} s" if job.seconds is not None else ""
            self.progress.finish(f"Done{seconds}: {len(job.paths)} image(s) saved.")
        elif job.error:
            self.progress.finish(f"Failed: {job.error}")
        else:
            self.progress.finish("Cancelled.")
