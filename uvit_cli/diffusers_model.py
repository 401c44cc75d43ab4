"""``UViTModel``: the U-ViT as a diffusers model (``ModelMixin`` + ``ConfigMixin``), for ``uvit export``.

It *is* our :class:`~uvit_cli.model.UViT` (a subclass: the same modules, the same state-dict keys, so the
exported ``diffusion_pytorch_model.safetensors`` holds exactly the weights ``uvit sample`` loads) and adds what
diffusers code expects: ``save_pretrained`` / ``from_pretrained`` with a ``config.json``, and a forward in the
diffusers convention, ``model(sample, timestep, class_labels=... | encoder_hidden_states=...).sample``, where
``timestep`` is a diffusers scheduler's integer index k in [0, N). Index k is the noise level of the scheduler's
``alphas_cumprod[k]``, which ``uvit export`` writes to equal our schedule at sampler time t = (k + 1) / N, so the
model feeds the network ``schedule.net_time((k + 1) / N)`` (VP-SDE: 999 t; discrete: k + 1, the official n).

Importing this module imports diffusers (about 4.5 s), so only ``uvit_cli.export`` imports it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput

from .build import build_schedule, model_kwargs
from .model import UViT
from .recipe import Recipe, recipe_from_dict, recipe_to_dict
from .runtime import to_device


@dataclass
class UViTModelOutput(BaseOutput):
    """The predicted noise eps, shaped like the input sample."""

    sample: torch.Tensor


class UViTModel(ModelMixin, UViT, ConfigMixin):
    """U-ViT with diffusers' saving, loading and calling conventions (see the module docstring). The base order
    keeps torch's attribute lookup right after ModelMixin's, as in diffusers' own (ModelMixin, ConfigMixin) models."""

    config_name = "config.json"

    @register_to_config
    def __init__(self, img_size: int = 32, patch_size: int = 2, in_chans: int = 3, embed_dim: int = 512,
                 num_layers: int = 13, num_heads: int = 8, mlp_ratio: float = 4.0, qkv_bias: bool = False,
                 mlp_time_embed: bool = False, num_classes: int = 0, null_class: bool = False, text_dim: int = 0,
                 text_tokens: int = 77, skip: str = "concat_linear", time_cond: str = "token", conv: str = "after",
                 patch_embed_type: str = "linear", pos_embed_type: str = "learned", grad_checkpoint: bool = False,
                 diffusion: dict | None = None, num_train_timesteps: int = 1000):
        # Config keys are the recipe's model fields, except patch_embed / pos_embed (+ "_type"): diffusers serves
        # config keys as attributes, and those two names are the network's own modules.
        # UViT.__init__ alone: ModelMixin.__init__ would build a default UViT first (the MRO reaches UViT.__init__).
        UViT.__init__(self, img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim,
                      num_layers=num_layers, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                      mlp_time_embed=mlp_time_embed, num_classes=num_classes, null_class=null_class,
                      text_dim=text_dim, text_tokens=text_tokens, skip=skip, time_cond=time_cond, conv=conv,
                      patch_embed=patch_embed_type, pos_embed=pos_embed_type, grad_checkpoint=grad_checkpoint)
        self._gradient_checkpointing_func = None
        self.schedule = build_schedule(recipe_from_dict({"diffusion": dict(diffusion or {})}))
        self.num_train_timesteps = int(num_train_timesteps)

    @classmethod
    def from_uvit(cls, model: UViT, recipe: Recipe) -> "UViTModel":
        """The same network and weights as ``model`` (built from ``recipe``), in the diffusers class."""
        kw = {**model_kwargs(recipe.model), "grad_checkpoint": False}
        kw.pop("conv_init")  # how the conv started; the trained weights are loaded below
        kw.pop("checkpoint_policy")  # training memory only
        kw["patch_embed_type"], kw["pos_embed_type"] = kw.pop("patch_embed"), kw.pop("pos_embed")
        n = recipe.diffusion.num_timesteps if recipe.diffusion.formulation == "discrete" else 1000
        out = cls(**kw, diffusion=recipe_to_dict(recipe)["diffusion"], num_train_timesteps=n)
        out.load_state_dict(model.state_dict(), strict=True)
        return out.eval()

    def network_time(self, timestep, batch: int) -> torch.Tensor:
        """A diffusers timestep index k (scalar or (B,)) -> the time the network was trained on, float32 on the CPU
        (computed in float64 there: some devices have no float64)."""
        k = torch.as_tensor(timestep).detach().to("cpu", torch.float64).reshape(-1)
        # the VP and discrete schedulers index noise level k at t = (k + 1) / N; flow matching's timestep is N t
        offset = 0.0 if self.schedule.kind == "flow" else 1.0
        t_net = self.schedule.net_time((k + offset) / self.num_train_timesteps).float()
        return t_net.expand(batch) if t_net.numel() == 1 else t_net

    def forward(self, sample: torch.Tensor, timestep, class_labels: torch.Tensor | None = None,
                encoder_hidden_states: torch.Tensor | None = None, return_dict: bool = True):
        """eps(sample, timestep | condition): class ids for class models, (B, 77, D) text features for text ones."""
        t_net = to_device(self.network_time(timestep, sample.shape[0]), sample.device)
        y = class_labels if self.num_classes > 0 else encoder_hidden_states if self.text_dim > 0 else None
        eps = UViT.forward(self, sample, t_net, y)
        return UViTModelOutput(sample=eps) if return_dict else (eps,)
