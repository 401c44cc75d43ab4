"""`uvit train`: train a U-ViT from a recipe (one process or many with torchrun)."""

from __future__ import annotations

import typer

from . import app
from .common import not_yet


@app.command("train", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def train_cmd(ctx: typer.Context) -> None:
    """Train a U-ViT from a recipe (one process or many with torchrun) (not implemented yet)."""
    not_yet(4, "train")
