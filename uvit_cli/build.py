"""Recipe -> objects, in one place: the only code that turns recipe fields into constructor arguments.

The model, the diffusion schedule, the training data and its stream, the optimizer and LR schedule, the decoder
(VAE), the text encoder, the sampler and its arguments; and :func:`load_model`, which resolves a run directory, one
of our ``.safetensors`` files or an official ``.pth`` into a model and its recipe.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import torch
import yaml

from .autoencoder import Autoencoder, load_autoencoder
from .checkpoint import load_into, load_weights, read_metadata
from .data.captions import open_captioned_digits
from .data.crops import DEFAULT_CROP
from .data.latents import check_latents_against_recipe, open_latents
from .data.pixels import DigitsSource, PixelSource
from .data.sources import open_folder
from .data.stream import TrainStream
from .diffusion import DiscreteSchedule, FlowSchedule, NoiseSchedule, VPSchedule
from .objective import Objective
from .errors import UvitError
from .model import UViT
from .recipe import ModelConfig, Recipe, apply_overrides, load_recipe, recipe_from_dict
from .noise_predictor import guided_at
from .run import RUN_EMA, RUN_RAW, RUN_RECIPE, RUN_TEXT_ENCODER, is_run_dir
from .sampling import evaluation_times, get_sampler, planned_nfe
from .text import TextEncoder, load_text_encoder

CHECKPOINT_SUFFIXES = (".safetensors", ".pth", ".pt", ".ckpt")


# ---------------------------------------------------------------------------------------------------------------------
# Model and diffusion
# ---------------------------------------------------------------------------------------------------------------------

def model_kwargs(cfg: ModelConfig) -> dict:
    """UViT constructor arguments for a model section (``size`` is already resolved into the fields)."""
    kw = dataclasses.asdict(cfg)
    kw.pop("size")
    return kw


def build_model(recipe: Recipe | ModelConfig) -> UViT:
    """A freshly initialised UViT for a recipe (or its model section)."""
    cfg = recipe.model if isinstance(recipe, Recipe) else recipe
    return UViT(**model_kwargs(cfg))


def build_objective(recipe: Recipe) -> Objective:
    """The training objective on the path: prediction target ("auto" resolved), time sampling, loss weighting."""
    t = recipe.train
    return Objective(prediction=recipe.prediction_target, time_sampling=t.time_sampling, logit_mean=t.logit_mean,
                     logit_std=t.logit_std, loss_weighting=t.loss_weighting, min_snr_gamma=t.min_snr_gamma)


def build_schedule(recipe: Recipe) -> NoiseSchedule:
    """The recipe's diffusion formulation (the continuous VP-SDE, the discrete SD schedule or the flow path) with
    its training objective (uvit_cli/diffusion.py)."""
    d, objective = recipe.diffusion, build_objective(recipe)
    if d.formulation == "vp":
        return VPSchedule(beta_min=d.beta_min, beta_max=d.beta_max, objective=objective)
    if d.formulation == "flow":
        return FlowSchedule(objective)
    return DiscreteSchedule(beta_start=d.beta_start, beta_end=d.beta_end, num_timesteps=d.num_timesteps,
                            objective=objective)


# ---------------------------------------------------------------------------------------------------------------------
# Training data, optimizer
# ---------------------------------------------------------------------------------------------------------------------

def resolved_crop(recipe: Recipe) -> str:
    """data.crop, with "auto" replaced by the official crop of the data set."""
    d = recipe.data
    return DEFAULT_CROP.get(d.name, "none") if d.crop == "auto" else d.crop


def build_source(recipe: Recipe, run_dir: str | Path | None = None):
    """The training data source of a recipe (interface: data/pixels.py); a resumed text run on the captioned digits
    reads its captions with the copy ``run_dir`` keeps of the built-in tower it started with."""
    d, m = recipe.data, recipe.model
    if d.name == "digits":
        if m.text_dim > 0:  # the captioned digits, encoded once by the recipe's text encoder
            return open_captioned_digits(build_text_encoder(recipe, "cpu", run_dir=run_dir), d.split)
        return DigitsSource()
    if d.name == "latents":
        if not d.latents:
            raise UvitError("data.latents is empty: set it to a directory written by `uvit encode-latents`")
        dataset = open_latents(d.latents)
        check_latents_against_recipe(dataset, recipe)
        return dataset
    if not d.source:
        raise UvitError(f"data.source is empty: set it to hf:NAME (a Hugging Face data set) or a local path "
                        f"holding the {d.name} images")
    if not d.source.startswith("hf:") and not Path(d.source).expanduser().is_dir():
        state = "is not a directory" if Path(d.source).expanduser().exists() else "does not exist"
        raise UvitError(f"data.source {d.source} {state}; set it to a folder of images (sub-folders = classes), "
                        "a `save_to_disk` data set, or hf:NAME")
    images = open_folder(d.source, condition="class" if m.num_classes > 0 else "none", split=d.split)
    return PixelSource(images, m.img_size, resolved_crop(recipe))


def build_stream(recipe: Recipe, source) -> TrainStream:
    """The seeded training stream over a source (see uvit_cli/data/stream.py)."""
    latent = recipe.data.name == "latents"
    return TrainStream(source, recipe.train.seed, random_flip=recipe.data.random_flip, p_uncond=recipe.train.p_uncond,
                       latent_scale=recipe.data.scale_factor if latent else None,
                       num_captions=getattr(source, "num_captions", 0) if recipe.model.text_dim > 0 else 0)


def lr_lambda(warmup_steps: int, decay: str = "none", total_steps: int = 0, final: float = 0.0):
    """The LR factor per step: the official linear warm-up min(step / warmup, 1), then constant (the official
    'customized' schedule) or a cosine / linear decay from 1 to ``final`` at ``total_steps``."""
    def factor(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return step / warmup_steps
        if decay == "none":
            return 1.0
        u = min(max(step - warmup_steps, 0) / max(total_steps - warmup_steps, 1), 1.0)
        shape = 0.5 * (1 + math.cos(math.pi * u)) if decay == "cosine" else 1 - u
        return final + (1 - final) * shape
    return factor


def build_optimizer(recipe: Recipe, model: torch.nn.Module, device: torch.device):
    """(AdamW on every parameter, its LR schedule, the loss scaler for fp16) as the official runs set them up."""
    t = torch.device(device)
    tr = recipe.train
    kw = dict(lr=tr.lr, betas=tr.betas, weight_decay=tr.weight_decay, eps=tr.adam_eps)
    try:
        # The fused kernel: on CUDA, and on the CPU from torch 2.4 (measured there 5x faster than foreach for the
        # digits model, 6.7x for U-ViT-S/2); other devices and older torch refuse it at construction.
        opt = torch.optim.AdamW(model.parameters(), fused=True, **kw)
    except RuntimeError:
        opt = torch.optim.AdamW(model.parameters(), **kw)
    lr_schedule = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(tr.warmup_steps, tr.lr_decay, tr.steps,
                                                                      tr.lr_final))
    scaler = torch.amp.GradScaler(t.type, enabled=tr.precision == "fp16")
    return opt, lr_schedule, scaler


# ---------------------------------------------------------------------------------------------------------------------
# Decoder, text encoder, sampler
# ---------------------------------------------------------------------------------------------------------------------

def build_decoder(recipe: Recipe, device, spec: str | None = None,
                  allow_download: bool | None = None) -> Autoencoder | None:
    """The VAE that turns a latent model's samples into images (None for pixel models); ``spec`` replaces data.vae."""
    if not recipe.is_latent:
        return None
    return load_autoencoder(spec or recipe.data.vae, recipe.data.scale_factor, device, allow_download=allow_download)


def build_text_encoder(recipe: Recipe, device, spec: str | None = None, allow_download: bool | None = None,
                       run_dir: str | Path | None = None) -> TextEncoder | None:
    """The text encoder of a text model's prompts (None otherwise): ``spec``, else the copy a run directory keeps
    of a built-in tower, else data.text_encoder. Its width must be the model's text_dim."""
    if recipe.conditioning != "text":
        return None
    kept = Path(run_dir) / RUN_TEXT_ENCODER if run_dir is not None and is_run_dir(run_dir) else None
    if not spec and kept is not None and kept.is_dir():
        spec = str(kept)
    encoder = load_text_encoder(spec or recipe.data.text_encoder, device, allow_download=allow_download)
    m = recipe.model
    if (encoder.context_length, encoder.width) != (m.text_tokens, m.text_dim):
        raise UvitError(f"the text encoder {encoder.name} gives {encoder.context_length} x {encoder.width} features "
                        f"but the model expects {m.text_tokens} x {m.text_dim} (model.text_tokens, model.text_dim); "
                        "use the text encoder the model was trained with (data.text_encoder / --text-encoder)")
    return encoder


def sampler_args(recipe: Recipe) -> dict:
    """The keyword arguments every sampler takes from ``recipe.sample`` (sampling.py's one signature)."""
    s = recipe.sample
    return dict(steps=s.steps, order=s.order, fast=s.fast, spacing=s.spacing)


def build_sampler(recipe: Recipe):
    """(sampler function, its keyword arguments) for ``recipe.sample``."""
    return get_sampler(recipe.sample.sampler), sampler_args(recipe)


def nfe_per_sample(recipe: Recipe) -> int:
    """Network evaluations per sample trajectory (a guided evaluation is one batched forward of cond + uncond)."""
    s = recipe.sample
    return planned_nfe(s.sampler, s.steps, s.order, s.fast)


def guided_nfe_per_sample(recipe: Recipe) -> int:
    """How many of a trajectory's evaluations are guided (each one forward of twice the batch): all of them, none
    without guidance, or those whose sampler time lies in ``sample.guidance_interval``."""
    s = recipe.sample
    if s.cfg_scale == 1.0:
        return 0
    if tuple(s.guidance_interval) == (0.0, 1.0):
        return nfe_per_sample(recipe)
    times = evaluation_times(s.sampler, build_schedule(recipe), **sampler_args(recipe))
    return sum(guided_at(t, s.guidance_interval) for t in times)


# ---------------------------------------------------------------------------------------------------------------------
# Recipes and models from files
# ---------------------------------------------------------------------------------------------------------------------

def is_model_target(path: str | Path) -> bool:
    """A run directory or a weights file (what `uvit sample` and `uvit fid` can draw samples from)."""
    p = Path(path)
    return is_run_dir(p) or (p.suffix in CHECKPOINT_SUFFIXES and not p.is_dir())


def embedded_recipe(path: Path, overrides: list[str] | None = None) -> Recipe:
    """The recipe stored in one of our .safetensors files (with ``--set`` overrides)."""
    meta = read_metadata(path)
    if "recipe" not in meta:
        raise UvitError(f"{path} carries no recipe in its metadata; pass --recipe RECIPE that describes its model")
    raw = apply_overrides(yaml.safe_load(meta["recipe"]), overrides)
    return recipe_from_dict(raw, source=f"{path} (embedded recipe)")


def load_recipe_for(target: str | Path, overrides: list[str] | None = None) -> tuple[Recipe, Path | None]:
    """(recipe, weights path or None) for a recipe YAML, a shipped recipe name, a run dir or a .safetensors file."""
    p = Path(target)
    if is_run_dir(p):
        return load_recipe(p / RUN_RECIPE, overrides), p
    if p.suffix == ".safetensors" and p.is_file():
        return embedded_recipe(p, overrides), p
    return load_recipe(target, overrides), None


def load_model(target: str | Path, recipe_path: str | None = None, overrides: list[str] | None = None,
               weights: str = "ema") -> tuple[UViT, Recipe, Path]:
    """(model in eval mode, recipe, weights path) from a run directory, one of our .safetensors files, or an
    official .pth (which needs ``recipe_path``). ``weights`` picks "ema" or "raw" inside a run directory."""
    recipe, path = model_recipe(target, recipe_path, overrides, weights)
    sd, _ = load_weights(path)
    model = build_model(recipe)
    load_into(model, sd, source=str(path))
    return model.eval(), recipe, path


def model_recipe(target: str | Path, recipe_path: str | None = None, overrides: list[str] | None = None,
                 weights: str = "ema") -> tuple[Recipe, Path]:
    """(recipe, weights path) of what :func:`load_model` would load, without reading the weights: the cheap check
    a launcher runs before it starts processes."""
    target = Path(target)
    if not target.exists():
        hint = (" (an official checkpoint also needs --recipe)" if target.suffix in CHECKPOINT_SUFFIXES else "")
        raise UvitError(f"{target} does not exist; pass a run directory, a .safetensors checkpoint, or an official "
                        f".pth with --recipe{hint}")
    if target.is_dir():
        if not is_run_dir(target):
            raise UvitError(f"{target} is not a run directory (no {RUN_RECIPE}); pass a run directory, a "
                            ".safetensors checkpoint, or an official .pth with --recipe")
        path = target / (RUN_EMA if weights == "ema" else RUN_RAW)
        if not path.exists():
            raise UvitError(f"{path} does not exist yet: the run has not written {weights} weights "
                            "(they appear at its first checkpoint)")
        recipe = load_recipe(recipe_path or target / RUN_RECIPE, overrides)
    elif target.suffix == ".safetensors":
        path = target
        recipe = load_recipe(recipe_path, overrides) if recipe_path else embedded_recipe(target, overrides)
    else:
        if not recipe_path:
            raise UvitError(f"{target} is an official checkpoint (no embedded recipe): pass --recipe RECIPE that "
                            "describes its model (e.g. --recipe imagenet256_uvit_h2)")
        path = target
        recipe = load_recipe(recipe_path, overrides)
    return recipe, path


def parameter_count(recipe: Recipe) -> int:
    """Parameters of the recipe's model, counted on the meta device (instant at any size)."""
    with torch.device("meta"):
        return sum(p.numel() for p in build_model(recipe).parameters())
