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


def build_schedule(recipe: Recipe):
    """The recipe's diffusion formulation: the continuous VP-SDE or the discrete SD schedule (uvit_cli/diffusion.py)."""
    from .diffusion import DiscreteSchedule, VPSchedule

    d = recipe.diffusion
    if d.formulation == "vp":
        return VPSchedule(beta_min=d.beta_min, beta_max=d.beta_max)
    return DiscreteSchedule(beta_start=d.beta_start, beta_end=d.beta_end, num_timesteps=d.num_timesteps)


# The official crop of each pixel data set ("auto").
DEFAULT_CROP = {"cifar10": "none", "celeba64": "celeba", "imagenet64": "adm_center", "folder": "adm_center"}


def build_source(recipe: Recipe):
    """The training data source of a recipe (see uvit_cli/data/pixels.py for the interface)."""
    from .errors import UvitError

    d, m = recipe.data, recipe.model
    if d.name == "digits":
        from .data.pixels import DigitsSource

        return DigitsSource()
    if d.name == "latents":
        from .data.latents import check_latents_against_recipe, open_latents
        from .data.pixels import LatentSource

        if not d.latents:
            raise UvitError("data.latents is empty: set it to a directory written by `uvit encode-latents`")
        dataset = open_latents(d.latents)
        check_latents_against_recipe(dataset, recipe)
        return LatentSource(dataset)
    from pathlib import Path

    from .data.pixels import FolderSource, HFSource

    if not d.source:
        raise UvitError(f"data.source is empty: set it to hf:NAME (a Hugging Face data set) or a local path "
                        f"holding the {d.name} images")
    crop = DEFAULT_CROP.get(d.name, "none") if d.crop == "auto" else d.crop
    if d.source.startswith("hf:") or (Path(d.source) / "dataset_info.json").exists() or \
            (Path(d.source) / "dataset_dict.json").exists():
        return HFSource(d.source, d.split, m.img_size, crop)
    return FolderSource(d.source, m.img_size, crop)


def build_stream(recipe: Recipe, source):
    """The seeded training stream over a source (see uvit_cli/data/stream.py)."""
    from .data.stream import TrainStream

    latent = recipe.data.name == "latents"
    return TrainStream(source, recipe.train.seed, random_flip=recipe.data.random_flip, p_uncond=recipe.train.p_uncond,
                       latent_scale=recipe.data.scale_factor if latent else None,
                       num_captions=getattr(source, "num_captions", 0) if recipe.model.text_dim > 0 else 0)
