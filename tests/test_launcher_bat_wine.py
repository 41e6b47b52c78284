"""run_gpu.bat / run_cpu.bat run by cmd under wine, as a double-click runs them: `cmd /c ""<bat>" args"` from
another current folder, stdin fed so that `pause` returns. python.exe / py.exe are a stub built with mingw
(tests/wine/stub_python.c) that logs its arguments and exits with scripted codes.

Needs `wine` (64-bit) and `x86_64-w64-mingw32-gcc` (.ci/run installs them); skips, saying so, without them.
The wine prefix boots once per module (about 15 s), each run then takes 1-2 s. Wine 8 quirks the launchers avoid: its where.exe
always succeeds and `A || B` runs B even when A succeeds, so neither is used.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
STUB_SOURCE = Path(__file__).with_name("wine") / "stub_python.c"
CRASH = -1073741819  # 0xC0000005, an access violation, as cmd's %ERRORLEVEL% reads it
STOPPED = "FluxDeck stopped with an error (see above)."
PAUSED = "Press any key to continue"


def windows_path(path: Path) -> str:
    """Wine's Z: drive is the Unix root."""
    return "Z:" + str(path).replace("/", "\\")


@dataclass
class Wine:
    env: dict[str, str]
    stub: Path
    work: Path

    def run(self, bat: Path, args: str = "", path: list[Path] = (), exits: str = "") -> Run:
        """Double-click `bat`: cmd gets exactly `cmd /c ""<bat>" args"` (a throwaway outer cmd passes the line
        on, since wine re-quotes its own arguments); the current folder is elsewhere; stdin answers pause."""
        log = self.work / "log"
        log.unlink(missing_ok=True)
        elsewhere = self.work / "elsewhere"
        elsewhere.mkdir(exist_ok=True)
        target = "".join("^" + c if c in "&|<>^" else c for c in windows_path(bat))  # the outer cmd's escapes
        line = f'@cmd /c ""{target}"{" " + args if args else ""}"\r\n@exit /b %ERRORLEVEL%\r\n'
        launch = self.work / "launch.cmd"
        launch.write_bytes(line.encode("cp437"))  # wine's cmd reads batch files in the OEM code page
        env = {
            **self.env,
            "FLUXDECK_LOG": windows_path(log),
            "FLUXDECK_EXIT": exits,
        }
        if path:  # prepended to Windows' PATH (an empty WINEPATH would hide cmd.exe itself)
            env["WINEPATH"] = ";".join(windows_path(p) for p in path)
        for _ in range(2):  # a fresh prefix can answer its first commands with nothing while wineboot settles
            done = subprocess.run(
                ["wine", "cmd", "/c", windows_path(launch)],
                cwd=elsewhere,
                env=env,
                input="\n\n\n",
                capture_output=True,
                text=True,
                errors="replace",
                timeout=120,
            )
            if (
                done.stdout or done.stderr or log.exists()
            ):  # every path of the launchers says or logs something
                break
        calls = log.read_text(encoding="utf-8").splitlines() if log.exists() else []
        return Run(done.returncode, done.stdout + done.stderr, calls)


@dataclass
class Run:
    rc: int
    output: str
    calls: list[str]

    @property
    def stopped_with_pause(self) -> bool:
        return self.rc == 1 and STOPPED in self.output and PAUSED in self.output


@pytest.fixture(scope="module")
def wine(tmp_path_factory) -> Wine:
    missing = [
        tool for tool in ("wine", "wineserver", "x86_64-w64-mingw32-gcc") if shutil.which(tool) is None
    ]
    if missing:
        pytest.skip(
            f"the .bat launcher tests need {', '.join(missing)} (Debian: apt-get install wine wine64 "
            "gcc-mingw-w64-x86-64; .ci/run installs them)"
        )
    work = tmp_path_factory.mktemp("wine")
    stub = work / "stub.exe"
    subprocess.run(["x86_64-w64-mingw32-gcc", "-O1", "-s", "-o", str(stub), str(STUB_SOURCE)], check=True)
    env = {
        **os.environ,
        "WINEPREFIX": str(work / "prefix"),
        "WINEDEBUG": "-all",
        "WINEDLLOVERRIDES": "mscoree,mshtml=",  # no Mono/Gecko install prompts
        "LANG": "C.UTF-8",
    }
    env.pop("LC_ALL", None)
    env.pop("DISPLAY", None)
    try:
        boot = subprocess.run(
            ["wine", "cmd", "/c", "echo", "ready"], env=env, capture_output=True, text=True, timeout=600
        )
        if "ready" not in boot.stdout:
            pytest.skip(f"wine could not start a Windows command prompt: {boot.stderr.strip()[-300:]}")
        yield Wine(env, stub, work)
    finally:
        subprocess.run(["wineserver", "-k"], env=env, capture_output=True, timeout=60)


def folder(wine: Wine, name: str, *, embedded: bool = False) -> Path:
    """A fresh FluxDeck folder with both launchers (and the bundle's python_embeded when asked)."""
    path = wine.work / "installs" / name
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    for bat in ("run_gpu.bat", "run_cpu.bat"):
        shutil.copy(ROOT / bat, path / bat)
    if embedded:
        (path / "python_embeded").mkdir()
        shutil.copy(wine.stub, path / "python_embeded" / "python.exe")
    return path


def bin_dir(wine: Wine, name: str, *exes: str) -> Path:
    path = wine.work / "bins" / name
    path.mkdir(parents=True, exist_ok=True)
    for exe in exes:
        shutil.copy(wine.stub, path / exe)
    return path


def env_calls(mode: str, tail: str) -> list[str]:
    return [
        f"python.exe -m bootstrap env {mode}",
        "python.exe -m launcher --check-models",
        "python.exe -m bootstrap wizard",
        f"python.exe -m launcher {tail}",
    ]


def test_portable_bundle_first_and_later_runs(wine):
    home = folder(wine, "FluxDeck", embedded=True)
    first = wine.run(home / "run_gpu.bat", "--seed 5")
    assert first.rc == 0, first.output
    assert first.calls == env_calls("--gpu", "--seed 5"), first.output
    assert not (home / ".venv").exists()
    later = wine.run(home / "run_cpu.bat")
    assert later.rc == 0 and PAUSED not in later.output
    assert later.calls == [
        "python.exe -m bootstrap env --cpu",
        "python.exe -m launcher --check-models",
        "python.exe -m launcher --cpu",
    ]


@pytest.mark.parametrize("name", ["Flux Deck (x86)", "R&D Jürgen!"])
@pytest.mark.parametrize(
    "bat, mode, flags", [("run_gpu.bat", "--gpu", ""), ("run_cpu.bat", "--cpu", "--cpu ")]
)
def test_clone_with_py_in_awkward_folders(wine, name, bat, mode, flags):
    home = folder(wine, name)
    run = wine.run(home / bat, "--seed 5", path=[bin_dir(wine, "py", "py.exe")])
    assert run.rc == 0, run.output
    assert run.calls == [
        "py.exe -3.12 -c import sys",
        f"py.exe -3.12 -m bootstrap env {mode}",
        *env_calls(mode, f"{flags}--seed 5"),
    ]
    assert (home / ".venv" / "Scripts" / "python.exe").is_file()


def test_py_without_3_12_takes_3_11(wine):
    home = folder(wine, "FluxDeck")
    run = wine.run(home / "run_gpu.bat", path=[bin_dir(wine, "py", "py.exe")], exits="py.exe|-3.12=103")
    assert run.rc == 0, run.output
    assert run.calls[:3] == [
        "py.exe -3.12 -c import sys",
        "py.exe -3.11 -c import sys",
        "py.exe -3.11 -m bootstrap env --gpu",
    ]


def test_clone_with_only_python(wine):
    home = folder(wine, "FluxDeck")
    run = wine.run(home / "run_gpu.bat", "--seed 5", path=[bin_dir(wine, "python", "python.exe")])
    assert run.rc == 0, run.output
    assert run.calls == [
        "python.exe -c import sys",
        "python.exe -m bootstrap env --gpu",
        *env_calls("--gpu", "--seed 5"),
    ]


def test_no_python_says_what_to_install_and_pauses(wine):
    run = wine.run(folder(wine, "FluxDeck") / "run_gpu.bat")
    assert run.stopped_with_pause and "No Python was found. Install Python 3.12" in run.output
    assert run.calls == []


def test_the_store_alias_is_not_a_python(wine):
    alias = bin_dir(wine, "Microsoft/WindowsApps", "python.exe")
    run = wine.run(folder(wine, "FluxDeck") / "run_gpu.bat", path=[alias])
    assert run.stopped_with_pause and "Microsoft Store" in run.output and run.calls == []
    # an alias elsewhere on PATH answers 9009 instead of running
    run = wine.run(
        folder(wine, "FluxDeck") / "run_cpu.bat",
        path=[bin_dir(wine, "alias", "python.exe")],
        exits="python.exe|-c=9009",
    )
    assert run.stopped_with_pause and "Microsoft Store" in run.output
    assert run.calls == ["python.exe -c import sys"]


# each step that can fail, with the calls that must (not) follow
FAILURES = [
    ("system bootstrap env", "py.exe|-3.12 -m bootstrap env=1", False, "py.exe -3.12 -m bootstrap env --gpu"),
    (
        "system bootstrap env crashes",
        f"py.exe|-3.12 -m bootstrap env={CRASH}",
        False,
        "py.exe -3.12 -m bootstrap env --gpu",
    ),
    (
        "environment's bootstrap env",
        "python.exe|-m bootstrap env=1",
        True,
        "python.exe -m bootstrap env --gpu",
    ),
    (
        "environment's bootstrap env crashes",
        "python.exe|-m bootstrap env=-1",
        True,
        "python.exe -m bootstrap env --gpu",
    ),
    ("wizard", "python.exe|-m bootstrap wizard=2", True, "python.exe -m bootstrap wizard"),
    ("launcher", "python.exe|-m launcher --seed=1", True, "python.exe -m launcher --seed 5"),
    ("launcher crashes", f"python.exe|-m launcher --seed={CRASH}", True, "python.exe -m launcher --seed 5"),
]


@pytest.mark.parametrize("step, exits, embedded, last", FAILURES, ids=[f[0] for f in FAILURES])
def test_every_failing_step_reaches_the_message_and_pause(wine, step, exits, embedded, last):
    home = folder(wine, "FluxDeck", embedded=embedded)
    path = [] if embedded else [bin_dir(wine, "py", "py.exe")]
    run = wine.run(home / "run_gpu.bat", "--seed 5", path=path, exits=exits)
    assert run.stopped_with_pause, run.output
    assert run.calls[-1] == last  # nothing ran after the step that failed
