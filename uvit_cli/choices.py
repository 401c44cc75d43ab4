"""The lists of choices a recipe and the CLI accept: the one home of each.

Modules that implement a choice keep a table keyed by these names, the CLI derives its options from them, and
tests/test_architecture.py asserts that every list agrees. This module must not import torch.
"""

from __future__ import annotations

import typing
from typing import Literal

Precision = Literal["fp32", "bf16", "fp16"]                 # autocast precision (runtime.DTYPES)
SkipMode = Literal["concat_linear", "add", "linear_skip", "linear_sum", "none"]  # long-skip fusion (model.SKIP_MODES)
CheckpointPolicy = Literal["all", "every_other", "attention", "mlp"]  # what is recomputed (model.CHECKPOINT_POLICIES)
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


# Which prediction targets and samplers apply to each formulation (validation.validate refuses the other pairs).
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
