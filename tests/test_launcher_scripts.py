"""The root launch scripts: run from another folder, build the environment on first run, wizard when no model."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Stands in for both the system python3 and the environment's python: logs each call, and the first
# `-m bootstrap env` creates .venv/bin/python (this same script). `--check-models` fails until the wizard ran.
FAKE_PYTHON = """#!/bin/sh
echo "$(basename "$0") $*" >> "$FLUXDECK_LOG"
case "$*" in
  "-m bootstrap env"*) mkdir -p .venv/bin && cp "$0" .venv/bin/python ;;
  "-m launcher --check-models") [ -f wizard-done ] || exit 3 ;;
  "-m bootstrap wizard") touch wizard-done ;;
esac
exit 0
"""


def executable(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)


@pytest.mark.parametrize("script, flags", [("run_cpu.sh", ["--cpu"]), ("run_gpu.sh", [])])
def test_shell_launcher_first_and_later_runs(tmp_path, script, flags):
    bundle, bin_dir, elsewhere = tmp_path / "FluxDeck folder", tmp_path / "bin", tmp_path / "elsewhere"
    for folder in (bundle, bin_dir, elsewhere):
        folder.mkdir()
    for name in ("run_gpu.sh", script):  # run_cpu.sh runs run_gpu.sh
        shutil.copy(ROOT / name, bundle / name)
    executable(bin_dir / "python3", FAKE_PYTHON)
    log = tmp_path / "log"
    env = {**os.environ, "PATH": f"{bin_dir}:/usr/bin:/bin", "FLUXDECK_LOG": str(log)}

    def run() -> list[str]:
        log.write_text("")
        result = subprocess.run(
            ["sh", str(bundle / script), "--seed", "5"], cwd=elsewhere, env=env, timeout=30
        )
        assert result.returncode == 0
        return log.read_text().splitlines()

    mode = "--cpu" if flags else "--gpu"
    assert run() == [
        f"python3 -m bootstrap env {mode}",
        "python -m launcher --check-models",
        "python -m bootstrap wizard",
        " ".join(["python -m launcher", *flags, "--seed 5"]),
    ]
    assert run() == [
        "python -m launcher --check-models",
        " ".join(["python -m launcher", *flags, "--seed 5"]),
    ]


def test_batch_launchers_are_crlf_and_pause_on_error():
    for name in ("run_gpu.bat", "run_cpu.bat"):
        data = (ROOT / name).read_bytes()
        assert data.count(b"\r\n") == data.count(b"\n"), f"{name} must use CRLF line ends"
        text = data.decode()
        assert 'cd /d "%~dp0"' in text and "pause" in text and "-m bootstrap env" in text
    assert "-m launcher --cpu %*" in (ROOT / "run_cpu.bat").read_text()
