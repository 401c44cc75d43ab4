"""Forward FLOPs measured with PyTorch's FLOP counter (not estimated by formula)."""

from __future__ import annotations

import copy

import torch
from torch.utils.flop_counter import FlopCounterMode


def example_inputs(model, batch: int = 1, device="cpu", dtype=torch.float32):
    """Inputs of the right shapes for a UViT: noise, times, and a condition if the model takes one."""
    x = torch.randn(batch, model.in_chans, model.img_size, model.img_size, device=device, dtype=dtype)
    t = torch.full((batch,), 500.0, device=device)
    y = None
    if model.num_classes > 0:
        y = torch.zeros(batch, dtype=torch.long, device=device)
    elif model.text_dim > 0:
        y = torch.randn(batch, model.extras - (1 if model.time_cond == "token" else 0), model.text_dim,
                        device=device, dtype=dtype)
    return x, t, y


def forward_flops(model, batch: int = 1) -> int:
    """FLOPs of one forward pass (a multiply-add counts 2), counted on the meta device so any size is instant."""
    meta = model if next(model.parameters()).device.type == "meta" else None
    if meta is None:
        meta = copy.deepcopy(model).to("meta")
    x, t, y = example_inputs(meta, batch, device="meta")
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        meta(x, t, y)
    return int(counter.get_total_flops())
