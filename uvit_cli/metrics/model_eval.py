"""Score a model: sample with the recipe's evaluation protocol, then :func:`evaluate` the samples.

The protocol (the paper's): EMA weights, guidance w and sampler/steps from the recipe, balanced classes
(sample i gets class i mod K) or seeded random classes, and per-sample seeds (sample i uses seed + i), so a
result does not depend on batch size, device count or interruptions.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from ..build import build_decoder, guided_nfe_per_sample, nfe_per_sample
from ..errors import UvitError
from ..generate import generate
from ..recipe import recipe_to_dict
from .evaluate import evaluate
from .sample_store import sample_to_npz
from .sources import ArraySource

log = logging.getLogger(__name__)


def class_labels(recipe, n: int, seed: int = 0) -> Optional[np.ndarray]:
    """Class ids for n samples: balanced (i mod K, the paper protocol) or seeded uniform; None if unconditional."""
    if recipe.conditioning == "text":
        raise UvitError("scoring a text-to-image model needs captions (MS-COCO protocol), which `uvit fid` does not "
                        "sample yet; sample to an .npz with `uvit sample` and score that file")
    if recipe.conditioning != "class":
        return None
    k = recipe.model.num_classes
    if recipe.eval.class_sampling == "random":
        return np.random.default_rng(seed).integers(0, k, n).astype(np.int64)
    return (np.arange(n) % k).astype(np.int64)


def sampling_card(recipe, *, num_samples: int, seed: int, weights: str = "ema", checkpoint: str | None = None,
                  checkpoint_sha256: str | None = None, precision: str = "fp32") -> dict:
    """The sampling half of the protocol card.

    ``nfe`` counts network evaluations per sample. With guidance the card also says how many were guided
    (``nfe_guided``; with a guidance interval, fewer) and their cost in single-batch forwards (``forward_cost``): a
    guided evaluation is one batched forward of twice the batch (cost 2), an unguided one of the batch (cost 1).
    """
    s = recipe.sample
    nfe = nfe_per_sample(recipe)
    card = {"recipe": recipe.name, "weights": weights, "sampler": s.sampler, "steps": s.steps,
            "nfe": nfe, "guidance_w": s.cfg_scale,
            "guidance_convention": "w (1 = off); official U-ViT scale = w - 1",
            "class_sampling": recipe.eval.class_sampling if recipe.conditioning == "class" else "none",
            "seeds": f"{seed}..{seed + num_samples - 1} (one per sample)", "precision": precision}
    if s.cfg_scale != 1.0:
        guided = guided_nfe_per_sample(recipe)
        card.update(nfe_guided=guided, forward_cost=nfe + guided)
        if tuple(s.guidance_interval) != (0.0, 1.0):
            card["guidance_interval"] = f"sampler time t in {list(s.guidance_interval)} (t = 1 is noise)"
    if s.sampler.startswith("dpm_solver") and s.sampler != "dpm_solver_pp_2m":
        card.update(order=s.order, fast=s.fast)
    if checkpoint:
        card["checkpoint"] = str(checkpoint)
    if checkpoint_sha256:
        card["checkpoint_sha256"] = checkpoint_sha256
    return card


def _decoder(recipe, device, decoder):
    return decoder if decoder is not None else build_decoder(recipe, device)


def evaluate_model(model, recipe, *, num_samples: int, device: str = "cpu", precision: str = "fp32",
                   batch_size: Optional[int] = None, seed: int = 0, progress: Optional[Callable] = None,
                   weights: str = "ema", decoder=None) -> dict:
    """Sample ``num_samples`` in memory with the recipe's protocol and score them with ``recipe.eval``.

    Returns the metric values plus "protocol" (the card). For ``eval.mode: digits`` the values are fd_digits and
    acc_digits (a CPU domain metric, not Inception FID). Used by the training monitor and the ablation suite.
    """
    labels = class_labels(recipe, num_samples, seed)
    seeds = list(range(seed, seed + num_samples))
    was_training = model.training
    model.eval()
    try:
        images = generate(model, recipe, seeds, None if labels is None else torch.from_numpy(labels),
                          batch_size=batch_size, device=device, precision=precision,
                          decoder=_decoder(recipe, device, decoder), progress=progress)
    finally:
        model.train(was_training)
    images = images.cpu().numpy() if hasattr(images, "cpu") else np.asarray(images)
    card = sampling_card(recipe, num_samples=num_samples, seed=seed, weights=weights, precision=precision)
    result = evaluate(ArraySource(images, labels, name="in-memory samples"), recipe.eval.ref or None,
                      metrics=recipe.eval.metrics, mode=recipe.eval.mode, batch_size=recipe.eval.batch_size,
                      device=str(device), protocol=card)
    return {**result.metrics, "protocol": result.protocol}


def sampling_identity(recipe) -> str:
    """SHA-256 of the recipe fields that change what is sampled (model, diffusion, sampler, classes, VAE), so
    editing e.g. eval.ref or train.* does not invalidate kept samples."""
    d = recipe_to_dict(recipe)
    d["sample"].pop("batch_size")        # samples do not depend on the batch size (per-sample seeds)
    d["model"].pop("grad_checkpoint")    # nor on activation checkpointing
    # fields added later, at the value that samples as before, leave the identity (and kept samples) unchanged
    if d["diffusion"]["prediction"] == "auto":
        d["diffusion"].pop("prediction")
    if d["sample"]["guidance_interval"] == [0.0, 1.0]:
        d["sample"].pop("guidance_interval")
    keep = {"model": d["model"], "diffusion": d["diffusion"], "sample": d["sample"],
            "class_sampling": d["eval"]["class_sampling"], "vae": d["data"]["vae"],
            "scale_factor": d["data"]["scale_factor"]}
    return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()


def samples_path(target: Path, recipe, num_samples: int, meta: dict) -> Path:
    """Where a run's evaluation samples are kept: <run>/eval/ or <checkpoint>_eval/, named by count and protocol."""
    tag = hashlib.sha256(repr(sorted(meta.items())).encode()).hexdigest()[:10]
    base = target / "eval" if target.is_dir() else target.with_name(target.stem + "_eval")
    return base / f"samples_{recipe.name}_{num_samples}_{tag}.npz"


def sample_for_eval(model, recipe, out: str | Path, num_samples: int, *, meta: dict, seed: int = 0,
                    device: str = "cpu", precision: str = "fp32", batch_size: Optional[int] = None, decoder=None,
                    chunk: int = 1000, progress: Optional[Callable[[int, int], None]] = None) -> Path:
    """Sample into a resumable .npz (sample_store) with the recipe's protocol; returns its path."""
    labels = class_labels(recipe, num_samples, seed)
    decoder = _decoder(recipe, device, decoder)
    model.eval()

    def make(start: int, stop: int):
        cond = None if labels is None else torch.from_numpy(labels[start:stop])
        images = generate(model, recipe, list(range(seed + start, seed + stop)), cond, batch_size=batch_size,
                          device=device, precision=precision, decoder=decoder)
        images = images.cpu().numpy() if hasattr(images, "cpu") else np.asarray(images)
        return images, None if labels is None else labels[start:stop]

    return sample_to_npz(out, num_samples, make, meta=meta, chunk=chunk, progress=progress)


def monitor_record(ema, recipe, device) -> dict | None:
    """The periodic training monitor: the metric under ``monitor/`` keys, with its protocol card beside it so nobody
    mistakes it for the paper's FID. None (and a warning) when it cannot run, e.g. without Inception weights."""
    try:
        result = evaluate_model(ema, recipe, num_samples=recipe.eval.monitor_samples, device=device)
    except UvitError as e:
        log.warning("monitor evaluation disabled for this run: %s", e)
        return None
    protocol = result.pop("protocol", None)
    out = {f"monitor/{k}": v for k, v in result.items()}
    if protocol is not None:
        out["monitor_protocol"] = protocol
    return out
