"""Weights on disk: our safetensors checkpoints (recipe in the metadata), official .pth files, atomic writes.

Loading never unpickles arbitrary objects: safetensors for our weights, ``torch.load(weights_only=True)``
for the official ``.pth`` state dicts.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import UvitError

log = logging.getLogger(__name__)

FORMAT = "uvit-weights-1"


@contextmanager
def atomic_path(path: str | Path):
    """Yield a temporary path next to ``path``; on success fsync it and rename it over ``path``.

    A crash leaves either the old file or the new one, never a partial file under the final name.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; outputs get the usual permissions
    try:
        yield Path(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


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
    """Write weights as safetensors, atomically, with the resolved recipe (YAML) in the metadata."""
    metadata = {"format": FORMAT, **{k: (v if isinstance(v, str) else json.dumps(v)) for k, v in meta.items()}}
    if recipe_yaml is not None:
        metadata["recipe"] = recipe_yaml
    with atomic_path(path) as tmp:
        save_file(clean_state_dict(state_dict), str(tmp), metadata=metadata)


def read_metadata(path: str | Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def load_weights(path: str | Path) -> tuple[dict, dict]:
    """Read (state_dict, metadata) from a safetensors file or an official .pth state dict."""
    path = Path(path)
    if not path.exists():
        raise UvitError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path)), read_metadata(path)
        except (SafetensorError, OSError, ValueError) as e:
            raise UvitError(f"{path} is not a readable safetensors file ({e}); it may be truncated") from None
    return read_official_pth(path), {}


def read_official_pth(path: str | Path) -> dict:
    """An official U-ViT ``nnet.pth`` / ``nnet_ema.pth`` / released ``*.pth``: a plain state dict of tensors."""
    try:
        sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure here means "not a plain tensor state dict"
        raise UvitError(f"{path} could not be read as a state dict with weights_only=True ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}); only plain tensor state dicts are loaded") from None
    for key in ("ema", "nnet_ema", "model", "state_dict"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            log.info("using the %r entry of %s", key, path)
            sd = sd[key]
            break
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise UvitError(f"{path} does not hold a state dict of tensors")
    return clean_state_dict(sd)


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


# Run-directory layout shared by train (writer) and sample / fid (readers).
RUN_RECIPE = "recipe.yaml"           # the resolved recipe, written before step 0
RUN_EMA = "ema.safetensors"          # the latest EMA weights (refreshed at every checkpoint and at the end)
RUN_RAW = "model.safetensors"        # the latest raw (non-EMA) weights


def load_model(target: str | Path, recipe_path: str | None = None, overrides: list[str] | None = None,
               weights: str = "ema"):
    """(model in eval mode, recipe, weights path) from a run directory, one of our .safetensors files, or an
    official .pth (which needs ``recipe_path``). ``weights`` picks "ema" or "raw" inside a run directory."""
    import yaml

    from .build import build_model
    from .recipe import apply_overrides, load_recipe, recipe_from_dict

    target = Path(target)
    if target.is_dir():
        if not (target / RUN_RECIPE).exists():
            raise UvitError(f"{target} is not a run directory (no {RUN_RECIPE}); pass a run directory, a "
                            ".safetensors checkpoint, or an official .pth with --recipe")
        path = target / (RUN_EMA if weights == "ema" else RUN_RAW)
        if not path.exists():
            raise UvitError(f"{path} does not exist yet: the run has not written {weights} weights "
                            "(they appear at its first checkpoint)")
        recipe = load_recipe(recipe_path or target / RUN_RECIPE, overrides)
        sd, _ = load_weights(path)
    elif target.suffix == ".safetensors":
        sd, meta = load_weights(target)
        path = target
        if recipe_path:
            recipe = load_recipe(recipe_path, overrides)
        elif "recipe" in meta:
            raw = apply_overrides(yaml.safe_load(meta["recipe"]), overrides)
            recipe = recipe_from_dict(raw, source=f"{target} (embedded recipe)")
        else:
            raise UvitError(f"{target} carries no recipe in its metadata; pass --recipe")
    else:
        if not recipe_path:
            raise UvitError(f"{target} looks like an official checkpoint: pass --recipe RECIPE that describes "
                            "its model (e.g. --recipe imagenet256_uvit_h2)")
        if not target.exists():
            raise UvitError(f"checkpoint {target} does not exist")
        recipe = load_recipe(recipe_path, overrides)
        sd, path = read_official_pth(target), target
    model = build_model(recipe)
    load_into(model, sd, source=str(path))
    return model.eval(), recipe, path


# Full training state, for exact resume: checkpoints/step-0000500.pt, written atomically, the last K kept.
CKPT_DIR = "checkpoints"


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
