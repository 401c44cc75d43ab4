"""Run directories: numbered, self-describing names, the recipe beside the results, and metrics.jsonl."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

from .errors import UvitError
from .files import write_text
from .recipe import Recipe, dump_recipe, load_recipe, recipe_to_dict

# Run-directory layout shared by train (the writer) and sample / fid / ablate (the readers).
RUN_RECIPE = "recipe.yaml"           # the resolved recipe, written before step 0
RUN_EMA = "ema.safetensors"          # the latest EMA weights (refreshed at every checkpoint and at the end)
RUN_RAW = "model.safetensors"        # the latest raw (non-EMA) weights
METRICS = "metrics.jsonl"            # one JSON record per logged step
SAMPLES = "samples"                  # EMA sample grids, samples/step-00001000.png
AMENDMENTS = "amendments.jsonl"      # settings a resumed run changed, with the step they apply from
RUN_TEXT_ENCODER = "text_encoder"    # a copy of a built-in text tower the run trained with (open_clip folder)
TENSORBOARD = "tensorboard"          # TensorBoard event files (train.log_to: tensorboard)
WANDB_ID = "wandb_id.txt"            # the wandb run id, so a resumed training run resumes its wandb run

# Fields a resumed run may change: how long it runs, how often it logs, samples, saves and evaluates, and what
# backward recomputes to save memory (the same gradients: a run that ran out of memory resumes with checkpointing).
RESUMABLE_CHANGES = {"model.grad_checkpoint", "model.checkpoint_policy", "train.steps", "train.log_every", "train.sample_every", "train.save_every", "train.keep_last",
                     "train.eval_every", "train.log_to", "train.wandb_project", "data.num_workers", "data.latents",
                     "data.source"}


def run_name(recipe: Recipe, index: int) -> str:
    """e.g. ``00003-digits-U-ViT-Tiny2``."""
    size = (recipe.model.size or f"L{recipe.model.num_layers}-D{recipe.model.embed_dim}").replace("/", "")
    return re.sub(r"[^A-Za-z0-9._-]+", "_", f"{index:05d}-{recipe.name}-{size}")


def new_run_dir(root: str | Path, recipe: Recipe) -> Path:
    root = Path(root)
    used = [int(p.name[:5]) for p in root.glob("[0-9][0-9][0-9][0-9][0-9]-*")] if root.is_dir() else []
    return root / run_name(recipe, max(used, default=-1) + 1)


def latest_run(root: str | Path, name: str | None = None) -> Path | None:
    """The highest-numbered run directory under root (optionally of a recipe name) that holds a recipe."""
    root = Path(root)
    runs = sorted(p for p in root.glob("[0-9][0-9][0-9][0-9][0-9]-*") if (p / RUN_RECIPE).exists()) \
        if root.is_dir() else []
    if name is not None:
        runs = [p for p in runs if load_recipe(p / RUN_RECIPE).name == name]
    return runs[-1] if runs else None


def recipe_differences(a: Recipe, b: Recipe) -> list[str]:
    """Dotted keys whose values differ between two recipes."""
    da, db = recipe_to_dict(a), recipe_to_dict(b)
    out = []
    for section in da:
        if isinstance(da[section], dict):
            out += [f"{section}.{k}" for k in da[section] if da[section][k] != db[section][k]]
        elif da[section] != db[section]:
            out.append(section)
    return out


def check_resume_compatible(saved: Recipe, new: Recipe, run_dir: Path) -> None:
    bad = [k for k in recipe_differences(saved, new) if k not in RESUMABLE_CHANGES and not k.startswith(
        ("sample.", "eval.")) and k not in ("name", "description")]
    if bad:
        raise UvitError(f"{run_dir} was trained with a different recipe ({', '.join(bad)} differ); resume with "
                        "the run's own recipe (uvit train RUN_DIR/recipe.yaml --run-dir RUN_DIR) or start a new run")


def amend_recipe(run_dir: Path, new: Recipe, step: int) -> list[str]:
    """Write the recipe a run continues with; when it differs from the one on record, append each change to
    amendments.jsonl with the step it applies from, so the record still says what trained steps 0..step-1.
    Returns the changed keys. Call :func:`check_resume_compatible` first."""
    path = run_dir / RUN_RECIPE
    changed = []
    if path.is_file():
        old = load_recipe(path)
        changed = recipe_differences(old, new)
        if changed:
            da, db = recipe_to_dict(old), recipe_to_dict(new)
            get = (lambda d, k: d[k.split(".")[0]][k.split(".")[1]] if "." in k else d[k])
            with open(run_dir / AMENDMENTS, "a") as f:
                for k in changed:
                    f.write(json.dumps({"step": step, "key": k, "from": get(da, k), "to": get(db, k),
                                        "time": time.time()}) + "\n")
    write_recipe(run_dir, new)
    return changed


def read_amendments(run_dir: str | Path) -> list[dict]:
    p = Path(run_dir) / AMENDMENTS
    return [json.loads(ln) for ln in p.read_text().splitlines() if ln.strip()] if p.exists() else []


def is_run_dir(path: str | Path) -> bool:
    return Path(path).is_dir() and (Path(path) / RUN_RECIPE).is_file()


def write_recipe(run_dir: Path, recipe: Recipe) -> None:
    write_text(run_dir / RUN_RECIPE, dump_recipe(recipe))


class MetricsLog:
    """Append-only metrics.jsonl; on resume, lines past the resumed step are dropped so nothing is counted twice."""

    def __init__(self, run_dir: Path, resume_step: int | None = None):
        self.path = run_dir / METRICS
        if resume_step is not None and self.path.exists():
            keep = [ln for ln in self.path.read_text().splitlines()
                    if ln.strip() and _step_of(ln) is not None and _step_of(ln) <= resume_step]
            write_text(self.path, "".join(ln + "\n" for ln in keep))

    def write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()


def _step_of(line: str) -> int | None:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None


def read_metrics(run_dir: str | Path) -> list[dict]:
    p = Path(run_dir) / METRICS
    return [json.loads(ln) for ln in p.read_text().splitlines() if ln.strip()] if p.exists() else []
