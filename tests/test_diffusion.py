"""The formulations (VP-SDE, discrete, flow): marginals, time conventions, forward noising, prediction targets,
time sampling, min-SNR weighting and the training loss."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from uvit_cli.build import build_schedule
from uvit_cli.diffusion import DiscreteSchedule, FlowSchedule, VPSchedule
from uvit_cli.objective import Objective
from uvit_cli.recipe import load_recipe


def test_vp_marginals_follow_the_linear_beta_sde():
    s = VPSchedule()
    t = torch.tensor([1e-4, 1e-3, 0.1, 0.5, 1.0], dtype=torch.float64)
    # alpha_t^2 = exp(-int_0^t beta) with beta(t) = 0.1 + 19.9 t (official sde.VPSDE.cum_alpha)
    cum_alpha = torch.exp(-(0.1 * t + 19.9 * t ** 2 / 2))
    assert torch.allclose(s.marginal_alpha(t) ** 2, cum_alpha, rtol=1e-12)
    assert torch.allclose(s.marginal_sigma(t) ** 2, 1 - cum_alpha, rtol=1e-9)
    assert torch.allclose(s.marginal_lambda(t), 0.5 * torch.log(cum_alpha / (1 - cum_alpha)), rtol=1e-9)


def test_discrete_knots_are_the_stable_diffusion_alphas_cumprod():
    s = DiscreteSchedule()
    betas = np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=np.float64) ** 2
    acp = np.cumprod(1 - betas)
    np.testing.assert_allclose(s.alphas_cumprod.numpy(), acp, rtol=1e-12)
    n = torch.tensor([1, 2, 500, 1000])
    np.testing.assert_allclose(s.marginal_alpha(n.double() / 1000).numpy() ** 2, acp[n.numpy() - 1], rtol=1e-12)
    # between knots log alpha is linear in t (DPM-Solver's discrete-time interpolation)
    mid = (s.marginal_log_alpha(0.5) + s.marginal_log_alpha(0.501)) / 2
    assert abs(float(s.marginal_log_alpha(0.5005)) - float(mid)) < 1e-12


@pytest.mark.parametrize("schedule,lo", [(VPSchedule(), 1e-4), (DiscreteSchedule(), 1e-3)])
def test_inverse_lambda_inverts_lambda(schedule, lo):
    t = torch.linspace(lo, 1.0, 97, dtype=torch.float64)
    back = schedule.inverse_lambda(schedule.marginal_lambda(t))
    assert torch.allclose(back, t, atol=1e-9)


@pytest.mark.parametrize("schedule", [VPSchedule(), DiscreteSchedule()])
def test_beta_is_minus_twice_the_slope_of_log_alpha(schedule):
    for t in (0.0123, 0.3337, 0.9071):  # away from knots, where the discrete slope jumps
        h = 1e-7
        slope = (float(schedule.marginal_log_alpha(t + h)) - float(schedule.marginal_log_alpha(t - h))) / (2 * h)
        assert math.isclose(float(schedule.beta(t)), -2 * slope, rel_tol=1e-5)


def test_time_conventions():
    vp, d = VPSchedule(), DiscreteSchedule()
    assert float(vp.net_time(0.5)) == pytest.approx(499.5)       # the network sees 999 t
    assert float(d.net_time(0.25)) == pytest.approx(250.0)       # the network sees N t (sampling)
    u = torch.rand(4096, generator=torch.Generator().manual_seed(0))
    t, net = d.times_from_uniform(u)
    assert net.dtype == torch.float32 and torch.equal(net, net.round())
    assert int(net.min()) == 1 and int(net.max()) == 1000        # n uniform in {1..N}
    assert torch.allclose(t * 1000, net.double())
    t, net = vp.times_from_uniform(u)
    assert 0 <= float(t.min()) and float(t.max()) < 1 and torch.allclose(net, 999 * t)


def test_defaults_end_times_follow_the_official_runs():
    assert VPSchedule().default_t_end("dpm_solver") == 1e-4
    assert VPSchedule().default_t_end("euler_maruyama") == 1e-3
    assert DiscreteSchedule().default_t_end("dpm_solver_pp") == 1e-3


@pytest.mark.parametrize("schedule", [VPSchedule(), DiscreteSchedule()])
def test_loss_noises_at_the_given_draws_and_is_a_per_sample_mean(schedule):
    g = torch.Generator().manual_seed(7)
    x0, noise, u = torch.randn(5, 3, 4, 4, generator=g), torch.randn(5, 3, 4, 4, generator=g), torch.rand(5, generator=g)
    y = torch.arange(5)
    seen = {}

    def model(xt, t_net, y=None):
        seen.update(xt=xt, t_net=t_net, y=y)
        return torch.full_like(xt, 0.1)

    loss = schedule.loss(model, x0, y, u, noise)
    assert loss.shape == (5,)
    t, t_net = schedule.times_from_uniform(u)
    a = schedule.marginal_alpha(t).float().view(-1, 1, 1, 1)
    s = schedule.marginal_sigma(t).float().view(-1, 1, 1, 1)
    assert torch.allclose(seen["xt"], a * x0 + s * noise, atol=1e-6)
    assert torch.equal(seen["t_net"], t_net) and torch.equal(seen["y"], y)
    assert torch.allclose(loss, ((noise - 0.1) ** 2).mean(dim=(1, 2, 3)), atol=1e-6)


def test_q_sample_variance_is_sigma_squared():
    s = VPSchedule()
    noise = torch.randn(20000, 1)
    xt = s.q_sample(torch.zeros(20000, 1), 0.3, noise)
    assert abs(xt.var().item() - float(s.marginal_sigma(0.3)) ** 2) < 0.02


def test_build_schedule_follows_the_recipe():
    vp = build_schedule(load_recipe("cifar10_uvit_s2"))
    assert isinstance(vp, VPSchedule) and (vp.beta_min, vp.beta_max) == (0.1, 20.0)
    d = build_schedule(load_recipe("imagenet256_uvit_h2"))
    assert isinstance(d, DiscreteSchedule) and d.num_timesteps == 1000
    d2 = build_schedule(load_recipe("coco_uvit_s", ["diffusion.num_timesteps=500"]))
    assert d2.num_timesteps == 500 and len(d2.betas) == 500


def test_training_inputs_map_uniform_draws_to_each_formulation():
    d, vp = DiscreteSchedule(), VPSchedule()
    u = torch.tensor([0.0, 0.0005, 0.001, 0.5, 0.99999])
    _, n = d.times_from_uniform(u)
    assert n.tolist() == [1.0, 1.0, 2.0, 501.0, 1000.0]
    x0, noise = torch.randn(5, 2, 4, 4), torch.randn(5, 2, 4, 4)
    for s in (d, vp):
        xt, t_net = s.training_inputs(x0, u, noise)
        t = t_net.double() / (1000 if s is d else 999)
        a = s.marginal_alpha(t).float().view(-1, 1, 1, 1)
        sg = s.marginal_sigma(t).float().view(-1, 1, 1, 1)
        assert torch.allclose(xt, a * x0 + sg * noise, atol=1e-5)
    assert torch.allclose(vp.training_inputs(x0, u, noise)[1], 999 * u)


# ---------------------------------------------------------------------------------------------------------------------
# Flow, prediction targets, time sampling, min-SNR
# ---------------------------------------------------------------------------------------------------------------------

def test_flow_path_marginals_and_time_convention():
    s = FlowSchedule()
    t = torch.tensor([1e-3, 0.1, 0.5, 0.9, 0.993], dtype=torch.float64)
    assert torch.allclose(s.marginal_alpha(t), 1 - t) and torch.allclose(s.marginal_sigma(t), t)
    assert torch.allclose(s.marginal_lambda(t), torch.log((1 - t) / t), atol=1e-12)
    assert torch.allclose(s.inverse_lambda(s.marginal_lambda(t)), t, atol=1e-12)
    assert float(s.net_time(0.5)) == pytest.approx(499.5)        # the network sees 999 t, like the VP-SDE
    u = torch.rand(64, generator=torch.Generator().manual_seed(0))
    tt, net = s.times_from_uniform(u)
    assert torch.equal(tt, u) and torch.allclose(net, 999 * u)
    # lambda is finite at both default ends (DPM-Solver steps in lambda), the same range as the VP-SDE's DPM-Solver
    vp_range = VPSchedule().marginal_lambda(torch.tensor([1.0, 1e-4]))
    flow_range = s.marginal_lambda(torch.tensor([s.t_start, s.default_t_end("dpm_solver")]))
    assert torch.allclose(flow_range, vp_range, atol=0.1)


@pytest.mark.parametrize("schedule", [VPSchedule(), DiscreteSchedule(), FlowSchedule()])
def test_marginal_derivatives_are_the_slopes_of_alpha_and_sigma(schedule):
    for t in (0.0123, 0.3337, 0.9071):
        h = 1e-6
        da, ds = schedule.marginal_derivatives(t)
        num_a = (float(schedule.marginal_alpha(t + h)) - float(schedule.marginal_alpha(t - h))) / (2 * h)
        num_s = (float(schedule.marginal_sigma(t + h)) - float(schedule.marginal_sigma(t - h))) / (2 * h)
        assert math.isclose(da, num_a, rel_tol=1e-5) and math.isclose(ds, num_s, rel_tol=1e-5)


PAIRS = [(VPSchedule, "eps"), (VPSchedule, "v"), (VPSchedule, "x0"), (DiscreteSchedule, "v"),
         (FlowSchedule, "velocity"), (FlowSchedule, "eps"), (FlowSchedule, "x0")]


@pytest.mark.parametrize("make,prediction", PAIRS, ids=lambda v: getattr(v, "__name__", v))
def test_each_target_trains_its_definition_and_converts_back_exactly(make, prediction):
    s = make(objective=Objective(prediction=prediction))
    g = torch.Generator().manual_seed(3)
    x0, noise = torch.randn(6, 2, 4, 4, generator=g, dtype=torch.float64), torch.randn(6, 2, 4, 4, generator=g,
                                                                                      dtype=torch.float64)
    t = 0.37
    a, sg = s.coefficients(t)
    want = {"eps": noise, "x0": x0, "v": a * noise - sg * x0, "velocity": noise - x0}[prediction]
    target = s.loss_target(x0, noise, torch.full((6,), t, dtype=torch.float64))
    assert torch.allclose(target, want, atol=1e-12)
    x = a * x0 + sg * noise
    assert torch.allclose(s.eps(target, x, t), noise, atol=1e-10)
    assert torch.allclose(s.x0(target, x, t), x0, atol=1e-10)
    # the probability-flow ODE's drift is the path's own velocity d alpha/dt x0 + d sigma/dt eps
    da, ds = s.marginal_derivatives(t)
    assert torch.allclose(s.pf_ode_drift(target, x, t), da * x0 + ds * noise, atol=1e-9)


@pytest.mark.parametrize("make,prediction", PAIRS, ids=lambda v: getattr(v, "__name__", v))
def test_min_snr_weight_is_min_snr_gamma_in_x0_units(make, prediction):
    """Hang et al. 2023: whatever the target, weight x |target error|^2 = min(SNR, gamma) x |x0 error|^2."""
    s = make(objective=Objective(prediction=prediction, loss_weighting="min_snr", min_snr_gamma=5.0))
    g = torch.Generator().manual_seed(4)
    x0, noise, err = (torch.randn(3, 8, generator=g, dtype=torch.float64) for _ in range(3))
    for t in (0.02, 0.2, 0.5, 0.9):
        a, sg = s.coefficients(t)
        x = a * x0 + sg * noise
        target = s.loss_target(x0, noise, torch.full((3,), t, dtype=torch.float64))
        x0_err = s.x0(target + 1e-3 * err, x, t) - x0
        w = float(s.loss_weight(torch.tensor([t], dtype=torch.float64)))
        lhs = w * (1e-3 * err).square().mean()
        rhs = min((a / sg) ** 2, 5.0) * x0_err.square().mean()
        assert math.isclose(float(lhs), float(rhs), rel_tol=1e-9), (prediction, t)


def test_min_snr_weights_are_finite_at_the_ends_of_the_path():
    for make, prediction in PAIRS:
        s = make(objective=Objective(prediction=prediction, loss_weighting="min_snr"))
        ends = [1e-3, 1.0] if make is DiscreteSchedule else [0.0, 1e-7, 0.999999, 1.0]  # discrete: t = n / N
        w = s.loss_weight(torch.tensor(ends, dtype=torch.float64))
        assert torch.isfinite(w).all() and (w >= 0).all(), (make.__name__, prediction, w)


def test_logit_normal_times_are_sigmoid_of_a_normal_quantile():
    from scipy.stats import norm

    obj = Objective(time_sampling="logit_normal", logit_mean=0.3, logit_std=0.8)
    u = torch.tensor([0.0, float(norm.cdf(-1.0)), 0.5, float(norm.cdf(2.0))])
    t = obj.draw(u)
    assert float(t[0]) == 0.0
    logit = torch.log(t[1:] / (1 - t[1:]))
    assert torch.allclose(logit, torch.tensor([0.3 - 0.8, 0.3, 0.3 + 1.6], dtype=torch.float64), atol=1e-6)
    # the stream's u stays the only randomness: the same u, the same time, for every formulation
    for s in (VPSchedule(objective=obj), DiscreteSchedule(objective=obj), FlowSchedule(obj)):
        a, _ = s.times_from_uniform(u)
        b, _ = s.times_from_uniform(u.clone())
        assert torch.equal(a, b)
    flow_t, _ = FlowSchedule(obj).times_from_uniform(u)
    assert torch.allclose(flow_t.double(), t, atol=1e-7)
    # uniform keeps the draw itself (the official runs' times, bit for bit)
    assert Objective().draw(u) is u


def test_min_snr_loss_is_the_weighted_plain_loss():
    g = torch.Generator().manual_seed(5)
    x0, noise, u = torch.randn(5, 1, 4, 4, generator=g), torch.randn(5, 1, 4, 4, generator=g), torch.rand(5, generator=g)

    def model(xt, t_net, y=None):
        return torch.full_like(xt, 0.2)

    plain = FlowSchedule().loss(model, x0, None, u, noise)
    weighted_schedule = FlowSchedule(Objective(prediction="velocity", loss_weighting="min_snr"))
    weighted = weighted_schedule.loss(model, x0, None, u, noise)
    t, _ = weighted_schedule.times_from_uniform(u)
    assert torch.allclose(weighted, plain * weighted_schedule.loss_weight(t).float(), atol=1e-7)
    assert torch.allclose(plain, ((0.2 - (noise - x0)) ** 2).mean(dim=(1, 2, 3)), atol=1e-6)


def test_build_schedule_maps_the_new_recipe_fields():
    flow = build_schedule(load_recipe("digits_flow_uvit_tiny"))
    assert isinstance(flow, FlowSchedule) and flow.target.name == "velocity"
    r = load_recipe("digits_uvit_tiny", ["diffusion.prediction=v", "train.time_sampling=logit_normal",
                                         "train.logit_std=0.5", "train.loss_weighting=min_snr", "train.min_snr_gamma=3"])
    s = build_schedule(r)
    assert s.target.name == "v" and s.objective == Objective("v", "logit_normal", 0.0, 0.5, "min_snr", 3.0)
    assert build_schedule(load_recipe("cifar10_uvit_s2")).objective == Objective()  # the official runs: unchanged
