"""FluxDeckApp: the screens, the job queue and the engine process that does the work."""

from __future__ import annotations

import dataclasses
import random
import sys
from collections import deque
from collections.abc import Iterable
from pathlib import Path

from textual import on
from textual.app import App, SystemCommand
from textual.screen import ModalScreen, Screen

from launcher.cli import LaunchOptions
from launcher.config import PROJECT_ROOT, ConfigFile, Settings
from launcher.engine_client import EngineExit, EngineProcess, default_engine_command
from launcher.form import AUTO_MODEL, FormError, FormValues, build_requests
from launcher.jobs import Job, JobQueue, JobState
from launcher.keymap import KEYS
from launcher.messages import EngineExited, EngineLog, EngineMessage, GenerateRequested, UseParams
from launcher.metadata import ImageParams
from launcher.models import ModelFile, defaults_for_file, root_of, scan_models
from launcher.screens.gallery import GalleryScreen
from launcher.screens.generate import GenerateScreen
from launcher.screens.load_png import LoadPngScreen
from launcher.screens.log import LogScreen
from launcher.screens.models import ModelsScreen
from launcher.screens.queue import QueueScreen
from launcher.screens.settings import SettingsScreen
from launcher.seeds import SeedMode, next_seed

MAX_CRASHES_IN_A_ROW = 3
REFINE_DENOISE = 0.55


def process_rss_mb() -> float:
    try:
        import psutil

        return psutil.Process().memory_info().rss / 2**20
    except Exception:
        return 0.0


class FluxDeckApp(App):
    TITLE = "FluxDeck"
    CSS = """
    Screen { background: $background; }
    """
    BINDINGS = [
        KEYS.binding("generate", "generate", "Generate", priority=True),
        KEYS.binding("cancel", "cancel", "Cancel"),
        KEYS.binding("cancel_all", "cancel_all", "Cancel all", priority=True),
        KEYS.binding("load_png", "load_png", "Load PNG", priority=True),
        KEYS.binding("show_generate", "show('generate')", "Generate", show=False),
        KEYS.binding("show_gallery", "show('gallery')", "Gallery"),
        KEYS.binding("show_queue", "show('queue')", "Queue"),
        KEYS.binding("show_models", "show('models')", "Models"),
        KEYS.binding("show_settings", "show('settings')", "Settings"),
        KEYS.binding("show_log", "show('log')", "Log"),
    ]

    def __init__(
        self,
        options: LaunchOptions | None = None,
        config: ConfigFile | None = None,
        *,
        engine_command: list[str] | None = None,
        bootstrap_command: list[str] | None = None,
        root: Path = PROJECT_ROOT,
        start_engine: bool = True,
        cursor_blink: bool = True,
        seed: int | None = None,
    ) -> None:
        super().__init__()
        self.options = options or LaunchOptions()
        self.config_file = config or ConfigFile(self.options.config)
        self.root = root
        self.settings = self._effective(self.config_file.settings)
        self.cursor_blink = cursor_blink
        self.jobs = JobQueue()
        self.rng = random.Random(seed)
        self.engine_command = engine_command or default_engine_command()
        self.bootstrap_command = bootstrap_command or [sys.executable, "-m", "bootstrap"]
        self.start_engine = start_engine
        self.engine = EngineProcess(
            on_message=lambda data: self.post_message(EngineMessage(data)),
            on_exit=lambda ended: self.post_message(EngineExited(ended)),
            on_log=lambda line: self.post_message(EngineLog(line)),
            command=self.engine_command,
            cwd=PROJECT_ROOT,  # where `-m engine` is importable, whatever the current directory
        )
        self.engine_busy: str | None = None  # id of the job the engine is working on
        self.hunting = False
        self.hunt_values: FormValues | None = None
        self.crashes_in_a_row = 0
        self.log_lines: deque[str] = deque(maxlen=5000)
        self.models: list[ModelFile] = scan_models(self.model_roots)
        if self.config_file.keys:
            self.set_keymap(KEYS.overridden(self.config_file.keys))

    # -- settings and folders --------------------------------------------------------------------------
    def _effective(self, saved: Settings) -> Settings:
        """The saved settings with the launch flags on top."""
        o = self.options
        return dataclasses.replace(
            saved,
            device="cpu" if o.cpu else saved.device,
            models_dir=o.models_dir or saved.models_dir,
            output_dir=o.output_dir or saved.output_dir,
        )

    def models_root(self, values: FormValues) -> Path:
        """The models folder of the chosen model (FluxDeck's own, or a ComfyUI/Forge one), for its other files."""
        return self.model_roots[0] if values.model == AUTO_MODEL else root_of(values.model, self.model_roots)

    @property
    def model_roots(self) -> list[Path]:
        return self.settings.model_roots(self.root)

    def key_for(self, binding_id: str) -> str:
        """The key a binding answers to (config.toml's [keys] or the default), for hints on screen."""
        keys = KEYS.overridden(self.config_file.keys).get(binding_id) or getattr(KEYS, binding_id)
        return keys.split(",")[0].strip()

    @property
    def output_dir(self) -> Path:
        return self.settings.resolve(self.settings.output_dir, self.root)

    def initial_values(self) -> FormValues:
        o = self.options
        model = next((m for m in self.models if m.is_model), None)
        defaults = defaults_for_file(model.path if model else "")
        values = FormValues(
            steps=defaults.steps, guidance=defaults.guidance, seed=self.rng.randint(0, 2**32 - 1)
        )
        for name in ("prompt", "width", "height", "steps", "seed"):
            if getattr(o, name) is not None:
                setattr(values, name, getattr(o, name))
        return values

    def save_settings(self, settings: Settings) -> None:
        self.config_file.settings = settings
        try:
            self.config_file.save()
        except OSError as error:
            self.notify(f"Could not save {self.config_file.path}: {error}", severity="error", markup=False)
            return
        self.settings = self._effective(settings)
        self.models_changed(scan_models(self.model_roots))
        gallery, models = self.get_screen("gallery"), self.get_screen("models")
        if isinstance(gallery, GalleryScreen):
            gallery.folder = self.output_dir
        if isinstance(models, ModelsScreen):
            models.roots = self.model_roots
        self.notify(f"Settings saved to {self.config_file.path}.", markup=False)

    def models_changed(self, models: list[ModelFile]) -> None:
        self.models = models
        generate = self._screen("generate")
        if isinstance(generate, GenerateScreen) and generate.is_mounted:
            generate.form.set_models(models)

    # -- screens ---------------------------------------------------------------------------------------
    def on_mount(self) -> None:
        renderer = self.options.renderer
        generate = GenerateScreen(self.initial_values(), self.models, renderer, lambda: self.model_roots)
        self.install_screen(generate, "generate")
        self.install_screen(GalleryScreen(self.output_dir, renderer), "gallery")
        self.install_screen(QueueScreen(self.jobs), "queue")
        self.install_screen(ModelsScreen(self.model_roots, self.bootstrap_command), "models")
        self.install_screen(SettingsScreen(self.config_file.settings, str(self.config_file.path)), "settings")
        self.install_screen(LogScreen(self.log_lines), "log")
        self.push_screen("generate")
        if not any(m.is_model for m in self.models) and not self.options.no_wizard:
            self.push_screen("models")
            self.notify(
                "No model found: press w for the download wizard, or set the models folder (F6).",
                markup=False,
            )
        if self.start_engine:
            self._start_engine()
        self.call_after_refresh(self._status)

    def _screen(self, name: str) -> Screen | None:
        """An installed screen that is mounted (engine replies can arrive while the app shuts down)."""
        try:
            screen = self.get_screen(name)
        except KeyError:
            return None
        return screen if screen.is_mounted and self.is_running else None

    def action_show(self, name: str) -> None:
        if self.screen is self._screen(name):
            return
        while len(self.screen_stack) > 2 and isinstance(self.screen, ModalScreen):
            self.pop_screen()  # a modal (the LoRA panel) over a screen closes first: no screen twice in the stack
        if self.screen is self._screen(name):
            return
        if len(self.screen_stack) > 1:
            self.switch_screen(name)
        else:
            self.push_screen(name)

    def get_system_commands(self, screen: Screen) -> Iterable[SystemCommand]:
        yield from super().get_system_commands(screen)
        yield SystemCommand("Generate", "Queue images from the form (ctrl+g)", self.action_generate)
        yield SystemCommand(
            "Cancel", "Cancel the running job and stop a seed hunt (escape)", self.action_cancel
        )
        yield SystemCommand(
            "Cancel all", "Cancel the running job and empty the queue", self.action_cancel_all
        )
        yield SystemCommand(
            "Load PNG parameters", "Fill the form from a PNG's metadata", self.action_load_png
        )
        for name in ("generate", "gallery", "queue", "models", "settings", "log"):
            yield SystemCommand(
                f"Show {name}", f"Switch to the {name} screen", lambda n=name: self.action_show(n)
            )
        for binding in screen.BINDINGS:
            if hasattr(binding, "action") and hasattr(screen, f"action_{binding.action}"):
                action = getattr(screen, f"action_{binding.action}")
                yield SystemCommand(binding.description, f"{binding.description} ({binding.key})", action)

    def log_line(self, line: str) -> None:
        self.log_lines.append(line)
        log = self._screen("log")
        if isinstance(log, LogScreen) and log.is_mounted:
            log.add(line)

    def _status(self) -> None:
        generate = self._screen("generate")
        if not (isinstance(generate, GenerateScreen) and generate.is_mounted):
            return
        engine = f"engine pid {self.engine.pid}" if self.engine.alive else "engine stopped"
        queued = len(self.jobs.queued())
        hunt = " · seed hunt on" if self.hunting else ""
        generate.set_status(f"{engine} · {queued} queued{hunt} · outputs: {self.output_dir}")
        queue = self._screen("queue")
        if isinstance(queue, QueueScreen) and queue.is_mounted:
            queue.refresh_jobs()

    # -- generating ------------------------------------------------------------------------------------
    def action_generate(self) -> None:
        generate = self._screen("generate")
        if not isinstance(generate, GenerateScreen) or not generate.is_mounted:
            return
        try:
            values = generate.form.values()
        except FormError as error:
            self.notify(str(error), severity="error", markup=False)
            return
        if not values.prompt:
            self.notify("Write a prompt first.", severity="warning", markup=False)
            return
        requests = build_requests(values, self.settings, self.output_dir, self.models_root(values), self.rng)
        self.post_message(GenerateRequested(requests, values.hunt, values))
        if values.seed_mode is SeedMode.INCREMENT:
            generate.form.set_seed(values.seed + values.batch)

    @on(GenerateRequested)
    def _enqueue(self, message: GenerateRequested) -> None:
        self.crashes_in_a_row = 0
        for request in message.requests:
            self.jobs.add(request, hunt=message.hunt)
        if message.hunt:
            self.hunting = True
            self.hunt_values = message.values
        count = len(message.requests)
        self.log_line(f"Queued {count} job(s){' (seed hunt)' if message.hunt else ''}.")
        self._pump()

    def _pump(self) -> None:
        """Give the engine the next queued job when it is free; (re)start it when it is not running."""
        if self.engine_busy is None:
            job = self.jobs.next_queued()
            if job is not None and self.crashes_in_a_row < MAX_CRASHES_IN_A_ROW:
                if not self.engine.alive:
                    self._start_engine()
                if self.engine.send({"type": "job", "id": job.id, "request": job.request}):
                    job.state = JobState.RUNNING
                    self.engine_busy = job.id
                    generate = self._screen("generate")
                    if isinstance(generate, GenerateScreen):
                        generate.job_started(job)
                else:
                    self.log_line(
                        "Could not send the job to the engine; it will be retried when it restarts."
                    )
        self._status()

    def _start_engine(self) -> None:
        if self.engine.alive:
            return
        self.log_line("Starting the engine: " + " ".join(self.engine_command))
        try:
            self.engine.start()
        except OSError as error:
            self.notify(f"Could not start the engine: {error}", severity="error", timeout=15, markup=False)
            self.log_line(f"Could not start the engine: {error}")

    def _hunt_next(self, finished: Job) -> None:
        if not (self.hunting and finished.hunt and self.hunt_values is not None) or self.jobs.queued():
            return
        values = dataclasses.replace(
            self.hunt_values,
            seed=next_seed(self.hunt_values.seed_mode, int(finished.request["seed"]), self.rng),
        )
        values.batch, values.seed_mode = 1, SeedMode.FIXED
        self.hunt_values = dataclasses.replace(values, seed_mode=self.hunt_values.seed_mode)
        request = build_requests(values, self.settings, self.output_dir, self.models_root(values), self.rng)[
            0
        ]
        self.jobs.add(request, hunt=True)

    def action_cancel(self) -> None:
        """Cancel the running job (between steps) and stop a seed hunt; queued jobs stay."""
        self.hunting = False
        if self.engine_busy is not None:
            self.engine.send({"type": "cancel", "id": self.engine_busy})
            self.notify("Cancelling…", markup=False)
        self._status()

    def action_cancel_all(self) -> None:
        dropped = self.jobs.cancel_queued()
        self.action_cancel()
        if dropped:
            self.notify(f"Dropped {len(dropped)} queued job(s).", markup=False)
        self._status()

    def cancel_job(self, job_id: str) -> None:
        if job_id == self.engine_busy:
            self.action_cancel()
        elif self.jobs.cancel_queued(job_id):
            self.notify(f"Dropped {job_id}.", markup=False)
        self._status()

    # -- the engine's replies --------------------------------------------------------------------------
    @on(EngineLog)
    def _engine_log(self, message: EngineLog) -> None:
        self.log_line(message.line)

    @on(EngineMessage)
    def _engine_message(self, message: EngineMessage) -> None:
        data = message.data
        kind = data.get("type")
        if kind == "ready":
            self.log_line(f"Engine ready (pid {data.get('pid')}).")
            self._status()
            return
        if kind == "bye":
            return
        job = self.jobs.get(str(data.get("id")))
        if job is None:
            if kind == "error":
                self.notify(data.get("message", "Engine error."), severity="error", markup=False)
                self.log_line(f"Engine error: {data.get('message')}")
            return
        generate = self._screen("generate")
        if kind in ("stage", "step", "preview", "stats", "message", "started"):
            if kind == "step":
                job.step, job.total = data["step"], data["total"]
            if kind == "stage":
                self.log_line(f"{job.id}: {data.get('stage')} {data.get('detail', '')}".rstrip())
            if kind == "message":
                self.log_line(f"{job.id}: {data.get('text')}")
            if kind == "preview" and not self.settings.live_preview:
                return
            if isinstance(generate, GenerateScreen):
                generate.job_event(job, data, process_rss_mb())
            if kind == "step":
                queue = self._screen("queue")
                if isinstance(queue, QueueScreen) and queue.is_mounted and self.screen is queue:
                    queue.refresh_jobs()
            return
        if kind == "done":
            job.state, job.paths, job.seconds = (
                JobState.DONE,
                list(data.get("paths", [])),
                data.get("seconds"),
            )
            self.crashes_in_a_row = 0
            self.log_line(f"{job.id}: done in {job.seconds:.1f} s: {', '.join(job.paths)}")
            self._hunt_next(job)
        elif kind == "cancelled":
            job.state = JobState.CANCELLED
            self.log_line(f"{job.id}: cancelled")
        elif kind == "error":
            job.state, job.error = JobState.FAILED, data.get("message", "Engine error.")
            self.log_line(f"{job.id}: {job.error}")
            self.notify(job.error, severity="error", timeout=10, markup=False)
        else:
            return
        self._job_ended(job)

    def _job_ended(self, job: Job) -> None:
        if job.id == self.engine_busy:
            self.engine_busy = None
        generate = self._screen("generate")
        if isinstance(generate, GenerateScreen):
            generate.job_finished(job)
        gallery = self._screen("gallery")
        if job.paths and isinstance(gallery, GalleryScreen) and gallery.is_mounted and self.screen is gallery:
            gallery.refresh_images()
        self._pump()

    @on(EngineExited)
    def _engine_exited(self, message: EngineExited) -> None:
        ended: EngineExit = message.exit
        if ended.pid is not None and self.engine.pid not in (None, ended.pid):
            return  # an older process; a new one already runs
        if ended.expected:
            return
        reason = ended.describe()
        self.log_line(reason)
        for line in ended.stderr_tail:
            self.log_line(f"  {line}")
        job = self.jobs.get(self.engine_busy) if self.engine_busy else None
        self.engine_busy = None
        self.hunting = False
        if job is not None:
            self.crashes_in_a_row += 1
            job.state, job.error = JobState.FAILED, reason
            generate = self._screen("generate")
            if isinstance(generate, GenerateScreen):
                generate.job_finished(job)
        waiting = len(self.jobs.queued())
        more = f" {waiting} queued job(s) kept; it restarts for the next one." if waiting else ""
        if self.crashes_in_a_row >= MAX_CRASHES_IN_A_ROW and waiting:
            more = f" It failed {self.crashes_in_a_row} times in a row: queue paused, press ctrl+g to go on."
        self.notify(reason + more, severity="error", timeout=20, markup=False)
        self._pump()

    # -- parameters from images ------------------------------------------------------------------------
    def action_load_png(self) -> None:
        def loaded(params: ImageParams | None) -> None:
            if params is not None:
                self.post_message(UseParams(params))

        self.push_screen(LoadPngScreen(), loaded)

    @on(UseParams)
    def _use_params(self, message: UseParams) -> None:
        generate = self._screen("generate")
        if not isinstance(generate, GenerateScreen):
            return
        self.action_show("generate")
        try:
            values = generate.form.values()
        except FormError:
            values = FormValues()
        values = values.with_params(message.params)
        if message.refine_from:
            values.init_image, values.denoise = message.refine_from, REFINE_DENOISE
            values.hunt = False
        missing = generate.form.set_values(values)
        what = f"Refining {Path(message.refine_from).name}" if message.refine_from else "Parameters loaded"
        self.notify(f"{what}: press {self.key_for('generate')} to generate.", markup=False)
        if missing:
            self.notify(
                f"LoRA(s) not found in the models folders, left off: {', '.join(missing)}.",
                severity="warning",
                timeout=10,
                markup=False,
            )

    # -- model files about to be replaced -------------------------------------------------------------
    def release_model_files(self) -> str | None:
        """Stop the engine so that it lets go of the model files it has memory-mapped (Windows cannot replace a
        mapped file) before a download or repair writes over them; the next job starts it again. Returns why
        not, when a generation is running."""
        if self.engine_busy is not None:
            return "A generation is running: let it finish or cancel it (escape) before downloading."
        if self.engine.alive:
            self.engine.stop(timeout=10.0)
            self.log_line("Engine stopped so that model files can be replaced; the next job starts it again.")
        return None

    # -- leaving ---------------------------------------------------------------------------------------
    async def action_quit(self) -> None:
        self.hunting = False
        self.engine.stop(timeout=5.0)
        self.exit()
