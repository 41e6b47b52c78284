"""The engine ends when the process that started it (the TUI) is gone, however that one ended: a closed console
window, a crash, a kill. The TUI names itself in FLUXDECK_PARENT_PID; without it the parent at start is watched.

POSIX: the parent is gone when getppid() changes (the orphan is re-parented). Windows: a handle to the parent
(pids are reused, handles are not) that becomes signalled when it exits. The TUI's Job Object
(launcher/win_job.py) kills the engine on Windows too; this is the second line that also covers Linux and macOS.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable

PARENT_ENV = "FLUXDECK_PARENT_PID"


def parent_pid(environ: dict[str, str], getppid: Callable[[], int] = os.getppid) -> int:
    value = environ.get(PARENT_ENV, "")
    return int(value) if value.isdigit() and int(value) > 0 else getppid()


def parent_gone_posix(expected: int, getppid: Callable[[], int] = os.getppid) -> bool:
    return getppid() != expected


def _wait_windows(pid: int) -> bool:
    """Block until the process exits; False when it cannot be watched (then nothing is done)."""
    import ctypes

    synchronize, infinite = 0x00100000, 0xFFFFFFFF
    kernel32 = ctypes.WinDLL("kernel32", use_last_error=True)  # type: ignore[attr-defined]
    kernel32.OpenProcess.restype = ctypes.c_void_p
    handle = kernel32.OpenProcess(synchronize, False, pid)
    if not handle:
        return False
    kernel32.WaitForSingleObject(ctypes.c_void_p(handle), infinite)
    kernel32.CloseHandle(ctypes.c_void_p(handle))
    return True


def watch_parent(
    on_gone: Callable[[], None],
    environ: dict[str, str] | None = None,
    interval_s: float = 1.0,
    windows: bool = sys.platform == "win32",
) -> threading.Thread:
    """A daemon thread that calls on_gone once the parent has ended."""
    expected = parent_pid(dict(os.environ if environ is None else environ))

    def run() -> None:
        if windows:
            if _wait_windows(expected):
                on_gone()
            return
        stop = threading.Event()
        while not stop.wait(interval_s):
            if parent_gone_posix(expected):
                on_gone()
                return

    thread = threading.Thread(target=run, name="parent-watch", daemon=True)
    thread.start()
    return thread


def exit_now() -> None:
    """The parent is gone and nobody reads our output: end at once (RAM and VRAM are released with us)."""
    os._exit(0)
