"""The engine as a long-lived child process of the TUI: JSON lines in on stdin, JSON lines out on stdout.

The commands (in) and the events (out) are the contract's: engine/contract/protocol.py and
engine/contract/events.py. Jobs run one at a time on a worker thread, in the order they came; a cancel stops the
running job between steps or drops a queued one (the TUI keeps its own queue and sends the next job when one
ends, so its engine holds at most one).
    ready                     once, at start
    started                   a job runs now
    stage, step, preview, message, done    the generation's events
    stats                     after each step and at the end
    cancelled, error          how a job ended otherwise; error with id null: a line the server could not read
    unknown-job               a cancel for an id that is neither queued nor running
    bye                       just before a clean exit

Every input line gets an answer or its job's events, and no input ends the server: a line that is not a JSON
object (nested past the parser's depth included) or a command of the wrong shape gets an error object whose
message is a plain sentence, never an exception's raw text.

stdout carries the protocol only: anything else that prints goes to stderr, which the TUI shows in its log.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import os
import sys
import threading
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO, Any

from engine.contract import events, protocol
from engine.contract.errors import Cancelled, UserError
from engine.contract.request import GenerateRequest

EngineFactory = Callable[[], Any]  # returns an object with .generate(request, on_event, cancel)


class LineWriter:
    """Writes one event per line, from any thread, flushing each line."""

    def __init__(self, stream: IO[str]) -> None:
        self._stream = stream
        self._lock = threading.Lock()

    def send(self, event: events.Event) -> None:
        line = protocol.encode_line(event.to_dict())
        with self._lock:
            self._stream.write(line)
            self._stream.flush()


@dataclass
class _Job:
    id: str
    request: Any
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
        self._changed = threading.Condition()  # guards the three below
        self._queued: deque[_Job] = deque()
        self._current: _Job | None = None
        self._stopping = False
        self._worker = threading.Thread(target=self._work, name="engine-worker", daemon=True)

    def serve(self, stdin: IO[str]) -> int:
        self._worker.start()
        self._out.send(events.Ready(pid=os.getpid()))
        for raw in stdin:
            if not raw.strip():
                continue
            try:
                command = protocol.decode_command(protocol.decode_line(raw))
            except UserError as error:
                self._out.send(events.Failed(message=str(error)))
                continue
            if isinstance(command, protocol.Shutdown):
                break
            try:
                self._handle(command)
            except Exception:  # a bug in handling one command must not end the server and its queue
                traceback.print_exc(file=sys.stderr)
                self._out.send(events.Failed(message="The engine could not handle a command: see its log."))
        self._stop()
        self._out.send(events.Bye())
        return 0

    def _handle(self, command: protocol.Generate | protocol.Cancel) -> None:
        if isinstance(command, protocol.Generate):
            with self._changed:
                self._queued.append(_Job(command.id, command.request))
                self._changed.notify()
        else:
            self._cancel(command.id)

    def _cancel(self, job_id: str) -> None:
        with self._changed:
            if self._current is not None and self._current.id == job_id:
                self._current.cancel.set()
                return
            dropped = next((job for job in self._queued if job.id == job_id), None)
            if dropped is not None:
                self._queued.remove(dropped)
        if dropped is not None:
            self._out.send(events.JobCancelled(job=job_id))
        else:
            self._out.send(
                events.UnknownJob(
                    job=job_id,
                    message=f"No job {job_id[:40]!r} to cancel: it has already ended or was never queued.",
                )
            )

    def _stop(self) -> None:
        with self._changed:
            if self._current is not None:
                self._current.cancel.set()
            self._queued.clear()
            self._stopping = True
            self._changed.notify()
        self._worker.join()

    def _work(self) -> None:
        while True:
            with self._changed:
                self._changed.wait_for(lambda: self._queued or self._stopping)
                if self._stopping:
                    return
                job = self._current = self._queued.popleft()
            try:
                self._run(job)
            finally:
                with self._changed:
                    self._current = None

    def _run(self, job: _Job) -> None:
        send = self._out.send
        send(events.Started(job=job.id))

        def on_event(event: events.Event) -> None:
            send(dataclasses.replace(event, job=job.id))
            if isinstance(event, events.Step | events.Done):
                send(events.Stats(job=job.id, **memory_stats()))

        try:
            request = GenerateRequest.from_dict(job.request)
            request.validate()
            if self._engine is None:
                self._engine = self._engine_factory()
            self._engine.generate(request, on_event, job.cancel)
        except Cancelled:
            send(events.JobCancelled(job=job.id))
        except UserError as error:
            send(events.Failed(job=job.id, message=str(error)))
        except MemoryError:
            traceback.print_exc(file=sys.stderr)
            send(
                events.Failed(job=job.id, message="Out of memory: try a smaller size or a lower VRAM budget.")
            )
        except Exception as error:  # the server must outlive a bad job
            traceback.print_exc(file=sys.stderr)
            send(events.Failed(job=job.id, message=_plain_sentence(error)))


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
