"""The profile suite: where a training step's time goes, by phase (forward and loss, backward, optimizer, EMA) and
by operator (the PyTorch profiler's table of self time), for the recipe's model on synthetic data."""

from __future__ import annotations

import torch
from torch.profiler import ProfilerActivity, profile

from ..recipe import Recipe
from .timer import sync
from .train import make_step

PHASES = ("forward + loss", "backward", "clip + optimizer", "ema")


def _total(event, device: bool) -> float:
    """Inclusive time of a labelled phase in microseconds (device time on a GPU)."""
    if device:
        return getattr(event, "device_time_total", None) or getattr(event, "cuda_time_total", 0.0)
    return event.cpu_time_total


def _self(event, device: bool) -> float:
    """Self time of an operator in microseconds (device time on a GPU)."""
    if device:
        return getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0.0)
    return event.self_cpu_time_total


def profile_train(recipe: Recipe, *, batch: int, precision: str = "fp32", compile: bool = False,
                  device: str = "cpu", warmup: int = 3, steps: int = 5, top: int = 15) -> dict:
    """Profile ``steps`` training steps after ``warmup``: per-step milliseconds and shares of each phase, and the
    ``top`` operators by self time (CPU time on a CPU, kernel time on a GPU)."""
    dev = torch.device(device)
    step, _ = make_step(recipe, batch=batch, precision=precision, compile=compile, device=device, phases=True)
    for _ in range(warmup + (2 if compile else 0)):
        step()
    sync(dev)
    on_gpu = dev.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        sync(dev)
    events = prof.key_averages()
    phases = {e.key: _total(e, on_gpu) / steps / 1e3 for e in events if e.key in PHASES}
    phase_sum = sum(phases.values()) or 1.0
    ops = [e for e in events if e.key not in PHASES and _self(e, on_gpu) > 0]
    op_sum = sum(_self(e, on_gpu) for e in ops) or 1.0
    ops.sort(key=lambda e: _self(e, on_gpu), reverse=True)
    return {
        "precision": precision, "batch": batch, "compile": compile, "steps": steps,
        "time": "device (kernel) time" if on_gpu else "CPU time",
        "phases": [{"phase": p, "ms_per_step": phases.get(p, 0.0), "share": phases.get(p, 0.0) / phase_sum}
                   for p in PHASES],
        "ops": [{"op": e.key, "self_ms_per_step": _self(e, on_gpu) / steps / 1e3,
                 "share": _self(e, on_gpu) / op_sum, "calls_per_step": e.count / steps} for e in ops[:top]],
    }
