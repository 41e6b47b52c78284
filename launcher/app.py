"""FluxDeckApp: the screens, the job queue and the engine process that does the work.

How the parts talk (launcher/messages.py): the engine client's threads post the engine's decoded events
(engine/contract/events.py); screens post what the user asked for (settings saved, a job cancelled, models rescanned,
parameters to reuse) and the app handles them with `@on`. The app posts what happened to jobs and the log to
its screens, and keeps the state several screens show (model files, folders, the status line) in reactives
that the screens bind to. The one screen the app calls is the generate screen it owns, to read the form on
ctrl+g and to fill it from an image.
"""

from __future__ import annotations

import dataclasses
import random
import sys
from collections import deque
from collections.abc import Callable, Iterable
from pathlib import Path

from textual import events as textual_events
from textual import on
from textual.app import App, SystemCommand
from textual.message import Message
from textual.reactive import var
from textual.screen import ModalScreen, Screen
from textual.widgets import Input, TextArea

from engine.contract import events
from engine.contract.protocol import Cancel, Generate
from launcher.cli import LaunchOptions
from launcher.config import PROJECT_ROOT, ConfigFile, Settings
from launcher.controlnets import controlnets_in_request, write_maps
from launcher.edits import INPUTS_FOLDER, EditMode, edit_from_request, find_input, recorded_inputs
from launcher.engine_client import EngineExit, EngineProcess, default_engine_command
from launcher.form import AUTO_MODEL, FormValues, build_requests
from launcher.jobs import Job, JobQueue, JobState
from launcher.keymap import KEYS
from launcher.limits import FormError
from launcher.messages import (
    EditRequested,
    EngineExited,
    EngineLog,
    EngineReported,
    GenerateRequested,
    JobCancelRequested,
    JobFinished,
    JobProgress,
    JobsChanged,
    JobStarted,
    LogLine,
    ModelsChanged,
    SettingsSaved,
    UseParams,
)
from launcher.metadata import ImageParams
from launcher.models import InstalledFile, defaults_for_file, root_of, scan_models
from launcher.screens.edit import EditScreen
from launcher.screens.gallery import GalleryScreen
from launcher.screens.generate import GenerateScreen
from launcher.screens.load_png import LoadPngScreen
from launcher.screens.log import LogScreen
from launcher.screens.models import ModelsScreen
from launcher.screens.queue import QueueScreen
from launcher.screens.settings import SettingsScreen
from launcher.seeds import MAX_RANDOM_SEED, SeedMode, next_seed

MAX_CRASHES_IN_A_ROW = 3
REFINE_DENOISE = 0.55


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
        KEYS.binding("show_edit", "show('edit')", "Edit"),
    ]

    # State the screens show; they bind to it (data_bind) instead of being told.
    models: var[list[InstalledFile]] = var(list, init=False)
    model_roots: var[list[Path]] = var(list, init=False)
    output_dir: var[Path] = var(Path, init=False)
    status: var[str] = var("", init=False)
    _generate: GenerateScreen  # made in on_mount
    _edit: EditScreen

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
        self.config_file = config or ConfigFile.load(self.options.config)
        self.root = root
        self.settings = Settings()
        self._use_settings(self.config_file.settings)
        self.cursor_blink = cursor_blink
        self.jobs = JobQueue()
        self.rng = random.Random(seed)
        self.engine_command = engine_command or default_engine_command()
        self.bootstrap_command = bootstrap_command or [sys.executable, "-m", "bootstrap"]
        self.start_engine = start_engine
        self.engine = EngineProcess(
            on_message=self._engine_said,
            on_exit=lambda ended: self.post_message(EngineExited(ended)),
            on_log=lambda line: self.post_message(EngineLog(line)),
            command=self.engine_command,
            cwd=PROJECT_ROOT,  # where `-m engine` is importable, whatever the current directory
        )
        self.hunting = False
        self.hunt_values: FormValues | None = None
        self.crashes_in_a_row = 0
        self.log_lines: deque[str] = deque(maxlen=5000)
        self.models = scan_models(self.model_roots)
        self._screens: list[Screen] = []
        if self.config_file.keys:
            self.set_keymap(KEYS.overridden(self.config_file.keys))

    # -- settings and folders --------------------------------------------------------------------------
    def _use_settings(self, saved: Settings) -> None:
        """The saved settings with the launch flags on top, and the folders they name."""
        o = self.options
        self.settings = dataclasses.replace(
            saved,
            device="cpu" if o.cpu else saved.device,
            models_dir=o.models_dir or saved.models_dir,
            output_dir=o.output_dir or saved.output_dir,
        )
        self.model_roots = self.settings.model_roots(self.root)
        self.output_dir = self.settings.resolve(self.settings.output_dir, self.root)

    def models_root(self, values: FormValues) -> Path:
        """The models folder of the chosen model (FluxDeck's own, or a ComfyUI/Forge one), for its other files."""
        return self.model_roots[0] if values.model == AUTO_MODEL else root_of(values.model, self.model_roots)

    def key_for(self, binding_id: str) -> str:
        """The key a binding answers to (config.toml's [keys] or the default), for hints on screen."""
        return KEYS.key_for(binding_id, self.config_file.keys)

    def initial_values(self) -> FormValues:
        o = self.options
        model = next((m for m in self.models if m.is_model), None)
        defaults = defaults_for_file(model.path if model else "")
        values = FormValues(
            steps=defaults.steps, guidance=defaults.guidance, seed=self.rng.randint(0, MAX_RANDOM_SEED)
        )
        for name in ("prompt", "width", "height", "steps", "seed"):
            if getattr(o, name) is not None:
                setattr(values, name, getattr(o, name))
        return values

    @on(SettingsSaved)
    def _save_settings(self, message: SettingsSaved) -> None:
        self.config_file.settings = message.settings
        try:
            self.config_file.save()
        except OSError as error:
            self.notify(f"Could not save {self.config_file.path}: {error}", severity="error", markup=False)
            return
        self._use_settings(message.settings)
        self.models = scan_models(self.model_roots)
        self._update_status()
        self.notify(f"Settings saved to {self.config_file.path}.", markup=False)

    @on(ModelsChanged)
    def _models_changed(self, message: ModelsChanged) -> None:
        self.models = message.models

    # -- screens ---------------------------------------------------------------------------------------
    def on_mount(self) -> None:
        renderer = self.options.renderer
        self._generate = GenerateScreen(
            self.initial_values(), self.models, renderer, key_for=self.key_for
        ).data_bind(FluxDeckApp.models, FluxDeckApp.model_roots, FluxDeckApp.status)
        self._edit = EditScreen(self.models, renderer, key_for=self.key_for).data_bind(FluxDeckApp.models)
        screens = {
            "generate": self._generate,
            "edit": self._edit,
            "gallery": GalleryScreen(self.output_dir, renderer).data_bind(folder=FluxDeckApp.output_dir),
            "queue": QueueScreen(self.jobs),
            "models": ModelsScreen(
                self.model_roots, self.bootstrap_command, cpu=self.settings.device == "cpu"
            ).data_bind(roots=FluxDeckApp.model_roots),
            "settings": SettingsScreen(self.config_file.settings, str(self.config_file.path)),
            "log": LogScreen(self.log_lines),
        }
        for name, screen in screens.items():
            self.install_screen(screen, name)
        self._screens = list(screens.values())
        self.push_screen("generate")
        if not any(m.is_model for m in self.models) and not self.options.no_wizard:
            self.push_screen("models")
            self.notify(
                "No model found: press w for the download wizard, or set the models folder (F6).",
                markup=False,
            )
        if self.start_engine:
            self._start_engine()
        self.call_after_refresh(self._update_status)

    def _tell_screens(self, message: Callable[[], Message]) -> None:
        """Post a message to every screen that runs (each handles what it shows; the others ignore it).
        A screen not shown yet reads the state when it is (engine replies can also arrive while quitting)."""
        if not self.is_running:
            return
        for screen in self._screens:
            if screen.is_running:
                screen.post_message(message())

    def _is_showing(self, name: str) -> bool:
        try:
            return self.screen is self.get_screen(name)
        except KeyError:
            return False

    def action_show(self, name: str) -> None:
        if self._is_showing(name):
            return
        while len(self.screen_stack) > 2 and isinstance(self.screen, ModalScreen):
            self.pop_screen()  # a modal (the LoRA panel) over a screen closes first: no screen twice in the stack
        if self._is_showing(name):
            return
        if len(self.screen_stack) > 1:
            self.switch_screen(name)
        else:
            self.push_screen(name)

    @on(textual_events.DescendantFocus)
    def _steady_cursor(self, event: textual_events.DescendantFocus) -> None:
        """With cursor_blink off (tests, screenshots), every text field that takes focus keeps a steady cursor."""
        if not self.cursor_blink and isinstance(event.widget, Input | TextArea):
            event.widget.cursor_blink = False

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
        for name in ("generate", "edit", "gallery", "queue", "models", "settings", "log"):
            yield SystemCommand(
                f"Show {name}", f"Switch to the {name} screen", lambda n=name: self.action_show(n)
            )
        for binding in screen.BINDINGS:
            if hasattr(binding, "action") and hasattr(screen, f"action_{binding.action}"):
                action = getattr(screen, f"action_{binding.action}")
                yield SystemCommand(binding.description, f"{binding.description} ({binding.key})", action)

    def log_line(self, line: str) -> None:
        self.log_lines.append(line)
        self._tell_screens(lambda: LogLine(line))

    def _update_status(self) -> None:
        engine = f"engine pid {self.engine.pid}" if self.engine.alive else "engine stopped"
        queued = len(self.jobs.queued())
        hunt = " · seed hunt on" if self.hunting else ""
        self.status = f"{engine} · {queued} queued{hunt} · outputs: {self.output_dir}"

    # -- generating ------------------------------------------------------------------------------------
    def action_generate(self) -> None:
        if self._is_showing("edit"):
            values = self._edit_values()
        else:
            values = self._generate.submit()
        if values is None:
            return
        if values.controlnets:
            # a Canny map made here at the job's size is what the engine gets (depth: the photo, the engine's to
            # preprocess); an edit's size is the engine's to work out from its image (the TUI cannot, without
            # torch): the map is made at the photo's own size (floored to 16) and the engine fits it to the job's
            size = (values.width, values.height)
            if values.edit is not None and values.edit.mode is not EditMode.REDUX:
                size = None
            try:
                write_maps(values.controlnets, size, self.output_dir / INPUTS_FOLDER)
            except (FormError, OSError) as error:
                self.notify(str(error), severity="error", markup=False)
                return
        requests = build_requests(values, self.settings, self.output_dir, self.models_root(values), self.rng)
        self.post_message(GenerateRequested(requests, values.hunt, values))

    def _edit_values(self) -> FormValues | None:
        """The Edit screen's edit, with the LoRAs and ControlNets chosen in their panels (a Canny/Depth LoRA, a
        style, a ControlNet holding the composition)."""
        try:
            loras = self._generate.form.lora_values()
            controlnets = self._generate.form.controlnet_values()
        except FormError as error:
            self.notify(str(error), severity="error", markup=False)
            return None
        values = self._edit.submit(self.output_dir / INPUTS_FOLDER)
        if values is not None:
            values.loras, values.controlnets = loras, controlnets
        return values

    @on(EditRequested)
    def _edit_requested(self, message: EditRequested) -> None:
        try:
            values = self._generate.form.values()
        except FormError:
            values = None
        self.action_show("edit")
        self._edit.open(message.path, values)

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
        self._tell_screens(JobsChanged)
        self._pump()

    def _pump(self) -> None:
        """Give the engine the next queued job when it is free; (re)start it when it is not running."""
        if self.jobs.running() is None:
            job = self.jobs.next_queued()
            if job is not None and self.crashes_in_a_row < MAX_CRASHES_IN_A_ROW:
                if not self.engine.alive:
                    self._start_engine()
                if self.engine.send(Generate(job.id, job.request)):
                    job.state = JobState.RUNNING
                    self._tell_screens(lambda: JobStarted(job))
                else:
                    self.log_line(
                        "Could not send the job to the engine; it will be retried when it restarts."
                    )
        self._update_status()

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
        running = self.jobs.running()
        if running is not None:
            self.engine.send(Cancel(running.id))
            self.notify("Cancelling…", markup=False)
        self._update_status()

    def action_cancel_all(self) -> None:
        dropped = self.jobs.cancel_queued()
        self.action_cancel()
        if dropped:
            self.notify(f"Dropped {len(dropped)} queued job(s).", markup=False)
            self._tell_screens(JobsChanged)

    @on(JobCancelRequested)
    def _cancel_job(self, message: JobCancelRequested) -> None:
        running = self.jobs.running()
        if running is not None and message.job_id == running.id:
            self.action_cancel()
        elif self.jobs.cancel_queued(message.job_id):
            self.notify(f"Dropped {message.job_id}.", markup=False)
            self._tell_screens(JobsChanged)
        self._update_status()

    # -- the engine's replies --------------------------------------------------------------------------
    def _engine_said(self, data: dict) -> None:
        """On the engine client's reader thread: decode the line and hand it to the app's loop."""
        event = events.decode(data)
        if event is None:
            self.post_message(EngineLog(f"Ignored an engine line the TUI does not know: {str(data)[:200]}"))
        else:
            self.post_message(EngineReported(event))

    @on(EngineLog)
    def _engine_log(self, message: EngineLog) -> None:
        self.log_line(message.line)

    @on(EngineReported)
    def _engine_reported(self, message: EngineReported) -> None:
        event = message.event
        if isinstance(event, events.Ready):
            self.log_line(f"Engine ready (pid {event.pid}).")
            self._update_status()
            return
        job = self.jobs.get(event.job) if event.job is not None else None
        if job is None:
            if isinstance(event, events.Failed):
                self.notify(event.message, severity="error", markup=False)
                self.log_line(f"Engine error: {event.message}")
            return
        if isinstance(event, events.Done | events.JobCancelled | events.Failed):
            self._job_ended(job, event)
        else:
            self._job_progress(job, event)

    def _job_progress(self, job: Job, event: events.Event) -> None:
        match event:
            case events.Step(step=step, total=total):
                job.step, job.total = step, total
            case events.Stage(stage=stage, detail=detail):
                self.log_line(f"{job.id}: {stage} {detail}".rstrip())
            case events.Message(text=text):
                self.log_line(f"{job.id}: {text}")
            case events.Preview() if not self.settings.live_preview:
                return
        self._tell_screens(lambda: JobProgress(job, event))

    def _job_ended(self, job: Job, event: events.Done | events.JobCancelled | events.Failed) -> None:
        match event:
            case events.Done(paths=paths, seconds=seconds):
                job.state, job.paths, job.seconds = JobState.DONE, list(paths), seconds
                self.crashes_in_a_row = 0
                took = f" in {seconds:.1f} s" if seconds is not None else ""
                self.log_line(f"{job.id}: done{took}: {', '.join(job.paths)}")
                self._hunt_next(job)
            case events.JobCancelled():
                job.state = JobState.CANCELLED
                self.log_line(f"{job.id}: cancelled")
            case events.Failed(message=error):
                job.state, job.error = JobState.FAILED, error
                self.log_line(f"{job.id}: {error}")
                self.notify(error, severity="error", timeout=10, markup=False)
        self._tell_screens(lambda: JobFinished(job))
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
        job = self.jobs.running()
        self.hunting = False
        if job is not None:
            self.crashes_in_a_row += 1
            job.state, job.error = JobState.FAILED, reason
            self._tell_screens(lambda: JobFinished(job))
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
        edit = edit_from_request(message.params.request) if message.refine_from is None else None
        if edit is not None:
            self._restore_edit(message, edit)
            return
        self.action_show("generate")
        self._generate.use_params(message.params, message.refine_from, REFINE_DENOISE)

    def _restore_edit(self, message: UseParams, edit) -> None:
        """Reuse an edited image: the Edit screen with its mode, inputs (found again by path, else by name
        beside the outputs; checked against the SHA-256 the PNG recorded), prompt, model and sampling."""
        params = message.params
        request = params.request or {}
        recorded = recorded_inputs(request)
        folders = [self.output_dir / INPUTS_FOLDER, self.output_dir]
        if message.image:
            folders += [Path(message.image).parent, Path(message.image).parent / INPUTS_FOLDER]
        notes: list[str] = []

        def found(path: str) -> str:
            where, note = find_input(path, recorded.get(path), folders)
            if note:
                notes.append(note)
            return where or path

        edit.source = found(edit.source)
        edit.references = [found(ref) for ref in edit.references]
        edit.redux = [(found(path), strength) for path, strength in edit.redux]
        mask = found(edit.mask) if edit.mode is EditMode.INPAINT else None
        # what one mode of the Edit screen cannot send again (a request made on the command line can combine them)
        if edit.mode is not EditMode.REDUX and request.get("redux_images"):
            notes.append(
                "The image also had Redux images; the Edit screen sends them in Redux mode only: left off."
            )
        if edit.mode is EditMode.REDUX and request.get("init_image"):
            notes.append(
                "The image also started from an init image, which Redux mode does not send: left off."
            )
        values = FormValues().with_params(params)
        files = request.get("files") if isinstance(request.get("files"), dict) else {}
        model = files.get("transformer") or files.get("checkpoint")
        values.model = model if isinstance(model, str) else AUTO_MODEL
        values.denoise = params.denoise if params.denoise is not None else 1.0
        missing = self._generate.form.set_loras(values.loras)
        missing += self._generate.form.set_controlnets(controlnets_in_request(request))
        self.action_show("edit")
        self._edit.restore(values, edit, mask, params.guidance)
        self.notify(f"Edit restored: press {self.key_for('generate')} to run it again.", markup=False)
        if missing:
            notes.append(
                f"LoRA(s) or ControlNet(s) not found in the models folders, left off: {', '.join(missing)}."
            )
        for note in notes:
            self.notify(note, severity="warning", timeout=10, markup=False)

    # -- model files about to be replaced -------------------------------------------------------------
    def release_model_files(self) -> str | None:
        """Stop the engine so that it lets go of the model files it has memory-mapped (Windows cannot replace a
        mapped file) before a download or repair writes over them; the next job starts it again. Returns why
        not, when a generation is running."""
        if self.jobs.running() is not None:
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
