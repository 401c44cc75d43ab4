"""Shared builders for the sampling tests: tiny recipes and random-weight models, stand-in decoder and text encoder."""

from __future__ import annotations

import torch

from uvit_cli.build import build_model
from uvit_cli.recipe import recipe_from_dict

TINY = dict(size="", embed_dim=32, num_layers=3, num_heads=2, patch_size=2)


def class_recipe(**sample):
    return recipe_from_dict({"name": "tiny_digits", "model": {**TINY, "img_size": 8, "in_chans": 1,
                                                              "num_classes": 10, "null_class": True},
                             "data": {"name": "digits"},
                             "sample": {"sampler": "dpm_solver", "steps": 6, "cfg_scale": 2.0, "batch_size": 8,
                                        **sample}})


def uncond_recipe():
    return recipe_from_dict({"name": "tiny_uncond", "model": {**TINY, "img_size": 8, "in_chans": 3},
                             "data": {"name": "cifar10"}, "sample": {"sampler": "euler_maruyama", "steps": 5}})


def latent_text_recipe():
    return recipe_from_dict({"name": "tiny_t2i", "model": {**TINY, "img_size": 4, "in_chans": 4, "text_dim": 16,
                                                           "text_tokens": 77},
                             "data": {"name": "latents", "vae": "stub-vae", "text_encoder": "stub-clip",
                                      "scale_factor": 0.5},
                             "diffusion": {"formulation": "discrete"},
                             "sample": {"sampler": "dpm_solver_pp", "steps": 5, "cfg_scale": 3.0}})


def tiny_model(recipe, seed=0):
    torch.manual_seed(seed)
    m = build_model(recipe).eval()
    # Random init leaves the output layer near zero; scale it so samples actually depend on the network.
    with torch.no_grad():
        m.decoder_pred.weight.mul_(20)
    return m


class StubDecoder:
    """Stands in for the VAE: scaled latents (B, 4, h, w) -> images (B, 3, 2h, 2w) in [-1, 1]."""

    def __init__(self, scale_factor=0.5):
        self.scale_factor = scale_factor
        self.calls = []

    def decode(self, z):
        self.calls.append(z.shape[0])
        x = torch.tanh(z[:, :3] / self.scale_factor)
        return torch.nn.functional.interpolate(x, scale_factor=2, mode="nearest")


class StubTextEncoder:
    """Stands in for CLIP: a prompt -> a deterministic (77, 16) context; "" gets its own context."""

    def __init__(self):
        self.seen = []

    def encode(self, prompts):
        self.seen.append(list(prompts))
        out = []
        for p in prompts:
            g = torch.Generator().manual_seed(sum(map(ord, p)) + 7 * len(p))
            out.append(torch.randn(77, 16, generator=g))
        return torch.stack(out)

    def encode_fixed(self, prompts, micro_batch=16):
        return self.encode(prompts)
