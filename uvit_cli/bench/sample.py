"""The sampling suite: the recipe's own sampling protocol (sampler, steps, guidance) through ``generate()`` at
several forward batches, precisions and with torch.compile, projected to the wall time of its FID sample count;
guided sampling with one batched bf16 forward against the straightforward two fp32 forwards per step; and the VAE
decode that turns sampled latents into images.

Both guided paths run the same sampler from the same initial noise for the same NFE; the result says how much
faster the batched bf16 path is and how far its images are from the fp32 ones (bf16 keeps 8 significant bits).
The two-forward baseline is built here from two unguided noise predictors: the library has one guided path.
"""

from __future__ import annotations

import logging
import math

import torch

from ..autoencoder import SD_VAE_CONFIG, Autoencoder
from ..build import build_model, build_sampler, build_schedule, nfe_per_sample
from ..generate import default_forward_batch, generate, quantize
from ..metrics.sample_store import default_chunk
from ..noise_predictor import NoisePredictor, cfg_combine
from ..recipe import Recipe, load_recipe, replace
from ..runtime import autocast
from .timer import measure, median, row

log = logging.getLogger(__name__)


def guided_bench_recipe() -> Recipe:
    """The CIFAR10 U-ViT-S/2 network (32px, 13 layers, conv) with a 10-class token and a null row for guidance."""
    r = load_recipe("cifar10_uvit_s2")
    return replace(r, model={"num_classes": 10, "null_class": True}, train={"p_uncond": 0.1},
                   sample={"sampler": "dpm_solver", "cfg_scale": 1.5})


def two_forward_guidance(model, schedule, cond, null: int, w: float, forward_batch: int):
    """The straightforward guided predictor: the conditional and the unconditional fp32 forwards run separately."""
    c = NoisePredictor(model, schedule, cond, forward_batch=forward_batch)
    u = NoisePredictor(model, schedule, torch.full_like(cond, null), forward_batch=forward_batch)
    return lambda x, t: cfg_combine(c(x, t), u(x, t), w)


def bench_guided_sampling(recipe: Recipe | None = None, *, batch: int = 2, steps: int = 6, cfg_scale: float = 1.5,
                          device: str = "cpu", repeats: int = 3, seed: int = 0, attribution: bool = True) -> dict:
    """Time ``steps`` sampler steps of guided sampling both ways at equal NFE; returns timings, speedup and agreement.

    baseline: cond and uncond as two separate fp32 forwards per evaluation. fast: one batched forward of
    [cond; uncond] under bf16 autocast. With ``attribution`` also times the batched fp32 forward alone. The paths
    run in rotation, each timed ``repeats`` times; medians are reported.
    """
    recipe = replace(recipe or guided_bench_recipe(), sample={"steps": steps, "cfg_scale": cfg_scale})
    device = torch.device(device)
    torch.manual_seed(seed)
    model = build_model(recipe).eval().to(device)
    schedule = build_schedule(recipe)
    sample_fn, kwargs = build_sampler(recipe)
    g = torch.Generator().manual_seed(seed)
    shape = (batch, recipe.model.in_chans, recipe.model.img_size, recipe.model.img_size)
    x_T = torch.randn(shape, generator=g).to(device)
    cond = torch.randint(0, recipe.model.num_classes, (batch,), generator=g).to(device)
    null = model.null_class_id
    if null is None:
        raise ValueError("the benchmark needs a class model with a null class (guidance)")
    paths = {"baseline": lambda: two_forward_guidance(model, schedule, cond, null, cfg_scale, batch),
             "fast": lambda: NoisePredictor(model, schedule, cond, cfg_scale=cfg_scale, null_cond=null,
                                            forward_batch=batch, precision="bf16")}
    if attribution:
        paths["batched_fp32"] = lambda: NoisePredictor(model, schedule, cond, cfg_scale=cfg_scale, null_cond=null,
                                                       forward_batch=batch)
    outs = {}

    def run(name: str):
        with torch.no_grad():
            outs[name] = sample_fn(paths[name](), x_T.clone(), schedule, **kwargs)

    times = {name: [] for name in paths}
    for _ in range(repeats):
        for name in paths:
            times[name] += measure(lambda: run(name), device, warmup=0 if times[name] else 1, repeats=1)
    med = {name: median(v) for name, v in times.items()}

    # Agreement: one evaluation's relative error, and the final images (in [-1, 1] and as uint8).
    with torch.no_grad():
        e32 = paths["baseline"]()(x_T, 0.5)
        e16 = paths["fast"]()(x_T, 0.5)
    a, b = outs["baseline"].float().cpu(), outs["fast"].float().cpu()
    qa, qb = quantize(a).int(), quantize(b).int()
    result = {
        "device": str(device), "model": recipe.model.size or "custom", "img_size": recipe.model.img_size,
        "batch": batch, "sampler": recipe.sample.sampler, "steps": steps, "nfe": nfe_per_sample(recipe),
        "cfg_scale": cfg_scale, "threads": torch.get_num_threads(), "runs": times,
        "baseline_s": med["baseline"], "fast_s": med["fast"], "speedup": med["baseline"] / med["fast"],
        # relative L2 errors of the bf16 path: one guided evaluation, and the final samples
        "eps_rel_err": float((e16 - e32).norm() / e32.norm()), "sample_rel_err": float((b - a).norm() / a.norm()),
        "bf16_rel_precision": 2.0 ** -8,
        # uint8 image differences (only telling for trained weights: a random network's samples saturate)
        "uint8_max_diff": int((qa - qb).abs().max()), "uint8_mean_diff": float((qa - qb).abs().float().mean()),
    }
    if attribution:
        result["batched_fp32_s"] = med["batched_fp32"]
    log.info("guided sampling: baseline %.2fs, batched bf16 %.2fs (%.2fx)", med["baseline"], med["fast"],
             result["speedup"])
    return result


def bench_vae_decode(vae="sd", *, latent_size: int = 32, batch: int = 1, precisions=("fp32", "bf16"),
                     device: str = "cpu", repeats: int = 3) -> list[dict]:
    """Images/s of the VAE decoder on ``latent_size``^2 latents (32 -> 256 px for the SD VAE), per precision.

    ``vae``: "sd" (the Stable Diffusion VAE architecture with random weights: speed does not depend on the values)
    or an :class:`~uvit_cli.autoencoder.Autoencoder`. Median of ``repeats`` timed decodes after one warm-up.
    """
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
        def decode():
            with autocast(dev, precision):
                return vae.decode(z)

        runs = measure(decode, dev, warmup=1, repeats=repeats)
        size = latent_size * vae.downsample
        r = row(dev, precision, runs, batch, vae=vae.name, batch=batch, latent_size=latent_size, image_size=size)
        r["sec_per_batch"] = r["sec_per_step"]
        rows.append(r)
        log.info("VAE decode %s: %.2f img/s (%dpx)", precision, r["img_per_s"], size)
    return rows


def _protocol_conditions(recipe: Recipe, n: int, seed: int):
    """(conditions, null context) of n benchmark samples: balanced classes, or seeded random text contexts (the
    cost of sampling does not depend on what the context says)."""
    if recipe.conditioning == "class":
        return torch.arange(n) % recipe.model.num_classes, None
    if recipe.conditioning == "text":
        g = torch.Generator().manual_seed(seed)
        shape = (recipe.model.text_tokens, recipe.model.text_dim)
        return torch.randn(n, *shape, generator=g), torch.randn(*shape, generator=g)
    return None, None


def projected_wall_s(num_samples: int, img_per_s: float, devices: int) -> float:
    """Seconds to draw ``num_samples`` on ``devices`` devices at ``img_per_s`` each: the busiest rank's share of
    the sample store's chunks (perfect scaling otherwise; features and scoring not included)."""
    chunk = default_chunk(num_samples)
    chunks = math.ceil(num_samples / chunk)
    return math.ceil(chunks / devices) * chunk / img_per_s if devices < chunks else chunk / img_per_s


def bench_sampling(recipe: Recipe, *, model=None, forward_batches=None, precisions=("fp32", "bf16"),
                   compile_flags=(False,), device: str = "cpu", repeats: int = 3, samples: int | None = None,
                   decode: bool = True, seed: int = 0, devices=(1, 8)) -> dict:
    """Images/s of the recipe's own protocol (``recipe.sample``: sampler, steps, guidance w) through generate(),
    per device, for each forward batch (default: the device type's default and 2x, 4x, 8x it), precision and
    torch.compile setting; the effect of bf16 / compile on the images (relative L2 error of the [-1, 1] samples
    against fp32 eager at the default forward batch, and uint8 differences); and the projected wall time of
    ``eval.num_samples`` on each of ``devices``.

    ``model``: trained weights (else a seeded random init: speed does not depend on the values, but image
    agreement is only telling for trained weights). Each timed call draws ``samples`` images (default the largest
    forward batch), and includes the VAE decode of a latent model (the SD VAE architecture when ``decode``).
    """
    dev = torch.device(device)
    default = default_forward_batch(dev)
    fbs = sorted(set(forward_batches or [default, 2 * default, 4 * default, 8 * default]))
    n = samples or max(fbs)
    weights = "random init" if model is None else "given"
    if model is None:
        torch.manual_seed(seed)
        model = build_model(recipe)
    model = model.eval().to(dev)
    decoder = None
    if recipe.is_latent and decode:
        torch.manual_seed(seed)
        decoder = Autoencoder.from_config(SD_VAE_CONFIG, recipe.data.scale_factor, name="sd (random weights)")
        decoder.vae.to(dev)
    cond, null = _protocol_conditions(recipe, n, seed)
    seeds = list(range(seed, seed + n))
    nets = {False: model}

    def net(compiled: bool):
        if compiled not in nets:
            nets[compiled] = torch.compile(model)
        return nets[compiled]

    def draw(precision: str, compiled: bool, fb: int, quantized: bool = True):
        with torch.no_grad():
            return generate(net(compiled), recipe, seeds, cond, batch_size=n, device=dev, precision=precision,
                            decoder=decoder, null_context=null, forward_batch=fb, quantized=quantized)

    rows = []
    for precision in precisions:
        for compiled in compile_flags:
            for fb in fbs:
                runs = measure(lambda: draw(precision, compiled, fb), dev, warmup=1, repeats=repeats)
                r = row(dev, precision, runs, n, compile=compiled, forward_batch=fb, default_forward_batch=fb == default,
                        samples=n, sampler=recipe.sample.sampler, steps=recipe.sample.steps,
                        nfe=nfe_per_sample(recipe), cfg_scale=recipe.sample.cfg_scale, decode=decoder is not None)
                r["sec_per_image"] = r["sec_per_step"] / n
                rows.append(r)
                log.info("sampling %s%s fb=%d: %.2f img/s", precision, " compiled" if compiled else "", fb,
                         r["img_per_s"])
    # What bf16 and compile do to the images, against fp32 eager, at the default forward batch.
    ref = draw("fp32", False, default, quantized=False)
    qref = quantize(ref).int()
    agreement = []
    for precision in precisions:
        for compiled in compile_flags:
            if precision == "fp32" and not compiled:
                continue
            x = draw(precision, compiled, default, quantized=False)
            q = quantize(x).int()
            agreement.append({"precision": precision, "compile": compiled, "forward_batch": default,
                              "sample_rel_err": float((x - ref).norm() / ref.norm()),
                              "uint8_max_diff": int((q - qref).abs().max()),
                              "uint8_mean_diff": float((q - qref).abs().float().mean())})
    num = recipe.eval.num_samples
    best = max(rows, key=lambda r: r["img_per_s"])
    base = next((r for r in rows if r["default_forward_batch"] and r["precision"] == "fp32" and not r["compile"]),
                rows[0])
    projection = {"num_samples": num, "chunk": default_chunk(num),
                  "default": {"img_per_s": base["img_per_s"], "precision": base["precision"],
                              "forward_batch": base["forward_batch"],
                              "wall_s": {d: projected_wall_s(num, base["img_per_s"], d) for d in devices}},
                  "best": {"img_per_s": best["img_per_s"], "precision": best["precision"], "compile": best["compile"],
                           "forward_batch": best["forward_batch"],
                           "wall_s": {d: projected_wall_s(num, best["img_per_s"], d) for d in devices}}}
    return {"recipe": recipe.name, "model": recipe.model.size or "custom", "device": str(dev),
            "weights": weights, "rows": rows,
            "agreement": agreement, "projection": projection, "default_forward_batch": default,
            "threads": torch.get_num_threads()}
