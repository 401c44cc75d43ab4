"""Score a set of samples against a reference: FID, sFID, IS, precision, recall (Inception) or the digits metric.

:func:`evaluate` takes an image folder, an ADM-style .npz, an :class:`ImageSource` or a uint8 array and returns
the metric values with a protocol card: what was scored, against what, through which pipeline. Two numbers are
comparable when their cards agree.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional

import numpy as np

from ..errors import UvitError
from ..files import sha256_file
from ..recipe import Metric, choices
from .digits import VERSION as DIGITS_VERSION
from .digits import digits_outputs, load_classifier, real_digits_stats
from .features import Features, FeatureExtractor, canonical_mode
from .frechet import GaussianStats, frechet_distance_stats
from .inception import load_fid_inception
from .precision_recall import precision_recall
from .reference import load_reference, write_stats
from .sources import ArraySource, ImageSource, open_source

log = logging.getLogger(__name__)

DIGITS_METRICS = ("fd_digits", "acc_digits")
INCEPTION_METRICS = tuple(m for m in choices(Metric) if m not in DIGITS_METRICS)  # fid, sfid, is, precision, recall
MIN_SAMPLES = {"fid": 2, "sfid": 2, "is": 1, "precision": 4, "recall": 4}  # P/R: k = 3 neighbours + the point


@dataclass
class EvalResult:
    """Metric values (floats) and the protocol card (JSON-ready)."""

    metrics: dict
    protocol: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"metrics": self.metrics, "protocol": self.protocol}


def parse_metrics(metrics: str | Iterable[str] | None, mode: str) -> tuple[str, ...]:
    """"fid,sfid" or a list -> validated names; the digits mode maps fid -> fd_digits and keeps acc_digits."""
    if metrics is None or metrics == "" or metrics == ():
        names = ["fid"]
    elif isinstance(metrics, str):
        names = [m.strip().lower() for m in metrics.split(",") if m.strip()]
    else:
        names = [str(m).strip().lower() for m in metrics]
    if "all" in names:
        names = list(INCEPTION_METRICS)
    if mode == "digits":  # the digits counterpart of FID is fd_digits plus, for labelled samples, acc_digits
        out = []
        for n in names:
            out += {"fid": DIGITS_METRICS, "fd_digits": ("fd_digits",), "acc_digits": ("acc_digits",)}.get(n, ())
        return tuple(dict.fromkeys(out)) or DIGITS_METRICS
    bad = [n for n in names if n not in INCEPTION_METRICS]
    if bad:
        raise UvitError(f"unknown metric {', '.join(bad)}; choose from {', '.join(INCEPTION_METRICS)} (or all)")
    return tuple(dict.fromkeys(names))


def _as_source(samples, channels: int) -> ImageSource:
    if isinstance(samples, ImageSource):
        return samples
    if isinstance(samples, (str, Path)):
        return open_source(samples, channels=channels)
    return ArraySource(samples)


def _check_count(source: ImageSource, num_samples: Optional[int], metrics: tuple) -> int:
    n = len(source)
    if num_samples is not None:
        if num_samples > n:
            raise UvitError(f"{source.name} holds {n} images but {num_samples} were asked for (--num-samples); "
                            "generate more samples or lower --num-samples")
        n = num_samples
    for m in metrics:
        if n < MIN_SAMPLES.get(m, 2):
            raise UvitError(f"{m} needs at least {MIN_SAMPLES.get(m, 2)} samples, got {n}")
    return n


def evaluate(samples, ref: str | Path | None = None, *, metrics: str | Iterable[str] | None = ("fid",),
             mode: str = "pytorch_fid", num_samples: Optional[int] = None, batch_size: int = 50,
             device: str = "cpu", inception_weights: str | Path | None = None, exact: bool = False,
             labels: Optional[np.ndarray] = None, protocol: Optional[dict] = None, frechet_method: str = "sqrtm",
             progress: Optional[Callable[[str, int, int], None]] = None) -> EvalResult:
    """Score ``samples`` against ``ref``; ``progress(stage, done, total)`` reports each pass.

    mode: pytorch_fid (default; U-ViT's published numbers), clean, legacy_tensorflow, or digits (the built-in
    8x8 digits; ``ref`` may be empty for the real digits). ``exact`` keeps the unfused Inception.
    frechet_method: "sqrtm" (the reference evaluators' numerics) or "eigh" (symmetric eigen form: same value for
    PSD covariances, several times faster on a CPU; see frechet.trace_sqrt_product).
    """
    mode = "digits" if mode == "digits" else canonical_mode(mode)
    names = parse_metrics(metrics, mode)
    source = _as_source(samples, channels=1 if mode == "digits" else 3)
    n = _check_count(source, num_samples, names)
    labels = source.labels if labels is None else np.asarray(labels)
    card = {"metrics": list(names), "mode": mode, **source.card(), **(protocol or {}), "count": n,
            "frechet": "scipy sqrtm, eps retry, imaginary check" if frechet_method == "sqrtm" else frechet_method}
    if n < len(source):
        card["count_note"] = f"first {n} of {len(source)} images"

    def stage(name):
        return (lambda done, total: progress(name, done, total)) if progress else None

    if mode == "digits":
        values, extra = _evaluate_digits(source, ref, names, n, labels, stage, batch_size, frechet_method)
        card.update(extra)
        return EvalResult(values, card)

    if not ref:
        raise UvitError("no reference to compare with: pass --ref (an image folder, an ADM reference batch, a "
                        "fid_stats .npz or `uvit fid-stats` output) or set eval.ref in the recipe")
    lazy: dict = {}

    def extractor() -> FeatureExtractor:  # loaded after the reference is validated (cheap errors first)
        if not lazy:
            model = load_fid_inception(inception_weights, device=device, exact=exact)
            lazy.update(x=FeatureExtractor(model, mode, device, batch_size), sha=sha256_file(model.weights_path))
        return lazy["x"]

    need = set()
    if "fid" in names:
        need.add("pool")
    if "sfid" in names:
        need.add("spatial")
    if {"precision", "recall"} & set(names):
        need.add("pool_features")
    reference = load_reference(
        ref, need=need, mode=mode, weights_sha256=lambda: (extractor(), lazy["sha"])[1],
        # Both Gaussian statistics come from the same pass, so the cache entry serves FID and sFID alike.
        extract=lambda src, keep: extractor().extract(src, want=("pool", "spatial"), keep_pool=keep,
                                                      progress=stage("reference")))
    if reference.shape and tuple(reference.shape[:2]) != tuple(source.shape[:2]):
        raise UvitError(f"the samples are {source.shape[0]}x{source.shape[1]} but the reference images are "
                        f"{reference.shape[0]}x{reference.shape[1]}; score both sets at one resolution")
    want = {k for m, k in (("fid", "pool"), ("sfid", "spatial"), ("is", "is")) if m in names}
    feats = extractor().extract(source, limit=n, want=want, keep_pool=bool({"precision", "recall"} & set(names)),
                                progress=stage("samples"))
    values = _inception_values(names, feats, reference, device, frechet_method)
    card.update(extractor().card())
    card["inception_weights_sha256"] = lazy["sha"]
    card.update(reference.card())
    if n < 2048 and ("fid" in names or "sfid" in names):
        card["note"] = (f"FID from {n} samples is biased upward (rank-deficient covariance); compare only with "
                        "FID at the same sample count")
    return EvalResult(values, card)


def _inception_values(names: tuple, feats, reference, device: str, method: str) -> dict:
    out = {}
    if "fid" in names:
        out["fid"] = frechet_distance_stats(feats.pool, reference.pool, method)
    if "sfid" in names:
        out["sfid"] = frechet_distance_stats(feats.spatial, reference.spatial, method)
    if "is" in names:
        out["is"] = feats.inception_score[0]
    if {"precision", "recall"} & set(names):
        p, r = precision_recall(reference.pool_features, feats.pool_features, device=device)
        out.update({k: v for k, v in (("precision", p), ("recall", r)) if k in names})
    return out


def _evaluate_digits(source: ImageSource, ref, names: tuple, n: int, labels, stage, batch_size: int, method: str):
    model = load_classifier()

    def extract(src: ImageSource, keep: bool = False, limit: Optional[int] = None, name: str = "reference"):
        feats, preds, done = [], [], 0
        total = min(len(src), limit) if limit else len(src)
        report = stage(name)
        for batch in src.batches(max(batch_size, 256), limit):
            f, p = digits_outputs(model, batch)
            feats.append(f)
            preds.append(p)
            done += len(batch)
            if report:
                report(done, total)
        f = np.concatenate(feats)
        return Features(n=len(f), pool=GaussianStats.from_features(f), shape=src.shape,
                        extra={"preds": np.concatenate(preds)})

    if ref:
        reference = load_reference(ref, need={"pool"}, extract=extract, mode="digits",
                                   weights_sha256=f"digits-v{DIGITS_VERSION}", channels=1)
        ref_stats, ref_card = reference.pool, reference.card()
    else:
        ref_stats = real_digits_stats(model)
        ref_card = {"ref": "built-in digits (scikit-learn, 1797 images)", "ref_kind": "digits", "ref_count": 1797}
    feats = extract(source, limit=n, name="samples")
    values = {}
    if "fd_digits" in names:
        values["fd_digits"] = frechet_distance_stats(feats.pool, ref_stats, method)
    if "acc_digits" in names and labels is not None:
        values["acc_digits"] = float((feats.extra["preds"] == np.asarray(labels)[:n]).mean())
    card = {"pipeline": f"digits classifier v{DIGITS_VERSION} (64-d features; a domain metric, NOT comparable to "
                        "Inception FID)", **ref_card}
    if "acc_digits" in names and labels is None:
        card["acc_note"] = "acc_digits needs class labels (arr_1 in the .npz); none were given"
    return values, card


def build_reference_stats(source, out: str | Path, *, mode: str = "pytorch_fid", num_samples: Optional[int] = None,
                          batch_size: int = 50, device: str = "cpu", inception_weights: str | Path | None = None,
                          exact: bool = False, keep_features: bool = False,
                          progress: Optional[Callable[[int, int], None]] = None) -> dict:
    """Write reference statistics of an image folder / .npz to ``out`` (``uvit fid-stats``); returns its card.

    The file holds mu/sigma (pool_3) and mu_s/sigma_s (sFID) as pytorch-fid and ADM name them, optional per-image
    pool features (``feats``, for precision/recall), and ``uvit_meta`` recording the mode, weights and source.
    """
    mode = "digits" if mode == "digits" else canonical_mode(mode)
    src = _as_source(source, channels=1 if mode == "digits" else 3)
    n = _check_count(src, num_samples, ("fid",))
    if mode == "digits":
        model = load_classifier()
        feats = np.concatenate([digits_outputs(model, b)[0] for b in src.batches(1024, n)])
        result = Features(n=len(feats), pool=GaussianStats.from_features(feats),
                          pool_features=feats.astype(np.float32) if keep_features else None)
        weights_sha, pipeline = f"digits-v{DIGITS_VERSION}", f"digits classifier v{DIGITS_VERSION}"
    else:
        model = load_fid_inception(inception_weights, device=device, exact=exact)
        extractor = FeatureExtractor(model, mode, device, batch_size)
        result = extractor.extract(src, limit=n, want=("pool", "spatial"), keep_pool=keep_features, progress=progress)
        weights_sha, pipeline = sha256_file(model.weights_path), extractor.card()["pipeline"]
    meta = {"mode": mode, "pipeline": pipeline, "source": src.name, "source_sha256": src.sha256(),
            "weights_sha256": weights_sha, "count": result.n, "shape": list(src.shape)}
    write_stats(out, result, meta)
    return {"out": str(out), **meta, "features_kept": keep_features}
