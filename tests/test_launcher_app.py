"""Pilot-driven tests of the whole TUI against a real `python -m engine serve` on tiny random models."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest
from PIL import Image
from textual.widgets import DataTable, Input, ProgressBar, RichLog

from launcher.form import FormValues
from launcher.jobs import JobState
from launcher.messages import GenerateRequested
from launcher.metadata import read_png_params
from tests.launcher_helpers import (
    A1111_TEXT,
    COMFY_PROMPT,
    FAKE_ENGINE,
    SIZE,
    fluxdeck_png,
    make_app,
    wait_for,
    write_png,
)

needs_engine = pytest.mark.skipif(
    importlib.util.find_spec("engine.generation.pipeline") is None
    or importlib.util.find_spec("engine.fixtures") is None,
    reason="engine.generation.pipeline / engine.fixtures are not written yet: the TUI needs the real engine for these tests",
)
ENGINE_TIMEOUT = 90  # the first job imports torch and loads the tiny models


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory) -> Path:
    from engine.fixtures import write_tiny_model_set

    folder = tmp_path_factory.mktemp("tiny") / "models"
    write_tiny_model_set(folder)
    return folder


def form_of(app):
    return app.get_screen("generate").form


def set_field(app, name: str, value: str) -> None:
    form_of(app).query_one(f"#{name}", Input).value = value


@needs_engine
async def test_generate_cancel_queue_and_engine_restart(tiny_models, tmp_path):
    app = make_app(tmp_path, models_dir=str(tiny_models))
    async with app.run_test(size=SIZE) as pilot:
        # generate: ctrl+g -> a PNG on disk with our metadata, progress and picture shown
        await pilot.press("ctrl+g")
        await wait_for(pilot, lambda: app.jobs.jobs and app.jobs.jobs[0].finished, ENGINE_TIMEOUT)
        first = app.jobs.jobs[0]
        assert first.state is JobState.DONE, first.error
        png = Path(first.paths[0])
        assert png.parent == tmp_path / "outputs" and Image.open(png).size == (64, 64)
        params = read_png_params(png)
        assert (params.source, params.prompt, params.seed, params.steps) == (
            "fluxdeck",
            "a tiny test image",
            7,
            2,
        )
        screen = app.get_screen("generate")  # its messages come after the app's: let it catch up
        await wait_for(pilot, lambda: "Done" in str(screen.progress.query_one("#stage").render()), 10)
        assert screen.progress.query_one(ProgressBar).progress == 2
        assert "RAM engine" in str(screen.progress.query_one("#memory").render())
        assert screen.query_one("#image").image is not None
        assert form_of(app).values().seed == 8  # +1 per image

        # cancel: escape stops a long job between steps; no file is written for it
        set_field(app, "steps", "1000")
        await pilot.press("ctrl+g")
        long_job = app.jobs.jobs[-1]
        await wait_for(pilot, lambda: long_job.step >= 1, ENGINE_TIMEOUT)
        await pilot.press("escape")
        await wait_for(pilot, lambda: long_job.finished, 30)
        assert long_job.state is JobState.CANCELLED and long_job.step < 1000
        assert len(list((tmp_path / "outputs").glob("*.png"))) == 1

        # queue: add three while a long job runs, drop one from the queue screen, cancel the running one
        await pilot.press("ctrl+g")
        running = app.jobs.jobs[-1]
        await wait_for(pilot, lambda: running.step >= 1, 30)
        set_field(app, "steps", "2")
        set_field(app, "batch", "3")
        await pilot.press("ctrl+g")
        queued = app.jobs.queued()
        assert len(queued) == 3 and [j.request["seed"] for j in queued] == [10, 11, 12]
        await pilot.press("f4")
        table = app.screen.query_one(DataTable)
        assert table.row_count == len(app.jobs.jobs)
        table.move_cursor(row=app.jobs.jobs.index(queued[1]))
        await pilot.press("x")
        assert queued[1].state is JobState.CANCELLED
        await pilot.press("escape")  # cancels the running job; the queue goes on
        await wait_for(pilot, lambda: all(j.finished for j in app.jobs.jobs), 60)
        assert running.state is JobState.CANCELLED
        assert [j.state for j in queued] == [JobState.DONE, JobState.CANCELLED, JobState.DONE]
        assert "done" in [str(cell) for cell in table.get_row_at(app.jobs.jobs.index(queued[0]))]

        # the engine dies mid-job: the TUI says why, and the next job restarts it
        await pilot.press("f2")
        old_pid = app.engine.pid
        set_field(app, "steps", "1000")
        set_field(app, "batch", "1")
        await pilot.press("ctrl+g")
        doomed = app.jobs.jobs[-1]
        await wait_for(pilot, lambda: doomed.step >= 1, 30)
        app.engine.kill()
        await wait_for(pilot, lambda: doomed.finished, 30)
        assert doomed.state is JobState.FAILED and "The engine stopped: killed" in doomed.error
        set_field(app, "steps", "2")
        await pilot.press("ctrl+g")
        await wait_for(pilot, lambda: app.jobs.jobs[-1].finished, ENGINE_TIMEOUT)
        assert app.jobs.jobs[-1].state is JobState.DONE and app.engine.pid != old_pid
        await pilot.press("f7")
        log = "\n".join(str(line) for line in app.screen.query_one(RichLog).lines)
        assert "The engine stopped" in log and "Starting the engine" in log
    app.engine.stop()


@needs_engine
async def test_gallery_reuse_refine_and_load_from_png(tiny_models, tmp_path):
    outputs = tmp_path / "outputs"
    older = fluxdeck_png(outputs / "older.png", "an old favourite", 1234, (200, 40, 40))
    newer = write_png(outputs / "forge.png", (40, 200, 40), parameters=A1111_TEXT)
    os.utime(older, (1_700_000_000, 1_700_000_000))
    os.utime(newer, (1_700_000_100, 1_700_000_100))
    app = make_app(tmp_path, models_dir=str(tiny_models))
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("f3")
        table = app.screen.query_one(DataTable)
        assert [str(table.get_row_at(i)[0]) for i in range(table.row_count)] == ["forge.png", "older.png"]
        assert "a lighthouse at dusk" in str(app.screen.query_one("#params").render())

        # reuse the A1111/Forge image's parameters
        await pilot.press("u")
        assert app.screen is app.get_screen("generate")
        values = form_of(app).values()
        assert (values.prompt, values.seed, values.width, values.height, values.steps) == (
            "a lighthouse at dusk, oil painting\nwith thick brush strokes",
            1234,
            832,
            1216,
            20,
        )
        assert (values.guidance, values.cfg, values.negative) == (3.0, 1.5, "blurry, text")

        # refine our own image: img2img from it with its parameters, through the real engine
        await pilot.press("f3")
        await pilot.press("down")
        await pilot.press("r")
        values = form_of(app).values()
        assert (values.init_image, values.denoise, values.seed, values.prompt) == (
            str(older),
            0.55,
            1234,
            "an old favourite",
        )
        await pilot.press("ctrl+g")
        await wait_for(pilot, lambda: app.jobs.jobs and app.jobs.jobs[0].finished, ENGINE_TIMEOUT)
        job = app.jobs.jobs[0]
        assert job.state is JobState.DONE, job.error
        record = json.loads(Image.open(job.paths[0]).text["fluxdeck"])
        assert (record["init_image"], record["denoise"], record["seed"]) == (str(older), 0.55, 1234)
        await pilot.press("f3")
        assert app.screen.query_one(DataTable).row_count == 3

        # load parameters from any PNG: ComfyUI's prompt JSON
        comfy = write_png(tmp_path / "comfy.png", prompt=json.dumps(COMFY_PROMPT), workflow="{}")
        await pilot.press("ctrl+o")
        app.screen.query_one(Input).value = str(tmp_path / "missing.png")
        await pilot.press("enter")
        assert "does not exist" in str(app.screen.query_one("#error").render())
        app.screen.query_one(Input).value = str(comfy)
        await pilot.press("enter")
        await pilot.pause()
        assert app.screen is app.get_screen("generate")
        values = form_of(app).values()
        assert (values.prompt, values.seed, values.steps, values.guidance) == (
            "a red fox in snow",
            987654,
            12,
            2.5,
        )
        assert (values.width, values.height, values.init_image) == (768, 512, "")
    app.engine.stop()


async def test_models_screen_lists_files_and_runs_bootstrap(tiny_models, tmp_path):
    app = make_app(tmp_path, models_dir=str(tiny_models), start_engine=False)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("f5")
        screen = app.screen
        table = screen.query_one("#files", DataTable)
        rows = sorted(tuple(str(cell) for cell in table.get_row_at(i)[:2]) for i in range(table.row_count))
        assert rows == [
            ("diffusion_models", "flux-tiny.safetensors"),
            ("text_encoders", "clip_l.safetensors"),
            ("text_encoders", "t5xxl_fp16.safetensors"),
            ("vae", "ae.safetensors"),
        ]
        model_options = [v for _, v in form_of(app).query_one("#model")._options]
        assert str(tiny_models / "diffusion_models" / "flux-tiny.safetensors") in model_options

        # the presets' verdicts come from `bootstrap fit --json`; enter on one fills its download
        presets = screen.query_one("#presets", DataTable)
        await wait_for(pilot, lambda: presets.row_count == 2, 20)
        first, second = (tuple(str(c) for c in presets.get_row_at(i)) for i in range(2))
        assert first == (
            "schnell-fp8 *",
            "17.3 GB",
            "fits: runs on the CPU in 14.6 GB RAM; about 3 min per step",
        )
        assert second[2].startswith("tight: on the CPU it needs 27.6 GB RAM")
        presets.focus()
        await pilot.press("enter")
        assert screen.query_one("#names").value == "--preset schnell-fp8"
        screen.query_one("#names").value = ""

        await pilot.press("d")  # nothing typed yet: asks for names
        assert screen.focused is screen.query_one("#names")
        await pilot.press(*"clip_l", "enter")
        await wait_for(
            pilot, lambda: screen.running is None and screen.query_one(ProgressBar).progress == 100, 20
        )
        log = "\n".join(str(line) for line in screen.query_one(RichLog).lines)
        assert "50% 100 MB / 200 MB" in log and "verified sha256" in log and "Finished." in log
        screen.query_one("#files", DataTable).focus()
        await pilot.press("v")
        await wait_for(
            pilot, lambda: "exit code 3" in "\n".join(str(x) for x in screen.query_one(RichLog).lines), 20
        )


async def test_crash_keeps_the_queue_and_seed_hunt_stops_on_escape(tmp_path):
    app = make_app(tmp_path, engine=FAKE_ENGINE)
    async with app.run_test(size=SIZE) as pilot:
        base = {"width": 64, "height": 64, "steps": 2, "files": {}}
        outs = [str(tmp_path / "outputs" / f"{n}.png") for n in range(3)]
        requests = [
            {**base, "prompt": p, "seed": i, "out": outs[i]} for i, p in enumerate(["crash", "ok", "ok"])
        ]
        app.post_message(GenerateRequested(requests, False, FormValues()))
        await wait_for(pilot, lambda: len(app.jobs.jobs) == 3 and all(j.finished for j in app.jobs.jobs), 30)
        crashed, *rest = app.jobs.jobs
        assert crashed.state is JobState.FAILED
        assert "killed (signal 9)" in crashed.error or "exit code 137" in crashed.error
        assert "CUDA out of memory (pretend)" in crashed.error
        assert [j.state for j in rest] == [JobState.DONE, JobState.DONE]

        # seed hunt: images keep coming with the next seed until escape
        set_field(app, "seed", "100")
        await pilot.press("ctrl+e")
        await pilot.press("ctrl+g")
        await wait_for(pilot, lambda: sum(j.state is JobState.DONE for j in app.jobs.jobs[3:]) >= 3, 30)
        await pilot.press("escape")
        await wait_for(pilot, lambda: all(j.finished for j in app.jobs.jobs), 30)
        count = len(app.jobs.jobs)
        await pilot.pause(0.5)
        assert len(app.jobs.jobs) == count and not app.hunting
        seeds = [j.request["seed"] for j in app.jobs.jobs[3:]]
        assert seeds == list(range(100, 100 + len(seeds)))
    app.engine.stop()
