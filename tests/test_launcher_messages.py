"""The TUI's typed plumbing: engine lines decoded once into events, screens that post what the user asked
for, the app that posts what happened to jobs and keeps the shared state in reactives the screens bind to."""

from __future__ import annotations

import dataclasses
import json
import typing
from pathlib import Path

import pytest
from textual.widgets import Input, ProgressBar, Select

from engine.contract import events
from engine.contract.protocol import decode_line, encode_line
from launcher.config import ConfigFile
from launcher.form import build_requests
from launcher.jobs import JobState
from launcher.messages import EngineReported, UseParams
from launcher.metadata import read_png_params
from tests.launcher_helpers import COMFY_PROMPT, SIZE, make_app, write_png

# -- one set of events, one decoder for the engine's lines --------------------------------------------------
ENGINE_EVENTS = [
    events.Stage("denoising", "28 steps"),
    events.Step(3, 28, 0.25),
    events.Preview(3, 2, 1, bytes(range(6))),
    events.Done(["/out/a.png"], 12.5, 0.4),
    events.Message("Decoded in tiles after an out-of-memory."),
]


def test_every_engine_event_crosses_the_wire_unchanged():
    assert {type(e) for e in ENGINE_EVENTS} == set(typing.get_args(events.GenerationEvent))  # none forgotten
    for original in ENGINE_EVENTS:
        sent = dataclasses.replace(original, job="job-3")  # as the server sends it
        line = encode_line(sent.to_dict())
        assert events.decode(decode_line(line)) == sent, line


def test_the_wire_format_is_pinned():
    assert events.Stage("loading", job="j").to_dict() == {
        "type": "stage",
        "id": "j",
        "stage": "loading",
        "detail": "",
    }
    assert events.Step(2, 4, 0.5, job="j").to_dict() == {
        "type": "step", "id": "j", "step": 2, "total": 4, "seconds_per_it": 0.5, "cached": False,
    }  # fmt: skip
    assert events.Preview(1, 1, 1, b"\x00\x7f\xff", job="j").to_dict()["rgb"] == "007fff"
    assert events.Done(["a.png"], 1.5, 0.25, job="j").to_dict() == {
        "type": "done", "id": "j", "paths": ["a.png"], "seconds": 1.5, "mean_seconds_per_it": 0.25,
    }  # fmt: skip
    assert events.Message("m", job="j").to_dict() == {"type": "message", "id": "j", "text": "m"}
    assert events.Ready(pid=7).to_dict() == {"type": "ready", "pid": 7}
    assert events.Bye().to_dict() == {"type": "bye"}
    assert events.Started(job="j").to_dict() == {"type": "started", "id": "j"}
    assert events.JobCancelled(job="j").to_dict() == {"type": "cancelled", "id": "j"}
    assert events.Failed(message="Not JSON.").to_dict() == {
        "type": "error",
        "id": None,
        "message": "Not JSON.",
    }
    assert events.UnknownJob(job="j", message="m").to_dict() == {
        "type": "unknown-job",
        "id": "j",
        "message": "m",
    }
    assert events.Stats(job="j", rss_mb=1.0).to_dict() == {
        "type": "stats", "id": "j", "rss_mb": 1.0, "vram_mb": None, "vram_total_mb": None,
    }  # fmt: skip
    for kind in events.KINDS.values():  # every event the server sends decodes to itself
        if kind not in {type(e) for e in ENGINE_EVENTS}:
            event = kind(job=None if kind in (events.Ready, events.Bye) else "j")
            assert events.decode(event.to_dict()) == event


def test_the_servers_own_lines_decode():
    assert events.decode({"type": "ready", "pid": 12}) == events.Ready(pid=12)
    assert events.decode({"type": "started", "id": "j"}) == events.Started(job="j")
    assert events.decode(
        {"type": "stats", "id": "j", "rss_mb": 300.0, "vram_mb": None, "vram_total_mb": 8192}
    ) == events.Stats(job="j", rss_mb=300.0, vram_total_mb=8192)
    assert events.decode({"type": "cancelled", "id": "j"}) == events.JobCancelled(job="j")
    assert events.decode({"type": "error", "id": None, "message": "Not JSON."}) == events.Failed(
        message="Not JSON."
    )
    assert events.decode({"type": "bye"}) == events.Bye()


@pytest.mark.parametrize(
    "data",
    [
        {"id": "j"},
        {"type": "telemetry", "id": "j"},
        {"type": "step", "id": "j", "step": 1},  # no total
        {"type": "preview", "id": "j", "step": 1, "width": 2, "height": 2, "rgb": "zz"},
        {"type": "preview", "id": "j", "step": 1, "width": 2, "height": 2, "rgb": "00"},  # too short
        {"type": "done", "id": "j", "paths": ["a.png"], "seconds": 1.0, "extra": 1},  # extra keys: fine
    ],
)
def test_objects_that_are_not_events_decode_to_none(data):
    event = events.decode(data)
    assert (event is None) == ("extra" not in data)


# -- the app and its screens --------------------------------------------------------------------------
async def test_engine_events_reach_the_generate_screen_and_the_queue(tmp_path):
    app = make_app(tmp_path, start_engine=False)
    async with app.run_test(size=SIZE) as pilot:
        job = app.jobs.add({"prompt": "p", "seed": 1, "width": 64, "height": 64, "steps": 4})
        job.state = JobState.RUNNING  # as if sent to an engine
        screen = app.get_screen("generate")
        for event in (
            events.Started(job=job.id),
            events.Stage(job=job.id, stage="denoising"),
            events.Step(job=job.id, step=2, total=4, seconds_per_it=0.5),
            events.Stats(job=job.id, rss_mb=2048.0),
            events.Preview(job=job.id, step=2, width=2, height=1, rgb=bytes(6)),
        ):
            app.post_message(EngineReported(event))
        await pilot.pause()
        assert (job.step, job.total) == (2, 4)
        assert screen.progress.query_one(ProgressBar).progress == 2
        assert "Denoising" in str(screen.progress.query_one("#stage").render())
        assert "RAM engine 2.0 GB" in str(screen.progress.query_one("#memory").render())
        assert "preview · step 2" in str(screen.query_one("#image #caption").render())

        await pilot.press("f4")
        app.post_message(EngineReported(events.Step(job=job.id, step=3, total=4)))
        await pilot.pause()
        assert "running 3/4" in [str(cell) for cell in app.screen.query_one("DataTable").get_row_at(0)]

        app.post_message(EngineReported(events.Failed(job=job.id, message="Out of memory.")))
        await pilot.pause()
        assert job.state is JobState.FAILED and job.error == "Out of memory."
        assert "failed" in [str(cell) for cell in app.screen.query_one("DataTable").get_row_at(0)]
        assert "Failed: Out of memory." in str(screen.progress.query_one("#stage").render())
        assert any("Out of memory." in line for line in app.log_lines)


async def test_saved_settings_reach_every_screen_that_shows_them(tmp_path):
    (tmp_path / "config.toml").write_text('wizard_done = true\nmodels_dir = "models"\n')
    other = tmp_path / "other-models"
    (other / "diffusion_models").mkdir(parents=True)
    (other / "diffusion_models" / "flux1-schnell.safetensors").write_bytes(b"0" * 64)
    app = make_app(tmp_path, start_engine=False, models_dir=None, output_dir=None)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("f3", "f5", "f6")  # the gallery and models screens are shown once before
        field = app.screen.query_one("#models_dir", Input)
        assert (
            field.cursor_blink is True
        )  # until it takes focus (steady cursors: the app's cursor_blink=False)
        field.focus()
        await pilot.pause()
        assert field.cursor_blink is False
        field.value = str(other)
        app.screen.query_one("#output_dir", Input).value = str(tmp_path / "new-outputs")
        await pilot.press("ctrl+s")
        await pilot.pause()
        saved = ConfigFile.load(tmp_path / "config.toml")
        assert saved.settings.models_dir == str(other) and saved.other == {"wizard_done": True}
        assert app.get_screen("gallery").folder == tmp_path / "new-outputs"
        assert app.get_screen("models").roots == [other]
        model = str(other / "diffusion_models" / "flux1-schnell.safetensors")
        assert model in [
            value for _, value in app.get_screen("generate").form.query_one("#model", Select)._options
        ]
        assert "outputs: " + str(tmp_path / "new-outputs") in str(
            app.get_screen("generate").query_one("#status").render()
        )


async def test_a_comfyui_64_bit_seed_loads_and_regenerates(tmp_path):
    seed = 2**64 - 1  # ComfyUI's seeds run to 2^64-1
    comfy = json.loads(json.dumps(COMFY_PROMPT))
    comfy["31"]["inputs"]["seed"] = seed
    png = write_png(tmp_path / "comfy.png", prompt=json.dumps(comfy), workflow="{}")
    app = make_app(tmp_path, start_engine=False)
    async with app.run_test(size=SIZE) as pilot:
        app.post_message(UseParams(read_png_params(png)))
        await pilot.pause()
        values = app.get_screen("generate").form.values()  # FormError before: the seed was capped at 2^32-1
        assert values.seed == seed
        request = build_requests(values, app.settings, app.output_dir, Path(tmp_path), app.rng)[0]
        from engine.contract.request import GenerateRequest  # the engine takes it as it is

        assert GenerateRequest.from_dict(request).seed == seed
        GenerateRequest.from_dict(request).validate()


async def test_the_step_cache_setting_reaches_every_request_and_a_bad_one_is_refused(tmp_path):
    (tmp_path / "config.toml").write_text('wizard_done = true\nmodels_dir = "models"\n')
    app = make_app(tmp_path, start_engine=False)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("f6")
        field = app.screen.query_one("#cache", Input)
        assert field.value == "none"
        field.value = "first-block:nan"
        await pilot.press("ctrl+s")
        await pilot.pause()
        assert ConfigFile.load(tmp_path / "config.toml").settings.cache == "none"  # refused, nothing saved
        field.value = "first-block:0.2"
        await pilot.press("ctrl+s")
        await pilot.pause()
        assert ConfigFile.load(tmp_path / "config.toml").settings.cache == "first-block:0.2"
        values = app.get_screen("generate").form.values()
        request = build_requests(values, app.settings, app.output_dir, Path(tmp_path), app.rng)[0]
        assert request["cache"] == "first-block:0.2"
