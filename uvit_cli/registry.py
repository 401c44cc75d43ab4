"""Named tables the recipe refers to, torch-free so recipes can use them: the U-ViT sizes, the Stable
Diffusion VAEs with their latent scale factors, and the default CLIP text encoder.

A name is ``U-ViT-<size>/<patch>``: "U-ViT-S/2" is Small with 2x2 patches. Layer counts are the paper's
layers (in-blocks + mid-block + out-blocks); the official code's ``depth`` is ``num_layers - 1``.
"""

from __future__ import annotations

import difflib

# size -> (num_layers, embed_dim, num_heads, mlp_ratio); paper Table 1. "Tiny" is this project's own
# size for the built-in 8x8 digits and is not in the paper.
BASE_SIZES: dict[str, tuple[int, int, int, float]] = {
    "Tiny": (7, 128, 4, 4.0),
    "S": (13, 512, 8, 4.0),
    "S-Deep": (17, 512, 8, 4.0),
    "M": (17, 768, 12, 4.0),
    "L": (21, 1024, 16, 4.0),
    "H": (29, 1152, 16, 4.0),
}
PATCH_SIZES = (1, 2, 4, 8)


def official_depth(num_layers: int) -> int:
    """The official code's ``depth`` argument for a paper layer count (13 layers = depth 12)."""
    return num_layers - 1


def size_names() -> list[str]:
    """Every registry name, e.g. ``U-ViT-S/2``."""
    return [f"U-ViT-{s}/{p}" for s in BASE_SIZES for p in PATCH_SIZES]


def size_kwargs(name: str) -> dict:
    """Architecture fields of a registry name; raises KeyError with close names when unknown."""
    try:
        prefix, patch = name.rsplit("/", 1)
        base = prefix.removeprefix("U-ViT-")
        num_layers, embed_dim, num_heads, mlp_ratio = BASE_SIZES[base]
        patch_size = int(patch)
        if patch_size not in PATCH_SIZES:
            raise KeyError(name)
    except (KeyError, ValueError):
        close = difflib.get_close_matches(name, size_names(), n=3, cutoff=0.5)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise KeyError(f"unknown model size {name!r}{hint}; sizes are {', '.join(size_names())}") from None
    return dict(num_layers=num_layers, embed_dim=embed_dim, num_heads=num_heads, mlp_ratio=mlp_ratio,
                patch_size=patch_size)


# The Stable Diffusion KL autoencoders of the official runs (paper section 3), per data set kind: hub id and the
# latent scale factor. ImageNet uses the EMA-finetuned VAE, MS-COCO the original SD v1 VAE.
VAES: dict[str, tuple[str, float]] = {
    "imagenet": ("stabilityai/sd-vae-ft-ema", 0.18215),
    "coco": ("CompVis/stable-diffusion-v1-4:vae", 0.23010),
    "folder": ("stabilityai/sd-vae-ft-ema", 0.18215),
}

# Stable Diffusion's text encoder (CLIP ViT-L/14, OpenAI weights) as an open_clip MODEL/TAG.
DEFAULT_TEXT_ENCODER = "ViT-L-14/openai"
