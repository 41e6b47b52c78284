"""A running job's progress: stage, step bar with s/it and ETA, and the memory in use."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import ProgressBar, Static

STAGE_NAMES = {
    "loading": "Loading the model",
    "encoding": "Encoding the prompt",
    "denoising": "Denoising",
    "decoding": "Decoding the image",
    "saving": "Saving",
}


def process_rss_mb() -> float:
    """This process's resident memory (the TUI's own, shown next to the engine's)."""
    try:
        import psutil

        return psutil.Process().memory_info().rss / 2**20
    except Exception:
        return 0.0


def format_eta(seconds: float) -> str:
    seconds = int(round(seconds))
    minutes, seconds = divmod(seconds, 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes}:{seconds:02d}"


def format_mb(mb: float | None) -> str:
    if mb is None:
        return "-"
    return f"{mb / 1024:.1f} GB" if mb >= 1024 else f"{mb:.0f} MB"


class ProgressPanel(Vertical):
    DEFAULT_CSS = """
    ProgressPanel { height: auto; padding: 0 1; border-bottom: tall $panel; }
    ProgressPanel > Static { height: 1; }
    ProgressPanel #job { text-style: bold; }
    ProgressPanel ProgressBar { width: 100%; }
    ProgressPanel #bar Bar { width: 1fr; }
    """

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self._step_times: list[float] = []

    def compose(self) -> ComposeResult:
        yield Static("Idle: write a prompt and press ctrl+g.", id="job", markup=False)
        yield Static("", id="stage", markup=False)
        yield ProgressBar(total=100, show_eta=False, id="bar")
        yield Static("", id="speed", markup=False)
        yield Static("", id="memory", markup=False)

    def start(self, summary: str) -> None:
        self._step_times = []
        self.query_one("#job", Static).update(summary)
        self.query_one("#stage", Static).update("Waiting for the engine…")
        self.query_one("#bar", ProgressBar).update(total=100, progress=0)
        self.query_one("#speed", Static).update("")

    def stage(self, stage: str, detail: str = "") -> None:
        text = STAGE_NAMES.get(stage, stage.capitalize())
        self.query_one("#stage", Static).update(f"{text}: {detail}" if detail else f"{text}…")

    def step(self, step: int, total: int, seconds_per_it: float, cached: bool = False) -> None:
        self._step_times.append(seconds_per_it)
        mean = sum(self._step_times) / len(self._step_times)
        self.query_one("#bar", ProgressBar).update(total=total, progress=step)
        eta = format_eta(mean * (total - step))
        self.query_one("#speed", Static).update(
            f"step {step}/{total} · {seconds_per_it:.2f} s/it{' (cached)' if cached else ''} · ETA {eta}"
        )

    def memory(
        self, engine_rss_mb: float | None, vram_mb: float | None, vram_total_mb: float | None, tui_mb: float
    ) -> None:
        vram = format_mb(vram_mb) + (f" / {format_mb(vram_total_mb)}" if vram_total_mb else "")
        self.query_one("#memory", Static).update(
            f"RAM engine {format_mb(engine_rss_mb)} · VRAM {vram} · TUI {format_mb(tui_mb)}"
        )

    def finish(self, text: str) -> None:
        self.query_one("#stage", Static).update(text)
