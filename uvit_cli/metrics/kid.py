"""Kernel Inception Distance (Bińkowski et al. 2018) as clean-fid and torch-fidelity compute it.

The cubic polynomial kernel k(x, y) = (x.y / d + 1)^3 on Inception pool features, the unbiased MMD^2 of one
random subset of m samples from each set, averaged over ``num_subsets`` subsets (m = min(n_samples, n_ref,
max_subset_size); defaults 100 subsets of 1000). Subsets are drawn without replacement by a seeded legacy NumPy
generator in clean-fid's order (reference subset, then sample subset), so ``np.random.seed(s)`` before clean-fid's
``kernel_distance`` draws the same subsets as ``seed=s`` here. Sums run in float64.
"""

from __future__ import annotations

import numpy as np

from ..errors import UvitError

NUM_SUBSETS = 100
MAX_SUBSET_SIZE = 1000


def _mmd2(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 of two equal-size sets under the cubic polynomial kernel."""
    m, d = x.shape
    kxx = (x @ x.T / d + 1) ** 3
    kyy = (y @ y.T / d + 1) ** 3
    kxy = (x @ y.T / d + 1) ** 3
    within = (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1))
    return float(within - 2 * kxy.sum() / (m * m))


def kernel_inception_distance(samples, reference, *, num_subsets: int = NUM_SUBSETS,
                              max_subset_size: int = MAX_SUBSET_SIZE, seed: int = 0) -> dict:
    """{"kid": mean MMD^2 over subsets, "kid_std": their standard deviation, "kid_subsets", "kid_subset_size",
    "kid_seed"} for (n, d) sample and reference features."""
    x_all = np.asarray(reference, dtype=np.float64)
    y_all = np.asarray(samples, dtype=np.float64)
    if x_all.ndim != 2 or y_all.ndim != 2 or x_all.shape[1] != y_all.shape[1]:
        raise UvitError(f"KID needs (n, d) features of one width, got {y_all.shape} and {x_all.shape}")
    m = min(len(x_all), len(y_all), max_subset_size)
    if m < 2:
        raise UvitError(f"KID needs at least 2 samples and 2 reference images, got {len(y_all)} and {len(x_all)}")
    rng = np.random.RandomState(seed)
    values = []
    for _ in range(num_subsets):
        x = x_all[rng.choice(len(x_all), m, replace=False)]
        y = y_all[rng.choice(len(y_all), m, replace=False)]
        values.append(_mmd2(x, y))
    return {"kid": float(np.mean(values)), "kid_std": float(np.std(values)), "kid_subsets": num_subsets,
            "kid_subset_size": m, "kid_seed": seed}
