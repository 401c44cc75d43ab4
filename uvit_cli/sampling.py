"""Samplers: plain functions with one signature, on the network's prediction in the schedule's sampler time.

Every sampler is called as ``sampler(model_fn, x, schedule, *, steps, order, fast, spacing, t_end, generators,
callback)`` where ``model_fn(x, t)`` returns the network's output for a batch x at the scalar time t (all samples of
a batch share t) in the schedule's prediction target (the noise eps for eps-prediction, the velocity for flow), ``x``
is the initial noise at ``schedule.t_start`` and ``schedule`` a ``diffusion.NoiseSchedule``, which converts that
output to the eps, x0 or ODE/SDE drift a sampler integrates. Options a sampler does not use are ignored.
``generators`` (one ``torch.Generator`` per sample, on the CPU) feed any noise a stochastic sampler draws, so a
sample depends on its own generator only. ``callback({"i", "t", "x"})`` runs after each step. ``planned_nfe`` says
how many network evaluations (NFE) a call makes, ``evaluation_times`` at which times.

DPM-Solver follows the reference implementation (LuChengTHU/dpm-solver; the copies the official U-ViT repo
carries, ``dpm_solver_pytorch.py`` and ``dpm_solver_pp.py``) and is tested against it to 1e-4. It needs only
alpha, sigma and lambda, so it runs on every Gaussian path, flow included.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

ModelFn = Callable[[torch.Tensor, float], torch.Tensor]
SPACINGS = ("logSNR", "time_uniform", "time_quadratic")  # recipe.Spacing without "auto"


# ---------------------------------------------------------------------------------------------------------------------
# Time grids and step plans
# ---------------------------------------------------------------------------------------------------------------------

def resolve_spacing(schedule, spacing: str = "auto", sampler: str = "dpm_solver") -> str:
    """"auto" is the schedule's spacing for the sampler (``default_spacing``): the official one for the VP-SDE
    (logSNR) and the discrete schedule (time-uniform)."""
    if spacing != "auto":
        if spacing not in SPACINGS:
            raise ValueError(f"unknown spacing {spacing!r}; use auto, {', '.join(SPACINGS)}")
        return spacing
    return schedule.default_spacing(sampler)


def time_grid(schedule, spacing: str, t_start: float, t_end: float, n: int) -> list[float]:
    """n + 1 decreasing times from t_start to t_end, uniform in lambda (logSNR), t, or sqrt(t) (time_quadratic)."""
    if spacing == "logSNR":
        lo, hi = float(schedule.marginal_lambda(t_start)), float(schedule.marginal_lambda(t_end))
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise ValueError(f"logSNR spacing needs a finite log-SNR at both ends (t = {t_start:g} .. {t_end:g}); "
                             "use time_uniform or an end time inside (0, 1)")
        lam = torch.linspace(lo, hi, n + 1, dtype=torch.float64)
        ts = schedule.inverse_lambda(lam)
    elif spacing == "time_uniform":
        ts = torch.linspace(t_start, t_end, n + 1, dtype=torch.float64)
    elif spacing == "time_quadratic":
        ts = torch.linspace(math.sqrt(t_start), math.sqrt(t_end), n + 1, dtype=torch.float64) ** 2
    else:
        raise ValueError(f"unknown spacing {spacing!r}")
    out = [float(v) for v in ts]
    out[0], out[-1] = float(t_start), float(t_end)
    return out


def fast_orders(steps: int, order: int) -> list[int]:
    """Orders of DPM-Solver-fast's steps, using exactly ``steps`` NFE (Lu et al. 2022, Sec. 3.4 / Appendix)."""
    if order == 3:
        k = steps // 3 + 1
        return [3] * (k - 2) + [2, 1] if steps % 3 == 0 else [3] * (k - 1) + ([1] if steps % 3 == 1 else [2])
    if order == 2:
        return [2] * (steps // 2) + ([1] if steps % 2 else [])
    if order == 1:
        return [1] * steps
    raise ValueError(f"DPM-Solver order is 1, 2 or 3, got {order}")


def singlestep_plan(schedule, steps: int, order: int, fast: bool, spacing: str, t_end: float) -> list[list[float]]:
    """The singlestep solver's steps, each a list [s, (s1, (s2,)) t] of times; order = len - 1.

    fast: orders from ``fast_orders``. With logSNR spacing the outer times are lambda-uniform over the steps
    (the DPM-Solver paper); otherwise they are every order-th point of a ``steps``-interval grid and the
    intermediate points are the grid points in between (official ``dpm_solver_pp.py`` "fast").
    fixed: steps // order steps of that order on a spacing grid; the intermediate points split lambda at
    r1 = 1/2 (order 2) or r1, r2 = 1/3, 2/3 (order 3), DPM-Solver's Algorithms 1-2 (official copies' defaults).
    """
    t0 = schedule.t_start
    if fast:
        orders = fast_orders(steps, order)
        if spacing == "logSNR":
            outer = time_grid(schedule, spacing, t0, t_end, len(orders))
            return [_lambda_split(schedule, outer[i], outer[i + 1], o) for i, o in enumerate(orders)]
        grid = time_grid(schedule, spacing, t0, t_end, steps)
        plan, i = [], 0
        for o in orders:
            plan.append(grid[i:i + o + 1])
            i += o
        return plan
    n = steps // order
    if n < 1:
        raise ValueError(f"{steps} steps are fewer than one step of order {order}")
    outer = time_grid(schedule, spacing, t0, t_end, n)
    return [_lambda_split(schedule, outer[i], outer[i + 1], order) for i in range(n)]


def _lambda_split(schedule, s: float, t: float, order: int) -> list[float]:
    """[s, intermediate times uniform in lambda, t]."""
    if order == 1:
        return [s, t]
    ls, lt = float(schedule.marginal_lambda(s)), float(schedule.marginal_lambda(t))
    mids = [float(schedule.inverse_lambda(ls + (lt - ls) * k / order)) for k in range(1, order)]
    return [s, *mids, t]


def planned_nfe(sampler: str, steps: int, order: int = 3, fast: bool = True) -> int:
    """Network evaluations one call makes (a guided evaluation counts once: cond and uncond are batched)."""
    if sampler in ("dpm_solver", "dpm_solver_pp"):
        return steps if fast else (steps // order) * order
    if sampler == "heun":
        return 2 * steps
    if sampler in SAMPLERS:
        return steps
    raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")


# ---------------------------------------------------------------------------------------------------------------------
# DPM-Solver and DPM-Solver++ (singlestep)
# ---------------------------------------------------------------------------------------------------------------------

def _marginals(schedule, ts: Sequence[float]):
    """(lambda, alpha, sigma) of each time as python floats (float64 arithmetic)."""
    t = torch.tensor(list(ts), dtype=torch.float64)
    return ([float(v) for v in schedule.marginal_lambda(t)], [float(v) for v in schedule.marginal_alpha(t)],
            [float(v) for v in schedule.marginal_sigma(t)])


def _singlestep_noise(model_fn: ModelFn, x: torch.Tensor, schedule, times: list[float]) -> torch.Tensor:
    """One DPM-Solver-k step (noise prediction, Lu et al. 2022 Algorithms 1-2) from times[0] to times[-1]."""
    lam, alpha, sigma = _marginals(schedule, times)
    order, h = len(times) - 1, lam[-1] - lam[0]
    noise_fn = _noise_pred(model_fn, schedule)
    e_s = noise_fn(x, times[0])
    a_t, s_t = alpha[-1] / alpha[0], sigma[-1]
    if order == 1:  # DPM-Solver-1 (= DDIM): x_t = (a_t / a_s) x - sigma_t (e^h - 1) eps_s
        return a_t * x - (s_t * math.expm1(h)) * e_s
    r1 = (lam[1] - lam[0]) / h
    u1 = (alpha[1] / alpha[0]) * x - (sigma[1] * math.expm1(r1 * h)) * e_s
    e_1 = noise_fn(u1, times[1])
    if order == 2:
        return a_t * x - (s_t * math.expm1(h)) * e_s - (0.5 / r1 * s_t * math.expm1(h)) * (e_1 - e_s)
    r2 = (lam[2] - lam[0]) / h
    phi_22 = math.expm1(r2 * h) / (r2 * h) - 1.0
    u2 = ((alpha[2] / alpha[0]) * x - (sigma[2] * math.expm1(r2 * h)) * e_s
          - (r2 / r1 * sigma[2] * phi_22) * (e_1 - e_s))
    e_2 = noise_fn(u2, times[2])
    phi_2 = math.expm1(h) / h - 1.0
    return a_t * x - (s_t * math.expm1(h)) * e_s - (s_t * phi_2 / r2) * (e_2 - e_s)


def _noise_pred(model_fn: ModelFn, schedule) -> ModelFn:
    """eps(x, t), the noise prediction DPM-Solver integrates (``model_fn`` itself for eps-prediction)."""
    return lambda x, t: schedule.eps(model_fn(x, t), x, t)


def _data_pred(model_fn: ModelFn, schedule) -> ModelFn:
    """x0(x, t), the data prediction DPM-Solver++ integrates ((x - sigma_t eps) / alpha_t for eps-prediction)."""
    return lambda x, t: schedule.x0(model_fn(x, t), x, t)


def _singlestep_data(data_fn, x: torch.Tensor, schedule, times: list[float]) -> torch.Tensor:
    """One DPM-Solver++ singlestep update (data prediction, Lu et al. 2022b, Algorithm 1 and its order-3 form)."""
    lam, alpha, sigma = _marginals(schedule, times)
    order, h = len(times) - 1, lam[-1] - lam[0]
    d_s = data_fn(x, times[0])
    phi_1 = math.expm1(-h)
    s_ratio, a_t = sigma[-1] / sigma[0], alpha[-1]
    if order == 1:  # x_t = (sigma_t / sigma_s) x - alpha_t (e^-h - 1) x0_s
        return s_ratio * x - (a_t * phi_1) * d_s
    r1 = (lam[1] - lam[0]) / h
    u1 = (sigma[1] / sigma[0]) * x - (alpha[1] * math.expm1(-r1 * h)) * d_s
    d_1 = data_fn(u1, times[1])
    if order == 2:
        return s_ratio * x - (a_t * phi_1) * d_s - (0.5 / r1 * a_t * phi_1) * (d_1 - d_s)
    r2 = (lam[2] - lam[0]) / h
    phi_22 = math.expm1(-r2 * h) / (r2 * h) + 1.0
    u2 = ((sigma[2] / sigma[0]) * x - (alpha[2] * math.expm1(-r2 * h)) * d_s
          + (r2 / r1 * alpha[2] * phi_22) * (d_1 - d_s))
    d_2 = data_fn(u2, times[2])
    phi_2 = phi_1 / h + 1.0
    return s_ratio * x - (a_t * phi_1) * d_s + (a_t * phi_2 / r2) * (d_2 - d_s)


def dpm_solver(model_fn: ModelFn, x: torch.Tensor, schedule, *, steps: int, order: int = 3, fast: bool = True,
               spacing: str = "auto", t_end: float | None = None, generators=None, callback=None) -> torch.Tensor:
    """DPM-Solver (Lu et al., NeurIPS 2022, arXiv 2206.00927), singlestep on the noise prediction.

    fast=True is DPM-Solver-fast (order-3 steps, then one order-2 or -1 step, ``steps`` NFE in all); with the
    VP-SDE, logSNR spacing and t_end = 1e-4 it is what the official continuous-time U-ViT runs sample with.
    fast=False runs steps // order steps of DPM-Solver-``order`` (Algorithms 1-2).
    """
    spacing = resolve_spacing(schedule, spacing, "dpm_solver")
    t_end = schedule.default_t_end("dpm_solver") if t_end is None else t_end
    for i, times in enumerate(singlestep_plan(schedule, steps, order, fast, spacing, t_end)):
        x = _singlestep_noise(model_fn, x, schedule, times)
        if callback is not None:
            callback({"i": i, "t": times[-1], "x": x})
    return x


def dpm_solver_pp(model_fn: ModelFn, x: torch.Tensor, schedule, *, steps: int, order: int = 3, fast: bool = True,
                  spacing: str = "auto", t_end: float | None = None, generators=None, callback=None) -> torch.Tensor:
    """DPM-Solver++ (Lu et al. 2022b, arXiv 2211.01095), singlestep on the data prediction x0 = (x - sigma eps) / alpha.

    fast=True with order 3, the discrete schedule, time-uniform spacing from t = 1 to 1/N and 50 steps is what the
    official discrete U-ViT runs sample with (``dpm_solver_pp.py`` method "fast"); fast=False: fixed order.
    """
    spacing = resolve_spacing(schedule, spacing, "dpm_solver_pp")
    t_end = schedule.default_t_end("dpm_solver_pp") if t_end is None else t_end
    data_fn = _data_pred(model_fn, schedule)
    for i, times in enumerate(singlestep_plan(schedule, steps, order, fast, spacing, t_end)):
        x = _singlestep_data(data_fn, x, schedule, times)
        if callback is not None:
            callback({"i": i, "t": times[-1], "x": x})
    return x


def dpm_solver_pp_2m(model_fn: ModelFn, x: torch.Tensor, schedule, *, steps: int, order: int = 2, fast: bool = True,
                     spacing: str = "auto", t_end: float | None = None, generators=None,
                     callback=None) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022b, Algorithm 2): multistep, second order, ``steps`` NFE.

    The first step is first order; as in the reference, runs of fewer than 10 steps also end with a first-order step.
    """
    spacing = resolve_spacing(schedule, spacing, "dpm_solver_pp_2m")
    t_end = schedule.default_t_end("dpm_solver_pp_2m") if t_end is None else t_end
    ts = time_grid(schedule, spacing, schedule.t_start, t_end, steps)
    lam, alpha, sigma = _marginals(schedule, ts)
    data_fn = _data_pred(model_fn, schedule)
    d_prev, d_cur = None, data_fn(x, ts[0])
    for i in range(1, steps + 1):
        h = lam[i] - lam[i - 1]
        phi_1 = math.expm1(-h)
        x_new = (sigma[i] / sigma[i - 1]) * x - (alpha[i] * phi_1) * d_cur
        if d_prev is not None and not (steps < 10 and i == steps):
            r0 = (lam[i - 1] - lam[i - 2]) / h
            x_new = x_new - (0.5 * alpha[i] * phi_1 / r0) * (d_cur - d_prev)
        x = x_new
        if callback is not None:
            callback({"i": i - 1, "t": ts[i], "x": x})
        if i < steps:
            d_prev, d_cur = d_cur, data_fn(x, ts[i])
    return x


# ---------------------------------------------------------------------------------------------------------------------
# DDIM, and Euler(-Maruyama) and Heun on the reverse SDE / probability-flow ODE
# ---------------------------------------------------------------------------------------------------------------------

def ddim(model_fn: ModelFn, x: torch.Tensor, schedule, *, steps: int, order: int = 1, fast: bool = True,
         spacing: str = "auto", t_end: float | None = None, generators=None, callback=None) -> torch.Tensor:
    """DDIM, deterministic (eta = 0; Song et al., ICLR 2021, Eq. 12): x_t = alpha_t x0_hat + sigma_t eps_hat."""
    spacing = resolve_spacing(schedule, spacing, "ddim")
    t_end = schedule.default_t_end("ddim") if t_end is None else t_end
    ts = time_grid(schedule, spacing, schedule.t_start, t_end, steps)
    _, alpha, sigma = _marginals(schedule, ts)
    target = schedule.target
    for i in range(steps):
        out = model_fn(x, ts[i])
        eps = target.eps(out, x, alpha[i], sigma[i])
        x0 = target.x0(out, x, alpha[i], sigma[i])
        x = alpha[i + 1] * x0 + sigma[i + 1] * eps
        if callback is not None:
            callback({"i": i, "t": ts[i + 1], "x": x})
    return x


def _euler_grid(schedule, steps: int, t_end: float) -> list[float]:
    # official sde.euler_maruyama: times [0, linspace(eps, 1, steps)], walked from 1 down to 0
    return [float(v) for v in torch.linspace(t_end, schedule.t_start, steps, dtype=torch.float64).flip(0)] + [0.0]


def _gaussian(x: torch.Tensor, generators) -> torch.Tensor:
    """Standard normal noise shaped like x, sample i drawn from generators[i] (CPU), then moved to x's device."""
    if generators is None:
        return torch.randn_like(x)
    if len(generators) != x.shape[0]:
        raise ValueError(f"{len(generators)} generators for a batch of {x.shape[0]}")
    z = torch.stack([torch.randn(x.shape[1:], generator=g, dtype=torch.float32) for g in generators])
    return z.to(device=x.device, dtype=x.dtype)


def euler_maruyama(model_fn: ModelFn, x: torch.Tensor, schedule, *, steps: int, order: int = 1, fast: bool = True,
                   spacing: str = "auto", t_end: float | None = None, generators=None,
                   callback=None) -> torch.Tensor:
    """Euler-Maruyama on the reverse-time SDE dx = [v - w/2 score] dt + sqrt(w) dw (Song et al., ICLR 2021, Eq. 6).

    With the VP-SDE (w = g^2 = beta) and 1000 steps from t = 1 to 1e-3, then a noise-free step to 0, this is the
    official pixel CIFAR10 / CelebA protocol (official ``sde.euler_maruyama``). On flow, w = 2 sigma_t (SiT's SDE
    sampler) and the noise-free last step starts at t = 3e-3. The drift is ``schedule.reverse_sde``.
    """
    t_end = schedule.default_t_end("euler_maruyama") if t_end is None else t_end
    ts = _euler_grid(schedule, steps, t_end)
    for i in range(steps):
        t, s = ts[i], ts[i + 1]
        drift, w = schedule.reverse_sde(model_fn(x, t), x, t)
        dt = s - t  # negative
        x_mean = x + drift * dt
        x = x_mean + math.sqrt(w * -dt) * _gaussian(x, generators) if s > 0 else x_mean
        if callback is not None:
            callback({"i": i, "t": s, "x": x})
    return x


def _ode_steps(model_fn: ModelFn, x: torch.Tensor, schedule, ts: list[float], heun: bool, callback) -> torch.Tensor:
    """Euler (or Heun's trapezoid corrector) on the probability-flow ODE dx/dt = ``schedule.pf_ode_drift`` over ts."""
    for i in range(len(ts) - 1):
        t, s = ts[i], ts[i + 1]
        d = schedule.pf_ode_drift(model_fn(x, t), x, t)
        x_next = x + d * (s - t)
        if heun:
            d_next = schedule.pf_ode_drift(model_fn(x_next, s), x_next, s)
            x_next = x + (0.5 * (s - t)) * (d + d_next)
        x = x_next
        if callback is not None:
            callback({"i": i, "t": s, "x": x})
    return x


def pf_ode_euler(model_fn: ModelFn, x: torch.Tensor, schedule, *, steps: int, order: int = 1, fast: bool = True,
                 spacing: str = "auto", t_end: float | None = None, generators=None,
                 callback=None) -> torch.Tensor:
    """Euler on the probability-flow ODE dx = [f x - g^2 score / 2] dt (Song et al., ICLR 2021, Eq. 13).

    The same time grid as ``euler_maruyama`` (official ``sde.euler_maruyama(sde.ODE(...))``), deterministic; the
    VP formulations' official ODE sampler (``euler`` is the same integrator on any spacing, for every formulation).
    """
    t_end = schedule.default_t_end("pf_ode_euler") if t_end is None else t_end
    return _ode_steps(model_fn, x, schedule, _euler_grid(schedule, steps, t_end), False, callback)


def euler(model_fn: ModelFn, x: torch.Tensor, schedule, *, steps: int, order: int = 1, fast: bool = True,
          spacing: str = "auto", t_end: float | None = None, generators=None, callback=None) -> torch.Tensor:
    """Euler on the probability-flow ODE, ``steps`` steps on a ``spacing`` grid (SiT's ODE "euler"); first order."""
    spacing = resolve_spacing(schedule, spacing, "euler")
    t_end = schedule.default_t_end("euler") if t_end is None else t_end
    return _ode_steps(model_fn, x, schedule, time_grid(schedule, spacing, schedule.t_start, t_end, steps), False,
                      callback)


def heun(model_fn: ModelFn, x: torch.Tensor, schedule, *, steps: int, order: int = 2, fast: bool = True,
         spacing: str = "auto", t_end: float | None = None, generators=None, callback=None) -> torch.Tensor:
    """Heun's method (explicit trapezoid) on the probability-flow ODE (Karras et al. 2022, Alg. 1; SiT's "heun"):
    second order, 2 NFE per step, on the same grid as ``euler``."""
    spacing = resolve_spacing(schedule, spacing, "heun")
    t_end = schedule.default_t_end("heun") if t_end is None else t_end
    return _ode_steps(model_fn, x, schedule, time_grid(schedule, spacing, schedule.t_start, t_end, steps), True,
                      callback)


# name (recipe.Sampler) -> sampler function
SAMPLERS: dict[str, Callable[..., torch.Tensor]] = {
    "dpm_solver": dpm_solver,
    "dpm_solver_pp": dpm_solver_pp,
    "dpm_solver_pp_2m": dpm_solver_pp_2m,
    "euler_maruyama": euler_maruyama,
    "pf_ode_euler": pf_ode_euler,
    "euler": euler,
    "heun": heun,
    "ddim": ddim,
}


def evaluation_times(name: str, schedule, *, steps: int, order: int = 3, fast: bool = True, spacing: str = "auto",
                     t_end: float | None = None) -> list[float]:
    """The sampler times at which a sampler evaluates the network, in order: the sampler run on a one-number batch
    with a zero network (cheap), so it is exact for every sampler (guidance intervals count their NFE from it)."""
    times: list[float] = []

    def probe(x: torch.Tensor, t: float) -> torch.Tensor:
        times.append(float(t))
        return torch.zeros_like(x)

    get_sampler(name)(probe, torch.zeros(1, 1, dtype=torch.float64), schedule, steps=steps, order=order, fast=fast,
                      spacing=spacing, t_end=t_end, generators=[torch.Generator().manual_seed(0)])
    return times


def get_sampler(name: str):
    """The sampler function for a recipe's ``sample.sampler`` name."""
    try:
        return SAMPLERS[name]
    except KeyError:
        raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}") from None
