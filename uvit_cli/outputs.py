"""Writing samples: a labelled grid PNG, one PNG per sample named by its seed, and ADM's .npz; all atomic."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from .files import atomic_path


def _as_numpy(images) -> np.ndarray:
    """uint8 (N, H, W, C) numpy from a tensor or array; one-channel images stay (N, H, W, 1)."""
    arr = images.cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    if arr.dtype != np.uint8 or arr.ndim != 4:
        raise ValueError(f"expected uint8 images (N, H, W, C), got {arr.dtype} {arr.shape}")
    return arr


def _pil(img: np.ndarray):
    return Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img)


def _save_png(img, path: Path) -> None:
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")


def save_grid(images, path: str | Path, labels: Sequence[str] | None = None, ncols: int | None = None,
              min_tile: int = 64, pad: int = 2) -> Path:
    """A grid PNG, one tile per image, each captioned below with its label (class name, prompt or seed).

    Small images (8x8 digits, 32px) are enlarged with nearest-neighbour to at least ``min_tile`` pixels so the
    captions fit.
    """
    arr = _as_numpy(images)
    n, h, w, _ = arr.shape
    scale = max(1, math.ceil(min_tile / max(h, w)))
    th, tw = h * scale, w * scale
    ncols = ncols or max(1, math.ceil(math.sqrt(n)))
    nrows = math.ceil(n / ncols)
    font = ImageFont.load_default()
    caption = 12 if labels else 0
    grid = Image.new("RGB", (ncols * (tw + pad) + pad, nrows * (th + caption + pad) + pad), "white")
    draw = ImageDraw.Draw(grid)
    for i in range(n):
        r, c = divmod(i, ncols)
        x, y = pad + c * (tw + pad), pad + r * (th + caption + pad)
        tile = _pil(arr[i]).convert("RGB").resize((tw, th), Image.NEAREST)
        grid.paste(tile, (x, y))
        if labels:
            text = _fit(draw, str(labels[i]), font, tw)
            draw.text((x, y + th), text, fill="black", font=font)
    path = Path(path)
    _save_png(grid, path)
    return path


def _fit(draw, text: str, font, width: int) -> str:
    """Shorten text with an ellipsis until it fits in ``width`` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."


def save_pngs(images, out_dir: str | Path, seeds: Sequence[int]) -> list[Path]:
    """One PNG per sample, named by its seed (``000042.png``), so runs over seed ranges can be merged."""
    arr = _as_numpy(images)
    if len(seeds) != len(arr):
        raise ValueError(f"{len(seeds)} seeds for {len(arr)} images")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for img, seed in zip(arr, seeds):
        p = out_dir / f"{int(seed):06d}.png"
        _save_png(_pil(img), p)
        paths.append(p)
    return paths


def save_npz(path: str | Path, images, labels=None) -> Path:
    """ADM's sample format: uint8 NHWC ``arr_0``, and class labels ``arr_1`` when given."""
    arr = _as_numpy(images)
    arrays = {"arr_0": arr}
    if labels is not None:
        lab = labels.cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
        arrays["arr_1"] = lab.astype(np.int64)
    path = Path(path)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to a temporary name
            np.savez(f, **arrays)
    return path
