"""Everything the engine wrote to stderr and what the TUI did about it."""

from __future__ import annotations

from collections.abc import Iterable

from textual import on
from textual.app import ComposeResult
from textual.screen import Screen
from textual.widgets import Footer, RichLog, Static

from launcher.messages import LogLine


class LogScreen(Screen):
    DEFAULT_CSS = """
    LogScreen #title { height: 1; padding: 0 1; background: $panel; }
    """

    def __init__(self, lines: Iterable[str], **kwargs) -> None:
        super().__init__(**kwargs)
        self._lines = lines  # the app's log so far, read when the screen is first shown

    def compose(self) -> ComposeResult:
        yield Static("Log: engine output and events", id="title")
        yield RichLog(id="log", wrap=True, markup=False, max_lines=5000)
        yield Footer()

    def on_mount(self) -> None:
        log = self.query_one(RichLog)
        for line in list(self._lines):
            log.write(line)

    @on(LogLine)
    def _add(self, message: LogLine) -> None:
        self.query_one(RichLog).write(message.line)
