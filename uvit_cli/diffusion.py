"""The two diffusion formulations of the official U-ViT runs: forward noising, the training loss, time conventions.

Both are variance-preserving: q(x_t | x_0) = N(alpha_t x_0, sigma_t^2 I) with alpha_t^2 + sigma_t^2 = 1, on a
continuous sampler time t in (0, 1]. Each schedule owns how that time is shown to the network (``net_time``) and
how training draws it, so no other module needs to know the conventions:

- :class:`VPSchedule` (Song et al. 2021, official ``sde.py``): beta(t) = beta_min + t (beta_max - beta_min);
  training draws t ~ U[0, 1); the network sees 999 t.
- :class:`DiscreteSchedule` (Stable Diffusion, official ``train_ldm_discrete.py``): N = 1000 betas
  linspace(sqrt(0.00085), sqrt(0.012))^2; training draws n uniform in {1..N} and the network sees n. Samplers use
  t = n / N with log alpha_t piecewise linear in t between the knots (DPM-Solver's discrete schedule), and the network
  sees N t (the official ``eval_ldm_discrete.py``).

The samplers (``sampling.py``) use only the marginal helpers below (log alpha, alpha, sigma, lambda = log(alpha /
sigma), its inverse, and beta(t) = -2 d log alpha / dt for the SDE samplers).
"""

from __future__ import annotations

import torch

from .runtime import to_device

Number = float | torch.Tensor


def _as_f64(t: Number) -> torch.Tensor:
    return torch.as_tensor(t, dtype=torch.float64)


def _bcast(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A (B,) or scalar coefficient shaped to multiply x (B, ...), in x's dtype and device (cast first, so a float64
    coefficient computed on the CPU reaches the device as x's dtype)."""
    v = to_device(v, x.device, x.dtype)
    return v.reshape(-1, *([1] * (x.dim() - 1))) if v.dim() else v


class NoiseSchedule:
    """Shared VP algebra: everything follows from ``marginal_log_alpha(t)`` and ``beta(t)``."""

    kind = ""
    t_start = 1.0        # the sampler starts from pure noise at t = 1

    # -- per-formulation conventions (overridden) -------------------------------------------------------------
    def marginal_log_alpha(self, t: Number) -> torch.Tensor:
        """log alpha_t (float64)."""
        raise NotImplementedError

    def beta(self, t: Number) -> torch.Tensor:
        """beta(t) = -2 d log alpha_t / dt: the forward SDE is dx = -beta/2 x dt + sqrt(beta) dw."""
        raise NotImplementedError

    def inverse_lambda(self, lam: Number) -> torch.Tensor:
        """The time t whose half-logSNR lambda_t equals ``lam``."""
        raise NotImplementedError

    def net_time(self, t: Number) -> torch.Tensor:
        """Sampler time t -> the time input the network was trained on (float64)."""
        raise NotImplementedError

    def times_from_uniform(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(t, network time) of the training time draw for uniform u in [0, 1), one per sample."""
        raise NotImplementedError

    def default_t_end(self, sampler: str) -> float:
        """The end time the official runs sample to."""
        raise NotImplementedError

    # -- marginals --------------------------------------------------------------------------------------------
    def marginal_alpha(self, t: Number) -> torch.Tensor:
        return torch.exp(self.marginal_log_alpha(t))

    def marginal_sigma(self, t: Number) -> torch.Tensor:
        # sigma = sqrt(1 - alpha^2), via expm1 for accuracy near t = 0
        return torch.sqrt(-torch.expm1(2.0 * self.marginal_log_alpha(t)))

    def marginal_lambda(self, t: Number) -> torch.Tensor:
        """Half-logSNR lambda_t = log alpha_t - log sigma_t (decreasing in t)."""
        log_alpha = self.marginal_log_alpha(t)
        return log_alpha - 0.5 * torch.log(-torch.expm1(2.0 * log_alpha))

    @staticmethod
    def _log_alpha_of_lambda(lam: torch.Tensor) -> torch.Tensor:
        # alpha^2 = sigmoid(2 lambda)  =>  log alpha = -log(1 + exp(-2 lambda)) / 2
        return -0.5 * torch.logaddexp(torch.zeros_like(lam), -2.0 * lam)

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

    def loss(self, net, x0: torch.Tensor, y, u: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """The training loss: per-sample noise-prediction MSE (B,), mean over C, H, W (official ``LSimple``).

        Every draw is given (the training stream's time draw u and noise), so a step is a function of its inputs;
        ``train()`` and ``uvit bench`` both call this.
        """
        x_t, t_net = self.training_inputs(x0, u, noise)
        eps = net(x_t, t_net, y)
        return (eps.float() - noise.float()).square().flatten(1).mean(1)


class VPSchedule(NoiseSchedule):
    """Continuous VP-SDE with a linear beta(t) from beta_min to beta_max (Song et al. 2021; official ``sde.VPSDE``)."""

    kind = "vp"

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0):
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
        t = u.float()  # official sde.sample: t ~ U[0, 1)
        return t, 999.0 * t

    def default_t_end(self, sampler: str) -> float:
        # DPM-Solver ends at 1e-4 (official eval_ldm.py); the SDE/ODE Euler samplers at 1e-3 (official sde.py).
        return 1e-3 if sampler in ("euler_maruyama", "pf_ode_euler") else 1e-4

    def __repr__(self) -> str:
        return f"VPSchedule(beta_min={self.beta_min}, beta_max={self.beta_max})"


class DiscreteSchedule(NoiseSchedule):
    """Discrete Stable-Diffusion schedule: N betas = linspace(sqrt(beta_start), sqrt(beta_end), N)^2."""

    kind = "discrete"

    def __init__(self, beta_start: float = 0.00085, beta_end: float = 0.012, num_timesteps: int = 1000):
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
        # n uniform in {1..N} (official Schedule.sample), t = n / N
        n = (u.double() * self.num_timesteps).floor().clamp(0, self.num_timesteps - 1) + 1
        return n / self.num_timesteps, n.float()

    def default_t_end(self, sampler: str) -> float:
        return 1.0 / self.num_timesteps  # official: DPM-Solver++ from t = 1 to 1/N

    def __repr__(self) -> str:
        return (f"DiscreteSchedule(beta_start={self.beta_start}, beta_end={self.beta_end}, "
                f"num_timesteps={self.num_timesteps})")
