"""Recipe validation: the checks a recipe must pass beyond its field types, each error naming the key and the fix.

Types and unknown keys are checked while the recipe is read (recipe.py); this module checks values and how the
fields fit together (a sampler for the formulation, guidance needing a null condition, the digits' shape).
This module must not import torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .choices import PREDICTIONS_FOR, SAMPLERS_FOR, Metric, choices, samplers_by_formulation
from .errors import RecipeError

if TYPE_CHECKING:
    from .schema import Recipe


def where(source: str | None, key: str) -> str:
    """``file: section.key`` (or the key alone) for error messages."""
    return f"{source}: {key}" if source else key


def validate(r: Recipe, source: str | None = None) -> None:
    """Reject impossible values with the key and a fix."""
    m, t, s = r.model, r.train, r.sample

    def err(key: str, msg: str):
        raise RecipeError(f"{where(source, key)}: {msg}")

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
