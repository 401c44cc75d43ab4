"""uvit: U-ViT (Bao et al., CVPR 2023) for people who train and evaluate image generators."""

__version__ = "0.1.0"
