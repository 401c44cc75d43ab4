"""Devices without the hardware: --device auto picks CUDA, then Apple MPS, then the CPU; missing devices and
precisions a device cannot run are refused; and no float64 tensor ever reaches a non-CPU device in the sampling or
training path (MPS has no float64), checked on the meta device with a dispatch mode that fails on one."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import uvit_cli.runtime as runtime
from uvit_cli.build import build_model, build_sampler, build_schedule
from uvit_cli.errors import UvitError
from uvit_cli.generate import initial_noise
from uvit_cli.noise_predictor import NoisePredictor
from uvit_cli.recipe import Sampler, choices, load_recipe


def _machine(monkeypatch, cuda: int = 0, mps: bool = False, bf16: bool = True, macos14: bool = True):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Tesla V100-SXM2-16GB")
    monkeypatch.setattr(runtime, "mps_available", lambda: mps)
    monkeypatch.setattr(torch.backends.mps, "is_macos_or_newer", lambda major, minor: macos14)


def test_auto_picks_cuda_then_mps_then_cpu(monkeypatch):
    _machine(monkeypatch, cuda=2, mps=True)
    assert runtime.resolve_device("auto", local_rank=1) == torch.device("cuda", 1)   # torchrun's LOCAL_RANK
    _machine(monkeypatch, cuda=0, mps=True)
    assert runtime.resolve_device("auto") == torch.device("mps")
    _machine(monkeypatch, cuda=0, mps=False)
    assert runtime.resolve_device("auto") == torch.device("cpu")


def test_a_missing_device_or_impossible_precision_is_refused_with_the_fix(monkeypatch):
    _machine(monkeypatch, cuda=0, mps=False)
    with pytest.raises(UvitError, match="no usable CUDA GPU.*use --device cpu"):
        runtime.resolve_device("cuda")
    with pytest.raises(UvitError, match="Metal backend is not available"):
        runtime.resolve_device("mps")
    with pytest.raises(UvitError, match="PyTorch calls GPUs cuda"):
        runtime.resolve_device("gpu")
    _machine(monkeypatch, cuda=1)
    with pytest.raises(UvitError, match="GPU 3 does not exist"):
        runtime.resolve_device("cuda:3")
    _machine(monkeypatch, cuda=1, bf16=False)
    with pytest.raises(UvitError, match="V100.*has no bfloat16; use fp16 or fp32"):
        runtime.check_precision("cuda:0", "bf16")
    runtime.check_precision("cuda:0", "fp16")
    _machine(monkeypatch, mps=True, macos14=False)
    with pytest.raises(UvitError, match="bfloat16 from macOS 14"):
        runtime.check_precision("mps", "bf16")
    runtime.check_precision("mps", "fp16")
    _machine(monkeypatch, mps=True, macos14=True)
    runtime.check_precision("mps", "bf16")


def test_training_refuses_a_precision_the_device_cannot_run_before_any_work(tmp_path, monkeypatch):
    import uvit_cli.train as T

    seen = []

    def refuse(dev, precision):
        seen.append((str(dev), precision))
        raise UvitError(f"no {precision} on {dev}")

    monkeypatch.setattr(T, "check_precision", refuse)
    with pytest.raises(UvitError, match="no bf16 on cpu"):
        T.train(load_recipe("digits_uvit_tiny", ["train.precision=bf16", "train.steps=1"]), tmp_path / "r",
                device="cpu")
    assert seen == [("cpu", "bf16")] and not (tmp_path / "r").exists()


class NoFloat64OffTheCPU(TorchDispatchMode):
    """Fails on any operation that takes or makes a float64 tensor on a device other than the CPU."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten((args, kwargs, out))[0]:
            if isinstance(t, torch.Tensor) and t.dtype == torch.float64 and t.device.type != "cpu":
                raise AssertionError(f"{func} has a float64 tensor on {t.device}")
        return out


def test_the_guard_catches_a_float64_tensor_on_a_device():
    with NoFloat64OffTheCPU(), pytest.raises(AssertionError, match="float64 tensor on meta"):
        torch.arange(3, dtype=torch.float64).to("meta")
    with NoFloat64OffTheCPU(), pytest.raises(AssertionError, match="float64 tensor on meta"):
        torch.ones(2, device="meta").double()
    with NoFloat64OffTheCPU():
        torch.ones(2, dtype=torch.float64).float().to("meta")           # the rule: cast on the CPU, then move


TINY = ["model.num_layers=3", "model.embed_dim=32", "model.num_heads=2", "sample.steps=6"]


@pytest.mark.parametrize("formulation", ["vp", "discrete"])
def test_no_float64_reaches_the_device_when_sampling_or_training(formulation):
    """Every sampler (guided) and a training step (loss, backward, AdamW, EMA) with the model and images on the meta
    device: the schedules' float64 math stays on the CPU and only float32 moves."""
    from uvit_cli.train import optimizer_step, update_ema

    dev = torch.device("meta")
    base = load_recipe("digits_uvit_tiny", [*TINY, f"diffusion.formulation={formulation}"])
    model = build_model(base).to(dev).eval()
    schedule = build_schedule(base)
    cond = torch.tensor([1, 2]).to(dev)
    with NoFloat64OffTheCPU():
        for sampler in choices(Sampler):
            recipe = load_recipe("digits_uvit_tiny", [*TINY, f"diffusion.formulation={formulation}",
                                                      f"sample.sampler={sampler}"])
            fn, kwargs = build_sampler(recipe)
            x, gens = initial_noise([0, 1], (1, 8, 8))
            eps = NoisePredictor(model, schedule, cond, cfg_scale=2.0, null_cond=model.null_class_id)
            z = fn(eps, x.to(dev), schedule, generators=gens, **kwargs)
            assert z.device == dev and z.dtype == torch.float32 and eps.nfe > 0

        model.train()
        ema = build_model(base).to(dev).requires_grad_(False)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
        scaler = torch.amp.GradScaler("cpu", enabled=False)
        x0, noise, u = torch.randn(4, 1, 8, 8).to(dev), torch.randn(4, 1, 8, 8).to(dev), torch.rand(4)
        loss = schedule.loss(model, x0, torch.tensor([0, 1, 2, 10]).to(dev), u, noise).mean()
        loss.backward()
        optimizer_step(model, opt, sched, scaler, grad_clip=1.0)
        update_ema(ema, model, 0.999)
        assert loss.device == dev and loss.dtype == torch.float32


def test_the_training_inputs_are_the_float64_math_rounded_once():
    """Computing the coefficients on the CPU and moving float32 gives what the float64 formula gives, rounded."""
    for formulation in ("vp", "discrete"):
        schedule = build_schedule(load_recipe("digits_uvit_tiny", [f"diffusion.formulation={formulation}"]))
        torch.manual_seed(0)
        x0, noise, u = torch.randn(16, 1, 8, 8), torch.randn(16, 1, 8, 8), torch.rand(16)
        x_t, t_net = schedule.training_inputs(x0, u, noise)
        t, want_net = schedule.times_from_uniform(u)
        a, s = schedule.marginal_alpha(t).float(), schedule.marginal_sigma(t).float()
        torch.testing.assert_close(x_t, a[:, None, None, None] * x0 + s[:, None, None, None] * noise, atol=0, rtol=0)
        assert t_net.dtype == torch.float32 and torch.equal(t_net, want_net.float())
