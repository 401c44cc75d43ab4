"""Seeds -> images: the one function the trainer's sample grids, ``uvit sample`` and ``uvit fid`` call.

Sample i draws all its randomness (initial noise, any SDE noise) from ``torch.Generator().manual_seed(seeds[i])``
on the CPU, and the network and the VAE decoder always see micro-batches of ``forward_batch`` samples (see
``noise_predictor.py``). So an image depends on its seed, the recipe, device and precision, and never on the batch size
or the other seeds drawn with it.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Callable, Sequence

import torch

from .build import build_sampler, build_schedule, nfe_per_sample
from .errors import UvitError
from .noise_predictor import NoisePredictor, pad_rows
from .runtime import check_precision

log = logging.getLogger(__name__)

# Samples per network forward, per device type. CPU: 8, from `uvit bench --suite sample` (BENCHMARKS.md: the digits
# model samples 1.2x faster at 8 than at 4, U-ViT-S/2 at 32 px is flat from 4 to 16). CUDA and MPS: not measured yet
# (no GPU run of the sampling suite); 32 and 8 are guesses until one is made.
DEFAULT_FORWARD_BATCH = {"cpu": 8, "cuda": 32, "mps": 8}


def default_forward_batch(device) -> int:
    return DEFAULT_FORWARD_BATCH.get(torch.device(device).type, 16)


def quantize(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] (B, C, H, W) -> uint8 (B, H, W, C): round half up of 127.5 x + 127.5 (torchvision's save_image, as
    U-ViT writes its samples), clamped to [0, 255]."""
    x = torch.floor(images.float() * 127.5 + 128.0).clamp_(0, 255)
    return x.to(torch.uint8).permute(0, 2, 3, 1).contiguous().cpu()


def initial_noise(seeds: Sequence[int], shape: tuple[int, ...]) -> tuple[torch.Tensor, list[torch.Generator]]:
    """(x_T, generators): sample i is N(0, I) from a CPU generator seeded with seeds[i]; the generators go on to
    feed any noise the sampler draws."""
    gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
    return torch.stack([torch.randn(shape, generator=g) for g in gens]), gens


def _check_condition(model, recipe, cond, n: int):
    kind = recipe.conditioning
    if kind == "none":
        if cond is not None:
            raise UvitError("this model is unconditional: sample it without classes or prompts")
        return None
    if cond is None:
        raise UvitError(f"this model is {kind}-conditional: pass " +
                        ("class ids (--class)" if kind == "class" else "prompts (--prompt)"))
    cond = torch.as_tensor(cond)
    if cond.shape[0] != n:
        raise UvitError(f"{cond.shape[0]} conditions for {n} seeds; give one per seed")
    if kind == "class":
        if cond.dtype not in (torch.int64, torch.int32) or cond.dim() != 1:
            raise UvitError("class conditions must be integer class ids, one per seed")
        top = recipe.model.num_classes + int(recipe.model.null_class)  # the null id asks for an unconditional sample
        bad = cond[(cond < 0) | (cond >= top)]
        if len(bad):
            raise UvitError(f"class id {int(bad[0])} is out of range: this model has classes "
                            f"0..{recipe.model.num_classes - 1}")
        return cond.long()
    if cond.dim() != 3 or cond.shape[-1] != recipe.model.text_dim:
        raise UvitError(f"text contexts must be (N, {recipe.model.text_tokens}, {recipe.model.text_dim}), "
                        f"got {tuple(cond.shape)}")
    return cond.float()


def _null_condition(model, recipe, null_context):
    """The null condition guidance needs (the recipe validated that the model has one): the null class id, or
    the empty-prompt context a text model's caller passes."""
    if recipe.sample.cfg_scale == 1.0:
        return None
    if recipe.conditioning == "class":
        return int(model.null_class_id)
    if null_context is None:
        raise UvitError(f"guidance w={recipe.sample.cfg_scale:g} on a text model needs the empty-prompt context "
                        "(null_context)")
    return torch.as_tensor(null_context).float()


def _decode(decoder, z: torch.Tensor, m: int) -> torch.Tensor:
    """The decoder on fixed-size micro-batches (padded), for the same batch-size independence as the network."""
    out = []
    with torch.no_grad():
        for i in range(0, z.shape[0], m):
            k = min(m, z.shape[0] - i)
            out.append(decoder.decode(pad_rows(z[i:i + k], m))[:k].float())
    return torch.cat(out)


def generate(model, recipe, seeds: Sequence[int], cond=None, *, batch_size: int | None = None, device="cpu",
             precision: str = "fp32", decoder=None, null_context=None,
             progress: Callable[[int, int], None] | None = None, forward_batch: int | None = None,
             stats: dict | None = None, quantized: bool = True) -> torch.Tensor:
    """Draw one image per seed with ``recipe.sample`` (sampler, steps, guidance w); returns uint8 (N, H, W, C), or
    with ``quantized=False`` the float32 (N, C, H, W) images in [-1, 1] before rounding (to measure precision).

    cond: None, class ids (N,) or text contexts (N, 77, D). decoder: for latent models, an object whose
    ``decode(z)`` maps the model's scaled latents to [-1, 1] images. precision: "fp32", "bf16" or "fp16" autocast
    for the network. progress(done, total) counts network evaluations of a batch. ``stats``, if given, is filled
    with nfe (per sample; guided_nfe of them guided), forwards, seconds and images/s.
    """
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise UvitError("no seeds to sample; pass e.g. --seeds 0-15")
    check_precision(device, precision)
    if recipe.is_latent and decoder is None:
        raise UvitError("a latent model needs a decoder (the recipe's VAE) to turn latents into images")
    device = torch.device(device)
    n = len(seeds)
    cond = _check_condition(model, recipe, cond, n)
    w = recipe.sample.cfg_scale
    null = _null_condition(model, recipe, null_context)
    sample_fn, kwargs = build_sampler(recipe)
    schedule = build_schedule(recipe)
    fb = int(forward_batch or default_forward_batch(device))
    bs = int(batch_size or recipe.sample.batch_size)
    bs = max(fb, math.ceil(bs / fb) * fb)  # whole micro-batches, so only the last batch is padded
    shape = (recipe.model.in_chans, recipe.model.img_size, recipe.model.img_size)
    nfe = nfe_per_sample(recipe)
    batches = math.ceil(n / bs)
    total, done = nfe * batches, [0]

    def on_eval(_):
        done[0] += 1
        if progress is not None:
            progress(done[0], total)

    if isinstance(null, torch.Tensor):
        null = null.to(device)
    was_training = model.training
    model.eval().to(device)
    out, forwards, guided, t0 = [], 0, 0, time.perf_counter()
    try:
        with torch.no_grad():
            for b in range(0, n, bs):
                x, gens = initial_noise(seeds[b:b + bs], shape)
                c = None if cond is None else cond[b:b + bs].to(device)
                fn = NoisePredictor(model, schedule, c, cfg_scale=w, null_cond=null, forward_batch=fb,
                                    precision=precision, guidance_interval=recipe.sample.guidance_interval,
                                    on_eval=on_eval)
                z = sample_fn(fn, x.to(device), schedule, generators=gens, **kwargs)
                forwards += fn.forwards
                guided = fn.guided_nfe
                images = _decode(decoder, z, fb) if decoder is not None else z
                out.append(quantize(images) if quantized else images.float().cpu())
    finally:
        model.train(was_training)
    seconds = time.perf_counter() - t0
    if stats is not None:
        stats.update(nfe=nfe, guided_nfe=guided, forwards=forwards, batches=batches, seconds=seconds, images_per_s=n / max(seconds, 1e-9),
                     sampler=recipe.sample.sampler, steps=recipe.sample.steps, cfg_scale=w, forward_batch=fb,
                     batch_size=bs)
    log.debug("sampled %d images with %s (%d NFE each) in %.1fs", n, recipe.sample.sampler, nfe, seconds)
    return torch.cat(out)
