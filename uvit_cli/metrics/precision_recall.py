"""Improved precision and recall (Kynkäänniemi et al. 2019) with ADM's manifold estimator.

Each set's manifold is the union of balls around its points, the radius of a point being its squared distance
to its k-th nearest *other* point of the same set (k = 3; ADM takes sorted position k including the zero
self-distance). A sample counts as precise when it lies inside (<=, inclusive) some reference ball; a reference
counts as recalled when it lies inside some sample ball. Distances are squared L2,
max(|u|^2 - 2 u.v + |v|^2, 0), computed blockwise in float32 so memory stays bounded (ADM computes a float16
pass first; that changes P/R by about 1e-3).
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import UvitError
from ..runtime import to_device

K = 3
BLOCK = 4096


def _as_tensor(x, device) -> torch.Tensor:
    t = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))
    return to_device(t, device)


def squared_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(len(a), len(b)) squared Euclidean distances, clamped at 0 (ADM's DistanceBlock form)."""
    na = (a * a).sum(dim=1, keepdim=True)
    nb = (b * b).sum(dim=1, keepdim=True).t()
    return (na - 2 * (a @ b.t()) + nb).clamp_min_(0)


def manifold_radii(feats, k: int = K, block: int = BLOCK, device: str | torch.device = "cpu") -> torch.Tensor:
    """Squared distance from each point to its k-th nearest other point of the same set (float32, on ``device``)."""
    x = _as_tensor(feats, device)
    n = len(x)
    if n <= k:
        raise UvitError(f"precision/recall with k={k} needs more than {k} feature vectors per set, got {n}")
    radii = torch.empty(n, device=x.device)
    for r0 in range(0, n, block):
        rows = x[r0:r0 + block]
        best = None  # the k+1 smallest distances seen so far for each row, self included
        for c0 in range(0, n, block):
            d = squared_distances(rows, x[c0:c0 + block])
            cand = d if best is None else torch.cat([best, d], dim=1)
            best = torch.topk(cand, min(k + 1, cand.shape[1]), dim=1, largest=False).values
        radii[r0:r0 + block] = best[:, k]
    return radii


def precision_recall(real, fake, k: int = K, block: int = BLOCK,
                     device: str | torch.device = "cpu") -> tuple[float, float]:
    """(precision, recall) of ``fake`` features against ``real`` features, both (N, d)."""
    real_t, fake_t = _as_tensor(real, device), _as_tensor(fake, device)
    if real_t.shape[1] != fake_t.shape[1]:
        raise UvitError(f"feature dimensions differ ({real_t.shape[1]} vs {fake_t.shape[1]})")
    r_real = manifold_radii(real_t, k, block, device)
    r_fake = manifold_radii(fake_t, k, block, device)
    fake_in = torch.zeros(len(fake_t), dtype=torch.bool, device=real_t.device)
    real_in = torch.zeros(len(real_t), dtype=torch.bool, device=real_t.device)
    for r0 in range(0, len(real_t), block):
        for c0 in range(0, len(fake_t), block):
            d = squared_distances(real_t[r0:r0 + block], fake_t[c0:c0 + block])
            fake_in[c0:c0 + block] |= (d <= r_real[r0:r0 + block, None]).any(dim=0)
            real_in[r0:r0 + block] |= (d <= r_fake[None, c0:c0 + block]).any(dim=1)
    return int(fake_in.sum()) / len(fake_t), int(real_in.sum()) / len(real_t)  # exact counts, no device float64
