"""Score a set of samples against a reference: FID, sFID, IS, precision, recall (Inception) or the digits metric.

:func:`evaluate` takes an image folder, an ADM-style .npz, an :class:`ImageSource` or a uint8 array and returns
the metric values with a protocol card: what was scored, against what, through which pipeline. Two numbers are
comparable when their cards agree.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional

import numpy as np

from .. import distributed
from ..errors import UvitError
from ..files import sha256_file
from ..choices import Metric, choices
from .digits import VERSION as DIGITS_VERSION
from .digits import digits_outputs, load_classifier, real_digits_stats
from .features import FeatureAccumulator, Features, FeatureExtractor, canonical_mode
from .frechet import GaussianAccumulator, GaussianStats, frechet_distance_stats
from .inception import load_fid_inception
from .kid import kernel_inception_distance
from .parts import Parts, Tracker, make_parts
from .precision_recall import precision_recall
from .reference import load_reference, write_stats
from .sources import ArraySource, ImageSource, open_source

log = logging.getLogger(__name__)

DIGITS_METRICS = ("fd_digits", "acc_digits")
INCEPTION_METRICS = tuple(m for m in choices(Metric) if m not in DIGITS_METRICS)  # fid, sfid, is, precision, recall
MIN_SAMPLES = {"fid": 2, "sfid": 2, "is": 1, "precision": 4, "recall": 4, "kid": 2}  # P/R: k = 3 neighbours + 1
KEEP_POOL = {"precision", "recall", "kid"}   # metrics that need every sample's pool features


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
    bad = [n for n in names if n not in INCEPTION_METRICS + DIGITS_METRICS]
    if bad:
        raise UvitError(f"--metrics: unknown metric {', '.join(bad)}; choose from "
                        f"{', '.join(INCEPTION_METRICS + DIGITS_METRICS)} (or all)")
    if mode == "digits":  # the digits counterpart of FID is fd_digits plus, for labelled samples, acc_digits
        out = []
        for n in names:
            out += {"fid": DIGITS_METRICS, "fd_digits": ("fd_digits",), "acc_digits": ("acc_digits",)}.get(n, ())
        return tuple(dict.fromkeys(out)) or DIGITS_METRICS
    bad = [n for n in names if n not in INCEPTION_METRICS]
    if bad:
        raise UvitError(f"--metrics: {', '.join(bad)} apply to the digits mode only; choose from "
                        f"{', '.join(INCEPTION_METRICS)} (or all)")
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
             progress: Optional[Callable[[str, int, int], None]] = None,
             shards_dir: str | Path | None = None) -> Optional[EvalResult]:
    """Score ``samples`` against ``ref``; ``progress(stage, done, total)`` reports each pass.

    mode: pytorch_fid (default; U-ViT's published numbers), clean, legacy_tensorflow, or digits (the built-in
    8x8 digits; ``ref`` may be empty for the real digits). ``exact`` keeps the unfused Inception.
    frechet_method: "sqrtm" (the reference evaluators' numerics) or "eigh" (symmetric eigen form: same value for
    PSD covariances, several times faster on a CPU; see frechet.trace_sqrt_product).
    ``shards_dir``: under torchrun, every rank calls this; each computes the features of its share of the samples
    into part files there (a folder every rank sees), rank 0 accumulates them in index order, with the batches
    one process uses, and returns the result (the other ranks return None).
    """
    mode = "digits" if mode == "digits" else canonical_mode(mode)
    names = parse_metrics(metrics, mode)
    source = _as_source(samples, channels=1 if mode == "digits" else 3)
    n = _check_count(source, num_samples, names)
    labels = source.labels if labels is None else np.asarray(labels)
    sharded = shards_dir is not None and distributed.world_size() > 1
    main = not sharded or distributed.is_main()
    card = {}
    if main:
        card = {"metrics": list(names), "mode": mode, **source.card(), **(protocol or {}), "count": n,
                "frechet": "scipy sqrtm, eps retry, imaginary check" if frechet_method == "sqrtm" else frechet_method}
        if n < len(source):
            card["count_note"] = f"first {n} of {len(source)} images"
        if sharded:
            card["feature_processes"] = distributed.world_size()

    def stage(name):
        return (lambda done, total: progress(name, done, total)) if progress and main else None

    def run_on_main(fn):  # rank 0 runs it; its UvitError reaches every rank
        return distributed.first_error(fn) if sharded else fn()

    shards = Path(shards_dir) if sharded else None
    if mode == "digits":
        model = load_classifier()
        held: dict = {}
        run_on_main(lambda: held.update(ref=_digits_reference(model, ref)))
        feats = _sample_features(DigitsPass(model, max(batch_size, 256)), source, n, stage("samples"), shards)
        if not main:
            return None
        values, extra = _digits_values(names, feats, held["ref"], labels, n, frechet_method)
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
    if KEEP_POOL & set(names):
        need.add("pool_features")

    def reference():
        reference = load_reference(
            ref, need=need, mode=mode, weights_sha256=lambda: (extractor(), lazy["sha"])[1],
            # Both Gaussian statistics come from the same pass, so the cache entry serves FID and sFID alike.
            extract=lambda src, keep: extractor().extract(src, want=("pool", "spatial"), keep_pool=keep,
                                                          progress=stage("reference")))
        if reference.shape and tuple(reference.shape[:2]) != tuple(source.shape[:2]):
            raise UvitError(f"the samples are {source.shape[0]}x{source.shape[1]} but the reference images are "
                            f"{reference.shape[0]}x{reference.shape[1]}; score both sets at one resolution")
        held["ref"] = reference

    held: dict = {}
    run_on_main(reference)
    want = {k for m, k in (("fid", "pool"), ("sfid", "spatial"), ("is", "is")) if m in names}
    fpass = InceptionPass(extractor(), want, bool(KEEP_POOL & set(names)), lazy["sha"])
    feats = _sample_features(fpass, source, n, stage("samples"), shards)
    if not main:
        return None
    values, extra = _inception_values(names, feats, held["ref"], device, frechet_method)
    card.update(extractor().card())
    card["inception_weights_sha256"] = lazy["sha"]
    card.update(held["ref"].card())
    card.update(extra)
    if n < 2048 and ("fid" in names or "sfid" in names):
        card["note"] = (f"FID from {n} samples is biased upward (rank-deficient covariance); compare only with "
                        "FID at the same sample count")
    return EvalResult(values, card)


# ---------------------------------------------------------------------------------------------------------------------
# The sample pass: one process, or shared over the ranks of a torchrun job
# ---------------------------------------------------------------------------------------------------------------------

class InceptionPass:
    """Samples -> Inception outputs (any process) -> FID/sFID/IS statistics and kept pool features (rank 0)."""

    def __init__(self, extractor: FeatureExtractor, want: set, keep_pool: bool, weights_sha256: str):
        self.extractor, self.want, self.keep_pool = extractor, want, keep_pool
        self.batch_size = extractor.batch_size
        self.outputs_needed = FeatureAccumulator(want, keep_pool).outputs
        self.identity = ["inception", extractor.mode, bool(extractor.model.fused), weights_sha256,
                         sorted(self.outputs_needed)]

    def outputs(self, batch) -> dict:
        return self.extractor.outputs(batch, self.outputs_needed)

    def accumulator(self) -> FeatureAccumulator:
        return FeatureAccumulator(self.want, self.keep_pool)


class DigitsPass:
    """Samples -> digits classifier features and predictions -> their statistics (the digits metric)."""

    def __init__(self, model, batch_size: int):
        self.model, self.batch_size = model, batch_size
        self.identity = ["digits", DIGITS_VERSION]

    def outputs(self, batch) -> dict:
        feats, preds = digits_outputs(self.model, batch)
        return {"feats": feats, "preds": preds}

    def accumulator(self) -> "DigitsAccumulator":
        return DigitsAccumulator()


class DigitsAccumulator:
    def __init__(self):
        self.pool, self.preds, self.n = GaussianAccumulator(), [], 0

    def update(self, out: dict) -> None:
        self.pool.update(out["feats"])
        self.preds.append(np.asarray(out["preds"]))
        self.n += len(out["preds"])

    def result(self, shape: tuple = ()) -> Features:
        return Features(n=self.n, pool=self.pool.result(), shape=tuple(shape),
                        extra={"preds": np.concatenate(self.preds)})


def feature_part_size(n: int, batch_size: int) -> int:
    """Rows per part of the many-process feature pass: whole batches (so every rank runs the batches one process
    would), about 64 parts."""
    return batch_size * max(1, math.ceil(n / batch_size / 64))


def _sample_features(fpass, source: ImageSource, n: int, progress, shards: Optional[Path]) -> Optional[Features]:
    """The features of the first n samples. One process: streamed batch by batch. Sharded: each rank computes
    whole-batch parts into ``shards`` and rank 0 feeds them, batch by batch in index order, to the accumulator,
    so the result equals one process's (same batches, same order); other ranks return None."""
    acc = fpass.accumulator()
    bs = fpass.batch_size
    if shards is None:
        for batch in source.batches(bs, n):
            acc.update(fpass.outputs(batch))
            if progress is not None:
                progress(acc.n, n)
        return acc.result(source.shape)
    stat = Path(source.name).stat() if Path(source.name).exists() else None
    ident = [source.name, stat.st_size if stat else None, stat.st_mtime_ns if stat else None, n, bs, fpass.identity]
    key = distributed.broadcast_object(hashlib.sha256(json.dumps(ident, default=str).encode()).hexdigest()[:16])
    parts = Parts(shards / f"features-{key}", n, feature_part_size(n, bs), prefix="features")

    def make(start: int, stop: int) -> dict:
        outs = [fpass.outputs(b) for b in source.batches(bs, stop, start)]
        return {k: np.concatenate([o[k] for o in outs]) for k in outs[0]}

    make_parts(parts, make, all_ranks=True, tracker=Tracker(progress), what="computing features")
    if not distributed.is_main():
        return None
    for s in parts.starts:
        arrays = parts.read(s)
        for i in range(0, parts.count(s), bs):
            acc.update({k: v[i:i + bs] for k, v in arrays.items()})
    parts.remove()
    if shards.is_dir() and not any(shards.iterdir()):
        shards.rmdir()
    return acc.result(source.shape)


def _inception_values(names: tuple, feats, reference, device: str, method: str) -> tuple[dict, dict]:
    out, card = {}, {}
    if "fid" in names:
        out["fid"] = frechet_distance_stats(feats.pool, reference.pool, method)
    if "sfid" in names:
        out["sfid"] = frechet_distance_stats(feats.spatial, reference.spatial, method)
    if "is" in names:
        out["is"] = feats.inception_score[0]
    if {"precision", "recall"} & set(names):
        p, r = precision_recall(reference.pool_features, feats.pool_features, device=device)
        out.update({k: v for k, v in (("precision", p), ("recall", r)) if k in names})
    if "kid" in names:
        kid = kernel_inception_distance(feats.pool_features, reference.pool_features)
        out["kid"] = kid.pop("kid")
        card.update(kid, kid_definition="cubic polynomial kernel (x.y/d + 1)^3 on pool features, unbiased MMD^2, "
                                        "mean over subsets (clean-fid / torch-fidelity)")
    return out, card


def _digits_reference(model, ref) -> tuple[GaussianStats, dict]:
    if ref:
        def extract(src: ImageSource, keep: bool = False):
            fpass = DigitsPass(model, 1024)
            acc = fpass.accumulator()
            for batch in src.batches(fpass.batch_size):
                acc.update(fpass.outputs(batch))
            return acc.result(src.shape)

        reference = load_reference(ref, need={"pool"}, extract=extract, mode="digits",
                                   weights_sha256=f"digits-v{DIGITS_VERSION}", channels=1)
        return reference.pool, reference.card()
    return real_digits_stats(model), {"ref": "built-in digits (scikit-learn, 1797 images)", "ref_kind": "digits",
                                      "ref_count": 1797}


def _digits_values(names: tuple, feats: Features, reference, labels, n: int, method: str):
    ref_stats, ref_card = reference
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
