"""The `uvit` command: typer sub-commands in front of the core modules."""

from __future__ import annotations

import sys

import typer
from rich.markup import escape

from ..errors import UvitError
from .common import err_console

app = typer.Typer(
    name="uvit",
    help="U-ViT for diffusion models: encode latents, train, sample, score and ablate from YAML recipes.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
    rich_markup_mode="rich",
)

# Each module registers its commands on `app` (one file per command group keeps the edge thin).
from . import recipes as _recipes  # noqa: E402,F401
from . import encode as _encode  # noqa: E402,F401
from . import train as _train  # noqa: E402,F401
from . import sample as _sample  # noqa: E402,F401
from . import fid as _fid  # noqa: E402,F401
from . import ablate as _ablate  # noqa: E402,F401
from . import bench as _bench  # noqa: E402,F401


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the app; a UvitError prints as one red line and exits with status 2, no traceback."""
    try:
        app(args=argv, standalone_mode=True)
    except UvitError as e:
        err_console.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        err_console.print("[yellow]interrupted[/]")
        sys.exit(130)
