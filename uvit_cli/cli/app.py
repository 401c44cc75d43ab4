"""The typer application, its consoles and logging set-up: what every command module registers on.

Command modules import library modules inside their command functions: the library imports torch (and, where a
command needs them, diffusers, open_clip or torchvision, seconds each), and `uvit --help` or a mistyped option
should answer at once. This is the only place in the package where package imports are deferred.
"""

from __future__ import annotations

import logging
import os

import typer
from rich.console import Console
from rich.logging import RichHandler

from .. import __version__

console = Console(stderr=False)
err_console = Console(stderr=True)

app = typer.Typer(
    name="uvit",
    help="U-ViT for diffusion models: encode latents, train, sample, score and ablate from YAML recipes.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
    rich_markup_mode="rich",
)


def setup_logging(verbose: bool = False) -> None:
    """Attach a rich handler on rank 0 only; other ranks log warnings and errors."""
    rank = int(os.environ.get("RANK", "0"))
    level = (logging.DEBUG if verbose else logging.INFO) if rank == 0 else logging.WARNING
    root = logging.getLogger()
    if not any(isinstance(h, RichHandler) for h in root.handlers):
        root.addHandler(RichHandler(console=err_console, show_path=False, rich_tracebacks=False))
    root.setLevel(logging.WARNING)
    logging.getLogger("uvit_cli").setLevel(level)


def _print_version(value: bool) -> None:
    if value:
        console.print(f"uvit {__version__}", highlight=False)
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                       help="print the version and exit")) -> None:
    """U-ViT for diffusion models: encode latents, train, sample, score and ablate from YAML recipes."""
