"""Recipe -> objects, in one place: the only code that turns recipe fields into constructor arguments."""

from __future__ import annotations

import dataclasses

from .recipe import ModelConfig, Recipe


def model_kwargs(cfg: ModelConfig) -> dict:
    """UViT constructor arguments for a model section (``size`` is already resolved into the fields)."""
    kw = dataclasses.asdict(cfg)
    kw.pop("size")
    return kw


def build_model(recipe: Recipe | ModelConfig):
    """A freshly initialised UViT for a recipe (or its model section)."""
    from .model import UViT

    cfg = recipe.model if isinstance(recipe, Recipe) else recipe
    return UViT(**model_kwargs(cfg))
