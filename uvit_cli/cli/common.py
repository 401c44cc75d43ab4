"""Shared pieces of the CLI edge: the console, logging set-up, recipe options, error printing."""

from __future__ import annotations

import logging
import os
from typing import Optional

import typer
from rich.console import Console

console = Console(stderr=False)
err_console = Console(stderr=True)

SetOption = typer.Option(None, "--set", metavar="SECTION.KEY=VALUE",
                         help="override a recipe field, e.g. --set train.lr=1e-4 (repeatable)")


def setup_logging(verbose: bool = False) -> None:
    """Attach a rich handler on rank 0 only; other ranks log warnings and errors."""
    from rich.logging import RichHandler

    rank = int(os.environ.get("RANK", "0"))
    level = (logging.DEBUG if verbose else logging.INFO) if rank == 0 else logging.WARNING
    root = logging.getLogger()
    if not any(isinstance(h, RichHandler) for h in root.handlers):
        root.addHandler(RichHandler(console=err_console, show_path=False, rich_tracebacks=False))
    root.setLevel(logging.WARNING)
    logging.getLogger("uvit_cli").setLevel(level)


def not_yet(issue: int, what: str) -> None:
    """Say plainly that a subcommand is not implemented yet, and exit with status 2."""
    err_console.print(f"[yellow]`uvit {what}` is not implemented yet (tracked in issue {issue}).[/]")
    raise typer.Exit(2)


def parse_seeds(text: Optional[str]) -> list[int]:
    """"0-63" or "1,5,7-9" -> a list of ints."""
    from ..errors import UvitError

    if not text:
        return []
    out: list[int] = []
    for part in text.split(","):
        part = part.strip()
        try:
            if "-" in part[1:]:
                a, b = part.split("-", 1)
                lo, hi = int(a), int(b)
                if hi < lo:
                    raise ValueError
                out.extend(range(lo, hi + 1))
            else:
                out.append(int(part))
        except ValueError:
            raise UvitError(f"--seeds {text!r}: expected ranges like 0-63 or lists like 1,5,7-9") from None
    return out
