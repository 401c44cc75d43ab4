"""The `uvit` command: typer sub-commands in front of the core modules (one module per command group)."""

from __future__ import annotations

import os
import shlex
import signal
import sys
import threading

from rich.markup import escape

from ..errors import Interrupted, UvitError
from . import ablate, bench, encode, export, fid, recipes, sample, train  # noqa: F401 - each registers its commands
from .app import app, err_console
from .options import RANK_ERRORS_ENV, record_rank_error

__all__ = ["app", "main"]


def _sigterm_as_interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the app; a UvitError prints as one red line and exits with status 2, no traceback.

    Under torchrun only rank 0 prints it (every rank meets the same error); under our launcher (--nproc-per-node) every
    rank records it and the launcher prints rank 0's. SIGTERM (a scheduler's stop) is handled
    like Ctrl-C; long jobs catch both and keep their last complete unit of work (errors.Interrupted)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    old = signal.signal(signal.SIGTERM, _sigterm_as_interrupt) \
        if threading.current_thread() is threading.main_thread() else None
    launched = os.environ.get(RANK_ERRORS_ENV)   # a rank of our launcher: it prints rank 0's error, once
    quiet = os.environ.get("RANK", "0") != "0" or bool(launched)
    try:
        app(args=argv, standalone_mode=True, obj={"argv": argv})   # obj: the arguments, for re-running under torchrun
    except UvitError as e:
        interrupted = isinstance(e, Interrupted)
        if launched:
            record_rank_error(launched, e)
        if not quiet:
            text = str(e)
            if interrupted and e.same_command:
                text += f". Resume with the same command: uvit {shlex.join(argv)}"
            err_console.print(f"[yellow]interrupted:[/] {escape(text)}" if interrupted else
                              f"[bold red]error:[/] {escape(text)}", highlight=False, soft_wrap=True)
        sys.exit(Interrupted.exit_code if interrupted else 2)
    except KeyboardInterrupt:
        if not quiet:
            err_console.print("[yellow]interrupted[/] (nothing half-written is kept under a final name)")
        sys.exit(130)
    finally:
        if old is not None:
            signal.signal(signal.SIGTERM, old)
