"""The real photos that ship offline: scikit-learn's china.jpg and flower.jpg, matplotlib's grace_hopper.jpg."""

from __future__ import annotations

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
