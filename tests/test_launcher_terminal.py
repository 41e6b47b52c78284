"""The real app in a real terminal (tmux): launch, ctrl+g, a PNG on disk, quit. And: the TUI never imports torch."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from launcher.metadata import read_png_params
from tests.launcher_measure import launch, tmux, tui_process, wait_for_screen

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed (apt-get install tmux)")
@pytest.mark.skipif(
    importlib.util.find_spec("engine.generation.pipeline") is None,
    reason="engine.generation.pipeline is not written yet",
)
def test_launch_generate_and_quit_in_tmux(tmp_path):
    from engine.fixtures import write_tiny_model_set

    write_tiny_model_set(tmp_path / "models")
    session = f"fluxdeck-test-{tmp_path.name}"
    launch(
        session,
        tmp_path,
        "--prompt 'a lighthouse' --width 64 --height 64 --steps 2 --seed 42 --images halfcell",
    )
    try:
        wait_for_screen(session, "^g Generate", timeout=20)
        assert "torch" not in " ".join(m for m in tui_process(session).cmdline())
        tmux("send-keys", "-t", session, "C-g")
        deadline = time.monotonic() + 90
        while not list((tmp_path / "outputs").glob("*.png")) and time.monotonic() < deadline:
            time.sleep(0.2)
        pngs = list((tmp_path / "outputs").glob("*.png"))
        assert len(pngs) == 1, tmux("capture-pane", "-p", "-t", session)
        wait_for_screen(session, "Done in", timeout=10)
        params = read_png_params(pngs[0])
        assert (params.prompt, params.seed, params.width) == ("a lighthouse", 42, 64)
        process = tui_process(session)
        engine = process.children()
        assert engine and "engine" in " ".join(engine[0].cmdline())
        tmux("send-keys", "-t", session, "C-q")
        process.wait(timeout=15)  # quits, and takes the engine down with it
        gone, alive = psutil.wait_procs(engine, timeout=10)
        assert not alive
    finally:
        tmux("kill-session", "-t", session)


NO_TORCH = """
import asyncio, sys
from pathlib import Path
from launcher.app import FluxDeckApp
from launcher.cli import LaunchOptions
from launcher.config import ConfigFile

async def main(tmp):
    options = LaunchOptions(models_dir=str(tmp / "models"), output_dir=str(tmp / "outputs"), no_wizard=True,
                            config=tmp / "config.toml", renderer="halfcell")
    app = FluxDeckApp(options, ConfigFile(options.config), start_engine=False, root=tmp)
    async with app.run_test() as pilot:
        for key in ("f3", "f4", "f5", "f6", "f7", "f2"):
            await pilot.press(key)
    print("torch" in sys.modules, "numpy" in sys.modules)

asyncio.run(main(Path(sys.argv[1])))
"""


def test_the_tui_never_imports_torch(tmp_path):
    result = subprocess.run(
        [sys.executable, "-c", NO_TORCH, str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[0] == "False", "the TUI process imported torch"
