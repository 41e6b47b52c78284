"""Stands in for the environment's Python in tests/test_bootstrap_env_quiet.py: `-m pip install` prints what pip
26 prints (Collecting/Downloading/Progress/Installing/Successfully installed, or ERROR lines and exit 1), `-m
pip install --help` lists `--progress-bar` as pip 26 or pip 23 does, `-c` answers the builder's two questions
(installed packages, the GPU probe) and `-m engine selftest` passes or fails. Its state (what is installed, what
should fail, which pip it plays) is the JSON file named by FAKE_ENV_STATE; every line it prints is also appended
to <state>.transcript, so a test can compare the log with what was printed.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

STATE = Path(os.environ["FAKE_ENV_STATE"])
state = json.loads(STATE.read_text())
transcript = STATE.with_suffix(".transcript").open("a", encoding="utf-8")

NEW_HELP = """Usage:
  pip install [options] <requirement specifier> [package-index-options] ...

Install Options:
  --no-input                  Disable prompting for input.
  --progress-bar <progress_bar>
                              Specify whether the progress bar should be used.
                              In 'auto' mode, --quiet
                              will suppress all progress bars. [auto, on,
                              off, raw] (default: auto)
  --root-user-action <root_user_action>
                              Action if pip is run as a root user [warn,
                              ignore] (default: warn)
"""
OLD_HELP = """Usage:
  pip install [options] <requirement specifier> [package-index-options] ...

Install Options:
  --progress-bar <progress_bar>
                              Specify whether the progress bar should be used
                              [on, off] (default: on)
  --root-user-action <root_user_action>
                              Action if pip is run as a root user. By default,
                              a warning message is shown.
"""
# what torch pulls in, as pip 26 reports it for the CPU index
TORCH_DEPS = [("filelock", "3.20.0", "16 kB"), ("sympy", "1.14.0", "6.3 MB"), ("mpmath", "1.3.0", "536 kB")]
SIZES = {"torch": 184_512_331, "numpy": 16_339_644, "safetensors": 486_210, "pillow": 4_372_556}


def say(line: str = "", err: bool = False) -> None:
    transcript.write(line + "\n")
    transcript.flush()
    stream = sys.stderr if err else sys.stdout
    stream.write(line + "\n")
    stream.flush()


def human(size: int) -> str:
    return f"{size / 1e6:.1f} MB" if size >= 1e6 else f"{size / 1e3:.0f} kB"


def download(name: str, version: str, size: int, raw: bool, index: str) -> None:
    quoted = version.replace("+", "%2B")
    say(f"  Downloading {index}/{name}-{quoted}-cp312-cp312-manylinux_2_28_x86_64.whl ({human(size)})")
    if raw and size > 512 * 1024:
        for step in range(9):
            say(f"Progress {size * step // 8} of {size}")
            time.sleep(0.01)


def pip_install(args: list[str]) -> int:
    raw = "--progress-bar" in args and args[args.index("--progress-bar") + 1] == "raw"
    if raw and state.get("pip") == "old":
        say(
            "ERROR: Invalid value: 'raw' for --progress-bar (invalid choice: 'raw' (choose from 'on', 'off'))"
        )
        return 2
    index = args[args.index("--index-url") + 1] if "--index-url" in args else "https://files.pythonhosted.org"
    specs = [a for a in args if "==" in a]
    say(f"Looking in indexes: {index}")
    say(
        "WARNING: Location 'file:///opt/mirror/simple/torch/' is ignored: it is neither a file nor a directory."
    )
    if any(s.split("==")[0] == state.get("fail") for s in specs):
        spec = next(s for s in specs if s.split("==")[0] == state.get("fail"))
        say(f"ERROR: Could not find a version that satisfies the requirement {spec} (from versions: none)")
        say(f"ERROR: No matching distribution found for {spec}")
        return 1
    installed = []
    for spec in specs:
        name, version = spec.split("==")
        hang = state.get("hang") == name  # stands still, as pip does on a slow mirror, until interrupted
        if hang:
            signal.signal(signal.SIGINT, lambda *_: sys.exit(1))
            (STATE.parent / "child.pid").write_text(str(os.getpid()))
        say(f"Collecting {spec}")
        if hang:
            time.sleep(60)
        download(name.lower(), version, SIZES.get(name.lower(), 100_000), raw, index)
        installed.append((name, version))
        if name == "torch":
            for dep, dep_version, size in TORCH_DEPS:
                say(f"Collecting {dep}>=1.0 (from {spec})")
                say(f"  Using cached {dep}-{dep_version}-py3-none-any.whl ({size})")
                installed.append((dep, dep_version))
    say(f"Installing collected packages: {', '.join(n for n, _ in installed)}")
    say(f"Successfully installed {' '.join(f'{n}-{v}' for n, v in sorted(installed))}")
    state["installed"].update({n: v for n, v in installed})
    STATE.write_text(json.dumps(state))
    return 0


def main(argv: list[str]) -> int:
    if argv[:2] == ["-m", "pip"]:
        if argv[2:] == ["--version"]:
            say("pip 26.3 from /fake/site-packages/pip (python 3.12)")
            return 0
        if argv[2:4] == ["install", "--help"]:
            print(OLD_HELP if state.get("pip") == "old" else NEW_HELP)
            return 0
        return pip_install(argv[3:])
    if argv[:1] == ["-c"] and "importlib.metadata" in argv[1]:
        print(json.dumps(state["installed"]))
        return 0
    if argv[:1] == ["-c"] and "torch.cuda" in argv[1]:
        print(json.dumps({"version": "2.13.0+cpu", "cuda": None, "available": False}))
        return 0
    if argv[:3] == ["-m", "engine", "selftest"]:
        say("torch 2.13.0+cpu, device cpu, dtype bfloat16", err=True)
        if state.get("selftest") == "crash":
            say("Traceback (most recent call last):", err=True)
            for depth in range(20):
                say(f'  File "/fd/engine/layer{depth}.py", line {depth + 10}, in forward', err=True)
            say("RuntimeError: mat1 and mat2 shapes cannot be multiplied (1x64 and 32x64)", err=True)
            return 1
        say("wrote a tiny model set in 0.21 s", err=True)
        say("selftest passed: wrote /tmp/selftest.png (2114 bytes) on cpu", err=True)
        return 0
    say(f"fake python: unexpected {argv}", err=True)
    return 3


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
