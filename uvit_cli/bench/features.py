"""The features suite: Inception feature-extraction throughput against pytorch-fid and clean-fid (legacy_pytorch) on the same images and weights.

A benchmark, not a test: ``uvit bench`` calls :func:`bench_features`. Each pipeline reads the same PNG folder end
to end (decode, resize, Inception), after one warm-up batch; model loading is not timed.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from PIL import Image

from ..errors import UvitError
from ..metrics.features import FeatureExtractor
from ..metrics.inception import WEIGHTS_FILE, find_inception_weights, load_fid_inception, random_state_dict
from ..metrics.sources import FolderSource
from .timer import measure, median

log = logging.getLogger(__name__)


def _images(n: int, size: int, seed: int = 0) -> np.ndarray:
    """Structured uint8 test images (blocky noise plus gradients)."""
    rng = np.random.default_rng(seed)
    base = rng.uniform(0, 255, (n, size // 4 + 1, size // 4 + 1, 3)).repeat(4, 1).repeat(4, 2)[:, :size, :size]
    return np.clip(base + rng.normal(0, 10, base.shape), 0, 255).astype(np.uint8)


@contextmanager
def _torch_home(weights: Path):
    """Point torch hub (and so pytorch-fid / clean-fid) at a directory holding ``weights`` under its usual name."""
    with tempfile.TemporaryDirectory() as d:
        target = Path(d) / "hub" / "checkpoints" / WEIGHTS_FILE
        target.parent.mkdir(parents=True)
        try:
            os.symlink(Path(weights).resolve(), target)
        except OSError:
            shutil.copy(weights, target)
        old = os.environ.get("TORCH_HOME")
        os.environ["TORCH_HOME"] = d
        try:
            yield Path(torch.hub.get_dir()) == Path(d) / "hub"
        finally:
            if old is None:
                os.environ.pop("TORCH_HOME", None)
            else:
                os.environ["TORCH_HOME"] = old


def bench_features(num_images: int = 64, resolution: int = 64, batch_size: int = 32, device: str = "cpu",
                   weights: Optional[str | Path] = None, compare: bool = True, num_workers: int = 0,
                   repeats: int = 1) -> dict:
    """Images/s of our extractor (BN folded, and ``exact``) vs pytorch-fid and clean-fid legacy_pytorch.

    Uses the real FID Inception weights when found (``weights`` / $UVIT_INCEPTION_WEIGHTS / hub cache), else a
    random-weight network of the same shape (timing is the same). ``num_workers`` goes to the baselines'
    DataLoaders (ours decodes in one background thread). With ``repeats`` > 1 the pipelines run in rotation and
    each reports the median of its rounds.
    """
    dev = torch.device(device)
    result = {"images": num_images, "resolution": resolution, "batch_size": batch_size, "device": str(dev),
              "threads": torch.get_num_threads(), "baseline_num_workers": num_workers, "repeats": repeats}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        try:
            wpath = find_inception_weights(weights)
            result["weights"] = str(wpath)
        except UvitError:  # timing does not need the real weights
            wpath = tmp / WEIGHTS_FILE
            torch.save(random_state_dict(0), wpath)
            result["weights"] = "random (real weights not found; timing is unaffected)"
        folder = tmp / "images"
        folder.mkdir()
        for i, img in enumerate(_images(num_images, resolution)):
            Image.fromarray(img).save(folder / f"{i:05d}.png")
        with _torch_home(wpath) as hub_ok:
            runners = _runners(wpath, folder, batch_size, dev, num_workers, compare and hub_ok)
            if compare and not hub_ok:
                result["baseline_note"] = "torch.hub.set_dir() is in effect; baselines skipped"
            feats, rates = {}, {}
            for _ in range(repeats):
                for name, run in runners.items():
                    sec = measure(lambda: feats.__setitem__(name, run()), dev, warmup=0, repeats=1)[0]
                    rates.setdefault(name, []).append(num_images / sec)
            for name, r in rates.items():
                result[f"{name}_img_s"] = median(r)
    if "pytorch_fid" in feats:
        scale = float(np.abs(feats["pytorch_fid"]).max())
        for name in ("uvit", "uvit_exact"):
            result[f"max_rel_diff_{name}_vs_pytorch_fid"] = float(np.abs(feats[name] - feats["pytorch_fid"]).max()) / scale
        result["speedup_vs_pytorch_fid"] = result["uvit_img_s"] / result["pytorch_fid_img_s"]
    if "clean_fid" in feats:
        result["speedup_vs_clean_fid"] = result["uvit_img_s"] / result["clean_fid_img_s"]
    return result


def _runners(wpath, folder, batch_size, dev, num_workers, baselines: bool) -> dict:
    """name -> a function that extracts pool features of every image in ``folder`` (models built and warmed up)."""
    files = sorted(str(p) for p in folder.iterdir())
    warm = torch.zeros(2, 3, 299, 299, device=dev)
    runners = {}
    for name, exact in (("uvit", False), ("uvit_exact", True)):
        ext = FeatureExtractor(load_fid_inception(wpath, device=dev, exact=exact), "pytorch_fid", dev, batch_size)
        with torch.inference_mode():
            ext.model(warm)
        runners[name] = (lambda e: lambda: e.extract(FolderSource(folder), want=("pool", "spatial", "is"),
                                                     keep_pool=True).pool_features)(ext)
    if not baselines:
        return runners
    try:
        from pytorch_fid.fid_score import get_activations
        from pytorch_fid.inception import InceptionV3

        pf_model = InceptionV3([3]).to(dev).eval()
        with torch.no_grad():
            pf_model(warm)
        runners["pytorch_fid"] = lambda: get_activations(files, pf_model, batch_size, 2048, dev, num_workers)
    except ImportError:
        log.info("pytorch-fid is not installed; skipped")
    try:
        from cleanfid.features import build_feature_extractor
        from cleanfid.fid import get_folder_features

        cf_model = build_feature_extractor("legacy_pytorch", dev, use_dataparallel=False)
        cf_model(warm)
        runners["clean_fid"] = lambda: get_folder_features(str(folder), cf_model, num_workers=num_workers,
                                                           batch_size=batch_size, device=dev, mode="legacy_pytorch",
                                                           verbose=False)
    except ImportError:
        log.info("clean-fid is not installed; skipped")
    return runners
