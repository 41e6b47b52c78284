"""The engine ends with the TUI: it watches its parent (every OS), and on Windows sits in a kill-on-close job."""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from engine import parent_watch
from launcher import win_job

ROOT = Path(__file__).resolve().parent.parent

# Plays the TUI: starts `python -m engine serve` with stdin from a pipe the test holds open (so the engine does
# not end on EOF), prints the engine's pid, then waits to be killed.
PARENT = """
import subprocess, sys, time
engine = subprocess.Popen([sys.executable, "-m", "engine", "serve"], stdin=int(sys.argv[1]),
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, pass_fds=(int(sys.argv[1]),))
print(engine.pid, flush=True)
time.sleep(120)
"""


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as handle:  # a zombie has ended: it only waits to be reaped
        return handle.read().rsplit(")", 1)[1].split()[0] != "Z"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses /proc and pass_fds")
def test_the_engine_ends_when_its_parent_is_killed():
    read_end, write_end = os.pipe()
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT, str(read_end)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
        pass_fds=(read_end,),
    )
    os.close(read_end)
    try:
        engine_pid = int(parent.stdout.readline())
        time.sleep(1.0)
        assert alive(engine_pid)  # stdin is still open: only the parent's death can end it
        parent.send_signal(signal.SIGKILL)
        parent.wait(10)
        deadline = time.monotonic() + 20
        while alive(engine_pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not alive(engine_pid), "the engine outlived the TUI"
    finally:
        os.close(write_end)
        if parent.poll() is None:
            parent.kill()


def test_the_parent_is_named_by_the_tui_or_taken_at_start():
    assert parent_watch.parent_pid({"FLUXDECK_PARENT_PID": "4242"}, lambda: 7) == 4242
    assert parent_watch.parent_pid({}, lambda: 7) == 7
    assert parent_watch.parent_pid({"FLUXDECK_PARENT_PID": "junk"}, lambda: 7) == 7
    assert parent_watch.parent_gone_posix(7, lambda: 1) and not parent_watch.parent_gone_posix(7, lambda: 7)


def test_the_tui_names_itself_to_the_engine(tmp_path):
    from launcher.engine_client import EngineProcess

    out = tmp_path / "env"
    code = f"import os; open({str(out)!r}, 'w').write(os.environ.get('FLUXDECK_PARENT_PID', ''))"
    engine = EngineProcess(lambda m: None, lambda e: None, command=[sys.executable, "-c", code])
    engine.start()
    deadline = time.monotonic() + 20
    while engine.alive and time.monotonic() < deadline:
        time.sleep(0.05)
    assert out.read_text() == str(os.getpid())


def test_the_job_kills_on_close_and_nothing_else():
    info = win_job.kill_on_close_limits()
    assert info.BasicLimitInformation.LimitFlags == 0x2000
    # JOBOBJECT_EXTENDED_LIMIT_INFORMATION as Windows lays it out (64-bit: 144 bytes, 32-bit: 112)
    assert ctypes.sizeof(win_job.ExtendedLimitInformation) == (
        144 if ctypes.sizeof(ctypes.c_void_p) == 8 else 112
    )
    assert ctypes.sizeof(win_job.BasicLimitInformation) == (64 if ctypes.sizeof(ctypes.c_void_p) == 8 else 48)


def test_off_windows_the_job_does_nothing():
    job = win_job.KillOnCloseJob(windows=False)
    assert job.handle is None and job.assign(object()) is False
