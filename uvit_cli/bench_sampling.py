"""Benchmark: guided sampling with one batched bf16 forward vs. the straightforward two fp32 forwards per step,
and the VAE decode that turns sampled latents into images.

Both paths run the same sampler from the same initial noise for the same NFE; the result says how much faster the
batched bf16 path is and how far its images are from the fp32 ones (bf16 keeps 8 significant bits: 2^-8 = 0.4%).
``uvit bench`` calls :func:`bench_guided_sampling`.
"""

from __future__ import annotations

import logging
import time

import torch

from .build import build_model, build_schedule
from .generate import quantize
from .guidance import ModelNoiseFn
from .recipe import Recipe, load_recipe, replace
from .sampling import get_sampler, planned_nfe

log = logging.getLogger(__name__)


def guided_bench_recipe() -> Recipe:
    """The CIFAR10 U-ViT-S/2 network (32px, 13 layers, conv) with a 10-class token and a null row for guidance."""
    r = load_recipe("cifar10_uvit_s2")
    return replace(r, model={"num_classes": 10, "null_class": True}, train={"p_uncond": 0.1},
                   sample={"sampler": "dpm_solver", "cfg_scale": 1.5})


def bench_guided_sampling(recipe: Recipe | None = None, *, batch: int = 2, steps: int = 6, cfg_scale: float = 1.5,
                          device: str = "cpu", repeats: int = 3, seed: int = 0, attribution: bool = True) -> dict:
    """Time ``steps`` sampler steps of guided sampling both ways at equal NFE; returns timings, speedup and agreement.

    baseline: cond and uncond as two separate fp32 forwards per evaluation. fast: one batched forward of
    [cond; uncond] under bf16 autocast. With ``attribution`` also times the batched fp32 forward alone.
    Timings are the minimum over ``repeats`` alternating runs (robust to other load on shared CPUs).
    """
    recipe = recipe or guided_bench_recipe()
    device = torch.device(device)
    torch.manual_seed(seed)
    model = build_model(recipe).eval().to(device)
    schedule = build_schedule(recipe)
    sample_fn = get_sampler(recipe.sample.sampler)
    g = torch.Generator().manual_seed(seed)
    shape = (batch, recipe.model.in_chans, recipe.model.img_size, recipe.model.img_size)
    x_T = torch.randn(shape, generator=g).to(device)
    cond = torch.randint(0, recipe.model.num_classes, (batch,), generator=g).to(device)
    null = model.null_class_id
    if null is None:
        raise ValueError("the benchmark needs a class model with a null class (guidance)")
    paths = {"baseline": ("fp32", False), "fast": ("bf16", True)}
    if attribution:
        paths["batched_fp32"] = ("fp32", True)

    def run(name: str) -> tuple[torch.Tensor, float]:
        precision, batched = paths[name]
        fn = ModelNoiseFn(model, schedule, cond, cfg_scale=cfg_scale, null_cond=null, forward_batch=batch,
                          precision=precision, batched_guidance=batched)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        with torch.no_grad():
            x = sample_fn(fn, x_T.clone(), schedule, steps=steps, order=recipe.sample.order, fast=recipe.sample.fast,
                          spacing=recipe.sample.spacing)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return x, time.perf_counter() - t0

    # Warm up every path once (kernel selection, autocast weight casts), then alternate timed runs.
    with torch.no_grad():
        for name in paths:
            precision, batched = paths[name]
            ModelNoiseFn(model, schedule, cond, cfg_scale=cfg_scale, null_cond=null, forward_batch=batch,
                         precision=precision, batched_guidance=batched)(x_T, 0.5)
    times = {name: [] for name in paths}
    outs = {}
    for _ in range(repeats):
        for name in paths:
            outs[name], dt = run(name)
            times[name].append(dt)
    best = {name: min(v) for name, v in times.items()}

    # Agreement: one evaluation's relative error, and the final images (in [-1, 1] and as uint8).
    with torch.no_grad():
        e32 = ModelNoiseFn(model, schedule, cond, cfg_scale=cfg_scale, null_cond=null, forward_batch=batch,
                           batched_guidance=False)(x_T, 0.5)
        e16 = ModelNoiseFn(model, schedule, cond, cfg_scale=cfg_scale, null_cond=null, forward_batch=batch,
                           precision="bf16")(x_T, 0.5)
    a, b = outs["baseline"].float().cpu(), outs["fast"].float().cpu()
    qa, qb = quantize(a).int(), quantize(b).int()
    result = {
        "device": str(device), "model": recipe.model.size or "custom", "img_size": recipe.model.img_size,
        "batch": batch, "sampler": recipe.sample.sampler, "steps": steps,
        "nfe": planned_nfe(recipe.sample.sampler, steps, recipe.sample.order, recipe.sample.fast),
        "cfg_scale": cfg_scale, "threads": torch.get_num_threads(),
        "baseline_s": best["baseline"], "fast_s": best["fast"], "speedup": best["baseline"] / best["fast"],
        # relative L2 errors of the bf16 path: one guided evaluation, and the final samples
        "eps_rel_err": float((e16 - e32).norm() / e32.norm()), "sample_rel_err": float((b - a).norm() / a.norm()),
        "bf16_rel_precision": 2.0 ** -8,
        # uint8 image differences (only telling for trained weights: a random network's samples saturate)
        "uint8_max_diff": int((qa - qb).abs().max()), "uint8_mean_diff": float((qa - qb).abs().float().mean()),
    }
    if attribution:
        result["batched_fp32_s"] = best["batched_fp32"]
    log.info("guided sampling: baseline %.2fs, batched bf16 %.2fs (%.2fx)", best["baseline"], best["fast"],
             result["speedup"])
    return result


def bench_vae_decode(vae="sd", *, latent_size: int = 32, batch: int = 1, precisions=("fp32", "bf16"),
                     device: str = "cpu", repeats: int = 3) -> list[dict]:
    """Images/s of the VAE decoder on ``latent_size``^2 latents (32 -> 256 px for the SD VAE), per precision.

    ``vae``: "sd" (the Stable Diffusion VAE architecture with random weights: speed does not depend on the values)
    or an :class:`~uvit_cli.autoencoder.Autoencoder`. Median of ``repeats`` timed decodes after one warm-up.
    """
    import statistics
    from contextlib import nullcontext

    from .autoencoder import SD_VAE_CONFIG, Autoencoder
    from .bench import timed
    from .train import AUTOCAST

    dev = torch.device(device)
    if isinstance(vae, str):
        if vae != "sd":
            raise ValueError(f"unknown VAE {vae!r}: pass 'sd' or an Autoencoder")
        torch.manual_seed(0)
        vae = Autoencoder.from_config(SD_VAE_CONFIG, 0.18215, name="sd (random weights)")
    vae.vae.to(dev)
    z = torch.randn(batch, vae.latent_channels, latent_size, latent_size, generator=torch.Generator().manual_seed(0))
    z = z.to(dev)
    rows = []
    for precision in precisions:
        amp = AUTOCAST[precision]
        ctx = (lambda: torch.autocast(dev.type, dtype=amp)) if amp is not None else nullcontext

        def decode():
            with ctx():
                return vae.decode(z)

        secs = timed(decode, dev, warmup=1, iters=1, repeats=repeats)
        med = statistics.median(secs)
        size = latent_size * vae.downsample
        rows.append({"vae": vae.name, "precision": precision, "batch": batch, "latent_size": latent_size,
                     "image_size": size, "sec_per_batch": med, "img_per_s": batch / med, "runs": secs})
        log.info("VAE decode %s: %.2f img/s (%dpx)", precision, batch / med, size)
    return rows
