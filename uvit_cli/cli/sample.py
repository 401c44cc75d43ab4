"""`uvit sample`: draw samples from a run or checkpoint (classes, prompts, guidance, DPM-Solver)."""

from __future__ import annotations

import typer

from . import app
from .common import not_yet


@app.command("sample", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def sample_cmd(ctx: typer.Context) -> None:
    """Draw samples from a run or checkpoint (classes, prompts, guidance, DPM-Solver) (not implemented yet)."""
    not_yet(3, "sample")
