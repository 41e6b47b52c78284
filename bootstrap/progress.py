"""Download progress: bytes, speed and ETA, as a line on a terminal (or a line now and then in a log)."""

from __future__ import annotations

import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol, TextIO


class ProgressSink(Protocol):
    """What the downloader reports to; the TUI's models screen can implement the same three calls."""

    def start(self, name: str, total: int | None, done: int, what: str = "downloading") -> None: ...

    def advance(self, nbytes: int) -> None: ...

    def finish(self, message: str) -> None: ...


def human_bytes(size: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(size) < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} GB"


def human_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m {seconds % 60:02d}s"
    return f"{seconds // 3600}h {seconds % 3600 // 60:02d}m"


def progress_line(name: str, done: int, total: int | None, speed: float | None) -> str:
    """e.g. 'flux1-schnell-fp8  4.2 GB / 17.2 GB (24%)  38.1 MB/s  ETA 5m 41s'."""
    parts = [name]
    if total:
        parts.append(f"{human_bytes(done)} / {human_bytes(total)} ({100 * done // total}%)")
    else:
        parts.append(human_bytes(done))
    if speed:
        parts.append(f"{human_bytes(speed)}/s")
        if total and total > done:
            parts.append(f"ETA {human_duration((total - done) / speed)}")
    return "  ".join(parts)


@dataclass
class TerminalProgress:
    """Rewrites one line on a terminal; elsewhere prints a line every `log_every` seconds, or when the
    percentage reaches the next multiple of `log_percent` (at most one a second)."""

    stream: TextIO = field(default_factory=lambda: sys.stderr)
    clock: Callable[[], float] = time.monotonic
    refresh: float = 0.25
    log_every: float = 10.0
    log_percent: int = 1
    name: str = ""
    total: int | None = None
    done: int = 0
    _started: float = 0.0
    _base: int = 0
    _shown: float = 0.0
    _percent: int | None = None
    _live: bool = False  # a line is being redrawn on the terminal

    def start(self, name: str, total: int | None, done: int, what: str = "downloading") -> None:
        self.name, self.total, self.done, self._base = name, total, done, done
        self._started = self._shown = self.clock()
        if done:
            self._write(f"{what} {name}: resuming at {human_bytes(done)}", final=True)

    def speed(self) -> float | None:
        elapsed = self.clock() - self._started
        return (self.done - self._base) / elapsed if elapsed > 0.5 else None

    def advance(self, nbytes: int) -> None:
        self.done += nbytes
        now = self.clock()
        if self.stream.isatty():
            due = now - self._shown >= self.refresh
        else:  # a log or a pipe (the TUI reads the percentage): a line per percent, at most one a second
            percent = 100 * self.done // self.total // self.log_percent if self.total else None
            due = now - self._shown >= self.log_every or (
                percent != self._percent and now - self._shown >= 1.0
            )
            if due:
                self._percent = percent
        if due:
            self._shown = now
            self._write(
                progress_line(self.name, self.done, self.total, self.speed()), final=not self.stream.isatty()
            )

    def finish(self, message: str) -> None:
        self._write(message, final=True)

    def status(self, text: str) -> None:
        """A line of what is happening: redrawn in place on a terminal (the next status or bar replaces it),
        printed as a plain line elsewhere."""
        self._shown = self.clock()
        self._write(text, final=not self.stream.isatty())

    def clear(self) -> None:
        """Removes the line being redrawn on a terminal, so that what is printed next starts on a clean line."""
        if self._live:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self._live = False

    def _write(self, text: str, final: bool) -> None:
        if self.stream.isatty():
            if not final:  # a line wider than the window would wrap, and \r only returns to its last row
                text = text[: max(20, shutil.get_terminal_size((80, 24)).columns - 1)]
            self.stream.write("\r\x1b[K" + text + ("\n" if final else ""))
            self._live = not final
        else:
            self.stream.write(text + "\n")
        self.stream.flush()


class QuietProgress:
    def start(self, name: str, total: int | None, done: int, what: str = "downloading") -> None:
        pass

    def advance(self, nbytes: int) -> None:
        pass

    def finish(self, message: str) -> None:
        pass
