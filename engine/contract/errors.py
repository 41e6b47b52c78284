"""The one exception type that means "the user asked for something we cannot do": printed as one sentence."""


class UserError(Exception):
    """Bad input: a missing or wrong file, an impossible size. Its message tells the user what to do."""


class Cancelled(Exception):
    """The job was cancelled by its caller (the TUI's escape key)."""
