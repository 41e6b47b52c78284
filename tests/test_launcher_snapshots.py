"""SVG snapshots of the main screens (no engine: status and images are deterministic).

Update after an intended change: pytest tests/test_launcher_snapshots.py --snapshot-update
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from launcher.jobs import JobState
from tests.launcher_helpers import SIZE, fluxdeck_png, make_app, wait_for, write_png

# A fixed folder: paths shown on screen must not change between runs.
BASE = Path("/tmp/fluxdeck-launcher-snapshots")


@pytest.fixture
def base() -> Path:
    shutil.rmtree(BASE, ignore_errors=True)
    (BASE / "models" / "diffusion_models").mkdir(parents=True)
    (BASE / "models" / "diffusion_models" / "flux1-schnell-fp8.safetensors").write_bytes(b"0" * 4096)
    (BASE / "models" / "vae").mkdir()
    (BASE / "models" / "vae" / "ae.safetensors").write_bytes(b"0" * 1024)
    yield BASE
    shutil.rmtree(BASE, ignore_errors=True)


def app_for(base: Path):
    return make_app(base, start_engine=False, models_dir=str(base / "models"))


def test_generate_screen(base, snap_compare):
    assert snap_compare(app_for(base), terminal_size=SIZE)


def test_gallery_screen(base, snap_compare):
    first = fluxdeck_png(base / "outputs" / "20250101-120000-7.png", "a red square", 7, (200, 30, 30))
    second = write_png(
        base / "outputs" / "forge.png",
        (30, 30, 200),
        parameters="a blue square\nSteps: 20, Seed: 9, Size: 64x64",
    )
    os.utime(first, (1_700_000_000, 1_700_000_000))
    os.utime(second, (1_700_000_100, 1_700_000_100))
    assert snap_compare(app_for(base), press=["f3"], terminal_size=SIZE)


def test_queue_screen(base, snap_compare):
    app = app_for(base)

    async def fill(pilot):
        for seed, state in ((1, JobState.DONE), (2, JobState.RUNNING), (3, JobState.QUEUED)):
            job = app.jobs.add(
                {"prompt": "a lighthouse", "seed": seed, "width": 512, "height": 512, "steps": 4}
            )
            job.state = state
        app.jobs.jobs[0].paths = ["outputs/1.png"]
        app.jobs.jobs[1].step, app.jobs.jobs[1].total = 2, 4
        await pilot.press("f4")

    assert snap_compare(app, run_before=fill, terminal_size=SIZE)


def test_models_screen(base, snap_compare):
    app = app_for(base)

    async def open_models(pilot):
        await pilot.press("f5")
        presets = app.screen.query_one("#presets")
        await wait_for(pilot, lambda: presets.row_count == 2, 20)  # the fake bootstrap's two verdicts

    assert snap_compare(app, run_before=open_models, terminal_size=SIZE)


def test_settings_screen(base, snap_compare):
    assert snap_compare(app_for(base), press=["f6"], terminal_size=SIZE)


def test_edit_screen_with_a_painted_mask(base, snap_compare):
    picture = write_png(base / "outputs" / "photo.png", (30, 140, 60), size=(96, 64))
    app = app_for(base)

    async def paint(pilot):
        await pilot.press("f3", "e")
        await pilot.pause()
        canvas = app._edit.query_one("MaskCanvas")
        canvas.painter.rectangle((10, 10), (40, 30))
        canvas.cursor = (60.0, 40.0)
        canvas.focus()
        await pilot.press("space")  # a dab at the cursor, and the caption's coverage

    assert picture.is_file()
    assert snap_compare(app, run_before=paint, terminal_size=SIZE)


def test_edit_screen_in_redux_mode(base, snap_compare):
    picture = write_png(base / "outputs" / "style.png", (160, 90, 30), size=(96, 64))
    app = app_for(base)

    async def redux(pilot):
        await pilot.press("f3", "e")
        await pilot.pause()
        app._edit.query_one("#mode").value = "redux"
        app._edit.query_one("#redux_more").value = "/tmp/other.png:0.5"
        await pilot.pause()

    assert picture.is_file()
    assert snap_compare(app, run_before=redux, terminal_size=SIZE)
