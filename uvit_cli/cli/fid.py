"""`uvit fid`: score samples: FID, sFID, IS, precision, recall."""

from __future__ import annotations

import typer

from . import app
from .common import not_yet


@app.command("fid", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def fid_cmd(ctx: typer.Context) -> None:
    """Score samples: FID, sFID, IS, precision, recall (not implemented yet)."""
    not_yet(6, "fid")
