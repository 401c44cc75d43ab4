"""`uvit ablate`: run the paper's ablation suite and plot it."""

from __future__ import annotations

import typer

from . import app
from .common import not_yet


@app.command("ablate", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def ablate_cmd(ctx: typer.Context) -> None:
    """Run the paper's ablation suite and plot it (not implemented yet)."""
    not_yet(7, "ablate")
