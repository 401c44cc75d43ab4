"""Shared builders for the encode-latents tests: tiny random VAE / CLIP text tower, image trees, COCO files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from photos import photo_image

# A 4-level AutoencoderKL (downsampling by 8 like the SD VAE) with 8 channels: milliseconds per image.
TINY_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=4,
                block_out_channels=(8, 8, 8, 8), down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4)

# An open_clip text tower with CLIP's vocabulary and context but width 32 and 2 layers (QuickGELU as OpenAI's).
TINY_CLIP = {"embed_dim": 16, "quick_gelu": True,
             "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16},
             "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}}


def tiny_vae(seed: int = 0):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(**TINY_VAE).eval()


def save_tiny_vae(path: Path, seed: int = 0) -> Path:
    tiny_vae(seed).save_pretrained(str(path))
    return path


def tiny_text_tower(seed: int = 0):
    from uvit_cli.text import build_text_tower

    torch.manual_seed(seed)
    return build_text_tower(TINY_CLIP).eval()


def save_tiny_clip(path: Path, seed: int = 0) -> Path:
    """An open_clip folder: open_clip_config.json + open_clip_model.safetensors (the hub repo layout)."""
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    (path / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CLIP, "preprocess_cfg": {}}))
    sd = {k: v.contiguous() for k, v in tiny_text_tower(seed).state_dict().items()}
    save_file(sd, str(path / "open_clip_model.safetensors"))
    return path


def photo_folder(root: Path, n: int, h: int, w: int, seed: int = 0) -> Path:
    """A folder of ``n`` photo-like PNGs of h x w (00.png, 01.png, ...), for folder encodes."""
    root.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for k in range(n):
        photo_image(rng, h, w).save(root / f"{k:02d}.png")
    return root


def imagenet_tree(root: Path, per_class: int = 5, wnids=("n01440764", "n01443537", "n01484850"),
                  bad: bool = True, seed: int = 0) -> Path:
    """``root/train/<wnid>/*.JPEG`` with assorted sizes; with ``bad``: a CMYK, a gray, an RGBA PNG, a truncated
    JPEG and a corrupt file among them."""
    rng = np.random.default_rng(seed)
    for c, wnid in enumerate(wnids):
        d = root / "train" / wnid
        d.mkdir(parents=True, exist_ok=True)
        for k in range(per_class):
            photo_image(rng, 36 + 3 * k, 48 - 2 * c).save(d / f"{wnid}_{k}.JPEG", quality=90)
    if bad:
        d0, d1 = root / "train" / wnids[0], root / "train" / wnids[1]
        photo_image(rng, 40, 40, "CMYK").save(d0 / "x_cmyk.JPEG")
        photo_image(rng, 40, 44, "L").save(d0 / "x_gray.JPEG")
        rgba = photo_image(rng, 40, 40, "RGBA")
        rgba.putalpha(128)
        rgba.save(d1 / "x_alpha.png")
        buf = d1 / "x_trunc.JPEG"
        photo_image(rng, 64, 64).save(buf, quality=95)
        buf.write_bytes(buf.read_bytes()[:600])
        (d1 / "x_corrupt.JPEG").write_bytes(b"\xff\xd8 this is not a jpeg")
    return root


def coco_tree(root: Path, split: str = "train", n: int = 5, seed: int = 0) -> Path:
    """``root/{split}2014/*.jpg`` + ``root/annotations/captions_{split}2014.json`` with 5 (or 6) captions."""
    rng = np.random.default_rng(seed)
    (root / f"{split}2014").mkdir(parents=True, exist_ok=True)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    images, anns = [], []
    ids = [int(x) for x in rng.permutation(np.arange(100, 100 + 7 * n, 7))]   # unsorted ids: order must be by id
    for k, img_id in enumerate(ids):
        name = f"COCO_{split}2014_{img_id:012d}.jpg"
        photo_image(rng, 40 + k, 52).save(root / f"{split}2014" / name)
        images.append({"id": img_id, "file_name": name, "height": 40 + k, "width": 52})
        for j in range(6 if k == 0 else 5):
            anns.append({"id": 1000 * img_id + j, "image_id": img_id, "caption": f"image {img_id} caption {j} "})
    anns = anns[::-1]                          # annotation-file order, not id order, decides caption order
    (root / "annotations" / f"captions_{split}2014.json").write_text(
        json.dumps({"images": images, "annotations": anns}))
    return root
