"""The CLI's progress on stderr: stages, each step with its s/it, and a closing line (`generate`, `selftest`)."""

from __future__ import annotations

import sys

from engine.contract.events import Done, Event, Message, Stage, Step


class StderrProgress:
    """Prints stages, each step with its s/it, and a closing line with the total time and the mean s/it."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stderr

    def __call__(self, event: Event) -> None:
        if isinstance(event, Stage):
            print(f"[{event.stage}] {event.detail}".rstrip(), file=self.stream, flush=True)
        elif isinstance(event, Step):
            print(
                f"  step {event.step}/{event.total}  {event.seconds_per_it:.3f} s/it"
                + ("  (cached)" if event.cached else ""),
                file=self.stream,
                flush=True,
            )
        elif isinstance(event, Message):
            print(f"  note: {event.text}", file=self.stream, flush=True)
        elif isinstance(event, Done):
            print(
                f"[done] {event.seconds:.2f} s in all, {event.mean_seconds_per_it:.3f} s/it mean: {', '.join(event.paths)}",
                file=self.stream,
                flush=True,
            )
