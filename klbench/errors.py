"""The error type for mistakes a user can fix: the CLI prints its one-line message, no traceback."""


class KlbenchError(RuntimeError):
    """A user-fixable problem (bad path, unloadable model, bad data row); the message says what to do."""
