"""Measure the TUI in a real terminal (tmux): time to first paint and its own RSS. Prints numbers, asserts nothing.

    .venv/bin/python tests/launcher_measure.py [--runs 5]

First paint: from starting `python -m launcher` until the footer is on screen (tmux capture-pane polled every
10 ms). RSS: the TUI process alone (the engine is a separate child), after it settles, by psutil.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent


def tmux(*args: str) -> str:
    return subprocess.run(["tmux", *args], capture_output=True, text=True, check=False).stdout


def launch(session: str, folder: Path, extra: str = "") -> float:
    """Start the TUI in a detached tmux session; returns the start time (perf_counter)."""
    command = (
        f"cd {ROOT} && {sys.executable} -m launcher --models-dir {folder}/models --output-dir {folder}/outputs "
        f"--config {folder}/config.toml --no-wizard {extra}"
    )
    start = time.perf_counter()
    subprocess.run(["tmux", "new-session", "-d", "-s", session, "-x", "150", "-y", "42", command], check=True)
    return start


def wait_for_screen(session: str, text: str, timeout: float = 30.0) -> float:
    deadline = time.perf_counter() + timeout
    while time.perf_counter() < deadline:
        if text in tmux("capture-pane", "-p", "-t", session):
            return time.perf_counter()
        time.sleep(0.01)
    raise TimeoutError(f"{text!r} did not appear within {timeout} s")


def tui_process(session: str) -> psutil.Process:
    shell = psutil.Process(int(tmux("display-message", "-p", "-t", session, "#{pane_pid}").strip()))
    for proc in [shell, *shell.children(recursive=True)]:
        if "launcher" in " ".join(proc.cmdline()):
            return proc
    raise RuntimeError("the TUI process was not found")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    if shutil.which("tmux") is None:
        print("tmux is needed: apt-get install tmux")
        return 1
    paints, rss = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for run in range(args.runs):
            session = f"fluxdeck-measure-{run}"
            start = launch(session, Path(tmp))
            try:
                paints.append(wait_for_screen(session, "^g Generate") - start)
                time.sleep(1.5)
                rss.append(tui_process(session).memory_info().rss / 2**20)
            finally:
                tmux("send-keys", "-t", session, "C-q")
                time.sleep(0.5)
                tmux("kill-session", "-t", session)
    print(
        f"first paint: median {statistics.median(paints):.2f} s, min {min(paints):.2f} s over {len(paints)} runs"
    )
    print(
        f"TUI RSS:     median {statistics.median(rss):.0f} MB, max {max(rss):.0f} MB (engine process excluded)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
