"""The engine server's protocol (`python -m engine serve`): the commands the launcher sends, one JSON object a line.

In:  {"type": "job", "id": "j1", "request": {...GenerateRequest.to_dict()...}}   Generate
     {"type": "cancel", "id": "j1"}                                              Cancel
     {"type": "shutdown"}                                                        Shutdown
Out: the events of engine/contract/events.py, `Event.to_dict()` a line.
The launcher builds commands and decodes events; the server decodes commands and builds events. Torch-free.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, ClassVar

from engine.contract.errors import UserError


@dataclass(frozen=True)
class Generate:
    """Run a generation: `request` is GenerateRequest.to_dict() (the server validates it)."""

    TYPE: ClassVar[str] = "job"
    id: str
    request: Any

    def to_dict(self) -> dict:
        return {"type": self.TYPE, "id": self.id, "request": self.request}


@dataclass(frozen=True)
class Cancel:
    """Stop a running job between steps, or drop a queued one."""

    TYPE: ClassVar[str] = "cancel"
    id: str

    def to_dict(self) -> dict:
        return {"type": self.TYPE, "id": self.id}


@dataclass(frozen=True)
class Shutdown:
    """Finish after cancelling the running job (end of input does the same)."""

    TYPE: ClassVar[str] = "shutdown"

    def to_dict(self) -> dict:
        return {"type": self.TYPE}


Command = Generate | Cancel | Shutdown


def decode_command(data: object) -> Command:
    """The command a protocol object describes; a UserError whose message is one plain sentence when it is not
    one (never the raw text of what came in, beyond a short quoted type)."""
    if not isinstance(data, dict):
        raise UserError("A line was not a JSON object: send one command per line.")
    kind = data.get("type")
    if kind == Shutdown.TYPE:
        return Shutdown()
    if kind in (Generate.TYPE, Cancel.TYPE):
        job_id = data.get("id")
        if isinstance(job_id, bool) or not isinstance(job_id, str | int):
            raise UserError(f"A {kind} command needs an id that is a string.")
        return Generate(str(job_id), data.get("request")) if kind == Generate.TYPE else Cancel(str(job_id))
    shown = kind if isinstance(kind, str) else type(kind).__name__
    raise UserError(f"Unknown command type {shown[:40]!r}.")


def encode_line(message: dict) -> str:
    """One protocol line: compact JSON and a newline."""
    return json.dumps(message, separators=(",", ":")) + "\n"


def decode_line(line: str) -> dict | None:
    """One protocol line as a dict, or None when the line is not a JSON object (a stray print, or JSON nested
    deeper than the parser goes)."""
    try:
        message = json.loads(line)
    except (ValueError, RecursionError):
        return None
    return message if isinstance(message, dict) else None
