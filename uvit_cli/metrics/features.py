"""Streaming Inception feature extraction with a named preprocessing pipeline ("mode").

Modes (how uint8 images become the network's 299x299 input):
- ``pytorch_fid`` (default): the pipeline behind U-ViT's published numbers (pytorch-fid = U-ViT tools/fid_score.py
  = clean-fid ``legacy_pytorch``): x/255, F.interpolate bilinear align_corners=False to 299, then 2x - 1.
- ``clean``: clean-fid's ``clean`` resize (PIL bicubic per channel in float, no re-quantisation, clip to 0..255,
  via clean-fid's own resizer), then (x - 128)/128, run through the same FID Inception weights.
- ``legacy_tensorflow``: the TF1 graph's preprocessing (ADM evaluator, TTUR): legacy ResizeBilinear (source index
  i * in/out, no half-pixel offset, no antialias), then (x - 128)/128.
Batches stream through: only Gaussian sums, IS split sums and (for precision/recall) the pool features are kept.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import UvitError
from .frechet import GaussianAccumulator, GaussianStats
from .inception_score import SPLIT_SIZE, InceptionScoreAccumulator
from .sources import ImageSource, check_uint8_batch

log = logging.getLogger(__name__)

SIZE = 299
MODES = {
    "pytorch_fid": "pytorch-fid / U-ViT: [0,1] -> torch bilinear (align_corners=False) 299 -> 2x-1",
    "clean": "clean-fid clean: PIL bicubic float resize 299 (clean-fid resizer) -> (x-128)/128",
    "legacy_tensorflow": "TF1 / ADM evaluator: legacy ResizeBilinear 299 (no half-pixel) -> (x-128)/128",
}
ALIASES = {"legacy_pytorch": "pytorch_fid", "pytorch": "pytorch_fid", "pfid": "pytorch_fid",
           "adm": "legacy_tensorflow", "tf1": "legacy_tensorflow", "tensorflow": "legacy_tensorflow"}


def canonical_mode(mode: str) -> str:
    """A mode name or alias -> the canonical name; unknown names are a UvitError listing the choices."""
    m = ALIASES.get(mode, mode)
    if m not in MODES:
        raise UvitError(f"unknown --mode {mode!r}; choose one of {', '.join(MODES)} or digits "
                        f"(aliases: {', '.join(ALIASES)})")
    return m


def tf1_resize_bilinear(x: torch.Tensor, size: int = SIZE) -> torch.Tensor:
    """TF1 ``ResizeBilinear`` (align_corners=False, legacy grid): src = i * in/out, clamped upper neighbour.

    x: (B, C, H, W) float. Interpolates along the width first, then the height, as TF's kernel does.
    """
    def axis(n_in: int):
        scale = torch.tensor(n_in / size, dtype=torch.float32)
        src = torch.arange(size, dtype=torch.float32) * scale
        lo = src.floor()
        frac = (src - lo).to(x.device)
        lo = lo.long().clamp(max=n_in - 1)
        hi = (lo + 1).clamp(max=n_in - 1)
        return lo.to(x.device), hi.to(x.device), frac

    lo, hi, frac = axis(x.shape[-1])
    left, right = x.index_select(-1, lo), x.index_select(-1, hi)
    x = left + (right - left) * frac
    lo, hi, frac = axis(x.shape[-2])
    top, bottom = x.index_select(-2, lo), x.index_select(-2, hi)
    return top + (bottom - top) * frac[:, None]


def _clean_resize(batch: np.ndarray) -> np.ndarray:
    # clean-fid's own PIL float resizer, so "clean" means clean-fid's; deferred: clean-fid takes ~1 s to import
    from cleanfid.resize import make_resizer

    fn = make_resizer("PIL", False, "bicubic", (SIZE, SIZE))
    return np.stack([fn(img) for img in batch])


def preprocess(batch, mode: str = "pytorch_fid", device: str | torch.device = "cpu") -> torch.Tensor:
    """uint8 (B, H, W, 3) images -> the (B, 3, 299, 299) float32 network input of ``mode``."""
    mode = canonical_mode(mode)
    batch = check_uint8_batch(batch)
    if batch.shape[-1] != 3:
        raise UvitError(f"the Inception metrics need RGB images (3 channels), got {batch.shape[-1]}; for the "
                        "built-in digits use --mode digits")
    if mode == "clean":
        x = torch.from_numpy(_clean_resize(batch)).to(device).permute(0, 3, 1, 2).contiguous()
        return (x - 128) / 128
    # NCHW-contiguous like torchvision's ToTensor, so the unfused network runs exactly pytorch-fid's kernels.
    x = torch.from_numpy(np.require(batch, requirements=("C", "W"))).to(device).permute(0, 3, 1, 2).contiguous()
    if mode == "pytorch_fid":
        # Same op order as pytorch-fid: ToTensor (/255), interpolate, then 2x - 1.
        x = x.float().div(255)
        x = F.interpolate(x, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
        return 2 * x - 1
    x = tf1_resize_bilinear(x.float(), SIZE)
    return (x - 128) * 0.0078125


@dataclass
class Features:
    """What one pass over a set keeps: Gaussian stats of pool/spatial features, IS, and optionally pool features."""

    n: int
    pool: Optional[GaussianStats] = None
    spatial: Optional[GaussianStats] = None
    inception_score: Optional[tuple[float, float]] = None
    pool_features: Optional[np.ndarray] = None
    shape: tuple = ()
    extra: dict = field(default_factory=dict)


class FeatureExtractor:
    """An FID Inception plus a preprocessing mode, run batch by batch over an :class:`ImageSource` or batches."""

    def __init__(self, model, mode: str = "pytorch_fid", device: str | torch.device = "cpu", batch_size: int = 50):
        self.model = model.to(device).eval()
        self.mode = canonical_mode(mode)
        self.device = torch.device(device)
        self.batch_size = batch_size

    def card(self) -> dict:
        return {"mode": self.mode, "pipeline": MODES[self.mode],
                "inception": "FID Inception-v3 (TF 2015-12-05 port)" + (", BN folded" if self.model.fused else ""),
                "inception_weights": getattr(self.model, "weights_path", "")}

    @torch.inference_mode()
    def run(self, batch) -> "object":
        """InceptionOutputs of one uint8 batch."""
        return self.model(preprocess(batch, self.mode, self.device))

    def outputs(self, batch, want: Iterable[str]) -> dict[str, np.ndarray]:
        """The per-image float32 outputs ``want`` asks for (``pool``, ``spatial``, ``logits``) of one uint8 batch."""
        out = self.run(check_uint8_batch(batch))
        return {k: getattr(out, k).float().cpu().numpy() for k in want}

    def extract(self, source: ImageSource | Iterable, *, total: int | None = None, limit: int | None = None,
                want: Iterable[str] = ("pool", "spatial", "is"), keep_pool: bool = False,
                split_size: int = SPLIT_SIZE, progress: Optional[Callable[[int, int], None]] = None) -> Features:
        """Stream a source (or an iterable of uint8 batches) through the network; see :class:`Features`."""
        acc = FeatureAccumulator(want, keep_pool, split_size)
        if isinstance(source, ImageSource):
            total = min(len(source), limit) if limit else len(source)
            batches = source.batches(self.batch_size, limit)
        else:
            batches = source
        shape = ()
        for batch in batches:
            batch = check_uint8_batch(batch)
            shape = shape or batch.shape[1:]
            if batch.shape[1:] != shape:
                raise UvitError(f"batch of shape {batch.shape[1:]} after {shape}: all images must share one size")
            acc.update(self.outputs(batch, acc.outputs))
            if progress is not None:
                progress(acc.n, total or acc.n)
        return acc.result(shape)


class FeatureAccumulator:
    """What one pass over a set keeps from per-batch network outputs (dicts of ``pool`` / ``spatial`` /
    ``logits`` arrays): Gaussian sums, IS split sums and, with ``keep_pool``, the pool features. Fed the same
    batches in the same order, it gives the same bits, whichever process computed them."""

    def __init__(self, want: Iterable[str] = ("pool", "spatial", "is"), keep_pool: bool = False,
                 split_size: int = SPLIT_SIZE):
        want = set(want)
        self.keep_pool = keep_pool
        self.pool = GaussianAccumulator() if "pool" in want else None
        self.spatial = GaussianAccumulator() if "spatial" in want else None
        self.is_acc = InceptionScoreAccumulator(split_size) if "is" in want else None
        # the network outputs the accumulators read
        self.outputs = tuple(k for k, on in (("pool", self.pool is not None or keep_pool),
                                             ("spatial", self.spatial is not None),
                                             ("logits", self.is_acc is not None)) if on)
        self.kept: list[np.ndarray] = []
        self.n = 0

    def update(self, out: dict) -> None:
        if self.pool is not None:
            self.pool.update(out["pool"])
        if self.spatial is not None:
            self.spatial.update(out["spatial"])
        if self.is_acc is not None:
            self.is_acc.update(out["logits"])
        if self.keep_pool:
            self.kept.append(np.asarray(out["pool"], dtype=np.float32))
        self.n += len(next(iter(out.values())))

    def result(self, shape: tuple = ()) -> Features:
        if self.n == 0:
            raise UvitError("no images to score")
        return Features(
            n=self.n,
            pool=self.pool.result() if self.pool is not None else None,
            spatial=self.spatial.result() if self.spatial is not None else None,
            inception_score=self.is_acc.result() if self.is_acc is not None else None,
            pool_features=np.concatenate(self.kept) if self.keep_pool else None,
            shape=tuple(shape),
        )
