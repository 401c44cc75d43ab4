"""Diffusion formulations as Gaussian paths x_t = alpha_t x0 + sigma_t eps: time conventions, prediction targets,
the training loss, and the drift of the probability-flow ODE and of the reverse SDE.

Every formulation is a path on a sampler time t in [0, 1] (t = 1 is noise). Each class owns how that time is shown
to the network (``net_time``) and how training draws it, so no other module needs to know the conventions:

- :class:`VPSchedule` (Song et al. 2021, official ``sde.py``): variance-preserving, beta(t) = beta_min + t
  (beta_max - beta_min); training draws t ~ U[0, 1); the network sees 999 t.
- :class:`DiscreteSchedule` (Stable Diffusion, official ``train_ldm_discrete.py``): variance-preserving, N = 1000
  betas linspace(sqrt(0.00085), sqrt(0.012))^2; training draws n uniform in {1..N} and the network sees n. Samplers
  use t = n / N with log alpha_t piecewise linear in t between the knots (DPM-Solver's discrete schedule), and the
  network sees N t (the official ``eval_ldm_discrete.py``).
- :class:`FlowSchedule` (rectified flow, Liu et al. 2023; SiT's linear interpolant, Ma et al. 2024): alpha_t = 1 - t,
  sigma_t = t, not variance-preserving; training draws t ~ U[0, 1) (or logit-normal); the network sees 999 t, the
  VP-SDE's scale, which the U-ViT's sinusoidal time embedding was built for.

What the network predicts is a *target* (``objective.PREDICTIONS``, the one place that defines each): eps, v = alpha eps -
sigma x0 (Salimans & Ho 2022), x0, or the flow velocity eps - x0. A target defines the training target, the
conversion of a network output to the eps and x0 that samplers integrate, and its min-SNR weight (Hang et al. 2023).
Conversions go straight from the network's own target, never through another one: the flow's x0 = x - t v is exact
where x0 = (x - sigma eps) / alpha divides by alpha_t -> 0.

The samplers (``sampling.py``) use only the helpers below: alpha, sigma, lambda = log(alpha / sigma) and its
inverse, the target conversions, ``pf_ode_drift`` and ``reverse_sde``.
"""

from __future__ import annotations


import torch

from .objective import PREDICTIONS, EpsTarget, Objective, VelocityTarget
from .runtime import to_device

Number = float | torch.Tensor


def _as_f64(t: Number) -> torch.Tensor:
    return torch.as_tensor(t, dtype=torch.float64)


def _bcast(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A (B,) or scalar coefficient shaped to multiply x (B, ...), in x's dtype and device (cast first, so a float64
    coefficient computed on the CPU reaches the device as x's dtype)."""
    v = to_device(v, x.device, x.dtype)
    return v.reshape(-1, *([1] * (x.dim() - 1))) if v.dim() else v


# ---------------------------------------------------------------------------------------------------------------------
# Gaussian paths
# ---------------------------------------------------------------------------------------------------------------------

class NoiseSchedule:
    """A Gaussian path q(x_t | x0) = N(alpha_t x0, sigma_t^2 I) and its training objective.

    Subclasses give log alpha_t, log sigma_t, the inverse of lambda, d alpha / dt and d sigma / dt, and the time
    conventions; the rest (lambda, the loss, the ODE and SDE drifts) follows here.
    """

    kind = ""
    t_start = 1.0        # the sampler starts from pure noise at t = 1
    default_prediction = "eps"  # the target without an explicit objective (recipe.PREDICTIONS_FOR's first)

    def __init__(self, objective: Objective | None = None):
        self.objective = objective or Objective(prediction=self.default_prediction)
        self.target = PREDICTIONS[self.objective.prediction]

    # -- per-formulation conventions (overridden) -------------------------------------------------------------
    def marginal_log_alpha(self, t: Number) -> torch.Tensor:
        """log alpha_t (float64)."""
        raise NotImplementedError

    def marginal_log_sigma(self, t: Number) -> torch.Tensor:
        """log sigma_t (float64)."""
        raise NotImplementedError

    def inverse_lambda(self, lam: Number) -> torch.Tensor:
        """The time t whose half-logSNR lambda_t equals ``lam``."""
        raise NotImplementedError

    def marginal_derivatives(self, t: float) -> tuple[float, float]:
        """(d alpha_t / dt, d sigma_t / dt) at a sampler time."""
        raise NotImplementedError

    def sde_diffusion(self, t: float) -> float:
        """w(t): the variance rate of the reverse SDE the stochastic sampler integrates."""
        raise NotImplementedError

    def net_time(self, t: Number) -> torch.Tensor:
        """Sampler time t -> the time input the network was trained on (float64)."""
        raise NotImplementedError

    def times_from_uniform(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(t, network time) of the training time draw for uniform u in [0, 1), one per sample."""
        raise NotImplementedError

    def default_t_end(self, sampler: str) -> float:
        """The end time a sampler integrates to by default."""
        raise NotImplementedError

    def default_spacing(self, sampler: str) -> str:
        """The step spacing ("auto") a sampler uses by default on this path."""
        raise NotImplementedError

    # -- marginals --------------------------------------------------------------------------------------------
    def marginal_alpha(self, t: Number) -> torch.Tensor:
        return torch.exp(self.marginal_log_alpha(t))

    def marginal_sigma(self, t: Number) -> torch.Tensor:
        return torch.exp(self.marginal_log_sigma(t))

    def marginal_lambda(self, t: Number) -> torch.Tensor:
        """Half-logSNR lambda_t = log alpha_t - log sigma_t (decreasing in t)."""
        return self.marginal_log_alpha(t) - self.marginal_log_sigma(t)

    def coefficients(self, t: float) -> tuple[float, float]:
        """(alpha_t, sigma_t) as python floats."""
        return float(self.marginal_alpha(t)), float(self.marginal_sigma(t))

    # -- forward process and loss -----------------------------------------------------------------------------
    def q_sample(self, x0: torch.Tensor, t: Number, noise: torch.Tensor) -> torch.Tensor:
        """x_t = alpha_t x0 + sigma_t noise, for a scalar t or one t per sample (B,)."""
        return _bcast(self.marginal_alpha(t), x0) * x0 + _bcast(self.marginal_sigma(t), x0) * noise

    def training_inputs(self, x0: torch.Tensor, u: torch.Tensor, noise: torch.Tensor):
        """(x_t, network time) for given uniform time draws u (B,) and noise: what the training loop feeds the net.

        The times and coefficients are computed in float64 on the CPU (u stays there; it is B numbers) and reach
        x0's device as float32, so no device needs float64 (Apple MPS has none)."""
        t, t_net = self.times_from_uniform(u.detach().cpu())
        return self.q_sample(x0, t, noise), to_device(t_net, x0.device)

    def loss_target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the network is trained to output at times t (B,) (the noise itself for eps-prediction)."""
        if isinstance(self.target, EpsTarget):
            return noise
        return self.target.target(x0, noise, _bcast(self.marginal_alpha(t), x0), _bcast(self.marginal_sigma(t), x0))

    def loss_weight(self, t: torch.Tensor) -> torch.Tensor:
        """Per-sample min-SNR weight (float64, (B,)) for this target; SNR = (alpha_t / sigma_t)^2."""
        a, s = self.marginal_alpha(t), self.marginal_sigma(t)
        return self.target.min_snr_weight((a / s) ** 2, s, self.objective.min_snr_gamma)

    def loss(self, net, x0: torch.Tensor, y, u: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """The training loss: per-sample MSE to the target (B,), mean over C, H, W (official ``LSimple`` for eps),
        times the min-SNR weight when the objective asks for it.

        Every draw is given (the training stream's time draw u and noise), so a step is a function of its inputs;
        ``train()`` and ``uvit bench`` both call this.
        """
        # times and coefficients in float64 on the CPU (B numbers), float32 on x0's device (MPS has no float64)
        t, t_net = self.times_from_uniform(u.detach().cpu())
        out = net(self.q_sample(x0, t, noise), to_device(t_net, x0.device), y)
        per = (out.float() - self.loss_target(x0, noise, t).float()).square().flatten(1).mean(1)
        if self.objective.loss_weighting == "min_snr":
            per = per * to_device(self.loss_weight(t), per.device, per.dtype)
        return per

    # -- what the samplers integrate --------------------------------------------------------------------------
    def eps(self, out: torch.Tensor, x: torch.Tensor, t: float) -> torch.Tensor:
        """The noise a network output ``out`` at (x, t) predicts (``out`` itself for eps-prediction)."""
        if isinstance(self.target, EpsTarget):
            return out
        return self.target.eps(out, x, *self.coefficients(t))

    def x0(self, out: torch.Tensor, x: torch.Tensor, t: float) -> torch.Tensor:
        """The data a network output ``out`` at (x, t) predicts."""
        return self.target.x0(out, x, *self.coefficients(t))

    def pf_ode_drift(self, out: torch.Tensor, x: torch.Tensor, t: float) -> torch.Tensor:
        """dx/dt of the probability-flow ODE: d alpha/dt x0 + d sigma/dt eps (the path's own velocity)."""
        a, s = self.coefficients(t)
        da, ds = self.marginal_derivatives(t)
        return da * self.target.x0(out, x, a, s) + ds * self.target.eps(out, x, a, s)

    def reverse_sde(self, out: torch.Tensor, x: torch.Tensor, t: float) -> tuple[torch.Tensor, float]:
        """(drift, w) of the reverse-time SDE dx = [v - w/2 score] dt + sqrt(w) dw with score = -eps / sigma: the
        same marginals as the path for any w(t) (Song et al. 2021; SiT's diffusion coefficient)."""
        a, s = self.coefficients(t)
        w = self.sde_diffusion(t)
        return self.pf_ode_drift(out, x, t) + (w / (2.0 * s)) * self.target.eps(out, x, a, s), w


class VariancePreserving(NoiseSchedule):
    """alpha_t^2 + sigma_t^2 = 1: everything follows from log alpha_t and beta(t) = -2 d log alpha_t / dt; the ODE
    and SDE drifts in the official ``sde.py`` form f x - (g^2 / 2) score, with f = -beta / 2 and g^2 = beta."""

    def beta(self, t: Number) -> torch.Tensor:
        """beta(t) = -2 d log alpha_t / dt: the forward SDE is dx = -beta/2 x dt + sqrt(beta) dw."""
        raise NotImplementedError

    def marginal_sigma(self, t: Number) -> torch.Tensor:
        # sigma = sqrt(1 - alpha^2), via expm1 for accuracy near t = 0
        return torch.sqrt(-torch.expm1(2.0 * self.marginal_log_alpha(t)))

    def marginal_log_sigma(self, t: Number) -> torch.Tensor:
        return 0.5 * torch.log(-torch.expm1(2.0 * self.marginal_log_alpha(t)))

    def marginal_lambda(self, t: Number) -> torch.Tensor:
        log_alpha = self.marginal_log_alpha(t)
        return log_alpha - 0.5 * torch.log(-torch.expm1(2.0 * log_alpha))

    @staticmethod
    def _log_alpha_of_lambda(lam: torch.Tensor) -> torch.Tensor:
        # alpha^2 = sigmoid(2 lambda)  =>  log alpha = -log(1 + exp(-2 lambda)) / 2
        return -0.5 * torch.logaddexp(torch.zeros_like(lam), -2.0 * lam)

    def marginal_derivatives(self, t: float) -> tuple[float, float]:
        # d alpha / dt = -beta alpha / 2; sigma d sigma = -alpha d alpha
        beta = float(self.beta(t))
        a, s = self.coefficients(t)
        return -0.5 * beta * a, 0.5 * beta * a * a / s

    def sde_diffusion(self, t: float) -> float:
        return float(self.beta(t))  # g^2 of the forward SDE

    def pf_ode_drift(self, out, x, t):
        beta, sigma = float(self.beta(t)), float(self.marginal_sigma(t))
        return (-0.5 * beta) * x + (0.5 * beta / sigma) * self.eps(out, x, t)

    def reverse_sde(self, out, x, t):
        # drift = -beta/2 x - beta * score = -beta/2 x + (beta / sigma) eps (official sde.ReverseSDE)
        beta, sigma = float(self.beta(t)), float(self.marginal_sigma(t))
        return (-0.5 * beta) * x + (beta / sigma) * self.eps(out, x, t), beta


class VPSchedule(VariancePreserving):
    """Continuous VP-SDE with a linear beta(t) from beta_min to beta_max (Song et al. 2021; official ``sde.VPSDE``)."""

    kind = "vp"

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0, objective: Objective | None = None):
        super().__init__(objective)
        self.beta_min, self.beta_max = float(beta_min), float(beta_max)

    def marginal_log_alpha(self, t: Number) -> torch.Tensor:
        t = _as_f64(t)
        # log alpha_t = -1/2 int_0^t beta = -(beta_max - beta_min) t^2 / 4 - beta_min t / 2
        return -0.25 * t ** 2 * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min

    def beta(self, t: Number) -> torch.Tensor:
        return self.beta_min + _as_f64(t) * (self.beta_max - self.beta_min)

    def inverse_lambda(self, lam: Number) -> torch.Tensor:
        # Solve (b1 - b0) t^2 / 2 + b0 t = log(1 + exp(-2 lambda)) =: c for t >= 0, in the cancellation-free form
        # t = 2c / (b0 + sqrt(b0^2 + 2 (b1 - b0) c)).
        lam = _as_f64(lam)
        c = torch.logaddexp(torch.zeros_like(lam), -2.0 * lam)
        db = self.beta_max - self.beta_min
        return 2.0 * c / (self.beta_min + torch.sqrt(self.beta_min ** 2 + 2.0 * db * c))

    def net_time(self, t: Number) -> torch.Tensor:
        return 999.0 * _as_f64(t)  # official ScoreModel.predict: nnet(x, t * 999)

    def times_from_uniform(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = self.objective.draw(u).float()  # official sde.sample: t ~ U[0, 1)
        return t, 999.0 * t

    def default_t_end(self, sampler: str) -> float:
        # DPM-Solver ends at 1e-4 (official eval_ldm.py); the SDE/ODE Euler samplers at 1e-3 (official sde.py).
        return 1e-3 if sampler in ("euler_maruyama", "pf_ode_euler", "euler", "heun") else 1e-4

    def default_spacing(self, sampler: str) -> str:
        return "logSNR"  # official eval_ldm.py (DPM-Solver)

    def __repr__(self) -> str:
        return f"VPSchedule(beta_min={self.beta_min}, beta_max={self.beta_max}, {self.objective})"


class DiscreteSchedule(VariancePreserving):
    """Discrete Stable-Diffusion schedule: N betas = linspace(sqrt(beta_start), sqrt(beta_end), N)^2."""

    kind = "discrete"

    def __init__(self, beta_start: float = 0.00085, beta_end: float = 0.012, num_timesteps: int = 1000,
                 objective: Objective | None = None):
        super().__init__(objective)
        self.beta_start, self.beta_end, self.num_timesteps = float(beta_start), float(beta_end), int(num_timesteps)
        n = self.num_timesteps
        self.betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, n, dtype=torch.float64) ** 2
        # Knot n (1..N) sits at t_n = n / N and has log alpha_n = 1/2 sum_{i<=n} log(1 - beta_i).
        self.knots_t = torch.arange(1, n + 1, dtype=torch.float64) / n
        self.knots_log_alpha = 0.5 * torch.cumsum(torch.log1p(-self.betas), 0)

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        """DDPM's bar-alpha_n for n = 1..N (alpha_{t_n}^2)."""
        return torch.exp(2.0 * self.knots_log_alpha)

    @staticmethod
    def _interp(x: torch.Tensor, xp: torch.Tensor, fp: torch.Tensor) -> torch.Tensor:
        """Piecewise-linear f(x) through increasing knots xp, extended linearly beyond both ends."""
        xp, fp = xp.to(x.device), fp.to(x.device)  # the knots live on the CPU; x may be on a GPU
        i = torch.searchsorted(xp, x.contiguous()).clamp(1, len(xp) - 1)
        x0, x1, f0, f1 = xp[i - 1], xp[i], fp[i - 1], fp[i]
        return f0 + (x - x0) * (f1 - f0) / (x1 - x0)

    def marginal_log_alpha(self, t: Number) -> torch.Tensor:
        t = _as_f64(t)
        return self._interp(t.reshape(-1), self.knots_t, self.knots_log_alpha).reshape(t.shape)

    def beta(self, t: Number) -> torch.Tensor:
        # -2 x the slope of the segment that holds t (the outer segments beyond the knots)
        t = _as_f64(t)
        la, kt = self.knots_log_alpha.to(t.device), self.knots_t.to(t.device)
        i = torch.searchsorted(kt, t.reshape(-1).contiguous()).clamp(1, self.num_timesteps - 1)
        return (-2.0 * (la[i] - la[i - 1]) / (kt[i] - kt[i - 1])).reshape(t.shape)

    def inverse_lambda(self, lam: Number) -> torch.Tensor:
        lam = _as_f64(lam)
        log_alpha = self._log_alpha_of_lambda(lam)
        # log alpha decreases with t: interpolate on the flipped (increasing) knots.
        t = self._interp(log_alpha.reshape(-1), self.knots_log_alpha.flip(0), self.knots_t.flip(0))
        return t.reshape(lam.shape)

    def net_time(self, t: Number) -> torch.Tensor:
        return self.num_timesteps * _as_f64(t)  # official eval_ldm_discrete.py: t_continuous * N

    def times_from_uniform(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # n uniform in {1..N} (official Schedule.sample), t = n / N; a logit-normal draw picks n the same way
        n = (self.objective.draw(u).double() * self.num_timesteps).floor().clamp(0, self.num_timesteps - 1) + 1
        return n / self.num_timesteps, n.float()

    def default_t_end(self, sampler: str) -> float:
        return 1.0 / self.num_timesteps  # official: DPM-Solver++ from t = 1 to 1/N

    def default_spacing(self, sampler: str) -> str:
        return "time_uniform"  # official dpm_solver_pp.py (skip_type time_uniform)

    def __repr__(self) -> str:
        return (f"DiscreteSchedule(beta_start={self.beta_start}, beta_end={self.beta_end}, "
                f"num_timesteps={self.num_timesteps}, {self.objective})")


class FlowSchedule(NoiseSchedule):
    """The linear path x_t = (1 - t) x0 + t eps (rectified flow; SiT's linear interpolant), velocity eps - x0.

    Samplers run from t = 0.993 to 3e-3, the log-SNR range [-4.95, 5.81] of the official VP-SDE runs (DPM-Solver
    from t = 1 to 1e-4: [-5.01, 5.75]); lambda must be finite at both ends for DPM-Solver, and a wider range costs
    its lambda-uniform steps accuracy. Starting from N(0, I) at t = 0.993 is the same approximation the VP-SDE makes
    at t = 1 (alpha = 0.007 there). Euler-Maruyama uses SiT's default diffusion w(t) = 2 sigma_t, finite on the whole
    path, and also ends at 3e-3 with a noise-free step to 0 (SiT's noise-free last step from t = 0.04 leaves
    x0 - 0.04 eps even for the exact velocity: 4 % noise).
    """

    kind = "flow"
    t_start = 0.993
    default_prediction = "velocity"

    def marginal_log_alpha(self, t: Number) -> torch.Tensor:
        return torch.log1p(-_as_f64(t))

    def marginal_log_sigma(self, t: Number) -> torch.Tensor:
        return torch.log(_as_f64(t))

    def marginal_alpha(self, t: Number) -> torch.Tensor:
        return 1.0 - _as_f64(t)

    def marginal_sigma(self, t: Number) -> torch.Tensor:
        return _as_f64(t)

    def inverse_lambda(self, lam: Number) -> torch.Tensor:
        return torch.sigmoid(-_as_f64(lam))  # lambda = log((1 - t) / t)

    def marginal_derivatives(self, t: float) -> tuple[float, float]:
        return -1.0, 1.0

    def sde_diffusion(self, t: float) -> float:
        return 2.0 * t  # SiT's default diffusion form "sigma" (norm 1)

    def pf_ode_drift(self, out, x, t):
        if isinstance(self.target, VelocityTarget):
            return out  # the network's own output is the ODE's velocity
        return super().pf_ode_drift(out, x, t)

    def net_time(self, t: Number) -> torch.Tensor:
        return 999.0 * _as_f64(t)

    def times_from_uniform(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = self.objective.draw(u).float()
        return t, 999.0 * t

    def default_t_end(self, sampler: str) -> float:
        return 3e-3  # every sampler, Euler-Maruyama included (its noise-free last step then leaves 0.003 eps)

    def default_spacing(self, sampler: str) -> str:
        # DPM-Solver steps in lambda (an exponential integrator); Euler / Heun / DDIM in t, like SiT's samplers
        return "logSNR" if sampler.startswith("dpm_solver") else "time_uniform"

    def __repr__(self) -> str:
        return f"FlowSchedule({self.objective})"
