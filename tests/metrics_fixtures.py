"""Shared builders for the metrics tests: random-weight FID Inception files and small image sets."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from uvit_cli.metrics.inception import WEIGHTS_FILE, random_state_dict


def write_random_inception(torch_home: Path, seed: int = 0) -> Path:
    """A random FID Inception saved where torch hub (and so pytorch-fid / clean-fid) looks for the real file."""
    path = torch_home / "hub" / "checkpoints" / WEIGHTS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        torch.save(random_state_dict(seed), path)
    return path


def smooth_images(n: int, size: int, seed: int) -> np.ndarray:
    """uint8 (n, size, size, 3) images with structure (blurred noise + gradients), not pure noise."""
    rng = np.random.default_rng(seed)
    base = rng.uniform(0, 255, (n, size // 4 + 1, size // 4 + 1, 3))
    img = base.repeat(4, axis=1).repeat(4, axis=2)[:, :size, :size]
    ramp = np.linspace(0, 60, size)[None, :, None, None] * rng.uniform(-1, 1, (n, 1, 1, 3))[:, None]
    return np.clip(img + ramp[:, 0] + rng.normal(0, 8, img.shape), 0, 255).astype(np.uint8)


def write_pngs(folder: Path, images: np.ndarray) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(images):
        Image.fromarray(img.squeeze()).save(folder / f"{i:05d}.png")
    return folder
