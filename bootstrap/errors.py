"""The one exception the bootstrap raises for anything the user can fix: its message is one plain sentence."""

from __future__ import annotations


class BootstrapError(Exception):
    """A user-facing failure; the CLI prints the message and exits with code 2, never a traceback."""
