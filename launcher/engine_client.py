"""The TUI's side of the engine protocol: a child process that speaks JSON lines (see engine/server.py).

Threads read the child's stdout (protocol) and stderr (log); callbacks run on those threads, so the app
hands them to its own loop with post_message. Nothing here imports torch.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from engine.contract.protocol import Command, Shutdown, decode_line, encode_line
from launcher.win_job import KillOnCloseJob


def default_engine_command() -> list[str]:
    """The engine server, run by the same Python as the TUI."""
    return [sys.executable, "-m", "engine", "serve"]


@dataclass
class EngineExit:
    """Why the engine process ended: its exit code and the last lines it wrote to stderr."""

    returncode: int
    stderr_tail: list[str]
    expected: bool  # we asked it to stop
    pid: int | None = None

    def describe(self) -> str:
        code = self.returncode
        if code in (-9, 137):
            reason = "killed (signal 9), usually because the system ran out of memory"
        elif code < 0:
            reason = f"killed by signal {-code}"
        elif code in (3221225477, -1073741819):
            reason = "crashed (access violation)"
        else:
            reason = f"exit code {code}"
        tail = " | ".join(line for line in self.stderr_tail[-3:] if line.strip())
        return f"The engine stopped: {reason}." + (f" Last output: {tail}" if tail else "")


@dataclass
class EngineProcess:
    """One engine child process. start() it, send() commands; on_message and on_exit report back."""

    on_message: Callable[[dict], None]
    on_exit: Callable[[EngineExit], None]
    on_log: Callable[[str], None] = lambda _line: None
    command: list[str] = field(default_factory=default_engine_command)
    cwd: Path | None = None
    stderr_lines: int = 40
    _process: subprocess.Popen | None = field(default=None, init=False, repr=False)
    _stderr: deque = field(default_factory=deque, init=False, repr=False)
    _stopping: bool = field(default=False, init=False, repr=False)
    _send_lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)
    _job: KillOnCloseJob | None = field(default=None, init=False, repr=False)

    @property
    def alive(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def start(self) -> None:
        if self.alive:
            return
        self._stopping = False
        self._stderr = deque(maxlen=self.stderr_lines)
        # FLUXDECK_PARENT_PID: the engine watches this process and ends when it is gone (engine/parent_watch.py)
        env = dict(
            os.environ, PYTHONUNBUFFERED="1", PYTHONIOENCODING="utf-8", FLUXDECK_PARENT_PID=str(os.getpid())
        )
        flags = getattr(subprocess, "CREATE_NO_WINDOW", 0)
        self._process = subprocess.Popen(
            self.command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=self.cwd,
            env=env,
            encoding="utf-8",
            errors="replace",
            bufsize=1,
            creationflags=flags,
        )
        process = self._process
        if self._job is None:
            self._job = KillOnCloseJob()
        self._job.assign(process)  # Windows: the engine dies with the TUI, even when the window is closed
        stderr_reader = threading.Thread(target=self._read_stderr, args=(process,), daemon=True)
        stderr_reader.start()
        threading.Thread(target=self._read_stdout, args=(process, stderr_reader), daemon=True).start()

    def send(self, command: Command) -> bool:
        """Send one command (engine/contract/protocol.py); False when the engine is not running (the caller
        restarts it)."""
        process = self._process
        if process is None or process.poll() is not None or process.stdin is None:
            return False
        try:
            with self._send_lock:
                process.stdin.write(encode_line(command.to_dict()))
                process.stdin.flush()
        except (BrokenPipeError, OSError, ValueError):
            return False
        return True

    def stop(self, timeout: float = 5.0) -> None:
        """Ask the engine to finish, then make sure it has."""
        process = self._process
        if process is None:
            return
        self._stopping = True
        self.send(Shutdown())
        try:
            if process.stdin:
                process.stdin.close()
        except OSError:
            pass
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout)

    def kill(self) -> None:
        """Test and last-resort helper: end the engine at once."""
        if self._process is not None and self._process.poll() is None:
            self._process.kill()

    def _read_stdout(self, process: subprocess.Popen, stderr_reader: threading.Thread) -> None:
        assert process.stdout is not None
        for line in process.stdout:
            message = decode_line(line)
            if message is None:
                if line.strip():
                    self.on_log(line.rstrip())
                continue
            self.on_message(message)
        returncode = process.wait()
        stderr_reader.join(timeout=2.0)
        self.on_exit(EngineExit(returncode, list(self._stderr), self._stopping, process.pid))

    def _read_stderr(self, process: subprocess.Popen) -> None:
        assert process.stderr is not None
        for line in process.stderr:
            text = line.rstrip()
            self._stderr.append(text)
            self.on_log(text)
