"""The one exception type users see: a clear, single-line message about bad input."""


class SelfReplayError(Exception):
    """Bad input or an unrecoverable user-facing problem; the CLI prints it as one line and exits 2."""
