"""The real photos that ship offline: scikit-learn's china.jpg and flower.jpg, matplotlib's grace_hopper.jpg."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import matplotlib
import numpy as np
from PIL import Image


def photo_paths() -> dict[str, Path]:
    """name -> the JPEG file as installed (real camera JPEGs of 427x640 and 600x512 pixels)."""
    import sklearn.datasets

    images = Path(sklearn.datasets.__file__).parent / "images"
    hopper = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    return {"china": images / "china.jpg", "flower": images / "flower.jpg", "grace_hopper": hopper}


def photos() -> dict[str, np.ndarray]:
    """name -> uint8 RGB array."""
    return {k: np.asarray(Image.open(p).convert("RGB")) for k, p in photo_paths().items()}


@lru_cache(maxsize=None)
def _pil_photos() -> tuple:
    return tuple(Image.fromarray(a) for a in photos().values())


def photo_image(rng: np.random.Generator, h: int, w: int, mode: str = "RGB") -> Image.Image:
    """A (w x h) PIL image of a random region of a random real photo (its scale and place drawn from ``rng``),
    resized with BICUBIC: real image statistics at any small test size."""
    src = _pil_photos()[int(rng.integers(len(_pil_photos())))]
    W, H = src.size
    side = int(rng.integers(min(W, H) // 3, min(W, H) + 1))
    rw, rh = min(W, max(8, round(side * w / max(h, w)))), min(H, max(8, round(side * h / max(h, w))))
    x, y = int(rng.integers(0, W - rw + 1)), int(rng.integers(0, H - rh + 1))
    return src.crop((x, y, x + rw, y + rh)).resize((w, h), Image.BICUBIC).convert(mode)


def photo_crops(n: int, size: int, seed: int) -> np.ndarray:
    """uint8 (n, size, size, 3): square regions of the real photos, seeded."""
    rng = np.random.default_rng(seed)
    return np.stack([np.asarray(photo_image(rng, size, size)) for _ in range(n)])
