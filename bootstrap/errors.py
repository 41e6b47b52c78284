"""The one exception the bootstrap raises for anything the user can fix: its message is one plain sentence."""

from __future__ import annotations


class BootstrapError(Exception):
    """A user-facing failure; the CLI prints the message and exits with code 2, never a traceback."""


class InputEnded(Exception):
    """A prompt got no answer: its input ended (Ctrl+D, Ctrl+Z then Enter on Windows, a closed console, stdin
    from /dev/null or none at all), or Ctrl+C was pressed at it (`interrupted`). The CLI says in one sentence
    how to come back, exit code 2 (130 for Ctrl+C), never a traceback."""

    def __init__(self, interrupted: bool = False) -> None:
        super().__init__("Ctrl+C at a prompt" if interrupted else "the input ended at a prompt")
        self.interrupted = interrupted
