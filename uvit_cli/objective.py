"""What training optimises on a Gaussian path x_t = alpha_t x0 + sigma_t eps: the prediction target (eps, v, x0 or
the flow velocity; each defines its training target, its conversions to eps and x0, and its min-SNR weight), how the
training time is drawn (uniform or logit-normal) and how samples are weighted (none or min-SNR). The paths
themselves are in ``diffusion.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# ---------------------------------------------------------------------------------------------------------------------
# Prediction targets: what the network outputs, in one place (training target, conversions, min-SNR weight)
# ---------------------------------------------------------------------------------------------------------------------
# a, s are alpha_t and sigma_t: python floats (a sampler's step) or tensors shaped to x (a training batch).

class Target:
    """A prediction target: ``target(x0, noise, a, s)`` trains it; ``eps`` / ``x0`` convert an output ``out`` at
    x_t = x back; ``min_snr_weight`` is min(SNR, gamma) in x0 units, i.e. times (d x0 / d out)^2."""

    name = ""

    def target(self, x0, noise, a, s):
        raise NotImplementedError

    def eps(self, out, x, a, s):
        raise NotImplementedError

    def x0(self, out, x, a, s):
        raise NotImplementedError

    def min_snr_weight(self, snr: torch.Tensor, s: torch.Tensor, gamma: float) -> torch.Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"Target({self.name})"


class EpsTarget(Target):
    """The noise (the paper and every official run): x0 = (x - sigma eps) / alpha."""

    name = "eps"

    def target(self, x0, noise, a, s):
        return noise

    def eps(self, out, x, a, s):
        return out

    def x0(self, out, x, a, s):
        return (x - s * out) / a

    def min_snr_weight(self, snr, s, gamma):
        return torch.clamp(gamma / snr, max=1.0)  # min(SNR, gamma) / SNR, finite at SNR = 0


class X0Target(Target):
    """The clean data: eps = (x - alpha x0) / sigma."""

    name = "x0"

    def target(self, x0, noise, a, s):
        return x0

    def eps(self, out, x, a, s):
        return (x - a * out) / s

    def x0(self, out, x, a, s):
        return out

    def min_snr_weight(self, snr, s, gamma):
        return torch.clamp(snr, max=gamma)


class VTarget(Target):
    """v = alpha eps - sigma x0 (Salimans & Ho 2022), for variance-preserving paths (alpha^2 + sigma^2 = 1)."""

    name = "v"

    def target(self, x0, noise, a, s):
        return a * noise - s * x0

    def eps(self, out, x, a, s):
        return s * x + a * out

    def x0(self, out, x, a, s):
        return a * x - s * out

    def min_snr_weight(self, snr, s, gamma):
        return torch.clamp(snr, max=gamma) / (snr + 1.0)


class VelocityTarget(Target):
    """The flow velocity d x_t / dt = eps - x0 of the linear path (alpha = 1 - t, sigma = t): x0 = x - t v."""

    name = "velocity"

    def target(self, x0, noise, a, s):
        return noise - x0

    def eps(self, out, x, a, s):
        return x + a * out

    def x0(self, out, x, a, s):
        return x - s * out

    def min_snr_weight(self, snr, s, gamma):
        return torch.clamp(snr, max=gamma) * s ** 2  # x0 error = t x velocity error


# name (recipe.Prediction without "auto") -> target
PREDICTIONS: dict[str, Target] = {t.name: t for t in (EpsTarget(), VTarget(), X0Target(), VelocityTarget())}
TIME_SAMPLINGS = ("uniform", "logit_normal")    # recipe.TimeSampling
LOSS_WEIGHTINGS = ("none", "min_snr")            # recipe.LossWeighting


@dataclass(frozen=True)
class Objective:
    """What training optimises on a path: the target, how the time is drawn, how samples are weighted."""

    prediction: str = "eps"             # a key of PREDICTIONS
    time_sampling: str = "uniform"      # uniform: t = u; logit_normal: t = sigmoid(mean + std Phi^-1(u)) (SD3)
    logit_mean: float = 0.0
    logit_std: float = 1.0
    loss_weighting: str = "none"        # none, or min_snr (Hang et al. 2023)
    min_snr_gamma: float = 5.0

    def __post_init__(self):
        if self.prediction not in PREDICTIONS:
            raise ValueError(f"unknown prediction {self.prediction!r}; use one of {', '.join(PREDICTIONS)}")
        if self.time_sampling not in TIME_SAMPLINGS:
            raise ValueError(f"unknown time sampling {self.time_sampling!r}; use one of {', '.join(TIME_SAMPLINGS)}")
        if self.loss_weighting not in LOSS_WEIGHTINGS:
            raise ValueError(f"unknown loss weighting {self.loss_weighting!r}; use {', '.join(LOSS_WEIGHTINGS)}")

    def draw(self, u: torch.Tensor) -> torch.Tensor:
        """The training time's draw in [0, 1] from the stream's uniform u (u itself when uniform)."""
        if self.time_sampling == "uniform":
            return u
        z = torch.special.ndtri(u.double())  # u = 0 gives -inf, i.e. t = 0
        return torch.sigmoid(self.logit_mean + self.logit_std * z)
