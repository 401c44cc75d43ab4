"""The two formulations: marginals, time conventions, forward noising and the training loss."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from uvit_cli.build import build_schedule
from uvit_cli.diffusion import DiscreteSchedule, VPSchedule
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
