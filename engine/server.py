"""The engine as a long-lived child process of the TUI: JSON lines in on stdin, JSON lines out on stdout.

In (one object a line):
    {"type": "job", "id": "j1", "request": {...GenerateRequest.to_dict()...}}
    {"type": "cancel", "id": "j1"}          cancels the running job between steps, or drops a queued one
    {"type": "shutdown"}                    finishes after cancelling the running job; so does end of input
Out (one object a line; every job line carries its "id"):
    {"type": "ready", "pid": 123}           once, at start
    {"type": "started", "id": ...}          a job left the queue and runs now
    event_to_dict(event) + "id"             stage, step, preview, done, message (engine/contract/events.py)
    {"type": "stats", "id": ..., "rss_mb": .., "vram_mb": .., "vram_total_mb": ..}   after each step and at the end
    {"type": "cancelled", "id": ...}
    {"type": "unknown-job", "id": ..., "message": ...}        a cancel for an id that is neither queued nor running
    {"type": "error", "id": ..., "message": "one sentence"}   UserError, or anything unexpected (traceback: stderr)

Every input line gets an answer or its job's events, and no input ends the server: a line that is not a JSON
object (nested past the parser's depth included) or a command of the wrong shape gets an error object whose
message is a plain sentence, never an exception's raw text.
    {"type": "bye"}                         just before a clean exit

stdout carries the protocol only: anything else that prints goes to stderr, which the TUI shows in its log.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import queue
import sys
import threading
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO, Any

from engine.contract.errors import Cancelled, UserError
from engine.contract.events import Done, Event, Step, event_to_dict
from engine.contract.request import GenerateRequest

EngineFactory = Callable[[], Any]  # returns an object with .generate(request, on_event, cancel)


class LineWriter:
    """Writes one JSON object per line, from any thread, flushing each line."""

    def __init__(self, stream: IO[str]) -> None:
        self._stream = stream
        self._lock = threading.Lock()

    def send(self, message: dict) -> None:
        line = json.dumps(message, separators=(",", ":"))
        with self._lock:
            self._stream.write(line + "\n")
            self._stream.flush()


@dataclass
class _Job:
    id: str
    request: dict
    cancel: threading.Event = field(default_factory=threading.Event)


def memory_stats() -> dict:
    """This process's RSS and, when CUDA is already in use, the VRAM torch holds (MB)."""
    stats: dict[str, float | None] = {"rss_mb": None, "vram_mb": None, "vram_total_mb": None}
    try:
        import psutil

        stats["rss_mb"] = round(psutil.Process().memory_info().rss / 2**20, 1)
    except Exception:  # psutil missing or refused: stats are a nicety
        pass
    torch = sys.modules.get("torch")
    if torch is not None:
        try:
            if torch.cuda.is_available() and torch.cuda.is_initialized():
                stats["vram_mb"] = round(torch.cuda.memory_reserved() / 2**20, 1)
                stats["vram_total_mb"] = round(torch.cuda.get_device_properties(0).total_memory / 2**20, 1)
        except Exception:
            pass
    return stats


class Server:
    """Reads commands, runs one job at a time on a worker thread, and reports everything as JSON lines."""

    def __init__(self, out: LineWriter, engine_factory: EngineFactory) -> None:
        self._out = out
        self._engine_factory = engine_factory
        self._engine: Any = None
        self._jobs: queue.Queue[_Job | None] = queue.Queue()
        self._lock = threading.Lock()
        self._pending: dict[str, _Job] = {}
        self._current: _Job | None = None
        self._worker = threading.Thread(target=self._work, name="engine-worker", daemon=True)

    def serve(self, stdin: IO[str]) -> int:
        self._worker.start()
        self._out.send({"type": "ready", "pid": os.getpid()})
        for raw in stdin:
            line = raw.strip()
            if not line:
                continue
            try:
                command = json.loads(line)
            except (ValueError, RecursionError):  # RecursionError: nested deeper than the parser goes
                command = None
            if not isinstance(command, dict):
                self._out.send(
                    {
                        "type": "error",
                        "id": None,
                        "message": "A line was not a JSON object: send one command per line.",
                    }
                )
                continue
            if command.get("type") == "shutdown":
                break
            try:
                self._handle(command)
            except Exception:  # a bug in handling one command must not end the server and its queue
                traceback.print_exc(file=sys.stderr)
                self._out.send(
                    {
                        "type": "error",
                        "id": None,
                        "message": "The engine could not handle a command: see its log.",
                    }
                )
        self._stop()
        self._out.send({"type": "bye"})
        return 0

    def _handle(self, command: dict) -> None:
        kind = command.get("type")
        job_id = command.get("id")
        if kind in ("job", "cancel") and (isinstance(job_id, bool) or not isinstance(job_id, str | int)):
            self._out.send(
                {"type": "error", "id": None, "message": f"A {kind} command needs an id that is a string."}
            )
            return
        if kind == "job":
            job = _Job(id=str(job_id), request=command.get("request"))
            with self._lock:
                self._pending[job.id] = job
            self._jobs.put(job)
        elif kind == "cancel":
            self._cancel(str(job_id))
        else:
            shown = kind if isinstance(kind, str) else type(kind).__name__
            self._out.send({"type": "error", "id": None, "message": f"Unknown command type {shown[:40]!r}."})

    def _cancel(self, job_id: str) -> None:
        with self._lock:
            if self._current is not None and self._current.id == job_id:
                self._current.cancel.set()
                return
            job = self._pending.pop(job_id, None)
        if job is not None:
            job.cancel.set()  # the worker skips it
            self._out.send({"type": "cancelled", "id": job_id})
        else:
            self._out.send(
                {
                    "type": "unknown-job",
                    "id": job_id,
                    "message": f"No job {job_id[:40]!r} to cancel: it has already ended or was never queued.",
                }
            )

    def _stop(self) -> None:
        with self._lock:
            if self._current is not None:
                self._current.cancel.set()
            for job in self._pending.values():
                job.cancel.set()
            self._pending.clear()
        self._jobs.put(None)
        self._worker.join()

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            with self._lock:
                if job.cancel.is_set():
                    continue
                self._pending.pop(job.id, None)
                self._current = job
            try:
                self._run(job)
            finally:
                with self._lock:
                    self._current = None

    def _run(self, job: _Job) -> None:
        send = self._out.send
        send({"type": "started", "id": job.id})

        def on_event(event: Event) -> None:
            send({**event_to_dict(event), "id": job.id})
            if isinstance(event, Step | Done):
                send({"type": "stats", "id": job.id, **memory_stats()})

        try:
            request = GenerateRequest.from_dict(job.request)
            request.validate()
            if self._engine is None:
                self._engine = self._engine_factory()
            self._engine.generate(request, on_event, job.cancel)
        except Cancelled:
            send({"type": "cancelled", "id": job.id})
        except UserError as error:
            send({"type": "error", "id": job.id, "message": str(error)})
        except MemoryError:
            traceback.print_exc(file=sys.stderr)
            send(
                {
                    "type": "error",
                    "id": job.id,
                    "message": "Out of memory: try a smaller size or a lower VRAM budget.",
                }
            )
        except Exception as error:  # the server must outlive a bad job
            traceback.print_exc(file=sys.stderr)
            send({"type": "error", "id": job.id, "message": _plain_sentence(error)})


def _plain_sentence(error: Exception) -> str:
    """What the user reads about an unexpected failure: a sentence, never the exception's raw text (which
    the log keeps, with the traceback)."""
    if "out of memory" in str(error).lower() or "not enough memory" in str(error).lower():
        return "The engine ran out of memory: try a smaller size, a smaller batch or a lower VRAM budget."
    return (
        f"The engine failed unexpectedly ({type(error).__name__}): the log has the details; please report it."
    )


def _default_engine() -> Any:
    from engine.generation.pipeline import Engine, EngineOptions, default_cache_dir

    return Engine(EngineOptions(cache_dir=str(default_cache_dir()), previews=True))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine serve", description=__doc__.splitlines()[0])
    parser.parse_args(argv)
    from engine.parent_watch import exit_now, watch_parent

    watch_parent(exit_now)  # the TUI gone (a closed window, a crash): no engine left holding RAM and VRAM
    # stdout carries the protocol only: keep a private copy of fd 1 for it, then point fd 1 and sys.stdout
    # at stderr so that stray prints, ours or a native library's, land in the TUI's log instead.
    sys.stdout.flush()
    protocol = os.fdopen(os.dup(1), "w", encoding="utf-8", newline="\n")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    commands = io.TextIOWrapper(sys.stdin.buffer, encoding="utf-8", errors="replace")
    try:
        return Server(LineWriter(protocol), _default_engine).serve(commands)
    finally:
        protocol.close()


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
