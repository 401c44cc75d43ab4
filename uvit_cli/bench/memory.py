"""The checkpoint suite: what each activation-checkpointing policy saves and what it costs, counted exactly.

Memory is counted in the bytes held by tensors a training step creates (the weights and inputs that exist before it
are not counted), followed storage by storage from the op that creates it until it is freed: what the forward keeps
for backward (the activations, which grow with the batch) and the step's peak (the gradients included, which do
not). That is what a GPU allocator's peak measures minus its caching and fragmentation, and it needs no GPU: it
does not depend on the device. Cost is the step's FLOPs by PyTorch's counter (recompute included); the time on a
given card is `uvit bench --suite train --grad-ckpt both` with the policy set by --set.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from ..build import build_model
from ..flops import example_inputs
from ..model import CHECKPOINT_POLICIES
from ..recipe import Recipe, replace
from ..runtime import autocast

POLICIES = ("none", *CHECKPOINT_POLICIES)   # none: no checkpointing (the reference row)


class LiveTensorBytes(TorchDispatchMode):
    """Counts the bytes of every storage an op creates while active, until the storage is freed; ``peak`` is the
    most held at once. A storage is counted once however many views share it."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._held: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # An output that shares an input's storage (a view such as weight.t(), an in-place op) allocates nothing.
        inputs = {id(t.untyped_storage()) for t in pytree.tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor) and t.device.type != "meta"}
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                storage = t.untyped_storage()
                if id(storage) not in inputs:
                    self._track(storage)
        return out

    def _track(self, storage) -> None:
        key = id(storage)   # PyTorch keeps one Python object per live storage, so its id names the storage
        if key in self._held:
            return
        n = storage.nbytes()
        self._held.add(key)
        self.live += n
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._free, key, n)

    def _free(self, key: int, n: int) -> None:
        self._held.discard(key)
        self.live -= n


def _model(recipe: Recipe, policy: str, device: str):
    model = build_model(replace(recipe, model={"grad_checkpoint": policy != "none",
                                               "checkpoint_policy": "all" if policy == "none" else policy}))
    return model.to(device).train()


def step_memory_and_flops(recipe: Recipe, policy: str, *, batch: int, device: str = "cpu", precision: str = "fp32",
                          seed: int = 0) -> dict:
    """Under one checkpoint policy ("none" for no checkpointing): the bytes a training step's forward keeps for
    backward, the peak it holds beyond the weights (forward, MSE loss, backward: the gradients included), and its
    FLOPs; the forward under ``precision``'s autocast (bf16 keeps about half the bytes)."""
    torch.manual_seed(seed)
    model = _model(recipe, policy, device)
    x, t, y = example_inputs(model, batch, device=device)
    target = torch.randn_like(x)
    meter = LiveTensorBytes()
    with meter:
        with autocast(device, precision):
            out = model(x, t, y)
        loss = F.mse_loss(out.float(), target)
        del out
        kept = meter.live          # what the forward keeps for backward: the activations checkpointing trades
        loss.backward()
    del model, loss
    with torch.device("meta"):
        meta = _model(recipe, policy, "meta")
    xm, tm, ym = example_inputs(meta, batch, device="meta")
    counter = FlopCounterMode(display=False)
    with counter:
        F.mse_loss(meta(xm, tm, ym), torch.zeros_like(xm)).backward()
    return {"policy": policy, "batch": batch, "precision": precision, "forward_bytes": kept, "peak_bytes": meter.peak,
            "flops": int(counter.get_total_flops())}


def bench_checkpointing(recipe: Recipe, *, batch: int, device: str = "cpu", precision: str = "fp32",
                        policies=POLICIES) -> list[dict]:
    """One row per policy, with its saving and its extra compute against no checkpointing."""
    rows = [step_memory_and_flops(recipe, p, batch=batch, device=device, precision=precision) for p in policies]
    ref = next((r for r in rows if r["policy"] == "none"), rows[0])
    for r in rows:
        r["forward_vs_none"] = r["forward_bytes"] / ref["forward_bytes"]
        r["memory_vs_none"] = r["peak_bytes"] / ref["peak_bytes"]
        r["flops_vs_none"] = r["flops"] / ref["flops"]
    return rows
