"""The training suite: the training step itself (the recipe's loss, optimizer step and EMA), timed on synthetic
data of the recipe's shapes; and its scaling with batch size and token count.

MFU counts model FLOPs only: a training step is 3x the forward FLOPs (backward = 2x forward) whatever gradient
checkpointing recomputes, divided by the matmul peak measured in the same run on the same device.
"""

from __future__ import annotations

import contextlib
import copy
import types

import einops
import torch

from ..build import build_model, build_optimizer, build_schedule
from ..flops import example_inputs, forward_flops
from ..model import Attention
from ..recipe import Recipe, replace
from ..runtime import autocast
from ..train import ema_rate, optimizer_step, update_ema
from .timer import measure, row


def _naive_attention_forward(self: Attention, x: torch.Tensor) -> torch.Tensor:
    """Attention written out (softmax(QK^T / sqrt(d)) V), the straightforward way, for comparison."""
    q, k, v = einops.rearrange(self.qkv(x), "B L (K H D) -> K B H L D", K=3, H=self.num_heads)
    attn = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
    x = attn.softmax(dim=-1) @ v
    return self.proj(einops.rearrange(x, "B H L D -> B L (H D)"))


def use_naive_attention(model: torch.nn.Module) -> torch.nn.Module:
    """Swap every attention's forward for the written-out one (the CPU baseline)."""
    for m in model.modules():
        if isinstance(m, Attention):
            m.forward = types.MethodType(_naive_attention_forward, m)
    return model


def make_step(recipe: Recipe, *, batch: int, precision: str = "fp32", compile: bool = False,
              grad_checkpoint: bool = False, naive_attention: bool = False, device: str = "cpu",
              phases: bool = False):
    """(step, model): one training step (forward and loss, backward, clip and AdamW, EMA) exactly as ``train()``
    runs it, on synthetic data of the recipe's shapes; ``phases`` labels each part for the profiler."""
    dev = torch.device(device)
    recipe = replace(recipe, model={"grad_checkpoint": grad_checkpoint}, train={"precision": precision})
    torch.manual_seed(0)
    model = build_model(recipe).to(dev)
    if naive_attention:
        use_naive_attention(model)
    ema = copy.deepcopy(model).requires_grad_(False)
    opt, lr_schedule, scaler = build_optimizer(recipe, model, dev)
    diffusion = build_schedule(recipe)
    net = torch.compile(model) if compile else model
    x0, _, y = example_inputs(model, batch, device=dev)
    if y is not None and y.dtype == torch.long:
        y = torch.randint(model.num_classes, (batch,), device=dev)
    noise, u = torch.randn_like(x0), torch.rand(batch)  # u on the CPU, as the training stream gives it
    t = recipe.train
    label = torch.profiler.record_function if phases else (lambda name: contextlib.nullcontext())

    def step():
        with label("forward + loss"), autocast(dev, precision):
            loss = diffusion.loss(net, x0, y, u, noise).mean()
        with label("backward"):
            scaler.scale(loss).backward()
        with label("clip + optimizer"):
            optimizer_step(model, opt, lr_schedule, scaler, t.grad_clip)
        with label("ema"):
            update_ema(ema, model, ema_rate(t.ema_rate, 0, t.ema_warmup))

    return step, model


def bench_train(recipe: Recipe, *, batch: int, precision: str = "fp32", compile: bool = False,
                grad_checkpoint: bool = False, naive_attention: bool = False, device: str = "cpu",
                warmup: int = 2, iters: int = 5, repeats: int = 3, peak_tflops: float | None = None) -> dict:
    """Time :func:`make_step`: img/s, TFLOP/s, MFU against ``peak_tflops`` and (CUDA) peak memory."""
    dev = torch.device(device)
    step, model = make_step(recipe, batch=batch, precision=precision, compile=compile,
                            grad_checkpoint=grad_checkpoint, naive_attention=naive_attention, device=device)
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
    runs = measure(step, dev, warmup=warmup + (2 if compile else 0), iters=iters, repeats=repeats)
    flops = 3 * forward_flops(model, batch=1) * batch
    out = row(dev, precision, runs, batch, batch=batch, compile=compile, grad_checkpoint=grad_checkpoint,
              naive_attention=naive_attention)
    out["steps_per_s"] = 1 / out["sec_per_step"]
    out["tflops"] = flops / out["sec_per_step"] / 1e12
    out["mfu"] = out["tflops"] / peak_tflops if peak_tflops else None
    if dev.type == "cuda":
        out["peak_mem_gb"] = torch.cuda.max_memory_allocated(dev) / 2 ** 30
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
