"""Throughput, model FLOPs utilisation and memory, measured on the current device (warm-up, then medians).

MFU counts model FLOPs only: a training step is 3x the forward FLOPs (backward = 2x forward) whatever gradient
checkpointing recomputes, divided by the matmul peak measured in the same run on the same device.
"""

from __future__ import annotations

import copy
import logging
import statistics
import time
import types
from contextlib import nullcontext

import einops
import torch

from .build import build_model, build_schedule
from .flops import example_inputs, forward_flops
from .model import Attention
from .recipe import Recipe, replace
from .train import AUTOCAST, training_loss, update_ema

log = logging.getLogger(__name__)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, warmup: int, iters: int, repeats: int) -> list[float]:
    """Seconds per call of fn: ``repeats`` measurements, each the mean over ``iters`` calls after ``warmup``."""
    for _ in range(warmup):
        fn()
    _sync(device)
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        _sync(device)
        out.append((time.perf_counter() - t0) / iters)
    return out


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int | None = None, repeats: int = 5) -> float:
    """The device's own dense matmul rate (TFLOP/s) for square n x n products: the MFU denominator."""
    n = n or (8192 if device.type == "cuda" else 1024)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    iters = 20 if device.type == "cuda" else 5
    secs = statistics.median(timed(lambda: a @ b, device, warmup=3, iters=iters, repeats=repeats))
    return 2 * n ** 3 / secs / 1e12


def _naive_attention_forward(self: Attention, x: torch.Tensor) -> torch.Tensor:
    """Attention written out (softmax(QK^T / sqrt(d)) V), the straightforward way, for comparison."""
    q, k, v = einops.rearrange(self.qkv(x), "B L (K H D) -> K B H L D", K=3, H=self.num_heads)
    attn = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
    x = attn.softmax(dim=-1) @ v
    return self.proj(einops.rearrange(x, "B H L D -> B L (H D)"))


def use_naive_attention(model: torch.nn.Module) -> torch.nn.Module:
    for m in model.modules():
        if isinstance(m, Attention):
            m.forward = types.MethodType(_naive_attention_forward, m)
    return model


def bench_train(recipe: Recipe, *, batch: int, precision: str = "fp32", compile: bool = False,
                grad_checkpoint: bool = False, naive_attention: bool = False, device: str = "cpu",
                warmup: int = 2, iters: int = 5, repeats: int = 3) -> dict:
    """A full training step (forward, loss, backward, clip, AdamW, EMA) on synthetic data of the recipe's shapes."""
    dev = torch.device(device)
    recipe = replace(recipe, model={"grad_checkpoint": grad_checkpoint})
    torch.manual_seed(0)
    model = build_model(recipe).to(dev)
    if naive_attention:
        use_naive_attention(model)
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=recipe.train.betas, weight_decay=0.03,
                            fused=dev.type == "cuda")
    schedule = build_schedule(recipe)
    net = torch.compile(model) if compile else model
    x0, _, y = example_inputs(model, batch, device=dev)
    if y is not None and y.dtype == torch.long:
        y = torch.randint(model.num_classes, (batch,), device=dev)
    noise, u = torch.randn_like(x0), torch.rand(batch, device=dev)
    amp = AUTOCAST[precision]
    ctx = (lambda: torch.autocast(dev.type, dtype=amp)) if amp is not None else nullcontext
    scaler = torch.amp.GradScaler(dev.type, enabled=precision == "fp16")

    def step():
        with ctx():
            loss = training_loss(schedule, net, x0, y, u, noise).mean()
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf"))
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        update_ema(ema, model, 0.9999)

    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
    secs = timed(step, dev, warmup=warmup + (2 if compile else 0), iters=iters, repeats=repeats)
    med = statistics.median(secs)
    flops = 3 * forward_flops(model, batch=1) * batch
    out = {"batch": batch, "precision": precision, "compile": compile, "grad_checkpoint": grad_checkpoint,
           "naive_attention": naive_attention, "sec_per_step": med, "steps_per_s": 1 / med,
           "img_per_s": batch / med, "tflops": flops / med / 1e12, "runs": secs}
    if dev.type == "cuda":
        out["peak_mem_gb"] = torch.cuda.max_memory_allocated(dev) / 2 ** 30
    del model, ema, opt, net
    return out


def bench_scaling(recipe: Recipe, *, batches=(), patch_sizes=(), precision: str = "fp32", device: str = "cpu",
                  warmup: int = 1, iters: int = 3, repeats: int = 3) -> list[dict]:
    """img/s (and GPU memory) against batch size, and against token count through the patch size."""
    rows = []
    for b in batches:
        r = bench_train(recipe, batch=b, precision=precision, device=device, warmup=warmup, iters=iters,
                        repeats=repeats)
        rows.append({"axis": "batch", "tokens": (recipe.model.img_size // recipe.model.patch_size) ** 2, **r})
    base = max(batches) if batches else 8
    for p in patch_sizes:
        if recipe.model.img_size % p:
            continue
        rp = replace(recipe, model={"patch_size": p})
        r = bench_train(rp, batch=base, precision=precision, device=device, warmup=warmup, iters=iters,
                        repeats=repeats)
        rows.append({"axis": "patch_size", "patch_size": p, "tokens": (recipe.model.img_size // p) ** 2, **r})
    return rows


def machine() -> dict:
    """What ran the benchmark, for the record."""
    import platform

    cpu = platform.processor() or platform.machine()
    try:                                          # Linux names the CPU model here; elsewhere keep the platform's
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    info = {"torch": torch.__version__, "python": platform.python_version(), "cpu": cpu,
            "threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info
