"""`bootstrap env` shows one line per step and a bar, pip's whole output goes to logs/environment.log (issue 17,
item 1). A fake environment Python (tests/fake_env_python.py) prints what pip prints, run through the real
Runner (a child process, its output read as it comes)."""

from __future__ import annotations

import io
import json
import os
import signal
import sys
from pathlib import Path

import pytest

from bootstrap import environment as env
from bootstrap.errors import BootstrapError
from bootstrap.hardware import Platform
from bootstrap.pip_output import BuildLog, PipWatcher, lines_that_matter, progress_bar_choice
from bootstrap.progress import TerminalProgress

FAKE = Path(__file__).resolve().parent / "fake_env_python.py"
LINUX = Platform("Linux", "x86_64")
REQS = "torch==2.13.0\nsafetensors==0.8.0\nnumpy==2.4.6\nPillow==13.0.0\n"
PIP_NOISE = (
    "Collecting",
    "Downloading",
    "Using cached",
    "Progress ",
    "Looking in",
    "WARNING",
    "Successfully",
)

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="the fake Python is a #! script")


class Screen(io.StringIO):
    """What the user sees: the step lines and the status/bar line, in the order written."""

    def __init__(self, tty: bool) -> None:
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


def project(tmp_path: Path, **state) -> tuple[Path, Path]:
    """A project folder (with a space in its name, as C:\\Flux Deck) whose .venv/bin/python is the fake."""
    root = tmp_path / "Flux Deck"
    venv = root / ".venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "pyvenv.cfg").write_text("home = /usr/bin\n")
    (root / "requirements.txt").write_text(REQS)
    state_file = tmp_path / "state.json"
    state_file.write_text(json.dumps({"installed": {}, **state}))
    python = venv / "bin" / "python"
    python.write_text(f'#!/bin/sh\nFAKE_ENV_STATE="{state_file}" exec "{sys.executable}" "{FAKE}" "$@"\n')
    python.chmod(0o755)
    return root, state_file


def build(root: Path, screen: Screen, clock=None) -> env.EnvironmentBuilder:
    options = env.EnvOptions(device="cpu", root=root, base_python="/usr/bin/python3")

    def say(text: str) -> None:
        screen.write(text + "\n")

    builder = env.EnvironmentBuilder(
        options, LINUX, None, env.Runner(), lambda host: None, say=say, stream=screen
    )
    if clock is not None:  # every redraw is due: the bar's lines are seen however fast the fake is
        builder.bar = TerminalProgress(stream=screen, clock=clock, log_every=30.0, log_percent=25)
    return builder


def ticking():
    now = [0.0]

    def clock() -> float:
        now[0] += 1.0
        return now[0]

    return clock


def transcript(state_file: Path) -> list[str]:
    return state_file.with_suffix(".transcript").read_text().splitlines()


def test_a_build_prints_its_steps_and_logs_pips_whole_output(tmp_path):
    root, state_file = project(tmp_path)
    screen = Screen(tty=False)
    assert build(root, screen).build() == 0
    shown = screen.getvalue()
    lines = shown.splitlines()
    assert lines[0] == f"Python: {root / '.venv/bin/python'} (virtual environment)."
    assert lines[1].startswith("torch: the cpu build from download.pytorch.org (no GPU wanted")
    assert "Packages: 1 of 4: torch" in lines and "Packages: 4 of 4 (+3): Pillow" in lines
    assert "Packages: 4 of 4 installed, with 3 dependencies." in lines
    assert lines[-2].startswith("Running on the CPU as asked")
    assert lines[-1].startswith("Selftest: passed on cpu in ")
    assert "\r" not in shown and "\x1b" not in shown  # a pipe or a log: plain lines
    assert not [line for line in lines if line.startswith(PIP_NOISE)]
    assert len(lines) < 15
    # the log holds every line pip and the selftest printed, in order, and each command line
    log = (root / "logs" / "environment.log").read_text().splitlines()
    printed = transcript(state_file)
    assert [line for line in log if line in set(printed)] == printed
    assert sum(line.startswith("Progress ") for line in log) == 9 * 3  # torch, numpy, pillow: over 512 KB
    pip_lines = [line for line in log if line.startswith("$ ") and " -m pip install " in line]
    assert len(pip_lines) == 2 and all("--progress-bar raw" in line for line in pip_lines)
    assert pip_lines[0].startswith(f'$ "{root / ".venv/bin/python"}" -m pip')  # a path with a space, quoted
    assert json.loads(state_file.read_text())["installed"]["torch"] == "2.13.0"


def test_on_a_terminal_the_bar_redraws_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    root, _ = project(tmp_path)
    screen = Screen(tty=True)
    assert build(root, screen, clock=ticking()).build() == 0
    shown = screen.getvalue()
    redraws = shown.split("\r\x1b[K")
    bars = [part for part in redraws if part.startswith("Packages: 1 of 4: torch  ")]
    assert (
        len(bars) == 8 and bars[3] == "Packages: 1 of 4: torch  92.3 MB / 184.5 MB (49%)  11.5 MB/s  ETA 8s"
    )
    assert "Packages: 3 of 4 (+3): numpy  16.3 MB / 16.3 MB (100%)  1.0 MB/s" in redraws
    assert "Packages: 1 of 4 (+2): from pip's cache sympy 1.14.0 (6.3 MB)" in redraws  # a dependency
    live = [part for part in redraws if "\n" not in part]
    assert all(len(part) < 80 for part in live)  # a redrawn line that wrapped would litter the screen
    # what stays on the screen: the step lines only (each live line was cleared before one was printed)
    kept = [line.rsplit("\r\x1b[K", 1)[-1] for line in shown.split("\n")[:-1]]
    assert [line.split(" ")[0] for line in kept] == ["Python:", "torch:", "Packages:", "Running", "Selftest:"]
    assert kept[2] == "Packages: 4 of 4 installed, with 3 dependencies." and shown.endswith("\n")


def test_an_older_pip_gets_no_raw_flag_and_no_bar(tmp_path):
    root, state_file = project(
        tmp_path, pip="old"
    )  # pip 23: --progress-bar [on, off]; 'raw' fails the install
    screen = Screen(tty=True)
    assert build(root, screen, clock=ticking()).build() == 0
    shown = screen.getvalue()
    assert "downloading torch 2.13.0 (184.5 MB)" in shown and "%)" not in shown
    assert "Packages: 4 of 4 installed, with 3 dependencies." in shown
    assert not any(line.startswith("Progress ") for line in transcript(state_file))
    log = (root / "logs" / "environment.log").read_text()
    assert log.count("-m pip install --disable-pip-version-check --no-input --progress-bar off ") == 2


def test_a_failed_install_shows_the_error_lines_and_the_log(tmp_path):
    root, state_file = project(tmp_path, fail="torch")
    screen = Screen(tty=False)
    with pytest.raises(BootstrapError) as caught:
        build(root, screen).build()
    log_path = root / "logs" / "environment.log"
    message = str(caught.value)
    assert message.startswith("pip could not install torch==2.13.0 (what pip said last is above, ")
    assert f"the whole output is in {log_path}" in message and "already there were kept" in message
    lines = screen.getvalue().splitlines()
    at = lines.index("What pip said last:")
    assert lines[at + 1 :] == [
        "  ERROR: Could not find a version that satisfies the requirement torch==2.13.0 (from versions: none)",
        "  ERROR: No matching distribution found for torch==2.13.0",
    ]
    assert not [line for line in lines if "WARNING" in line or "Looking in" in line]  # only what matters
    log = log_path.read_text()
    assert all(line in log for line in transcript(state_file)) and "(exit code 1)" in log
    assert "stopped: BootstrapError: pip could not install" in log


def test_a_failed_selftest_shows_its_last_lines(tmp_path):
    root, state_file = project(tmp_path, selftest="crash")
    screen = Screen(tty=False)
    with pytest.raises(
        BootstrapError, match=r"selftest failed on cpu \(what the selftest said last is above, the whole"
    ):
        build(root, screen).build()
    lines = screen.getvalue().splitlines()
    shown = lines[lines.index("What the selftest said last:") + 1 :]
    assert len(shown) == 15 and shown[-1].endswith(
        "RuntimeError: mat1 and mat2 shapes cannot be multiplied (1x64 and 32x64)"
    )
    assert "Traceback (most recent call last):" in (root / "logs" / "environment.log").read_text()


def test_ctrl_c_during_pip_leaves_a_readable_log_and_no_pip_running(tmp_path):
    root, state_file = project(tmp_path, hang="numpy")
    pid_file = tmp_path / "child.pid"

    class Interrupting(Screen):
        def write(self, text: str) -> int:
            if "numpy" in text and pid_file.exists():  # Ctrl+C reaches the whole console: pip, then us
                os.kill(int(pid_file.read_text()), signal.SIGINT)
                raise KeyboardInterrupt
            return super().write(text)

    with pytest.raises(KeyboardInterrupt):
        build(root, Interrupting(tty=False)).build()
    pid = int(pid_file.read_text())
    with pytest.raises(ProcessLookupError):  # reaped: gone, not a zombie
        os.kill(pid, 0)
    log = (root / "logs" / "environment.log").read_text().splitlines()
    assert "Collecting numpy==2.4.6" in log and log[-1] == "stopped: KeyboardInterrupt: "


def test_a_ready_environment_is_one_line_and_keeps_the_last_log(tmp_path):
    root, _ = project(tmp_path)
    assert build(root, Screen(tty=False)).build() == 0
    log_path = root / "logs" / "environment.log"
    before = log_path.read_text()
    screen = Screen(tty=False)
    assert build(root, screen).build() == 0
    assert screen.getvalue().splitlines() == [
        f"The environment in {root / '.venv'} is ready. Running on the CPU as asked (torch 2.13.0+cpu)."
    ]
    assert log_path.read_text() == before


# ---- the pieces ----


def test_raw_progress_is_recognised_in_pips_own_help_texts():
    text = FAKE.read_text()
    new_help = text.split('NEW_HELP = """', 1)[1].split('"""', 1)[0]
    old_help = text.split('OLD_HELP = """', 1)[1].split('"""', 1)[0]
    assert progress_bar_choice(new_help) == "raw"  # pip 26.3: "[auto, on,\n off, raw]" across lines
    assert progress_bar_choice(old_help) == "off"  # pip 23.2: "[on, off]"
    # 'raw' in another option's text does not count
    assert progress_bar_choice(old_help + "  --raw-mode   raw output\n") == "off"
    assert progress_bar_choice("  --progress-bar <progress_bar>  [off|on|ascii|pretty|emoji]\n") == "off"
    assert progress_bar_choice("") is None


def test_lines_that_matter():
    noise = [f"line {i}" for i in range(40)]
    assert lines_that_matter(noise) == noise[-15:]
    mixed = noise + ["ERROR: No matching distribution found for torch==9"] + noise
    assert lines_that_matter(mixed) == ["ERROR: No matching distribution found for torch==9"]
    build_error = ["  error: subprocess-exited-with-error", *noise, "ERROR: Failed to build 'x'"]
    assert lines_that_matter(build_error) == [
        "  error: subprocess-exited-with-error",
        "ERROR: Failed to build 'x'",
    ]


def test_the_watcher_counts_requirements_and_dependencies():
    screen = Screen(tty=False)
    watcher = PipWatcher(["torch", "pillow"], TerminalProgress(stream=screen))
    for line in [
        "Collecting torch==2.13.0+cu126",
        "  Downloading https://download.pytorch.org/whl/cu126/torch-2.13.0%2Bcu126-cp312-cp312-win_amd64.whl (2.6 GB)",
        "Collecting typing-extensions>=4.10.0 (from torch==2.13.0+cu126)",
        "Processing c:\\wheels\\pillow-13.0.0-cp312-cp312-win_amd64.whl",
        "Installing collected packages: typing-extensions, torch, pillow",
        "Successfully installed pillow-13.0.0 torch-2.13.0+cu126 typing-extensions-4.15.0",
    ]:
        watcher.feed(line)
    assert screen.getvalue().splitlines() == [
        "Packages: 1 of 2: torch",
        "Packages: 2 of 2 (+1): pillow",
        "Packages: installing 3 (typing-extensions, torch, pillow); unpacking torch takes a minute",
    ]
    assert watcher.summary() == "Packages: 2 of 2 installed, with 1 dependency."


def test_an_unwritable_log_is_named_and_the_build_goes_on(tmp_path):
    blocker = tmp_path / "logs"
    blocker.write_text("a file where the folder should be")
    log = BuildLog(blocker / "environment.log")
    log.begin(["pip", "install", "x"])
    log.line("ERROR: boom")
    log.end(1)
    assert list(log.tail) == ["ERROR: boom"] and log.where().startswith(
        f"{blocker / 'environment.log'} could not"
    )
