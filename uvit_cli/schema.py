"""The recipe's schema: one frozen dataclass per section, each field with its default and a one-line comment.

recipe.py reads YAML into these (types and unknown keys checked there), validation.py checks the values.
This module must not import torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from .choices import (PREDICTIONS_FOR, CheckpointPolicy, Crop, DataName, EvalMode, Formulation, LossWeighting, LrDecay, Precision,
                      Prediction, Sampler, SkipMode, Spacing, TimeSampling, Tracker)
from .registry import VAES


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
    grad_checkpoint: bool = False       # recompute activations in backward to save memory (official use_checkpoint)
    checkpoint_policy: CheckpointPolicy = "all"  # with grad_checkpoint, what is recomputed: every block (official), every other block, or only each block's attention / MLP sub-layer


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
