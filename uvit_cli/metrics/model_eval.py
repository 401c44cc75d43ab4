"""Score a model: sample with the recipe's evaluation protocol, then :func:`evaluate` the samples.

The protocol (the paper's): EMA weights, guidance w and sampler/steps from the recipe, balanced classes
(sample i gets class i mod K) or seeded random classes, for text models the MS-COCO caption draw
(metrics/captions.py), and per-sample seeds (sample i uses seed + i), so a result does not depend on batch size,
process count or interruptions.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from ..build import build_decoder, build_text_encoder, guided_nfe_per_sample, nfe_per_sample
from ..data.captions import open_captioned_digits
from ..data.latents import MANIFEST, check_latents_against_recipe, open_latents
from ..errors import UvitError
from ..files import sha256_file
from ..generate import generate
from ..recipe import recipe_to_dict
from .captions import CaptionConditions, cache_conditions, prompt_conditions, read_prompts_file
from .evaluate import evaluate
from .parts import Tracker
from .sample_store import sample_to_npz
from .sources import ArraySource

log = logging.getLogger(__name__)


def class_labels(recipe, n: int, seed: int = 0) -> Optional[np.ndarray]:
    """Class ids for n samples: balanced (i mod K, the paper protocol) or seeded uniform; None otherwise."""
    if recipe.conditioning != "class":
        return None
    k = recipe.model.num_classes
    if recipe.eval.class_sampling == "random":
        return np.random.default_rng(seed).integers(0, k, n).astype(np.int64)
    return (np.arange(n) % k).astype(np.int64)


@dataclass
class EvalConditions:
    """What conditions evaluation sample i: class ids or caption contexts (or nothing); ``labels`` (written into
    the samples file and scored by acc_digits) are the class ids, or the classes the captions name."""

    labels: Optional[np.ndarray] = None
    captions: Optional[CaptionConditions] = None

    @property
    def card(self) -> dict:
        return self.captions.card if self.captions is not None else {}

    @property
    def null_context(self):
        return self.captions.null_context if self.captions is not None else None

    def batch(self, start: int, stop: int):
        if self.captions is not None:
            return self.captions.contexts(start, stop)
        if self.labels is not None:
            return torch.from_numpy(self.labels[start:stop])
        return None


def open_captions(recipe, n: int, seed: int, *, captions: str | Path | None = None,
                  prompts_file: str | Path | None = None, device="cpu", text_encoder: str | None = None,
                  allow_download: bool | None = None, run_dir: str | Path | None = None) -> CaptionConditions:
    """The caption conditions of a text model's evaluation: an encoded val cache (``captions``, default
    ``eval.captions``; a .txt there is read as a prompts file) drawn with the MS-COCO protocol, or a prompts file
    in order, encoded with the recipe's text encoder (the copy ``run_dir`` keeps of a built-in tower, so a run is
    scored with the tower it trained with). The built-in digits default to their held-out phrasings."""
    spec = prompts_file or captions or recipe.eval.captions
    if not spec and recipe.data.name == "digits":
        encoder = build_text_encoder(recipe, device, text_encoder, allow_download, run_dir=run_dir)
        digits = open_captioned_digits(encoder, "val")
        return cache_conditions(digits, n, seed, source="built-in digits captions, held-out phrasings",
                                source_sha256=sha256_file(digits.root / "manifest.json"))
    if not spec:
        raise UvitError("scoring a text-to-image model needs captions: encode the val split (`uvit encode-latents "
                        "coco --split val`) and pass --captions data/coco256_latents_val (or set eval.captions), "
                        "or pass --prompts-file FILE with one prompt per line")
    path = Path(spec)
    if prompts_file is not None or path.suffix == ".txt":
        encoder = build_text_encoder(recipe, device, text_encoder, allow_download, run_dir=run_dir)
        return prompt_conditions(read_prompts_file(path), encoder, n, source=str(path))
    if not path.is_dir():
        raise UvitError(f"captions {path} does not exist: encode the val split with `uvit encode-latents coco "
                        f"--split val --out {path}`, or pass --prompts-file FILE")
    cache = open_latents(path)
    if not cache.is_text:
        raise UvitError(f"{path} holds no captions (it was encoded from {cache.manifest['conditioning']} data); "
                        "pass the cache of `uvit encode-latents coco --split val`")
    check_latents_against_recipe(cache, recipe)
    conditions = cache_conditions(cache, n, seed, source=str(path), source_sha256=sha256_file(path / MANIFEST))
    if recipe.sample.cfg_scale != 1.0 and conditions.null_context is None:
        raise UvitError(f"{path} stores no empty-prompt context, which guidance (w={recipe.sample.cfg_scale:g}) "
                        "needs; re-encode it with `uvit encode-latents`")
    return conditions


def eval_conditions(recipe, n: int, seed: int = 0, captions: Optional[CaptionConditions] = None) -> EvalConditions:
    """The conditions of n evaluation samples: the recipe's class protocol, or ``captions`` for a text model."""
    if recipe.conditioning == "text":
        if captions is None:
            captions = open_captions(recipe, n, seed)
        return EvalConditions(labels=captions.labels, captions=captions)
    return EvalConditions(labels=class_labels(recipe, n, seed))


def sampling_card(recipe, *, num_samples: int, seed: int, weights: str = "ema", checkpoint: str | None = None,
                  checkpoint_sha256: str | None = None, precision: str = "fp32",
                  conditions: Optional[EvalConditions] = None, forward_batch: int | None = None,
                  device_type: str | None = None, compiled: bool = False) -> dict:
    """The sampling half of the protocol card (with the caption draw of a text model).

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
    if conditions is not None:
        card.update(conditions.card)
    if forward_batch:
        card["forward_batch"] = forward_batch        # images depend on it in the last bits
    if device_type:
        card["device_type"] = device_type
    if compiled:
        card["compile"] = True
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
    acc_digits (a CPU domain metric, not Inception FID). Used by the training monitor and the ablation suite (one
    process; text models draw their captions from ``eval.captions``).
    """
    conditions = eval_conditions(recipe, num_samples, seed)
    seeds = list(range(seed, seed + num_samples))
    was_training = model.training
    model.eval()
    try:
        images = generate(model, recipe, seeds, conditions.batch(0, num_samples), batch_size=batch_size,
                          device=device, precision=precision, decoder=_decoder(recipe, device, decoder),
                          null_context=conditions.null_context, progress=progress)
    finally:
        model.train(was_training)
    images = images.cpu().numpy() if hasattr(images, "cpu") else np.asarray(images)
    card = sampling_card(recipe, num_samples=num_samples, seed=seed, weights=weights, precision=precision,
                         conditions=conditions)
    result = evaluate(ArraySource(images, conditions.labels, name="in-memory samples"), recipe.eval.ref or None,
                      metrics=recipe.eval.metrics, mode=recipe.eval.mode, batch_size=recipe.eval.batch_size,
                      device=str(device), protocol=card)
    return {**result.metrics, "protocol": result.protocol}


def sampling_identity(recipe) -> str:
    """SHA-256 of the recipe fields that change what is sampled (model, diffusion, sampler, classes, VAE), so
    editing e.g. eval.ref or train.* does not invalidate kept samples."""
    d = recipe_to_dict(recipe)
    d["sample"].pop("batch_size")        # samples do not depend on the batch size (per-sample seeds)
    d["model"].pop("grad_checkpoint")    # nor on activation checkpointing
    d["model"].pop("checkpoint_policy")
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
                    chunk: Optional[int] = None, progress: Optional[Callable[[int, int], None]] = None,
                    conditions: Optional[EvalConditions] = None, forward_batch: Optional[int] = None,
                    all_ranks: bool = False) -> tuple[Path, list[int]]:
    """Sample into a resumable .npz (sample_store) with the recipe's protocol; returns (its path, the chunks
    drawn now). ``all_ranks``: every rank of a torchrun job calls this and draws its share of the chunks."""
    conditions = conditions or eval_conditions(recipe, num_samples, seed)
    decoder = _decoder(recipe, device, decoder)
    model.eval()
    tracker = Tracker(progress)

    def make(start: int, stop: int):
        images = generate(model, recipe, list(range(seed + start, seed + stop)), conditions.batch(start, stop),
                          batch_size=batch_size, device=device, precision=precision, decoder=decoder,
                          null_context=conditions.null_context, forward_batch=forward_batch,
                          progress=lambda done, total: tracker.inflight(start, done / total))
        images = images.cpu().numpy() if hasattr(images, "cpu") else np.asarray(images)
        return images, None if conditions.labels is None else conditions.labels[start:stop]

    return sample_to_npz(out, num_samples, make, meta=meta, chunk=chunk, tracker=tracker, all_ranks=all_ranks)


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
