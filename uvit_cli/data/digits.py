"""The built-in data set: scikit-learn's bundled 8x8 handwritten digits (1,797 images, 10 classes, offline)."""

from __future__ import annotations

import numpy as np
import torch

NUM_CLASSES = 10
IMAGE_SIZE = 8


def load_digits_uint8() -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (1797, 8, 8) in 0..255, labels int64 (1797,)); the 0..16 gray levels are scaled by 255/16."""
    from sklearn.datasets import load_digits  # deferred: scikit-learn costs 1.5 s to import; only digits runs need it

    d = load_digits()
    images = np.clip(np.rint(d.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    return images, d.target.astype(np.int64)


def digits_tensors():
    """(images float32 (1797, 1, 8, 8) in [-1, 1], labels int64) as torch tensors, the training representation."""
    images, labels = load_digits_uint8()
    x = torch.from_numpy(images).float().div(127.5).sub(1.0)[:, None]
    return x, torch.from_numpy(labels)
