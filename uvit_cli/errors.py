"""The one exception type the CLI prints without a traceback."""


class UvitError(Exception):
    """A user's mistake or a missing asset. The message names the problem and the fix."""
