"""The two ways a job ends without an image that are not bugs: bad input (UserError) and a cancel (Cancelled).

The CLI prints a UserError as one sentence and exits 2; the server sends it as an `error` event and a Cancelled as
`cancelled` (engine/contract/events.py). Anything else is a bug, reported as one.
"""


class UserError(Exception):
    """Bad input: a missing or wrong file, an impossible size. Its message is one sentence that tells the user
    what to do."""


class Cancelled(Exception):
    """The job was cancelled by its caller (the TUI's escape key)."""
