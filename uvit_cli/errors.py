"""The exception types the CLI prints without a traceback."""


class UvitError(Exception):
    """A user's mistake or a missing asset. The message names the problem and the fix."""


class RecipeError(UvitError, ValueError):
    """A user's mistake in a recipe: the message names the file, the key and the fix."""


class Interrupted(UvitError):
    """Work stopped by Ctrl-C or SIGTERM after keeping what was done; the message says what was kept and the
    command that continues (``same_command``: rerunning the same command continues, and the CLI adds it). The CLI
    exits with 130, the shell's code for an interrupt."""

    exit_code = 130

    def __init__(self, message: str, *, same_command: bool = False):
        super().__init__(message)
        self.same_command = same_command
