"""The `uvit` command: typer sub-commands in front of the core modules (one module per command group)."""

from __future__ import annotations

import sys

from rich.markup import escape

from ..errors import UvitError
from . import ablate, bench, encode, fid, recipes, sample, train  # noqa: F401 - each registers its commands
from .app import app, err_console

__all__ = ["app", "main"]


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the app; a UvitError prints as one red line and exits with status 2, no traceback."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        app(args=argv, standalone_mode=True, obj={"argv": argv})   # obj: the arguments, for re-running under torchrun
    except UvitError as e:
        err_console.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        err_console.print("[yellow]interrupted[/]")
        sys.exit(130)
