"""Installed model files, the presets' verdicts on this machine, and the bootstrap's wizard, downloads (with
progress) and verification."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.reactive import var
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Input, Label, ProgressBar, RichLog, Static

from launcher.keymap import KEYS
from launcher.messages import ModelsChanged
from launcher.models import InstalledFile, defaults_for, human_size, scan_models

_PERCENT = re.compile(r"(\d{1,3}(?:\.\d+)?)\s?%")


def percent_in(text: str) -> float | None:
    """The last percentage a progress line mentions (bootstrap, pip or huggingface style)."""
    found = _PERCENT.findall(text)
    if not found:
        return None
    value = float(found[-1])
    return value if 0 <= value <= 100 else None


def split_output(chunk: str) -> list[str]:
    """Progress bars redraw with carriage returns: treat them as line ends."""
    return [part for part in re.split(r"[\r\n]+", chunk) if part.strip()]


class ModelsScreen(Screen):
    BINDINGS = [
        KEYS.binding("wizard", "wizard", "Wizard"),
        KEYS.binding("download", "download", "Download"),
        KEYS.binding("verify", "verify", "Verify"),
        KEYS.binding("rescan", "rescan", "Rescan"),
    ]
    DEFAULT_CSS = """
    ModelsScreen #title { height: 1; padding: 0 1; background: $panel; }
    ModelsScreen #files { height: 1fr; }
    ModelsScreen #presets { height: auto; max-height: 10; border-top: tall $panel; }
    ModelsScreen #tools { height: 1fr; border-top: tall $panel; padding: 0 1; }
    ModelsScreen #tools Horizontal { height: auto; }
    ModelsScreen #tools Label { margin: 1 1 0 0; width: auto; }
    ModelsScreen #names { width: 1fr; }
    ModelsScreen #progress { height: 1; }
    ModelsScreen RichLog { height: 1fr; }
    """

    roots: var[list[Path]] = var(list, init=False)  # the model folders (bound to the app's settings)

    def __init__(self, roots: list[Path], bootstrap_command: list[str], cpu: bool = False, **kwargs) -> None:
        super().__init__(**kwargs)
        self._cpu = cpu  # verdicts as if there were no GPU (the TUI's --cpu)
        self.set_reactive(ModelsScreen.roots, roots)
        self._bootstrap = bootstrap_command
        self.files: list[InstalledFile] = []
        self.running: subprocess.Popen | None = None

    def compose(self) -> ComposeResult:
        yield Static("", id="title", markup=False)
        yield DataTable(id="files", cursor_type="row", zebra_stripes=True)
        yield DataTable(id="presets", cursor_type="row")
        with Vertical(id="tools"):
            with Horizontal():
                yield Label("Download (names or --preset P):")
                yield Input(placeholder="e.g. --preset schnell-fp8   or   clip_l t5xxl_fp8 ae", id="names")
            yield ProgressBar(total=100, show_eta=False, id="progress")
            yield RichLog(id="output", wrap=True, markup=False, max_lines=2000)
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#files", DataTable).add_columns("Folder", "File", "Size", "Kind")
        self.query_one("#presets", DataTable).add_columns("Preset", "Download", "On this machine")
        self.action_rescan()
        self._fit_worker()

    # ---- the presets' verdicts: `bootstrap fit`, in its own process (it imports torch; the TUI does not) ----

    @work(thread=True, exclusive=True, group="fit")
    def _fit_worker(self) -> None:
        command = [
            *self._bootstrap,
            "fit",
            "--json",
            *self._models_dir_args(),
            *(["--cpu"] if self._cpu else []),
        ]
        try:
            done = subprocess.run(
                command, capture_output=True, text=True, encoding="utf-8", errors="replace",
                stdin=subprocess.DEVNULL, timeout=300,
            )  # fmt: skip
        except (OSError, subprocess.TimeoutExpired) as error:
            self.app.call_from_thread(self._show_fit, [], f"No verdicts: {error}")
            return
        rows = []
        for line in done.stdout.splitlines():
            try:
                rows.append(json.loads(line))
            except ValueError:
                continue
        problem = None if done.returncode == 0 else (done.stderr.strip().splitlines() or ["no output"])[-1]
        self.app.call_from_thread(self._show_fit, rows, problem)

    def _show_fit(self, rows: list[dict], problem: str | None) -> None:
        table = self.query_one("#presets", DataTable)
        table.clear()
        for row in rows:
            name = f"{row.get('preset', '?')}{' *' if row.get('recommended') else ''}"
            mark = "fits" if row.get("fits") else "tight"
            cells = (name, f"{row.get('disk_gb', 0):g} GB", f"{mark}: {row.get('verdict', '')}")
            table.add_row(*(Text(str(c)) for c in cells), key=str(row.get("preset")))
        if problem:
            table.add_row(Text("-"), Text(""), Text(problem), key="problem")

    @on(DataTable.RowSelected, "#presets")
    def _preset_chosen(self, event: DataTable.RowSelected) -> None:
        """Enter on a preset: its download, ready to start with d."""
        if event.row_key.value and event.row_key.value != "problem":
            names = self.query_one("#names", Input)
            names.value = f"--preset {event.row_key.value}"
            names.focus()

    def on_screen_resume(self) -> None:
        self.action_rescan()

    def action_rescan(self) -> None:
        self.files = scan_models(self.roots)
        table = self.query_one("#files", DataTable)
        table.clear()
        for f in self.files:
            kind = f"FLUX.1 [{defaults_for(f.path.name).variant}]" if f.is_model else "part"
            table.add_row(
                *(Text(c) for c in (f.folder, f.path.name, human_size(f.size), kind)), key=str(f.path)
            )
        where = ", ".join(str(r) for r in self.roots)
        self.query_one("#title", Static).update(f"Models: {len(self.files)} file(s) in {where}")
        self.post_message(ModelsChanged(self.files))

    def _models_dir_args(self) -> list[str]:
        return ["--models-dir", str(self.roots[0])]

    def _release_files(self) -> bool:
        """The engine lets go of the model files before they are replaced (see FluxDeckApp)."""
        release = getattr(self.app, "release_model_files", None)
        reason = release() if release is not None else None
        if reason:
            self.notify(reason, severity="warning", markup=False)
        return reason is None

    def action_wizard(self) -> None:
        if not self._release_files():
            return
        with self.app.suspend():
            subprocess.run([*self._bootstrap, "wizard"], check=False)
        self.action_rescan()

    def action_download(self) -> None:
        names = self.query_one("#names", Input).value.split()
        if not names:
            self.query_one("#names", Input).focus()
            self.notify(
                "Type the names to download (or --preset P), then press d again.",
                severity="warning",
                markup=False,
            )
            return
        if self.running is None and not self._release_files():
            return
        self._run(["download", *names, *self._models_dir_args()])

    @on(Input.Submitted, "#names")
    def _submitted(self) -> None:
        self.action_download()

    def action_verify(self) -> None:
        self._run(["verify", *self._models_dir_args()])

    def _run(self, args: list[str]) -> None:
        if self.running is not None:
            self.notify("A download or check is already running.", severity="warning", markup=False)
            return
        log = self.query_one(RichLog)
        log.write("$ bootstrap " + " ".join(args))
        self.query_one(ProgressBar).update(total=100, progress=0)
        self._run_worker([*self._bootstrap, *args])

    @work(thread=True, exclusive=True, group="bootstrap")
    def _run_worker(self, command: list[str]) -> None:
        try:
            process = subprocess.Popen(
                command,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                text=True,
                encoding="utf-8",
                errors="replace",
                bufsize=1,
            )
        except OSError as error:
            self.app.call_from_thread(self._finished, None, f"Could not start {command[0]}: {error}")
            return
        self.running = process
        assert process.stdout is not None
        for chunk in process.stdout:  # text mode: a carriage return ends a line too
            for line in split_output(chunk):
                self.app.call_from_thread(self._output, line)
        code = process.wait()
        self.app.call_from_thread(self._finished, code, None)

    def _output(self, line: str) -> None:
        value = percent_in(line)
        if value is not None:
            self.query_one(ProgressBar).update(progress=value)
        self.query_one(RichLog).write(line)

    def _finished(self, code: int | None, error: str | None) -> None:
        self.running = None
        log = self.query_one(RichLog)
        if error:
            log.write(error)
            self.notify(error, severity="error", markup=False)
        elif code == 0:
            self.query_one(ProgressBar).update(progress=100)
            log.write("Finished.")
            self.notify("Finished.", markup=False)
        else:
            log.write(f"Failed with exit code {code}: see the output above.")
            self.notify(
                f"Failed with exit code {code}: see the output above.", severity="error", markup=False
            )
        self.action_rescan()
