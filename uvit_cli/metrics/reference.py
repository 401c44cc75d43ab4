"""Reference statistics: find, read, compute (cached by content hash) and write them.

A reference is one of: an image folder or image .npz (features computed here), an ADM reference batch (``mu``,
``sigma``, ``mu_s``, ``sigma_s`` precomputed by ADM's TF evaluator, ``arr_0`` images for precision/recall), a
U-ViT / pytorch-fid ``fid_stats`` file (``mu``, ``sigma``), or a file written by ``uvit fid-stats`` (the same keys
plus ``uvit_meta`` that records the mode, weights and source). Features computed from images are cached under
$UVIT_CACHE/ref_features, keyed by the source's SHA-256, the mode and the Inception weights' SHA-256.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from ..errors import UvitError
from ..files import atomic_path, cache_dir, sha256_file
from .features import Features
from .frechet import GaussianStats
from .sources import ImageSource, npz_keys, open_source

log = logging.getLogger(__name__)

STATS_FORMAT = "uvit-fid-stats-1"
STATS_ENV = "UVIT_FID_STATS"
UVIT_STATS_URL = "https://drive.google.com/drive/folders/1yo-XhqbPue3rp5P57j6QbA5QZx6KybvP"
ADM_REF_URL = "https://openaipublic.blob.core.windows.net/diffusion/jul-2021/ref_batches/"
ADM_REF_PATHS = {  # file name -> path under ADM_REF_URL (guided-diffusion evaluations/README.md)
    "VIRTUAL_imagenet64_labeled.npz": "imagenet/64/", "VIRTUAL_imagenet128_labeled.npz": "imagenet/128/",
    "VIRTUAL_imagenet256_labeled.npz": "imagenet/256/", "VIRTUAL_imagenet512.npz": "imagenet/512/",
    "VIRTUAL_lsun_bedroom256.npz": "lsun/bedroom/", "VIRTUAL_lsun_cat256.npz": "lsun/cat/",
    "VIRTUAL_lsun_horse256.npz": "lsun/horse/",
}


@dataclass
class Reference:
    """Reference statistics plus where they came from (for the protocol card)."""

    kind: str                                  # images | adm_ref_batch | fid_stats | uvit_stats | digits
    path: str
    sha256: str
    pool: Optional[GaussianStats] = None       # FID statistics (2048-d; 64-d for digits)
    spatial: Optional[GaussianStats] = None    # sFID statistics (2023-d)
    pool_features: Optional[np.ndarray] = None  # per-image pool features (precision/recall, KID)
    mode: Optional[str] = None                 # pipeline that produced the statistics, when known
    count: Optional[int] = None
    shape: Optional[tuple] = None              # (H, W, C) of the reference images, when known
    notes: list = field(default_factory=list)

    def card(self) -> dict:
        out = {"ref": self.path, "ref_kind": self.kind, "ref_sha256": self.sha256, "ref_count": self.count,
               "ref_stats_pipeline": self.mode or "unknown"}
        if self.shape:
            out["ref_resolution"] = f"{self.shape[0]}x{self.shape[1]}"
        if self.notes:
            out["ref_notes"] = "; ".join(self.notes)
        return out


def search_dirs() -> list[Path]:
    """Folders searched for a bare reference file name: $UVIT_FID_STATS, ./assets/fid_stats, $UVIT_CACHE/fid_stats."""
    dirs = [Path(os.environ[STATS_ENV]).expanduser()] if os.environ.get(STATS_ENV) else []
    return dirs + [Path("assets/fid_stats"), cache_dir() / "fid_stats"]


def find_reference(ref: str | Path) -> Path:
    """A reference path as given, else the bare name in :func:`search_dirs`; missing: a UvitError saying where
    such a file comes from."""
    p = Path(ref).expanduser()
    if p.exists():
        return p
    if p.parent == Path("."):
        for d in search_dirs():
            if (d / p.name).exists():
                return d / p.name
    looked = ", ".join(str(d) for d in search_dirs())
    if p.name.startswith("fid_stats_"):
        origin = (f"it is one of U-ViT's reference statistics: download the fid_stats folder from {UVIT_STATS_URL} "
                  "(U-ViT README) into assets/fid_stats/")
    elif p.name in ADM_REF_PATHS:
        origin = f"it is an ADM reference batch: download {ADM_REF_URL}{ADM_REF_PATHS[p.name]}{p.name}"
    else:
        origin = "build statistics for your own images with `uvit fid-stats IMAGES --out stats.npz`"
    raise UvitError(f"reference {ref} not found (looked in {looked}); {origin}, or pass --ref PATH")


def _meta(z) -> dict:
    if "uvit_meta" not in z.files:
        return {}
    return json.loads(str(z["uvit_meta"]))


def _stats(z, mu: str, sigma: str) -> Optional[GaussianStats]:
    if mu in z.files and sigma in z.files:
        return GaussianStats(mu=z[mu].astype(np.float64), sigma=z[sigma].astype(np.float64), n=0)
    return None


def read_stats_file(path: Path) -> Reference:
    """A statistics .npz (ADM reference batch, U-ViT/pytorch-fid fid_stats, or ours) without computing anything."""
    keys = npz_keys(path)
    with np.load(path, allow_pickle=False) as z:
        meta = _meta(z)
        ref = Reference(kind="fid_stats", path=str(path), sha256=sha256_file(path),
                        pool=_stats(z, "mu", "sigma"), spatial=_stats(z, "mu_s", "sigma_s"))
        if meta.get("format") == STATS_FORMAT:
            ref.kind, ref.mode, ref.count = "uvit_stats", meta.get("mode"), meta.get("count")
            ref.shape = tuple(meta["shape"]) if meta.get("shape") else None
            if "feats" in z.files:
                ref.pool_features = z["feats"].astype(np.float32)
        elif "mu_s" in keys or "arr_0" in keys:
            ref.kind, ref.mode = "adm_ref_batch", "precomputed by ADM's TF evaluator (TF1 resize, (x-128)/128)"
        else:
            ref.mode = "precomputed (pytorch-fid / U-ViT fid_stats; producer's pipeline)"
    if ref.pool is not None and ref.pool.mu.shape[0] ** 2 != ref.pool.sigma.size:
        raise UvitError(f"{path}: mu {ref.pool.mu.shape} and sigma {ref.pool.sigma.shape} do not match")
    return ref


def load_reference(ref: str | Path, *, need: set, extract: Callable[[ImageSource, bool], object],
                   mode: str, weights_sha256: str | Callable[[], str] = "", channels: int = 3) -> Reference:
    """Reference statistics covering ``need`` ⊆ {"pool", "spatial", "pool_features"}.

    ``extract(source, keep_pool)`` runs the feature extractor (returns features.Features); it is called only for
    images that are not in the cache. ``weights_sha256`` (the cache key's network part) may be a callable, so
    the network is loaded only when images must be read.
    """
    path = find_reference(ref)
    base = None
    if path.is_file() and path.suffix == ".npz" and any(k in npz_keys(path) for k in ("mu", "uvit_meta")):
        base = read_stats_file(path)
        if base.kind == "uvit_stats" and base.mode != mode:
            raise UvitError(f"{path} was built with --mode {base.mode}, but samples are scored with --mode {mode}; "
                            f"use --mode {base.mode} or rebuild the statistics with `uvit fid-stats --mode {mode}`")
        missing = {n for n in need if getattr(base, n) is None}
        if not missing:
            return base
        if "arr_0" not in npz_keys(path):
            what = {"spatial": "sFID statistics (mu_s, sigma_s)", "pool": "FID statistics (mu, sigma)",
                    "pool_features": "per-image features for precision/recall/KID (ADM keeps them as arr_0 images)"}
            raise UvitError(f"{path} ({base.kind}) has no {' or '.join(what[m] for m in sorted(missing))}; drop "
                            "those metrics from --metrics, or pass an ADM reference batch / an image folder as --ref")
    source = open_source(path, channels=channels)
    computed = _cached_features(source, need, extract, mode, weights_sha256)
    if base is None:
        return Reference(kind="images", path=str(path), sha256=source.sha256(), pool=computed.pool,
                         spatial=computed.spatial, pool_features=computed.pool_features, mode=mode,
                         count=computed.n, shape=source.shape)
    # ADM reference batch: precomputed whole-dataset stats win; arr_0 fills what is missing (as ADM does).
    for name in ("pool", "spatial", "pool_features"):
        if getattr(base, name) is None:
            setattr(base, name, getattr(computed, name))
    base.shape, base.count = source.shape, base.count or len(source)
    base.notes.append(f"arr_0 features ({len(source)} images) computed with mode {mode}")
    return base


def _cached_features(source: ImageSource, need: set, extract, mode: str, weights_sha256):
    if callable(weights_sha256):
        weights_sha256 = weights_sha256()
    key = f"{source.sha256()[:20]}_{mode}_{weights_sha256[:12] or 'noweights'}"
    path = cache_dir() / "ref_features" / f"{key}.npz"
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as z:
                feats = Features(n=int(z["n"]), pool=_stats(z, "mu", "sigma"), spatial=_stats(z, "mu_s", "sigma_s"),
                                 pool_features=z["feats"] if "feats" in z.files else None, shape=source.shape)
            if all(getattr(feats, n) is not None for n in need):
                log.info("reference features from the cache %s", path)
                return feats
        except (OSError, ValueError, KeyError) as e:
            log.warning("ignoring an unreadable cache entry %s (%s)", path, e)
    log.info("computing reference features for %s (%d images, mode %s)", source.name, len(source), mode)
    feats = extract(source, "pool_features" in need)
    write_stats(path, feats, meta={"mode": mode, "source": source.name, "source_sha256": source.sha256(),
                                   "weights_sha256": weights_sha256, "count": feats.n, "shape": list(source.shape)})
    return feats


def write_stats(path: str | Path, feats, meta: dict) -> None:
    """Write mu/sigma (+ mu_s/sigma_s, + feats) and a ``uvit_meta`` JSON record, atomically."""
    arrays = {"n": np.asarray(feats.n)}
    if feats.pool is not None:
        arrays.update(mu=feats.pool.mu, sigma=feats.pool.sigma)
    if feats.spatial is not None:
        arrays.update(mu_s=feats.spatial.mu, sigma_s=feats.spatial.sigma)
    if feats.pool_features is not None:
        arrays["feats"] = np.asarray(feats.pool_features, dtype=np.float32)
    arrays["uvit_meta"] = np.asarray(json.dumps({"format": STATS_FORMAT, **meta}))
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
