"""Weights and training states on disk: our safetensors weights (recipe in the metadata), official .pth state
dicts, and the full training state for exact resume.

Loading never unpickles arbitrary objects: safetensors for our weights, ``torch.load(weights_only=True)`` for the
official ``.pth`` files and for training states (which hold tensors, numbers and strings only).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from .errors import UvitError
from .files import atomic_path, read_safetensors, read_state_dict, write_safetensors

log = logging.getLogger(__name__)

FORMAT = "uvit-weights-1"
CKPT_DIR = "checkpoints"     # full training states: checkpoints/step-0000500.pt, written atomically, last K kept


# ---------------------------------------------------------------------------------------------------------------------
# Weights
# ---------------------------------------------------------------------------------------------------------------------

def clean_state_dict(sd: dict) -> dict:
    """Strip wrapper prefixes (DDP ``module.``, torch.compile ``_orig_mod.``) and make tensors contiguous."""
    out = {}
    for k, v in sd.items():
        for prefix in ("module.", "_orig_mod."):
            while k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v.detach().contiguous() if isinstance(v, torch.Tensor) else v
    return out


def save_weights(path: str | Path, state_dict: dict, recipe_yaml: str | None = None, **meta) -> None:
    """Write weights as safetensors, atomically and byte-deterministically, with the resolved recipe (YAML) in the
    metadata."""
    metadata = {"format": FORMAT, **{k: (v if isinstance(v, str) else json.dumps(v)) for k, v in meta.items()}}
    if recipe_yaml is not None:
        metadata["recipe"] = recipe_yaml
    write_safetensors(path, clean_state_dict(state_dict), metadata)


def read_metadata(path: str | Path) -> dict:
    """The string metadata of a safetensors file; a truncated or foreign file is a UvitError."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as e:
        raise UvitError(f"{path} is not a readable safetensors file ({e}); it may be truncated") from None


def load_weights(path: str | Path) -> tuple[dict, dict]:
    """Read (state_dict, metadata) from a safetensors file or an official .pth state dict."""
    path = Path(path)
    if not path.exists():
        raise UvitError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        return read_safetensors(path), read_metadata(path)
    return read_official_pth(path), {}


def read_official_pth(path: str | Path) -> dict:
    """An official U-ViT ``nnet.pth`` / ``nnet_ema.pth`` / released ``*.pth``: a plain state dict of tensors."""
    return clean_state_dict(read_state_dict(path))


def load_into(model: torch.nn.Module, state_dict: dict, source: str = "checkpoint") -> None:
    """``load_state_dict(strict=True)`` with an error that lists what is missing, unexpected or misshapen."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    shapes = [f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state_dict and state_dict[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} keys (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} keys (e.g. {', '.join(unexpected[:3])})")
        if shapes:
            parts.append("shape mismatch: " + "; ".join(shapes[:3]))
        raise UvitError(f"{source} does not fit the recipe's model: {'; '.join(parts)}. "
                        "Check that the recipe matches the checkpoint (size, patch size, classes, conv).")
    model.load_state_dict(state_dict, strict=True)


# ---------------------------------------------------------------------------------------------------------------------
# Training states
# ---------------------------------------------------------------------------------------------------------------------

def state_path(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / CKPT_DIR / f"step-{step:08d}.pt"


def list_states(run_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of every complete training-state file, newest last (temporary files are ignored)."""
    d = Path(run_dir) / CKPT_DIR
    out = []
    for p in d.glob("step-*.pt") if d.is_dir() else []:
        try:
            out.append((int(p.stem.split("-")[1]), p))
        except (IndexError, ValueError):
            continue
    return sorted(out)


def save_state(run_dir: str | Path, step: int, state: dict, keep_last: int = 3) -> Path:
    """Write a training state (tensors, numbers, strings only) atomically, then drop all but the last K."""
    path = state_path(run_dir, step)
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    for _, old in list_states(run_dir)[:-max(1, keep_last)]:
        old.unlink(missing_ok=True)
    return path


def load_latest_state(run_dir: str | Path) -> tuple[dict, Path] | None:
    """The newest readable training state; a truncated or corrupt file is skipped with a warning."""
    for step, path in reversed(list_states(run_dir)):
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            if not isinstance(state, dict) or state.get("step") != step:
                raise ValueError("step mismatch")
            return state, path
        except Exception as e:  # noqa: BLE001 - any unreadable file: fall back to the previous one
            log.warning("checkpoint %s is unreadable (%s: %s); falling back to the previous one",
                        path, type(e).__name__, str(e).splitlines()[0][:120] if str(e) else "")
    return None
