"""`uvit train`: train a U-ViT from a recipe, one process or many (torchrun), with exact resume."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import List, Optional

import typer

from ..errors import UvitError
from . import app
from .common import SetOption, console, err_console, setup_logging


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
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N (torchrun: from LOCAL_RANK)",
                               rich_help_panel="Performance"),
    nproc_per_node: int = typer.Option(1, "--nproc-per-node", min=1, help="launch this many processes with "
                                       "torchrun (DDP; NCCL on GPUs, gloo on CPU)", rich_help_panel="Performance"),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="debug logging"),
) -> None:
    """Train a U-ViT from a recipe.

    Examples:
      uvit train recipes/digits_uvit_tiny.yaml
      uvit train coco_uvit_s_deep --set train.batch_size=128 --run-dir runs/coco
      torchrun --nproc-per-node 8 -m uvit_cli train imagenet256_uvit_h2   (or: uvit train ... --nproc-per-node 8)
    """
    from ..recipe import load_recipe
    from ..run import check_resume_compatible, latest_run, new_run_dir

    setup_logging(verbose)
    recipe = load_recipe(recipe_path, overrides)
    in_torchrun = "LOCAL_RANK" in os.environ
    if nproc_per_node > 1 and not in_torchrun:
        from ..distributed import launch_torchrun

        args = [a for a in sys.argv[1:]]
        i = args.index("--nproc-per-node")
        del args[i:i + 2]
        if run_dir is None and not dry_run:  # every rank must agree on one directory
            args += ["--run-dir", str(new_run_dir(runs_root, recipe) if not resume else
                                      (latest_run(runs_root, recipe.name) or new_run_dir(runs_root, recipe)))]
        raise typer.Exit(launch_torchrun(nproc_per_node, args))

    # Pick the run directory and decide whether this is a resume.
    from ..checkpoint import RUN_RECIPE, list_states

    if run_dir is None:
        run_dir = (latest_run(runs_root, recipe.name) if resume else None) or new_run_dir(runs_root, recipe)
    has_states = bool(list_states(run_dir))
    if resume is None:
        resume = has_states
    if has_states and not resume:
        raise UvitError(f"{run_dir} already holds checkpoints; pass --resume to continue it, or pick a new "
                        "--run-dir")
    if resume and (run_dir / RUN_RECIPE).exists():
        check_resume_compatible(load_recipe(run_dir / RUN_RECIPE), recipe, run_dir)

    if dry_run:
        _dry_run(recipe, run_dir, resume and has_states)
        return

    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from .. import distributed
    from ..train import train

    main = int(os.environ.get("RANK", "0")) == 0
    with Progress(TextColumn("[bold]step {task.completed}/{task.total}"), BarColumn(), TextColumn("{task.fields[stats]}"),
                  TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=err_console,
                  disable=not main, transient=False) as bar:
        task = bar.add_task("train", total=recipe.train.steps, stats="")

        def progress(step, total, info):
            stats = (f"loss {info['loss']:.4f} · {info['img_per_s']:.0f} img/s · lr {info['lr']:.2e}"
                     if info else "")
            bar.update(task, completed=step, stats=stats)

        try:
            train(recipe, run_dir, device=device, resume=resume, progress=progress)
        finally:
            distributed.cleanup()
    if main:
        console.print(f"run directory: [bold]{run_dir}[/] (EMA weights: {run_dir}/ema.safetensors)")


def _dry_run(recipe, run_dir: Path, resuming: bool) -> None:
    import torch

    from ..build import build_model, build_source
    from ..recipe import dump_recipe
    from ..train import check_data_fits_model

    console.rule("resolved recipe")
    console.print(dump_recipe(recipe), highlight=False, markup=False)
    with torch.device("meta"):
        n = sum(p.numel() for p in build_model(recipe).parameters())
    source = build_source(recipe)
    check_data_fits_model(recipe, source)
    console.print(f"run directory: {run_dir} ({'resume' if resuming else 'new run'})")
    console.print(f"model: {recipe.model.size or 'custom'}, {n:,} parameters")
    console.print(f"data: {recipe.data.name}, {len(source):,} examples, "
                  f"{getattr(source, 'num_classes', 0)} classes")
