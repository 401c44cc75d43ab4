"""`uvit train`: train a U-ViT from a recipe, one process or many (torchrun), with exact resume."""

from __future__ import annotations

import os
from pathlib import Path
from typing import List, Optional

import typer

from ..errors import UvitError
from ..files import prepare_output
from ..recipe import dump_recipe, load_recipe
from ..run import RUN_RECIPE, check_resume_compatible, latest_run, new_run_dir
from .app import app, console, setup_logging
from .options import (DeviceOption, MasterAddrOption, MasterPortOption, NnodesOption, NodeRankOption, NprocOption,
                      SetOption, VerboseOption, in_torchrun, relaunch)
from .progress import progress_bar


@app.command("train")
def train_cmd(
    recipe_path: str = typer.Argument(..., metavar="RECIPE", help="recipe YAML or a shipped recipe name"),
    overrides: Optional[List[str]] = SetOption,
    run_dir: Optional[Path] = typer.Option(None, "--run-dir", help="run directory (default: a new numbered "
                                           "directory under --runs, or the latest run of this recipe with --resume)"),
    resume: Optional[bool] = typer.Option(None, "--resume/--no-resume", help="continue from the run directory's "
                                          "last checkpoint (default: resume when --run-dir holds one)"),
    dry_run: bool = typer.Option(False, "--dry-run", help="print the resolved recipe, run directory, model size "
                                 "and data, then exit"),
    runs_root: Path = typer.Option(Path("runs"), "--runs", help="where numbered run directories are created",
                                   rich_help_panel="I/O"),
    device: str = DeviceOption,
    nproc_per_node: int = NprocOption,
    nnodes: int = NnodesOption,
    node_rank: int = NodeRankOption,
    master_addr: Optional[str] = MasterAddrOption,
    master_port: int = MasterPortOption,
    verbose: bool = VerboseOption,
) -> None:
    """Train a U-ViT from a recipe.

    Examples:
      uvit train recipes/digits_uvit_tiny.yaml
      uvit train coco_uvit_s_deep --set train.batch_size=128 --run-dir runs/coco
      torchrun --nproc-per-node 8 -m uvit_cli train imagenet256_uvit_h2   (or: uvit train ... --nproc-per-node 8)
      uvit train imagenet256_uvit_h2 --run-dir runs/h2 --nproc-per-node 8 --nnodes 2 --node-rank 0 --master-addr node0
    """
    from .. import build, distributed, runtime, train  # deferred: loads torch (cli/app.py)
    from ..checkpoint import list_states  # deferred: loads torch (cli/app.py)

    setup_logging(verbose)
    recipe = load_recipe(recipe_path, overrides)
    if (nproc_per_node > 1 or nnodes > 1) and not in_torchrun():
        extra = []
        if run_dir is None and not dry_run:  # every rank must agree on one directory
            if nnodes > 1:  # numbering on each node could disagree: the job names its directory
                raise UvitError(f"--nnodes {nnodes}: pass --run-dir DIR (on a file system every node shares) so "
                                "that all nodes write one run")
            extra = ["--run-dir", str(new_run_dir(runs_root, recipe) if not resume else
                                      (latest_run(runs_root, recipe.name) or new_run_dir(runs_root, recipe)))]
        if not dry_run:   # what every rank would refuse, said once by the launcher before any process starts
            runtime.resolve_device(device)
            _resume_rules(recipe, run_dir or Path(extra[1]), resume)
            train.check_data_fits_model(recipe, build.build_source(recipe))
        relaunch(nproc_per_node, extra, nnodes=nnodes, node_rank=node_rank, master_addr=master_addr,
                 master_port=master_port)

    # Pick the run directory and decide whether this is a resume.
    if run_dir is None:
        run_dir = (latest_run(runs_root, recipe.name) if resume else None) or new_run_dir(runs_root, recipe)
    if dry_run:
        resuming = _resume_rules(recipe, run_dir, resume, check_output=False) and bool(list_states(run_dir))
        _dry_run(recipe, run_dir, resuming)
        return
    resume = _resume_rules(recipe, run_dir, resume)

    runtime.setup_runtime(runtime.resolve_device(device))
    main = int(os.environ.get("RANK", "0")) == 0
    with progress_bar("step", stats=True, disable=not main) as bar:
        task = bar.add_task("train", total=recipe.train.steps, stats="")

        def progress(step, total, info):
            stats = (f"loss {info['loss']:.4f} · {info['img_per_s']:.0f} img/s · data {info['data_frac']:.0%} · "
                     f"lr {info['lr']:.2e}" if info else "")
            bar.update(task, completed=step, stats=stats)

        try:
            train.train(recipe, run_dir, device=device, resume=resume, progress=progress)
        finally:
            distributed.cleanup()
    if main:
        console.print(f"run directory: [bold]{run_dir}[/] (EMA weights: {run_dir}/ema.safetensors)")


def _resume_rules(recipe, run_dir: Path, resume: Optional[bool], check_output: bool = True) -> bool:
    """Whether this run resumes (default: when ``run_dir`` holds checkpoints); refuses checkpoints without
    --resume, a resume that changes what was trained, and a run directory that cannot be written."""
    from ..checkpoint import list_states  # deferred: loads torch (cli/app.py)

    has_states = bool(list_states(run_dir))
    if resume is None:
        resume = has_states
    if has_states and not resume:
        raise UvitError(f"{run_dir} already holds checkpoints; pass --resume to continue it, or pick a new "
                        "--run-dir")
    if resume and (run_dir / RUN_RECIPE).exists():
        check_resume_compatible(load_recipe(run_dir / RUN_RECIPE), recipe, run_dir)
    if check_output:
        prepare_output(run_dir, "--run-dir", directory=True)
    return resume


def _dry_run(recipe, run_dir: Path, resuming: bool) -> None:
    from .. import build, train  # deferred: loads torch (cli/app.py)

    console.rule("resolved recipe")
    console.print(dump_recipe(recipe), highlight=False, markup=False)
    n = build.parameter_count(recipe)
    source = build.build_source(recipe)
    train.check_data_fits_model(recipe, source)
    console.print(f"run directory: {run_dir} ({'resume' if resuming else 'new run'})")
    console.print(f"model: {recipe.model.size or 'custom'}, {n:,} parameters")
    console.print(f"data: {recipe.data.name}, {len(source):,} examples, "
                  f"{getattr(source, 'num_classes', 0)} classes")
