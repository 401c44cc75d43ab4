"""From a U-ViT to the predictor the samplers call: time convention, condition, guidance, precision.

The predictor returns the network's output in the schedule's prediction target (eps by default; the schedule
converts it to what a sampler integrates, see diffusion.py). Classifier-free guidance (Ho & Salimans 2022) in the
standard convention: out = out_u + w (out_c - out_u), w = 1 off; every target is affine in eps at a fixed (x, t),
so this is the same guidance on any target. The official U-ViT writes eps_c + s (eps_c - eps_u), i.e. w = 1 + s.
The conditional and unconditional halves run as one batched forward of twice the batch. With a guidance interval
[t_lo, t_hi] (Kynkaanniemi et al. 2024) only evaluations at sampler times inside it are guided; the others run the
conditional model alone (one forward of the batch). The null condition is the model's null class id, or the
empty-prompt context for text.

The model always sees micro-batches of exactly ``forward_batch`` samples (the last one padded by repeating a
sample): CPU (and GPU) matmul kernels are chosen by shape, so a row's bits can depend on the batch size. With a
fixed forward shape, a sample's result depends only on its own inputs, never on ``batch_size`` or its batch-mates.
"""

from __future__ import annotations

from typing import Callable

import torch

from .runtime import autocast


def cfg_combine(eps_cond: torch.Tensor, eps_uncond: torch.Tensor, w: float) -> torch.Tensor:
    """Classifier-free guidance, standard w (1 = the conditional model, 0 = the unconditional one)."""
    return eps_uncond + w * (eps_cond - eps_uncond)


def guided_at(t: float, interval: tuple[float, float] = (0.0, 1.0)) -> bool:
    """Whether an evaluation at sampler time t is guided: t in [t_lo, t_hi] (the whole path by default)."""
    return interval[0] <= t <= interval[1]


def pad_rows(v: torch.Tensor | None, m: int) -> torch.Tensor | None:
    """Pad a micro-batch to m rows by repeating its last row."""
    if v is None or v.shape[0] == m:
        return v
    return torch.cat([v, v[-1:].expand(m - v.shape[0], *v.shape[1:])])


def expand_null(null_cond, cond: torch.Tensor) -> torch.Tensor:
    """The null condition repeated to cond's batch: a class id (int) or a context (77, D) / (1, 77, D)."""
    if isinstance(null_cond, int):
        return torch.full_like(cond, null_cond)
    null = torch.as_tensor(null_cond, device=cond.device, dtype=cond.dtype)
    if null.dim() == cond.dim() - 1:
        null = null[None]
    return null.expand(cond.shape[0], *cond.shape[1:])


class NoisePredictor:
    """The network's prediction at (x, t) for a sampler: converts t to the network's time, adds the condition and
    guidance (inside ``guidance_interval``), counts NFE.

    ``on_eval(nfe)`` is called after every evaluation (for progress bars). The recipe decides whether guidance is
    possible (validation.validate); here a guided call only needs the null condition it was given.
    """

    def __init__(self, model: torch.nn.Module, schedule, cond: torch.Tensor | None = None, *, cfg_scale: float = 1.0,
                 null_cond=None, forward_batch: int = 4, precision: str = "fp32",
                 guidance_interval: tuple[float, float] = (0.0, 1.0), on_eval: Callable[[int], None] | None = None):
        if forward_batch < 1:
            raise ValueError(f"forward_batch must be >= 1, got {forward_batch}")
        self.model, self.schedule, self.cond = model, schedule, cond
        self.cfg_scale, self.null_cond = float(cfg_scale), null_cond
        self.guidance_interval = (float(guidance_interval[0]), float(guidance_interval[1]))
        self.forward_batch, self.precision = forward_batch, precision
        self.on_eval = on_eval
        self.nfe = 0         # evaluations of the whole batch
        self.guided_nfe = 0  # of which guided (one forward of twice the batch each)
        self.forwards = 0    # model forward calls (micro-batches)

    def _forward(self, x: torch.Tensor, t_net: torch.Tensor, y) -> torch.Tensor:
        """The model on fixed-size micro-batches; returns float32."""
        n, m = x.shape[0], self.forward_batch
        outs = []
        for i in range(0, n, m):
            k = min(m, n - i)
            xb, tb = pad_rows(x[i:i + k], m), pad_rows(t_net[i:i + k], m)
            yb = None if y is None else pad_rows(y[i:i + k], m)
            with autocast(x.device, self.precision):
                out = self.model(xb, tb) if yb is None else self.model(xb, tb, yb)
            self.forwards += 1
            outs.append(out[:k].float())
        return torch.cat(outs)

    def __call__(self, x: torch.Tensor, t: float) -> torch.Tensor:
        n = x.shape[0]
        t_net = torch.full((n,), float(self.schedule.net_time(t)), device=x.device, dtype=torch.float32)
        cond = self.cond
        with torch.no_grad():
            if self.cfg_scale == 1.0 or not guided_at(t, self.guidance_interval):
                out = self._forward(x, t_net, cond)
            else:
                out = self._guided_batched(x, t_net, cond)
                self.guided_nfe += 1
        self.nfe += 1
        if self.on_eval is not None:
            self.on_eval(self.nfe)
        return out

    def _guided_batched(self, x: torch.Tensor, t_net: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """Each micro-batch of samples goes through the model once as [cond half; uncond half]."""
        null = expand_null(self.null_cond, cond)
        m = self.forward_batch
        half = []
        for i in range(0, x.shape[0], m):
            k = min(m, x.shape[0] - i)
            xb, tb, cb, nb = (pad_rows(v[i:i + k], m) for v in (x, t_net, cond, null))
            with autocast(x.device, self.precision):
                out = self.model(torch.cat([xb, xb]), torch.cat([tb, tb]), torch.cat([cb, nb])).float()
            self.forwards += 1
            e_c, e_u = out[:m], out[m:]
            half.append(cfg_combine(e_c[:k], e_u[:k], self.cfg_scale))
        return torch.cat(half)
