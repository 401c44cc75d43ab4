"""`uvit bench`: measure training and sampling throughput, MFU and memory."""

from __future__ import annotations

import typer

from . import app
from .common import not_yet


@app.command("bench", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def bench_cmd(ctx: typer.Context) -> None:
    """Measure training and sampling throughput, MFU and memory (not implemented yet)."""
    not_yet(8, "bench")
