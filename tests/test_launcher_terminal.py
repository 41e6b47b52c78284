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
from PIL import Image
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
        # the Edit screen's Control mode: the canny preview (the engine's own function) and depth (no preview)
        photo = tmp / "photo.png"
        Image.new("RGB", (64, 48), (200, 30, 30)).save(photo)
        await pilot.press("f8")
        edit = app.screen
        edit.query_one("#source").value = str(photo)
        edit.query_one("#source").focus()
        await pilot.press("enter")
        edit.query_one("#mode").value = "control"
        edit.query_one("#preprocess").value = "canny"
        for _ in range(200):
            if edit.preview is not None:
                break
            await pilot.pause(0.05)
        edit.query_one("#preprocess").value = "depth"
        edit.query_one("#mode").value = "redux"
        await pilot.pause()
        # the ControlNet panel's depth: the photo goes to the engine as it is (no map made here, no torch)
        (tmp / "models" / "controlnet").mkdir(parents=True, exist_ok=True)
        (tmp / "models" / "controlnet" / "union.safetensors").write_bytes(b"net")
        await pilot.press("ctrl+t")
        panel = app.screen
        panel.query_one("#on-0").value = True
        panel.query_one("#image-0").value = str(photo)
        panel.query_one("#pre-0").value = "depth"
        panel.query_one("#image-0").focus()
        await pilot.press("enter")
        await pilot.pause()
        said = "computed by the engine" in str(panel.query_one("#cn-preview").query_one("#caption").render())
    print("torch" in sys.modules, "numpy" in sys.modules, edit.preview is not None, said)

asyncio.run(main(Path(sys.argv[1])))
"""


def test_the_tui_never_imports_torch(tmp_path):
    result = subprocess.run(
        [sys.executable, "-c", NO_TORCH, str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    torch, _, previewed, depth_said = result.stdout.split()[-4:]
    assert torch == "False", "the TUI process imported torch"
    assert previewed == "True", "the canny preview was not computed (the check would prove nothing)"
    assert depth_said == "True", "the ControlNet panel's depth was not chosen (the check would prove nothing)"


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed (apt-get install tmux)")
@pytest.mark.skipif(
    importlib.util.find_spec("engine.generation.pipeline") is None,
    reason="engine.generation.pipeline is not written yet",
)
def test_open_an_image_paint_a_mask_and_inpaint_in_tmux(tmp_path):
    """The real app and the real engine (tiny random model): the gallery's image opened in Edit (e), a mask
    painted with keys, ctrl+g, and an inpainted PNG on disk whose metadata names the mask by its SHA-256."""
    import hashlib

    from PIL import Image

    from engine.fixtures import write_tiny_model_set

    write_tiny_model_set(tmp_path / "models")
    (tmp_path / "outputs").mkdir()
    source = tmp_path / "outputs" / "photo.png"
    Image.new("RGB", (64, 64), (30, 140, 60)).save(source)
    session = f"fluxdeck-edit-{tmp_path.name}"
    launch(session, tmp_path, "--prompt 'a red door' --steps 2 --seed 3 --images halfcell")
    try:
        wait_for_screen(session, "^g Generate", timeout=20)
        tmux("send-keys", "-t", session, "F3")
        wait_for_screen(session, "photo.png", timeout=10)
        time.sleep(0.5)  # the table takes the keys once listed
        tmux("send-keys", "-t", session, "e")  # open the selected image in Edit: the canvas takes the keys
        try:
            wait_for_screen(session, "mask 0%", timeout=10)
        except TimeoutError:
            raise AssertionError(tmux("capture-pane", "-p", "-t", session)) from None
        tmux("send-keys", "-t", session, "r", "Left", "Left", "Up", "Up", "r", "Right", "Right", "Space")
        deadline = time.monotonic() + 10
        while "mask 0%" in tmux("capture-pane", "-p", "-t", session) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "mask 0%" not in tmux("capture-pane", "-p", "-t", session)
        tmux("send-keys", "-t", session, "C-g")
        deadline = time.monotonic() + 90
        while not list((tmp_path / "outputs").glob("*.png"))[1:] and time.monotonic() < deadline:
            time.sleep(0.2)
        results = [p for p in (tmp_path / "outputs").glob("*.png") if p != source]
        assert len(results) == 1, tmux("capture-pane", "-p", "-t", session)
        request = read_png_params(results[0]).request
        mask = Path(request["mask"])
        assert mask.parent == tmp_path / "outputs" / "inputs" and request["init_image"] == str(source)
        with Image.open(mask) as painted:
            assert painted.size == (64, 64) and painted.getextrema() == (0, 255)
        recorded = {item["role"]: item["sha256"] for item in request["inputs"]}
        assert recorded["mask"] == hashlib.sha256(mask.read_bytes()).hexdigest()
        with Image.open(results[0]) as result:
            assert result.size == (64, 64)
        tmux("send-keys", "-t", session, "C-q")
        tui_process(session).wait(timeout=15)
    finally:
        tmux("kill-session", "-t", session)
