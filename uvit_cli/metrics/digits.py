"""The digits metric: a domain-specific Fréchet distance and class accuracy for the built-in 8x8 digits.

A small CNN trained by this project on scikit-learn's digits (seeded, deterministic, a few seconds on a CPU,
cached under $UVIT_CACHE or ~/.cache/uvit) supplies 64-d penultimate features. ``fd_digits`` is the Fréchet
distance of those features between samples and the 1,797 real digits; ``acc_digits`` is the fraction of
class-conditional samples that the classifier assigns to their intended class. It is a CPU-friendly quality
signal for training monitors and ablations, NOT comparable to Inception FID.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import nn

from ..data.digits import load_digits_uint8
from ..errors import UvitError
from ..files import cache_dir, read_safetensors, write_safetensors
from .frechet import GaussianStats, frechet_distance_stats

log = logging.getLogger(__name__)

VERSION = 1          # bump when the architecture or training recipe changes (new cache file)
FEATURE_DIM = 64
SEED = 0
EPOCHS = 60
BATCH = 128


class DigitsClassifier(nn.Module):
    """conv 1->16 -> conv 16->32 -> avgpool 2 -> fc 512->64 (the features) -> fc 64->10, ReLUs between."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
            nn.AvgPool2d(2), nn.Flatten(),
            nn.Linear(32 * 4 * 4, FEATURE_DIM), nn.ReLU(),
        )
        self.head = nn.Linear(FEATURE_DIM, 10)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (B, 1, 8, 8) in [-1, 1] -> (features (B, 64), logits (B, 10))."""
        f = self.body(x)
        return f, self.head(f)


def to_input(images) -> torch.Tensor:
    """uint8 (B, 8, 8), (B, 8, 8, 1) or (B, 1, 8, 8) -> float (B, 1, 8, 8) in [-1, 1]."""
    if hasattr(images, "detach"):
        images = images.detach().cpu().numpy()
    a = np.asarray(images)
    if a.dtype != np.uint8:
        if a.dtype.kind == "f" and not np.isfinite(a).all():
            raise UvitError("the digit samples contain NaN or inf values: the sampler diverged")
        raise UvitError(f"digit samples must be uint8 0..255, got {a.dtype}")
    if a.ndim == 4 and a.shape[-1] == 1:
        a = a[..., 0]
    elif a.ndim == 4 and a.shape[1] == 1:
        a = a[:, 0]
    if a.ndim != 3 or a.shape[1:] != (8, 8):
        raise UvitError(f"the digits metric scores 8x8 gray images, got shape {a.shape}; "
                        "use an Inception --mode for other images")
    return torch.from_numpy(a.astype(np.float32)).div(127.5).sub(1.0)[:, None]


@contextmanager
def one_thread():
    """Run a tiny network on one CPU thread: as fast, immune to oversubscribed cores (where multi-threaded small
    ops slow down by 10-50x), and bit-reproducible whatever the caller's thread setting."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def train_classifier(seed: int = SEED, epochs: int = EPOCHS) -> DigitsClassifier:
    """Train on all 1,797 digits with +-1 pixel shifts and light noise (so features are not brittle); deterministic."""
    with one_thread():
        return _train(seed, epochs)


def _train(seed: int, epochs: int) -> DigitsClassifier:
    images, labels = load_digits_uint8()
    x, y = to_input(images), torch.from_numpy(labels)
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DigitsClassifier()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), BATCH):
            idx = order[i:i + BATCH]
            xb = x[idx]
            dy, dx = torch.randint(-1, 2, (2,), generator=gen).tolist()
            xb = torch.roll(xb, shifts=(dy, dx), dims=(2, 3))
            xb = (xb + 0.1 * torch.randn(xb.shape, generator=gen)).clamp(-1, 1)
            loss = nn.functional.cross_entropy(model(xb)[1], y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return model.eval()


def classifier_path() -> Path:
    return cache_dir() / f"digits_classifier_v{VERSION}_seed{SEED}.safetensors"


def load_classifier(path: str | Path | None = None) -> DigitsClassifier:
    """The cached classifier; trained once (seconds) and written atomically when the cache has none."""
    p = Path(path) if path else classifier_path()
    model = DigitsClassifier()
    if p.is_file():
        try:
            model.load_state_dict(read_safetensors(p))
            return model.eval()
        except Exception as e:  # noqa: BLE001 - a corrupt cache entry is rebuilt
            log.warning("rebuilding the digits classifier cache %s (%s)", p, e)
    log.info("training the digits metric classifier once (cached at %s)", p)
    with torch.enable_grad():
        model = train_classifier()
    write_safetensors(p, model.state_dict(),
                      {"what": "uvit digits metric classifier", "version": str(VERSION), "seed": str(SEED)})
    return model


@torch.inference_mode()
def digits_outputs(model: DigitsClassifier, images, batch_size: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """(features (N, 64) float64, predicted classes (N,)) for uint8 digit images."""
    x = to_input(images)
    feats, preds = [], []
    with one_thread():
        for i in range(0, len(x), batch_size):
            f, logits = model(x[i:i + batch_size])
            feats.append(f.double().numpy())
            preds.append(logits.argmax(1).numpy())
    return np.concatenate(feats), np.concatenate(preds)


def real_digits_stats(model: DigitsClassifier) -> GaussianStats:
    """Feature statistics of all 1,797 real digits (the reference for ``fd_digits``)."""
    feats, _ = digits_outputs(model, load_digits_uint8()[0])
    return GaussianStats.from_features(feats)


def score_digits(images, labels: Optional[np.ndarray] = None, model: Optional[DigitsClassifier] = None,
                 ref: Optional[GaussianStats] = None) -> dict:
    """{"fd_digits": .., "acc_digits": .. (only with labels)} for uint8 8x8 samples against the real digits."""
    model = model or load_classifier()
    feats, preds = digits_outputs(model, images)
    if len(feats) < 2:
        raise UvitError(f"fd_digits needs at least 2 samples, got {len(feats)}")
    ref = ref or real_digits_stats(model)
    out = {"fd_digits": frechet_distance_stats(GaussianStats.from_features(feats), ref)}
    if labels is not None:
        labels = np.asarray(labels)
        if len(labels) != len(preds):
            raise UvitError(f"{len(labels)} labels for {len(preds)} samples")
        out["acc_digits"] = float((preds == labels).mean())
    return out
