"""Samplers against the reference DPM-Solver code, on a noise predictor that is exact in closed form.

The data are a product of 1-D two-component Gaussian mixtures (one per dimension), so E[eps | x_t] is analytic for
any alpha_t. ``tests/data/sampling_reference.safetensors`` holds the mixture, the initial noise and the outputs of the
reference implementations (the DPM-Solver copies the official U-ViT repo carries, LuChengTHU/dpm-solver, and the
official ``sde.py``) for each variant; they were generated once, outside the repository, by running that code with
the predictor defined below. Its metadata records the variant settings and source commits.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from uvit_cli.diffusion import DiscreteSchedule, FlowSchedule, VPSchedule
from uvit_cli.objective import Objective
from uvit_cli.sampling import (SAMPLERS, dpm_solver, dpm_solver_pp, fast_orders, planned_nfe, singlestep_plan,
                               time_grid)

DATA = Path(__file__).parent / "data" / "sampling_reference.safetensors"


# ---------------------------------------------------------------------------------------------------------------------
# The analytic predictor (also used, verbatim, to generate the reference data)
# ---------------------------------------------------------------------------------------------------------------------

def vp_log_alpha(t):
    """Linear VP-SDE, beta 0.1..20: log alpha_t = -(19.9) t^2 / 4 - 0.1 t / 2."""
    return -0.25 * t ** 2 * 19.9 - 0.05 * t


_BETAS = np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=np.float64) ** 2
_KNOT_T = np.arange(1, 1001, dtype=np.float64) / 1000
_KNOT_LA = 0.5 * np.cumsum(np.log(1.0 - _BETAS))


def discrete_log_alpha(t):
    """SD schedule: log alpha piecewise linear in t between knots t_n = n / 1000."""
    return np.interp(t, _KNOT_T, _KNOT_LA)


def mixture_eps(x: torch.Tensor, log_alpha: float, mu: torch.Tensor, sd: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """E[eps | x_t] when each dimension of x0 is sum_k w_k N(mu_k, sd_k^2); mu, sd: (K, *shape), w: (K,)."""
    a = math.exp(log_alpha)
    s2 = -math.expm1(2 * log_alpha)
    xd = x.double()[:, None]                                   # (B, 1, ...)
    var = a * a * sd.double() ** 2 + s2                         # (K, ...)
    diff = xd - a * mu.double()                                 # (B, K, ...)
    logp = torch.log(w.double()).reshape(1, -1, *[1] * (x.dim() - 1)) - 0.5 * torch.log(var) - diff ** 2 / (2 * var)
    r = torch.softmax(logp, dim=1)
    return (r * math.sqrt(s2) * diff / var).sum(1).to(x.dtype)


def make_net(kind: str, mix: dict):
    """A fake network nnet(x, t_net) that predicts the exact noise; t_net is what the U-ViT would see."""
    def net(x, t_net):
        t_net = torch.as_tensor(t_net).reshape(-1)
        if kind == "vp":
            la = vp_log_alpha(float(t_net[0]) / 999.0)
        else:
            la = float(discrete_log_alpha(float(t_net[0]) / 1000.0))
        return mixture_eps(x, la, mix["mu"], mix["sd"], mix["w"])
    return net


def noise_fn_for(schedule, net):
    """Our samplers' noise_fn: the network at the schedule's network time (float32, as the model gets it)."""
    def fn(x, t):
        return net(x, torch.full((x.shape[0],), float(schedule.net_time(t)), dtype=torch.float32))
    return fn


# ---------------------------------------------------------------------------------------------------------------------
# Parity with the reference implementations
# ---------------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ref():
    from safetensors import safe_open

    tensors = load_file(str(DATA))
    with safe_open(str(DATA), framework="pt") as f:
        meta = json.loads(f.metadata()["variants"])
    mix = {"mu": tensors["mix.mu"], "sd": tensors["mix.sd"], "w": tensors["mix.w"]}
    return tensors, meta, mix


def _schedule(kind):
    return VPSchedule() if kind == "vp" else DiscreteSchedule()


def test_reference_file_covers_every_variant(ref):
    _, meta, _ = ref
    samplers = {v["sampler"] for v in meta.values()}
    assert {"dpm_solver", "dpm_solver_pp", "dpm_solver_pp_2m", "euler_maruyama", "pf_ode_euler", "ddim"} <= samplers
    assert "vp_dpm_solver_fast50_official" in meta and "discrete_dpm_solver_pp_fast50_official" in meta
    for order in (1, 2, 3):
        for spacing in ("logSNR", "time_uniform", "time_quadratic"):
            assert any(v["sampler"] == "dpm_solver" and not v["fast"] and v["order"] == order
                       and v["spacing"] == spacing for v in meta.values())


def _run_variant(v, tensors, mix):
    schedule = _schedule(v["kind"])
    fn = noise_fn_for(schedule, make_net(v["kind"], mix))
    gens = None
    if v["sampler"] == "euler_maruyama":
        gens = [torch.Generator().manual_seed(v["noise_seed"] + i) for i in range(tensors["x_T"].shape[0])]
    calls = []

    def counting(x, t):
        calls.append(t)
        return fn(x, t)

    out = SAMPLERS[v["sampler"]](counting, tensors["x_T"].clone(), schedule, steps=v["steps"], order=v["order"],
                                 fast=v["fast"], spacing=v["spacing"], t_end=v.get("t_end"), generators=gens)
    return out, len(calls)


def _variant_names():
    from safetensors import safe_open

    if not DATA.exists():  # reported as a failure by the fixture, not silently skipped
        return ["missing-reference-file"]
    with safe_open(str(DATA), framework="pt") as f:
        return sorted(json.loads(f.metadata()["variants"]))


@pytest.mark.parametrize("name", _variant_names())
def test_matches_reference(ref, name):
    tensors, meta, mix = ref
    v = meta[name]
    out, nfe = _run_variant(v, tensors, mix)
    expected = tensors[f"out.{name}"]
    err = (out - expected).abs().max().item()
    assert err < 1e-4, f"{name}: max abs difference {err:.2e} from {v['reference']}"
    assert nfe == planned_nfe(v["sampler"], v["steps"], v["order"], v["fast"]) == v["nfe"]


def test_official_variants_agree_across_reference_versions(ref):
    """The U-ViT copies and today's LuChengTHU/dpm-solver agree on the official samples (either is the reference)."""
    tensors, meta, _ = ref
    for official, latest in (("vp_dpm_solver_fast50_official", "vp_dpm_solver_fast50_latest"),
                             ("discrete_dpm_solver_pp_fast50_official", "discrete_dpm_solver_pp_fast50_latest")):
        assert (tensors[f"out.{official}"] - tensors[f"out.{latest}"]).abs().max() < 1e-4


# ---------------------------------------------------------------------------------------------------------------------
# Step plans, NFE and basic properties
# ---------------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("steps", [10, 11, 12, 50])
def test_fast_orders_use_exactly_steps_nfe(steps):
    for order in (1, 2, 3):
        assert sum(fast_orders(steps, order)) == steps
    assert fast_orders(50, 3) == [3] * 16 + [2]


def test_plans_start_at_one_and_end_at_t_end():
    for schedule, t_end in ((VPSchedule(), 1e-4), (DiscreteSchedule(), 1e-3)):
        for spacing in ("logSNR", "time_uniform", "time_quadratic"):
            for fast in (True, False):
                plan = singlestep_plan(schedule, 12, 3, fast, spacing, t_end)
                assert plan[0][0] == 1.0 and abs(plan[-1][-1] - t_end) < 1e-12
                for a, b in zip(plan, plan[1:]):
                    assert a[-1] == b[0]
                for step in plan:
                    assert all(x > y for x, y in zip(step, step[1:]))


def test_logsnr_grid_is_uniform_in_lambda():
    s = VPSchedule()
    ts = time_grid(s, "logSNR", 1.0, 1e-4, 10)
    lam = s.marginal_lambda(torch.tensor(ts, dtype=torch.float64))
    d = lam[1:] - lam[:-1]
    assert torch.allclose(d, d.mean().expand_as(d), atol=1e-9)


def test_official_discrete_grid_is_time_uniform_from_1_to_1_over_N():
    s = DiscreteSchedule()
    plan = singlestep_plan(s, 50, 3, True, "time_uniform", 1e-3)
    flat = [plan[0][0]] + [t for step in plan for t in step[1:]]
    assert len(flat) == 51
    np.testing.assert_allclose(flat, np.linspace(1.0, 1e-3, 51), atol=1e-12)


def test_ddim_equals_first_order_dpm_solver():
    """DDIM (eta = 0) is DPM-Solver-1 (Lu et al. 2022, Prop. 4.1): same numbers on the same grid."""
    torch.manual_seed(0)
    mix = {"mu": torch.randn(2, 3) * 0.5, "sd": torch.rand(2, 3) * 0.2 + 0.1, "w": torch.tensor([0.4, 0.6])}
    for kind in ("vp", "discrete"):
        s = _schedule(kind)
        fn = noise_fn_for(s, make_net(kind, mix))
        x = torch.randn(5, 3)
        a = SAMPLERS["ddim"](fn, x, s, steps=20, spacing="time_uniform")
        b = dpm_solver(fn, x, s, steps=20, order=1, fast=False, spacing="time_uniform")
        assert (a - b).abs().max() < 1e-5


def test_guidance_free_sampler_is_deterministic_and_per_sample():
    """Deterministic samplers treat samples independently: a sub-batch gives the same rows bit for bit."""
    torch.manual_seed(1)
    mix = {"mu": torch.randn(2, 4) * 0.5, "sd": torch.rand(2, 4) * 0.2 + 0.1, "w": torch.tensor([0.5, 0.5])}
    s = VPSchedule()
    fn = noise_fn_for(s, make_net("vp", mix))
    x = torch.randn(6, 4)
    full = dpm_solver(fn, x, s, steps=15)
    part = dpm_solver(fn, x[2:5], s, steps=15)
    assert torch.equal(full[2:5], part)


def test_euler_maruyama_noise_comes_from_each_samples_generator():
    torch.manual_seed(2)
    mix = {"mu": torch.randn(2, 4) * 0.5, "sd": torch.rand(2, 4) * 0.2 + 0.1, "w": torch.tensor([0.5, 0.5])}
    s = VPSchedule()
    fn = noise_fn_for(s, make_net("vp", mix))
    x = torch.randn(4, 4)

    def gens(seeds):
        return [torch.Generator().manual_seed(k) for k in seeds]

    full = SAMPLERS["euler_maruyama"](fn, x, s, steps=30, generators=gens([10, 11, 12, 13]))
    part = SAMPLERS["euler_maruyama"](fn, x[1:3], s, steps=30, generators=gens([11, 12]))
    other = SAMPLERS["euler_maruyama"](fn, x[1:3], s, steps=30, generators=gens([21, 22]))
    assert torch.equal(full[1:3], part)
    assert not torch.allclose(part, other)


# ---------------------------------------------------------------------------------------------------------------------
# Many-step samples have the data's mean and spread
# ---------------------------------------------------------------------------------------------------------------------

MOMENT_CASES = [
    # the official settings, then the others with enough steps that solver error is below the sampling error
    ("vp", "dpm_solver", 50), ("discrete", "dpm_solver_pp", 50), ("vp", "euler_maruyama", 1000),
    ("vp", "dpm_solver_pp_2m", 50), ("discrete", "dpm_solver_pp_2m", 200), ("vp", "pf_ode_euler", 1000),
    ("discrete", "euler_maruyama", 1000), ("vp", "ddim", 200),
    # flow matching: SiT's SDE (250 steps) and ODE samplers, DPM-Solver++ on the flow path
    ("flow", "euler_maruyama", 250), ("flow", "heun", 50), ("flow", "euler", 200), ("flow", "dpm_solver_pp", 50),
    ("flow", "dpm_solver", 50), ("vp", "heun", 50),
]


@pytest.mark.parametrize("kind,sampler,steps", MOMENT_CASES)
def test_many_step_samples_have_the_data_moments(kind, sampler, steps):
    g = torch.Generator().manual_seed(3)
    dims, n = 4, 4000
    mix = {"mu": torch.tensor([[-0.6, -0.2, 0.1, -0.5], [0.4, 0.5, 0.7, 0.3]]),
           "sd": torch.tensor([[0.1, 0.2, 0.15, 0.3], [0.2, 0.1, 0.25, 0.1]]), "w": torch.tensor([0.3, 0.7])}
    if kind == "flow":
        s = FlowSchedule(Objective(prediction="velocity"))
        fn = exact_model(s, mix, "velocity")
    else:
        s = _schedule(kind)
        fn = noise_fn_for(s, make_net(kind, mix))
    x = torch.randn(n, dims, generator=g)
    torch.manual_seed(4)  # without generators, the SDE noise comes from the global RNG (per-sample: tested above)
    out = SAMPLERS[sampler](fn, x, s, steps=steps)
    w = mix["w"][:, None]
    mean = (w * mix["mu"]).sum(0)
    std = ((w * (mix["sd"] ** 2 + mix["mu"] ** 2)).sum(0) - mean ** 2).sqrt()
    # Standard error of the mean is about 0.45 / sqrt(4000) = 0.007; allow solver bias on top.
    assert (out.mean(0) - mean).abs().max() < 0.03, (out.mean(0), mean)
    assert (out.std(0) - std).abs().max() < 0.03, (out.std(0), std)
    # Both modes are populated in the right proportion (the dimension 0 modes at -0.6 and 0.4 are far apart).
    frac = (out[:, 0] > -0.1).float().mean().item()
    assert abs(frac - 0.7) < 0.03


# ---------------------------------------------------------------------------------------------------------------------
# Every Gaussian path: an exact predictor for any target, convergence orders, DPM-Solver++ on flow
# ---------------------------------------------------------------------------------------------------------------------

def mixture_posterior(x: torch.Tensor, a: float, s: float, mix: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(E[eps | x_t], E[x0 | x_t]) for x_t = a x0 + s eps on any Gaussian path, per dimension, with x0 drawn from
    the mixture sum_k w_k N(mu_k, sd_k^2); both in closed form (no division by a or s)."""
    xd = x.double()[:, None]
    var = a * a * mix["sd"].double() ** 2 + s * s
    diff = xd - a * mix["mu"].double()
    logp = torch.log(mix["w"].double()).reshape(1, -1, *[1] * (x.dim() - 1)) - 0.5 * torch.log(var) - diff ** 2 / (2 * var)
    r = torch.softmax(logp, dim=1)
    eps = (r * s * diff / var).sum(1)
    x0 = (r * (mix["mu"].double() + a * mix["sd"].double() ** 2 * diff / var)).sum(1)
    return eps.to(x.dtype), x0.to(x.dtype)


def exact_model(schedule, mix: dict, target: str):
    """The exact network of a target (eps, v, x0 or the flow velocity) in the schedule's sampler time."""
    def fn(x, t):
        a, s = schedule.coefficients(t)
        eps, x0 = mixture_posterior(x, a, s, mix)
        return {"eps": eps, "x0": x0, "v": a * eps - s * x0, "velocity": eps - x0}[target]
    return fn


MIX_1D = {"mu": torch.tensor([[-0.3], [0.3]]), "sd": torch.tensor([[0.5], [0.5]]), "w": torch.tensor([0.4, 0.6])}
MIX_4D = {"mu": torch.tensor([[-0.6, -0.2, 0.1, -0.5], [0.4, 0.5, 0.7, 0.3]]),
          "sd": torch.tensor([[0.1, 0.2, 0.15, 0.3], [0.2, 0.1, 0.25, 0.1]]), "w": torch.tensor([0.3, 0.7])}


def _flow(prediction="velocity"):
    return FlowSchedule(Objective(prediction=prediction))


def _slope(steps, errors) -> float:
    """The log-log slope of error against step size h = 1 / steps (the order of convergence)."""
    return float(np.polyfit(np.log(1.0 / np.asarray(steps)), np.log(np.asarray(errors)), 1)[0])


@pytest.mark.parametrize("kind", ["flow", "vp"])
def test_euler_converges_like_h_and_heun_like_h_squared(kind):
    """Toward a 2000-step Heun solution of the probability-flow ODE: Euler's error halves when the steps double,
    Heun's quarters (the log-log slopes of the mean error over 512 trajectories, 4 step counts each)."""
    s = _flow() if kind == "flow" else VPSchedule()
    fn = exact_model(s, MIX_1D, "velocity" if kind == "flow" else "eps")
    x = torch.randn(512, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ref = SAMPLERS["heun"](fn, x, s, steps=2000)
    euler_steps, heun_steps = (16, 32, 64, 128), (8, 16, 32, 64)
    e_euler = [(SAMPLERS["euler"](fn, x, s, steps=n) - ref).abs().mean().item() for n in euler_steps]
    e_heun = [(SAMPLERS["heun"](fn, x, s, steps=n) - ref).abs().mean().item() for n in heun_steps]
    assert 0.85 < _slope(euler_steps, e_euler) < 1.2, e_euler
    assert 1.65 < _slope(heun_steps, e_heun) < 2.2, e_heun
    assert e_heun[-1] < 0.1 * e_euler[-1]


def test_dpm_solver_pp_on_flow_at_20_steps_agrees_with_1000_step_heun():
    """DPM-Solver++ on the flow path (data prediction x0 = x - t v, lambda = log((1 - t) / t)) at 20 NFE lands within
    1e-3 (mean over 2000 trajectories; 3e-3 at worst) of a 1000-step Heun solution of the same ODE, and converges
    fast: at 40 NFE the mean error is over 4x smaller."""
    s = _flow()
    fn = exact_model(s, MIX_1D, "velocity")
    x = torch.randn(2000, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ref = SAMPLERS["heun"](fn, x, s, steps=1000)
    err = (dpm_solver_pp(fn, x, s, steps=20) - ref).abs()
    assert err.mean() < 1e-3 and err.max() < 3e-3, (err.mean(), err.max())
    assert (dpm_solver_pp(fn, x, s, steps=40) - ref).abs().mean() < err.mean() / 4


def test_ddim_on_flow_is_euler_on_the_velocity():
    """On the linear path DDIM's x_s = alpha_s x0 + sigma_s eps equals Euler's x + (s - t) v: the same numbers."""
    s = _flow()
    fn = exact_model(s, MIX_4D, "velocity")
    x = torch.randn(64, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    a = SAMPLERS["ddim"](fn, x, s, steps=25)
    b = SAMPLERS["euler"](fn, x, s, steps=25)
    assert (a - b).abs().max() < 1e-10


TARGETS = {"vp": ("eps", "v", "x0"), "discrete": ("eps", "v", "x0"), "flow": ("velocity", "eps", "x0")}


@pytest.mark.parametrize("kind", list(TARGETS))
def test_every_target_gives_the_same_samples_when_its_network_is_the_exact_conversion(kind):
    """Networks that predict v, x0 (or eps on flow) and are exact conversions of one another give every sampler of
    the formulation the same output as the first target (float64, to rounding)."""
    from uvit_cli.recipe import SAMPLERS_FOR

    make = {"vp": VPSchedule, "discrete": DiscreteSchedule, "flow": FlowSchedule}[kind]
    x = torch.randn(16, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    for name in SAMPLERS_FOR[kind]:
        outs = {}
        for target in TARGETS[kind]:
            s = make(objective=Objective(prediction=target))
            gens = [torch.Generator().manual_seed(100 + i) for i in range(len(x))]
            outs[target] = SAMPLERS[name](exact_model(s, MIX_4D, target), x, s, steps=12, generators=gens)
        first = outs[TARGETS[kind][0]]
        assert torch.isfinite(first).all()
        for target, out in outs.items():
            assert (out - first).abs().max() < 1e-8, (kind, name, target, (out - first).abs().max())


def test_evaluation_times_follow_the_plan_of_every_sampler():
    from uvit_cli.sampling import evaluation_times

    for schedule in (VPSchedule(), DiscreteSchedule(), _flow()):
        for name in SAMPLERS:
            for steps, order, fast in ((10, 3, True), (12, 2, False)):
                times = evaluation_times(name, schedule, steps=steps, order=order, fast=fast)
                assert len(times) == planned_nfe(name, steps, order, fast), (schedule.kind, name)
                assert times[0] == schedule.t_start and all(0 < t <= 1 for t in times)
