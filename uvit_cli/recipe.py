"""Typed recipes: the schema, YAML loading, ``--set a.b=c`` overrides and validation with named errors.

A recipe says *what* to run. Each field below has a default and a one-line comment; unknown keys, wrong
types and impossible values raise :class:`RecipeError` naming the file, the key and the fix.
This module must not import torch.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import yaml

from .errors import UvitError
from .registry import VAES, size_kwargs


class RecipeError(UvitError, ValueError):
    """A user's mistake in a recipe: the message names the file, the key and the fix."""


# ---------------------------------------------------------------------------------------------------------------------
# Lists of choices: the one home of each. Modules that implement a choice keep a table keyed by these names, the
# CLI derives its options from them, and tests/test_architecture.py asserts that every list agrees.
# ---------------------------------------------------------------------------------------------------------------------

Precision = Literal["fp32", "bf16", "fp16"]                 # autocast precision (runtime.DTYPES)
SkipMode = Literal["concat_linear", "add", "linear_skip", "linear_sum", "none"]  # long-skip fusion (model.SKIP_MODES)
Sampler = Literal["dpm_solver", "dpm_solver_pp", "dpm_solver_pp_2m", "euler_maruyama", "pf_ode_euler", "euler",
                  "heun", "ddim"]                           # sampling.SAMPLERS
Spacing = Literal["auto", "logSNR", "time_uniform", "time_quadratic"]  # step spacing (sampling.time_grid)
Crop = Literal["auto", "adm_center", "celeba", "center_lanczos", "none"]  # data/crops.CROPS (+ auto)
Formulation = Literal["vp", "discrete", "flow"]             # build.build_schedule
Prediction = Literal["auto", "eps", "v", "x0", "velocity"]  # objective.PREDICTIONS (+ auto)
TimeSampling = Literal["uniform", "logit_normal"]           # objective.TIME_SAMPLINGS
LossWeighting = Literal["none", "min_snr"]                  # objective.LOSS_WEIGHTINGS
LrDecay = Literal["none", "cosine", "linear"]               # build.lr_lambda
EvalMode = Literal["pytorch_fid", "clean", "legacy_tensorflow", "digits"]  # metrics/features.MODES (+ digits)
Metric = Literal["fid", "sfid", "is", "precision", "recall", "kid", "fd_digits", "acc_digits"]  # metrics/evaluate
Weights = Literal["ema", "raw"]                             # which weights of a run directory
Tracker = Literal["jsonl", "tensorboard", "wandb"]     # experiment trackers (tracking.TRACKERS); jsonl always on
ExportFormat = Literal["diffusers", "safetensors"]       # uvit export --format (export.EXPORTERS)
DataName = Literal["digits", "cifar10", "celeba64", "imagenet64", "folder", "latents"]


def choices(kind) -> tuple[str, ...]:
    """The values of one of the Literal types above, e.g. ``choices(Sampler)``."""
    return typing.get_args(kind)


# Which prediction targets and samplers apply to each formulation (recipe.validate refuses the other pairs).
# v = alpha eps - sigma x0 is a variance-preserving target, the velocity eps - x0 the linear path's; eps and x0 fit
# any Gaussian path. pf_ode_euler is the official VP-SDE ODE sampler written with beta(t); on flow, euler is the
# same integrator. The first prediction of each formulation is what "auto" means.
PREDICTIONS_FOR: dict[str, tuple[str, ...]] = {
    "vp": ("eps", "v", "x0"),
    "discrete": ("eps", "v", "x0"),
    "flow": ("velocity", "eps", "x0"),
}
SAMPLERS_FOR: dict[str, tuple[str, ...]] = {
    "vp": choices(Sampler),
    "discrete": choices(Sampler),
    "flow": tuple(x for x in choices(Sampler) if x != "pf_ode_euler"),
}


def samplers_by_formulation() -> str:
    """One line saying which samplers apply to which formulation (for --help and error messages)."""
    parts = []
    for f, names in SAMPLERS_FOR.items():
        missing = [x for x in choices(Sampler) if x not in names]
        parts.append(f"{f}: " + ("all" if not missing else f"all but {', '.join(missing)}"))
    return "; ".join(parts)


# ---------------------------------------------------------------------------------------------------------------------
# Schema
# ---------------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelConfig:
    size: str = ""                      # registry name such as "U-ViT-S/2"; fills the architecture fields not given
    img_size: int = 32                  # side of the network input: pixels, or latents (32 for 256px SD latents)
    in_chans: int = 3                   # channels of the network input: 3 for RGB, 4 for SD latents
    patch_size: int = 2                 # P: tokens are P x P patches
    num_layers: int = 13                # transformer layers as the paper counts them (official depth = this - 1)
    embed_dim: int = 512                # token width D
    num_heads: int = 8                  # attention heads (must divide embed_dim)
    mlp_ratio: float = 4.0              # MLP hidden width = mlp_ratio * D
    qkv_bias: bool = False              # bias in the qkv projection (off in every official config)
    mlp_time_embed: bool = False        # pass the sinusoidal time embedding through D->4D->SiLU->D (off officially)
    num_classes: int = 0                # class-conditional when > 0 (1000 for ImageNet, 10 for digits)
    null_class: bool = False            # add the null-class row for guidance (official num_classes=1001 = 1000 + this)
    text_dim: int = 0                   # text-conditional when > 0: width of the text features (768 for CLIP ViT-L/14)
    text_tokens: int = 77               # number of text context tokens
    skip: SkipMode = "concat_linear"    # long-skip fusion: Linear(concat(h_m, h_s)) (paper), add, ..., none
    time_cond: Literal["token", "adaln"] = "token"      # time as a token (paper) or through AdaLN in every block
    conv: Literal["after", "before", "none"] = "after"  # extra 3x3 conv: on the image after the patch decoder, on the token grid before it, or none
    conv_init: Literal["default", "identity"] = "default"  # that conv's init: PyTorch's random one (official) or identity (Dirac kernel, zero bias: starts as a no-op)
    patch_embed: Literal["linear", "conv"] = "linear"   # linear patch embedding (paper) or a 3x3-conv stack + 1x1 conv
    pos_embed: Literal["learned", "sincos2d", "none"] = "learned"  # learned 1D table (paper), fixed 2D sin-cos, or none
    grad_checkpoint: bool = False       # recompute block activations in backward to save memory


@dataclass(frozen=True)
class DataConfig:
    name: DataName = "cifar10"          # data set kind (the defaults describe the paper's CIFAR10 run)
    source: str = ""                    # "hf:NAME" (Hugging Face datasets) or a local path; empty: the kind's default
    split: str = "train"                # data set split to train on
    random_flip: bool = False           # random horizontal flip (the official CIFAR10 run flips)
    crop: Crop = "auto"                 # preprocessing crop; auto: the official one for the data set
    latents: str = ""                   # directory written by `uvit encode-latents` (name: latents)
    vae: str = ""                       # VAE hub id or local path that decodes latents (latent models only)
    scale_factor: float = VAES["imagenet"][1]  # latent scale: 0.18215 ImageNet (sd-vae-ft-ema), 0.23010 MS-COCO (SD v1)
    text_encoder: str = ""              # CLIP text encoder for prompts (text models), e.g. "ViT-L-14/openai"
    num_workers: int = 2                # data-loading worker processes per rank


@dataclass(frozen=True)
class DiffusionConfig:
    formulation: Formulation = "vp"     # vp: VP-SDE (net sees 999 t); discrete: SD schedule (net sees n); flow: x_t = (1-t) x0 + t eps (rectified flow / SiT, net sees 999 t)
    prediction: Prediction = "auto"     # network target: eps, v = alpha eps - sigma x0 (Salimans & Ho 2022), x0, velocity eps - x0 (flow); auto: velocity for flow, else eps
    beta_min: float = 0.1               # VP-SDE beta(0)
    beta_max: float = 20.0              # VP-SDE beta(1)
    beta_start: float = 0.00085         # discrete: first beta (betas = linspace(sqrt(start), sqrt(end))^2)
    beta_end: float = 0.012             # discrete: last beta
    num_timesteps: int = 1000           # discrete: number of steps N


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 500_000                # optimizer steps
    batch_size: int = 128               # global batch (split over ranks and accumulation steps)
    lr: float = 2e-4                    # peak learning rate (AdamW)
    betas: tuple[float, float] = (0.99, 0.999)  # AdamW betas
    weight_decay: float = 0.03          # AdamW weight decay (official configs; the paper text says 0.3)
    adam_eps: float = 1e-8              # AdamW epsilon
    warmup_steps: int = 5000            # linear warm-up, then constant (or lr_decay)
    lr_decay: LrDecay = "none"          # after the warm-up: none (official, constant), or cosine / linear to lr * lr_final at train.steps (short runs)
    lr_final: float = 0.0               # lr_decay: the last step's learning rate as a fraction of train.lr
    ema_rate: float = 0.9999            # EMA of weights, updated every step; sampling and FID use the EMA
    ema_warmup: bool = False            # rate min(ema_rate, (1+step)/(10+step)) so short runs' EMA forgets the init (off officially)
    p_uncond: float = 0.0               # probability of replacing the condition by the null one (guidance training)
    grad_accum: int = 1                 # micro-batches per optimizer step
    grad_clip: float = 0.0              # clip the gradient norm to this value (0: off)
    precision: Precision = "fp32"       # autocast precision (fp16 uses a loss scaler)
    compile: bool = False               # torch.compile the model
    seed: int = 1234                    # global seed (official: 1234); rank r uses seed * world + r
    time_sampling: TimeSampling = "uniform"  # training times: uniform (official), or logit_normal t = sigmoid(mean + std z) (SD3, Esser et al. 2024)
    logit_mean: float = 0.0             # logit-normal time sampling: location (SD3: 0)
    logit_std: float = 1.0              # logit-normal time sampling: scale (SD3: 1)
    loss_weighting: LossWeighting = "none"  # per-sample loss weight: none (official) or min_snr, min(SNR, gamma) in x0 units (Hang et al. 2023)
    min_snr_gamma: float = 5.0          # min-SNR gamma (Hang et al.: 5)
    log_every: int = 10                 # steps between metrics.jsonl lines
    sample_every: int = 5000            # steps between EMA sample grids (0: off)
    save_every: int = 5000              # steps between full training-state checkpoints
    keep_last: int = 3                  # training-state checkpoints kept
    eval_every: int = 0                 # steps between monitor FIDs (0: off)
    log_to: tuple[Tracker, ...] = ("jsonl",)  # trackers: metrics.jsonl always, plus tensorboard / wandb (pip extras uvit[tensorboard], uvit[wandb])
    wandb_project: str = "uvit"         # wandb project (log_to: wandb; WANDB_MODE=offline logs without a network)


@dataclass(frozen=True)
class SampleConfig:
    sampler: Sampler = "dpm_solver"     # sampling algorithm
    steps: int = 50                     # sampler steps (NFE is reported separately)
    order: int = 3                      # DPM-Solver order; with "fast" the official runs use 3
    fast: bool = True                   # DPM-Solver "fast" step schedule (the official runs)
    spacing: Spacing = "auto"           # step spacing; auto: the official one per formulation
    cfg_scale: float = 1.0              # guidance w, standard convention (1 = off); official scale s is w = 1 + s
    guidance_interval: tuple[float, float] = (0.0, 1.0)  # guide only at sampler times t in [lo, hi] (t in [0, 1], 1 = noise; Kynkaanniemi et al. 2024), the conditional model elsewhere
    batch_size: int = 64                # samples per forward batch


@dataclass(frozen=True)
class EvalConfig:
    num_samples: int = 50_000           # samples for FID (paper: 50K; MS-COCO 30K)
    ref: str = ""                       # reference statistics / images for FID
    metrics: tuple[str, ...] = ("fid",)  # metrics to compute (names of Metric, or "all")
    mode: EvalMode = "pytorch_fid"      # feature pipeline: pytorch_fid (U-ViT's published numbers) or an alternative
    class_sampling: Literal["balanced", "random"] = "balanced"  # class labels for conditional samples
    captions: str = ""                  # text models: encoded val cache (encode-latents coco --split val) or prompts .txt
    batch_size: int = 50                # images per Inception batch
    monitor_samples: int = 1000         # samples for the in-training monitor FID (labelled as a monitor)


@dataclass(frozen=True)
class Recipe:
    name: str = "uvit"                  # short name used in run directory names
    description: str = ""               # one line about the run
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    # Convenience views used across modules.
    @property
    def conditioning(self) -> str:
        """"class", "text" or "none"."""
        if self.model.num_classes > 0:
            return "class"
        if self.model.text_dim > 0:
            return "text"
        return "none"

    @property
    def has_null_condition(self) -> bool:
        """Whether guidance is possible: a null class row, or a text model (the empty prompt)."""
        return (self.model.num_classes > 0 and self.model.null_class) or self.model.text_dim > 0

    @property
    def is_latent(self) -> bool:
        return self.data.name == "latents"

    @property
    def prediction_target(self) -> str:
        """diffusion.prediction with "auto" resolved: velocity for flow, eps for the VP formulations."""
        d = self.diffusion
        return PREDICTIONS_FOR[d.formulation][0] if d.prediction == "auto" else d.prediction


SECTIONS = {"model": ModelConfig, "data": DataConfig, "diffusion": DiffusionConfig, "train": TrainConfig,
            "sample": SampleConfig, "eval": EvalConfig}


# ---------------------------------------------------------------------------------------------------------------------
# Loading, overrides, dumping
# ---------------------------------------------------------------------------------------------------------------------

def _where(source: str | None, key: str) -> str:
    return f"{source}: {key}" if source else key


def _suggest(name: str, options) -> str:
    close = difflib.get_close_matches(name, list(options), n=1, cutoff=0.5)
    return f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(options)}"


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """Convert a YAML value to a field's type, or raise a RecipeError naming the key."""
    origin = typing.get_origin(hint)
    if origin is Literal:
        choices = typing.get_args(hint)
        if value not in choices:
            raise RecipeError(f"{where} = {value!r} is not a valid choice; use one of {', '.join(map(str, choices))}"
                              + (_suggest(str(value), choices).replace("valid keys", "choices") if isinstance(value, str) else ""))
        return value
    if origin is tuple:
        args = typing.get_args(hint)
        if not isinstance(value, (list, tuple)):
            raise RecipeError(f"{where} must be a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], where) for v in value)
        if len(value) != len(args):
            raise RecipeError(f"{where} must have {len(args)} items, got {len(value)}")
        return tuple(_coerce(v, a, where) for v, a in zip(value, args))
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise RecipeError(f"{where} must be true or false, got {value!r}")
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise RecipeError(f"{where} must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool):
            raise RecipeError(f"{where} must be a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise RecipeError(f"{where} must be a number, got {value!r}")
    if hint is str:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        if not isinstance(value, str):
            raise RecipeError(f"{where} must be a string, got {value!r}")
        return value
    return value


def _build_section(cls, raw: Any, source: str | None, section: str):
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise RecipeError(f"{_where(source, section)} must be a mapping of keys to values, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in fields(cls)]
    raw = dict(raw)
    if cls is ModelConfig and raw.get("size"):
        try:
            base = size_kwargs(str(raw["size"]))
        except KeyError as e:
            raise RecipeError(f"{_where(source, 'model.size')}: {e.args[0]}") from None
        raw = {**base, **raw}  # explicit fields win over the size's defaults
    kwargs = {}
    for key, value in raw.items():
        if key not in names:
            raise RecipeError(f"{_where(source, f'{section}.{key}')} is not a known key{_suggest(key, names)}")
        kwargs[key] = _coerce(value, hints[key], _where(source, f"{section}.{key}"))
    return cls(**kwargs)


def recipe_from_dict(raw: Any, source: str | None = None) -> Recipe:
    """Build and validate a Recipe from a plain dict (as read from YAML)."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise RecipeError(f"{source or 'recipe'} must be a YAML mapping with sections "
                          f"{', '.join(SECTIONS)}; got {type(raw).__name__}")
    top = [f.name for f in fields(Recipe)]
    kwargs = {}
    for key, value in raw.items():
        if key not in top:
            raise RecipeError(f"{_where(source, key)} is not a known section{_suggest(key, top)}")
        if key in SECTIONS:
            kwargs[key] = _build_section(SECTIONS[key], value, source, key)
        else:
            kwargs[key] = _coerce(value, str, _where(source, key))
    recipe = Recipe(**kwargs)
    validate(recipe, source)
    return recipe


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse ``section.key=value`` (value in YAML syntax) into (path, value)."""
    if "=" not in text:
        raise RecipeError(f"--set {text!r}: expected section.key=value, e.g. --set train.lr=1e-4")
    key, value = text.split("=", 1)
    path = key.strip().split(".")
    if len(path) not in (1, 2) or not all(path):
        raise RecipeError(f"--set {text!r}: expected section.key=value, e.g. --set train.lr=1e-4")
    try:
        parsed = yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError:
        parsed = value
    return path, parsed


def apply_overrides(raw: dict, overrides: list[str] | None) -> dict:
    """Return a copy of a raw recipe dict with ``--set`` overrides applied."""
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in (raw or {}).items()}
    for text in overrides or []:
        path, value = parse_override(text)
        if len(path) == 1:
            out[path[0]] = value
        else:
            section, key = path
            if section not in SECTIONS:
                raise RecipeError(f"--set {text!r}: {section!r} is not a section{_suggest(section, list(SECTIONS))}")
            sect = out.setdefault(section, {})
            if not isinstance(sect, dict):
                raise RecipeError(f"--set {text!r}: section {section!r} is not a mapping")
            sect[key] = value
    return out


def read_yaml(path: str | Path) -> dict:
    """A recipe file's YAML mapping; a directory, a binary file, invalid YAML or a non-mapping is a RecipeError."""
    path = Path(path)
    if not path.exists():
        raise RecipeError(f"recipe file {path} does not exist; `uvit recipes` lists the shipped recipes")
    if path.is_dir():
        hint = f"; a run's recipe is {path / 'recipe.yaml'}" if (path / "recipe.yaml").is_file() else ""
        raise RecipeError(f"recipe {path} is a directory; pass a recipe YAML file{hint}")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise RecipeError(f"recipe {path} is not a text file (not UTF-8); pass a recipe YAML file") from None
    except yaml.YAMLError as e:
        raise RecipeError(f"{path} is not valid YAML: {e}") from None
    if raw is not None and not isinstance(raw, dict):
        raise RecipeError(f"recipe {path} is a YAML {type(raw).__name__}, not a mapping of sections "
                          f"({', '.join(SECTIONS)}); see recipes/digits_uvit_tiny.yaml for the layout")
    if not raw:   # an empty file would silently train the defaults (CIFAR10): never what was meant
        raise RecipeError(f"recipe {path} is empty; write its sections ({', '.join(SECTIONS)}), e.g. copy "
                          "recipes/digits_uvit_tiny.yaml")
    return raw


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Load a recipe from YAML (a path, or a shipped recipe's name), apply overrides, validate."""
    path = resolve_recipe_path(path)
    raw = apply_overrides(read_yaml(path), overrides)
    return recipe_from_dict(raw, source=str(path))


def recipe_to_dict(recipe: Recipe) -> dict:
    """The resolved recipe as plain YAML-able data (tuples become lists)."""
    def plain(v):
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v
    return plain(dataclasses.asdict(recipe))


def dump_recipe(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False)


def replace(recipe: Recipe, **sections) -> Recipe:
    """Copy a recipe with some fields changed, e.g. ``replace(r, train={"steps": 10})``; validated."""
    raw = recipe_to_dict(recipe)
    for section, values in sections.items():
        if isinstance(values, dict):
            raw[section].update(values)
        else:
            raw[section] = values
    return recipe_from_dict(raw)


# ---------------------------------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------------------------------

def validate(r: Recipe, source: str | None = None) -> None:
    """Reject impossible values with the key and a fix."""
    m, t, s = r.model, r.train, r.sample

    def err(key: str, msg: str):
        raise RecipeError(f"{_where(source, key)}: {msg}")

    for key in ("img_size", "in_chans", "patch_size", "num_layers", "embed_dim", "num_heads"):
        if getattr(m, key) <= 0:
            err(f"model.{key}", f"must be positive, got {getattr(m, key)}")
    if m.img_size % m.patch_size:
        err("model.patch_size", f"image size {m.img_size} is not divisible by patch size {m.patch_size}; "
                                "pick a patch size that divides it")
    if m.embed_dim % m.num_heads:
        err("model.num_heads", f"{m.num_heads} heads do not divide width {m.embed_dim}; "
                               "pick a head count that divides model.embed_dim")
    if m.num_layers % 2 == 0:
        err("model.num_layers", f"U-ViT has in-blocks + a mid-block + out-blocks, an odd count; got {m.num_layers} "
                                f"(the official depth={m.num_layers} is num_layers={m.num_layers + 1})")
    if m.pos_embed == "sincos2d" and m.embed_dim % 4:
        err("model.embed_dim", "2D sin-cos position embedding needs a width divisible by 4")
    if m.mlp_ratio <= 0:
        err("model.mlp_ratio", f"must be positive, got {m.mlp_ratio}")
    if m.num_classes < 0:
        err("model.num_classes", "must be >= 0 (0: no class condition)")
    if m.num_classes > 0 and m.text_dim > 0:
        err("model.text_dim", "a model is class-conditional or text-conditional, not both; set one of "
                              "model.num_classes / model.text_dim to 0")
    if m.null_class and m.num_classes == 0:
        err("model.null_class", "a null class needs a class-conditional model (model.num_classes > 0)")
    if t.lr <= 0:
        err("train.lr", f"learning rate must be positive, got {t.lr}")
    if t.batch_size <= 0:
        err("train.batch_size", f"must be positive, got {t.batch_size}")
    if t.steps < 1:
        err("train.steps", f"must be >= 1, got {t.steps}")
    if t.grad_accum <= 0:
        err("train.grad_accum", f"must be >= 1, got {t.grad_accum}")
    if t.batch_size % t.grad_accum:
        err("train.grad_accum", f"{t.grad_accum} accumulation steps do not divide the batch of {t.batch_size}")
    if not 0 <= t.ema_rate <= 1:
        err("train.ema_rate", f"must be in [0, 1], got {t.ema_rate}")
    if not 0 <= t.p_uncond < 1:
        err("train.p_uncond", f"must be in [0, 1), got {t.p_uncond}")
    if t.p_uncond > 0 and not r.has_null_condition:
        err("train.p_uncond", "label dropout needs a null condition: set model.null_class: true "
                              "(class models) or use a text model")
    if not all(0 <= b < 1 for b in t.betas):
        err("train.betas", f"AdamW betas must be in [0, 1), got {list(t.betas)}")
    if t.weight_decay < 0:
        err("train.weight_decay", f"must be >= 0, got {t.weight_decay}")
    if t.warmup_steps < 0:
        err("train.warmup_steps", f"must be >= 0, got {t.warmup_steps}")
    if not 0 <= t.lr_final <= 1:
        err("train.lr_final", f"is a fraction of train.lr and must be in [0, 1], got {t.lr_final}")
    for key in ("log_every", "save_every", "keep_last"):
        if getattr(t, key) < 1:
            err(f"train.{key}", f"must be >= 1, got {getattr(t, key)}")
    for key in ("sample_every", "eval_every"):
        if getattr(t, key) < 0:
            err(f"train.{key}", f"must be >= 0 (0: off), got {getattr(t, key)}")
    if s.batch_size < 1:
        err("sample.batch_size", f"must be >= 1, got {s.batch_size}")
    if r.eval.batch_size < 1 or r.eval.monitor_samples < 1:
        err("eval.batch_size" if r.eval.batch_size < 1 else "eval.monitor_samples", "must be >= 1")
    if r.data.num_workers < 0:
        err("data.num_workers", f"must be >= 0, got {r.data.num_workers}")
    d = r.diffusion
    if d.prediction != "auto" and d.prediction not in PREDICTIONS_FOR[d.formulation]:
        err("diffusion.prediction", f"{d.prediction} is not a target of the {d.formulation} formulation; use "
                                    f"{', '.join(PREDICTIONS_FOR[d.formulation])} (or auto)")
    if t.logit_std <= 0:
        err("train.logit_std", f"must be positive, got {t.logit_std}")
    if t.min_snr_gamma <= 0:
        err("train.min_snr_gamma", f"must be positive, got {t.min_snr_gamma}")
    if s.sampler not in SAMPLERS_FOR[d.formulation]:
        err("sample.sampler", f"{s.sampler} does not apply to the {d.formulation} formulation; use one of "
                              f"{', '.join(SAMPLERS_FOR[d.formulation])} (samplers by formulation: "
                              f"{samplers_by_formulation()})")
    lo, hi = s.guidance_interval
    if not 0 <= lo <= hi <= 1:
        err("sample.guidance_interval", f"must be [t_lo, t_hi] with 0 <= t_lo <= t_hi <= 1 (sampler times), got "
                                        f"{list(s.guidance_interval)}")
    if s.steps <= 0:
        err("sample.steps", f"must be positive, got {s.steps}")
    if s.order not in (1, 2, 3):
        err("sample.order", f"DPM-Solver order is 1, 2 or 3, got {s.order}")
    if s.cfg_scale < 0:
        err("sample.cfg_scale", f"must be >= 0 (1 = no guidance), got {s.cfg_scale}")
    if s.cfg_scale != 1.0 and not r.has_null_condition:
        err("sample.cfg_scale", f"guidance w={s.cfg_scale} needs a model trained with a null condition; "
                                "sample with --cfg-scale 1 (sample.cfg_scale: 1.0), or train with model.null_class: true "
                                "and train.p_uncond > 0")
    if r.data.name == "latents" and m.in_chans != 4:
        err("model.in_chans", f"Stable Diffusion latents have 4 channels, got {m.in_chans}")
    if r.data.name == "digits":
        if m.img_size != 8 or m.in_chans not in (1, 3):
            err("model.img_size", "the built-in digits are 8x8 images with 1 channel: set model.img_size: 8, "
                                  "model.in_chans: 1")
        if m.num_classes not in (0, 10):
            err("model.num_classes", "the digits have 10 classes: set model.num_classes to 10 or 0")
        if m.text_dim > 0 and not r.data.text_encoder:
            err("data.text_encoder", "the captioned digits need a text encoder: builtin:digits-clip (made here from "
                                     "a seed) or a CLIP such as ViT-L-14/openai")
    if r.eval.num_samples <= 0:
        err("eval.num_samples", f"must be positive, got {r.eval.num_samples}")
    bad = [x for x in r.eval.metrics if x != "all" and x not in choices(Metric)]
    if bad:
        err("eval.metrics", f"unknown metric {', '.join(map(repr, bad))}; choose from {', '.join(choices(Metric))} "
                            "or all")


# ---------------------------------------------------------------------------------------------------------------------
# Shipped recipes
# ---------------------------------------------------------------------------------------------------------------------

def recipes_dir() -> Path:
    """The shipped recipes directory (next to the package in a source checkout)."""
    return Path(__file__).resolve().parent.parent / "recipes"


def resolve_recipe_path(path: str | Path) -> Path:
    """A path as given, or the name of a shipped recipe (``digits_uvit_tiny`` or ``digits_uvit_tiny.yaml``)."""
    p = Path(path)
    if p.exists():
        return p
    for cand in (recipes_dir() / p, recipes_dir() / f"{p}.yaml", recipes_dir() / p.name):
        if cand.exists():
            return cand
    names = [q.stem for q in sorted(recipes_dir().glob("*.yaml"))]
    close = difflib.get_close_matches(p.stem, names, n=2, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else "; `uvit recipes` lists the shipped recipes"
    raise RecipeError(f"recipe {str(path)!r} not found{hint}")


def shipped_recipes() -> list[Path]:
    return sorted(recipes_dir().glob("*.yaml"))
