"""engine/server.py and launcher/engine_client.py talking over real pipes (a fake Engine behind the real server)."""

from __future__ import annotations

import queue
import threading

from engine.contract.protocol import Cancel, Generate, Shutdown
from launcher.engine_client import EngineExit, EngineProcess
from tests.launcher_helpers import FAKE_ENGINE

TIMEOUT = 20


class Teleport:
    """A command the engine does not know."""

    def to_dict(self) -> dict:
        return {"type": "teleport"}


class Recorder:
    def __init__(self) -> None:
        self.messages: queue.Queue[dict] = queue.Queue()
        self.logs: list[str] = []
        self.exited = threading.Event()
        self.exit: EngineExit | None = None

    def on_exit(self, ended: EngineExit) -> None:
        self.exit = ended
        self.exited.set()

    def until(self, kind: str, job_id: str | None = None) -> list[dict]:
        """Messages up to and including the first of this type (for this job)."""
        seen = []
        while True:
            message = self.messages.get(timeout=TIMEOUT)
            seen.append(message)
            if message["type"] == kind and (job_id is None or message.get("id") == job_id):
                return seen


def start(recorder: Recorder) -> EngineProcess:
    engine = EngineProcess(recorder.messages.put, recorder.on_exit, recorder.logs.append, command=FAKE_ENGINE)
    engine.start()
    recorder.until("ready")
    return engine


def request(tmp_path, prompt: str, steps: int = 3) -> dict:
    return {
        "prompt": prompt,
        "out": str(tmp_path / "out.png"),
        "width": 64,
        "height": 64,
        "steps": steps,
        "seed": 5,
    }


def test_job_events_results_and_clean_shutdown(tmp_path):
    rec = Recorder()
    engine = start(rec)
    engine.send(Generate("a", request(tmp_path, "a cat")))
    engine.send(Generate("b", request(tmp_path, "a dog")))
    seen = rec.until("done", "b")
    kinds = [m["type"] for m in seen if m.get("id") == "a"]
    assert kinds[0] == "started" and kinds.count("step") == 3 and kinds.count("preview") == 3
    assert {"stage", "stats", "done"} <= set(kinds)
    preview = next(m for m in seen if m["type"] == "preview")
    assert len(bytes.fromhex(preview["rgb"])) == preview["width"] * preview["height"] * 3
    done = [m for m in seen if m["type"] == "done"]
    assert [len(m["paths"]) for m in done] == [1, 1]
    assert done[0]["paths"] != done[1]["paths"]  # the second did not overwrite the first
    assert all(m.get("rss_mb", 1) > 0 for m in seen if m["type"] == "stats")
    engine.stop()
    assert rec.exited.wait(TIMEOUT)
    assert rec.exit.returncode == 0 and rec.exit.expected
    # the stray print went to stderr (the log), never into the protocol
    assert "a stray print that must not reach stdout" in rec.logs


def test_errors_are_one_line_and_the_server_survives(tmp_path):
    rec = Recorder()
    engine = start(rec)
    engine.send(Generate("bad", request(tmp_path, "bad prompt")))
    assert (
        rec.until("error", "bad")[-1]["message"] == "The fake engine refuses bad prompts: write a good one."
    )
    engine.send(Generate("boom", request(tmp_path, "boom")))
    message = rec.until("error", "boom")[-1]["message"]
    assert (
        message == "The engine failed unexpectedly (RuntimeError): the log has the details; please report it."
    )
    engine.send(Generate("invalid", {**request(tmp_path, "x"), "width": 65}))
    assert "multiple of 16" in rec.until("error", "invalid")[-1]["message"]
    engine.send(Teleport())
    assert "Unknown command" in rec.until("error")[-1]["message"]
    engine.send(Generate("ok", request(tmp_path, "fine")))
    rec.until("done", "ok")
    assert any("Traceback" in line for line in rec.logs)  # the traceback went to stderr
    engine.stop()


def test_cancel_running_and_queued(tmp_path):
    rec = Recorder()
    engine = start(rec)
    engine.send(Generate("long", request(tmp_path, "slow", steps=50)))
    engine.send(Generate("queued", request(tmp_path, "x")))
    rec.until("step", "long")
    engine.send(Cancel("queued"))
    engine.send(Cancel("long"))
    seen = rec.until("cancelled", "long")
    assert {"type": "cancelled", "id": "queued"} in seen
    assert not any(m.get("id") == "queued" and m["type"] == "started" for m in seen)
    assert not any(m["type"] == "done" for m in seen)
    engine.send(Generate("after", request(tmp_path, "x")))
    rec.until("done", "after")
    engine.stop()


def test_a_dying_engine_reports_why(tmp_path):
    rec = Recorder()
    engine = start(rec)
    engine.send(Generate("oom", request(tmp_path, "crash")))
    assert rec.exited.wait(TIMEOUT)
    assert rec.exit.returncode == 137 and not rec.exit.expected
    assert "CUDA out of memory (pretend)" in rec.exit.stderr_tail
    assert "out of memory" in rec.exit.describe()
    assert not engine.alive and not engine.send(Shutdown())
    rec.exited.clear()
    engine.start()  # restarts
    rec.until("ready")
    engine.send(Generate("again", request(tmp_path, "x")))
    rec.until("done", "again")
    engine.stop()
