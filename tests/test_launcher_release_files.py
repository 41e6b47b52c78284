"""The models screen stops the engine, which has the model files memory-mapped, before a download replaces them
(Windows refuses to replace a mapped file); a running generation is never cut short for it."""

from __future__ import annotations

from textual.widgets import RichLog

from launcher.jobs import JobState
from tests.launcher_helpers import FAKE_ENGINE, SIZE, make_app, wait_for


async def test_a_download_stops_the_engine_first_and_a_running_job_blocks_it(tmp_path):
    app = make_app(tmp_path, engine=FAKE_ENGINE, start_engine=True)
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: app.engine.alive, 30)
        job = app.jobs.add({"prompt": "a cat"})
        job.state = JobState.RUNNING  # a generation is running
        assert "A generation is running" in (app.release_model_files() or "")
        assert app.engine.alive
        job.state = JobState.DONE

        await pilot.press("f5")
        screen = app.screen
        await pilot.press("d")
        await pilot.press(*"clip_l", "enter")
        await wait_for(pilot, lambda: screen.running is None and not app.engine.alive, 20)
        log = "\n".join(str(line) for line in screen.query_one(RichLog).lines)
        assert "$ bootstrap download clip_l" in log
        assert any("Engine stopped so that model files can be replaced" in line for line in app.log_lines)
