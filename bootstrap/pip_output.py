"""What `bootstrap env` makes of pip's output: the whole of it goes to a log file, the terminal gets one line
per step ("Packages: 2 of 4: torch 2.13.0+cu126") and a progress bar for the big downloads, and a failure shows
only the lines that matter. Standard library only (it runs before anything is installed).

pip's lines that are read (the same from pip 20 to 26): `Collecting NAME...` and `Processing FILE` (a package;
"(from X)" at the end marks a dependency), `Downloading FILE (SIZE)` / `Using cached FILE (SIZE)`,
`Progress DONE of TOTAL` (bytes, only with `--progress-bar raw`, pip 24.1 and newer, for files over 512 KB),
`Installing collected packages: A, B`, `Successfully installed A-1 B-2` and `ERROR: ...`.
"""

from __future__ import annotations

import re
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote

from bootstrap.progress import TerminalProgress

TAIL_LINES = 15  # what a failure shows when no line says ERROR
KEEP_LINES = 400  # kept in memory for that, should the log file not be writable


def progress_bar_choice(help_text: str) -> str | None:
    """What to pass to --progress-bar, read from `pip install --help`: `raw` (byte counts for our bar) where it
    is listed (pip 24.1 and newer; older ones exit with "invalid choice" when given it, so it is asked, never
    assumed), else `off` (pip 23 draws its own bar even into a pipe, i.e. into the log), else nothing."""
    match = re.search(r"--progress-bar\b(.*?)(?:\n\s*-{1,2}[a-z]|\Z)", help_text, re.S)
    for choice in ("raw", "off"):
        if match and re.search(rf"\b{choice}\b", match.group(1)):
            return choice
    return None


def lines_that_matter(lines: list[str], limit: int = TAIL_LINES, width: int = 400) -> list[str]:
    """The ERROR lines (pip's, or `error:` from a build or the engine), else the last `limit` lines; each cut
    to `width` characters (pip lists every version there is in one line)."""
    errors = [line for line in lines if re.match(r"\s*(ERROR|error)\b:?", line)]
    chosen = errors or [line for line in lines if line.strip()]
    return [line if len(line) <= width else line[: width - 3] + "..." for line in chosen[-limit:]]


class BuildLog:
    """logs/environment.log: each build starts it afresh (a run that installs nothing leaves the last one), each
    command's output is appended as it comes and flushed line by line, so a crash leaves it readable. The file is
    open only while one command runs, and only in this process (never handed to the child: Windows would keep
    it locked)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.problem: str | None = None  # why the file could not be written, if it could not
        self.tail: deque[str] = deque(maxlen=KEEP_LINES)
        self._started = False
        self._handle = None

    def _open(self):
        if self.problem is not None:
            return None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            mode = "a" if self._started else "w"
            handle = self.path.open(mode, encoding="utf-8", errors="replace")
            if not self._started:
                stamp = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
                handle.write(f"FluxDeck environment build, {stamp}\n")
            self._started = True
            return handle
        except OSError as exc:
            self.problem = exc.strerror or str(exc)
            return None

    def begin(self, argv: list[str]) -> None:
        """A command starts: its line in the log, and the lines kept for a failure start afresh."""
        self.tail.clear()
        self._handle = self._open()
        self._put("\n$ " + " ".join(f'"{arg}"' if " " in arg or not arg else arg for arg in argv))

    def line(self, text: str) -> None:
        self.tail.append(text)
        self._put(text)

    def end(self, returncode: int) -> None:
        self._put(f"(exit code {returncode})")
        self.close()

    def note(self, text: str) -> None:
        """A line of our own, outside any command (e.g. why the build stopped); only in a log this build
        started (a check that stops it before anything is written leaves no file either)."""
        if not self._started:
            return
        if self._handle is None:
            self._handle = self._open()
        self._put(text)
        self.close()

    def close(self) -> None:
        if self._handle is not None:
            try:
                self._handle.close()
            except OSError:
                pass
            self._handle = None

    def _put(self, text: str) -> None:
        if self._handle is None:
            return
        try:
            self._handle.write(text + "\n")
            self._handle.flush()
        except OSError as exc:
            self.problem = exc.strerror or str(exc)
            self.close()

    def where(self) -> str:
        if self.problem is not None:
            return f"{self.path} could not be written ({self.problem})"
        return f"the whole output is in {self.path}"


_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def file_label(location: str) -> str:
    """'https://…/torch-2.13.0%2Bcu126-cp312-cp312-win_amd64.whl' -> 'torch 2.13.0+cu126'."""
    name = unquote(re.split(r"[/\\]", location)[-1].split("#", 1)[0])
    for ext in (".whl", ".tar.gz", ".zip", ".tar.bz2"):
        if name.endswith(ext):
            stem = name[: -len(ext)]
            if ext == ".whl":
                parts = stem.split("-")
                return f"{parts[0]} {parts[1]}" if len(parts) >= 2 else stem
            head, _, version = stem.rpartition("-")
            return f"{head} {version}" if head else stem
    return name


@dataclass
class PipWatcher:
    """Turns pip's lines into step lines and a bar. `planned`: the requirements' names this build installs
    (normalised): their count is the M of "N of M"; any other package pip collects is a dependency."""

    planned: list[str]
    progress: TerminalProgress
    seen: list[str] = field(default_factory=list)  # planned packages pip got to, in order
    dependencies: set[str] = field(default_factory=set)
    installed: list[str] = field(default_factory=list)  # "name-version", from "Successfully installed"
    _bar_file: str | None = None
    _bar_done: int = 0

    def counts(self) -> str:
        """'Packages: 2 of 4' (+ the dependencies so far: '(+3)'); short, so that a bar still fits 80 columns."""
        extra = f" (+{len(self.dependencies)})" if self.dependencies else ""
        return f"Packages: {len(self.seen)} of {len(self.planned)}{extra}"

    def _status(self, text: str, always: bool) -> None:
        """A new status: redrawn on a terminal; in a log or a pipe only the steps worth a line (`always`)."""
        self._bar_file = None
        if always or self.progress.stream.isatty():
            self.progress.status(text)

    def feed(self, line: str) -> None:
        text = line.strip()
        match = re.match(r"(Collecting|Processing)\s+(\S+)", text)
        if match:
            dependency = "(from " in text
            if match.group(1) == "Collecting":
                found = _NAME.match(match.group(2))
                name = found.group(0) if found else match.group(2)
            else:
                name = file_label(match.group(2)).split(" ")[0]
            key = _normalise(name)
            first_time = False
            if key in self.planned and not dependency:
                if key not in self.seen:
                    self.seen.append(key)
                    first_time = True
            else:
                self.dependencies.add(key)
            self._status(f"{self.counts()}: {name}", always=first_time)
            return
        match = re.match(r"(Downloading|Using cached|Resuming download)\s+(\S+)\s*(\(.*\))?", text)
        if match:
            what = "downloading" if match.group(1) != "Using cached" else "from pip's cache"
            size = f" {match.group(3)}" if match.group(3) else ""
            self._status(f"{self.counts()}: {what} {file_label(match.group(2))}{size}", always=False)
            self._bar_file = file_label(match.group(2)).split(" ")[0]  # the bar leaves out the version
            self._bar_done = -1
            return
        match = re.match(r"Progress (\d+) of (\d+)$", text)
        if match and self._bar_file is not None:
            done, total = int(match.group(1)), int(match.group(2))
            if self._bar_done < 0:
                self.progress.start(f"{self.counts()}: {self._bar_file}", total or None, done)
            else:
                self.progress.advance(max(0, done - self._bar_done))
            self._bar_done = done
            return
        if text.startswith("Installing collected packages:"):
            names = [n.strip() for n in text.split(":", 1)[1].split(",") if n.strip()]
            slow = "; unpacking torch takes a minute" if "torch" in names else ""
            self._status(f"Packages: installing {len(names)} ({_short_list(names)}){slow}", always=True)
            return
        if text.startswith("Successfully installed"):
            self.installed += text.split()[2:]

    def summary(self) -> str:
        """The step's last line, e.g. 'Packages: 4 of 4 installed, with 12 dependencies.'"""
        planned = set(self.planned)
        installed = {_normalise(item.rsplit("-", 1)[0]) for item in self.installed}
        deps = len(installed - planned) if installed else len(self.dependencies)
        tail = f", with {deps} {'dependency' if deps == 1 else 'dependencies'}" if deps else ""
        return f"Packages: {len(self.planned)} of {len(self.planned)} installed{tail}."


def _short_list(names: list[str], most: int = 4) -> str:
    return ", ".join(names[:most]) + (f" and {len(names) - most} more" if len(names) > most else "")
