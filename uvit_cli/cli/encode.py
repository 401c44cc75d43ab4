"""`uvit encode-latents`: encode images to VAE latents and captions to CLIP features."""

from __future__ import annotations

import typer

from . import app
from .common import not_yet


@app.command("encode-latents", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def encode_cmd(ctx: typer.Context) -> None:
    """Encode images to VAE latents and captions to CLIP features (not implemented yet)."""
    not_yet(5, "encode-latents")
