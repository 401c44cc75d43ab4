"""`uvit ablate`: run the paper's ablation suite (Figure 2 and the scaling study) and report it."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import List, Optional

import typer

from . import app
from .common import SetOption, console, err_console, setup_logging


@app.command("ablate")
def ablate_cmd(
    suite_path: str = typer.Argument(..., metavar="SUITE", help="suite YAML, a shipped suite name (digits_fig2) or "
                                     "a suite output directory"),
    steps: Optional[int] = typer.Option(None, "--steps", min=1, help="training steps of every variant (default: "
                                        "the suite's)", rich_help_panel="Hyperparameters"),
    eval_every: Optional[int] = typer.Option(None, "--eval-every", min=1, help="steps between monitor "
                                             "evaluations (default: the suite's)", rich_help_panel="Hyperparameters"),
    only: Optional[List[str]] = typer.Option(None, "--only", metavar="NAME", help="run only these variants or "
                                             "factors (repeatable, or comma-separated)"),
    overrides: Optional[List[str]] = SetOption,
    resume: bool = typer.Option(False, "--resume", help="continue: skip finished variants, resume an interrupted "
                                "one from its last checkpoint"),
    dry_run: bool = typer.Option(False, "--dry-run", help="list the variants, their overrides, sizes and status, "
                                 "then exit"),
    report_only: bool = typer.Option(False, "--report-only", help="redraw results.jsonl, the figures and "
                                     "results.md from the runs already in --out, without training"),
    out: Optional[Path] = typer.Option(None, "--out", help="suite output directory (default: ablations/<suite "
                                       "name>, or SUITE itself when it is an output directory)",
                                       rich_help_panel="I/O"),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N (torchrun: from LOCAL_RANK)",
                               rich_help_panel="Performance"),
    nproc_per_node: int = typer.Option(1, "--nproc-per-node", min=1, help="train each variant with this many "
                                       "processes (torchrun; DDP)", rich_help_panel="Performance"),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="debug logging"),
) -> None:
    """Train the variants of an ablation suite with one seed and data order, then plot and rank them.

    Examples:
      uvit ablate digits_fig2 --out runs/digits_fig2   (41 min on 2 CPU cores; on a busy CPU: OMP_NUM_THREADS=1)
      uvit ablate recipes/ablations/digits_scaling.yaml --only depth --steps 200 --eval-every 50
      uvit ablate cifar10_fig2 --nproc-per-node 8 --set data.source=/data/cifar10 --resume
    """
    from ..ablation import load_suite, run_suite, select_variants, variant_recipe, write_report
    from ..ablation.suite import SUITE_COPY

    setup_logging(verbose)
    suite = load_suite(suite_path, steps=steps, eval_every=eval_every)
    if out is None:
        given = Path(suite_path)
        out = given if (given / SUITE_COPY).is_file() else Path("ablations") / suite.name
    names = select_variants(suite, only)

    if dry_run:
        _dry_run(suite, names, out, overrides)
        return
    if report_only:
        paths = write_report(suite, out)
        console.print(f"report: [bold]{paths['table']}[/] ({len(paths['figures'])} figures, {paths['results']})")
        return
    for name in names:  # a bad overlay fails here, before any progress display or training
        variant_recipe(suite, name, overrides)
    if nproc_per_node > 1 and "LOCAL_RANK" not in os.environ:
        from ..distributed import launch_torchrun

        args = list(sys.argv[1:])
        i = args.index("--nproc-per-node")
        del args[i:i + 2]
        if "--out" not in args:  # every rank must agree on one directory
            args += ["--out", str(out)]
        raise typer.Exit(launch_torchrun(nproc_per_node, args))

    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from .. import distributed

    main = int(os.environ.get("RANK", "0")) == 0
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TextColumn("{task.fields[stats]}"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                  console=err_console, disable=not main, transient=False) as bar:
        total = bar.add_task("suite", total=len(names) * suite.steps, stats="")
        current = bar.add_task("variant", total=suite.steps, stats="")
        state = {"index": -1}

        def progress(name, index, count, step, steps_total, info):
            if index != state["index"]:  # a new variant: restart its bar (a resumed one starts at its step)
                state["index"] = index
                bar.reset(current, total=steps_total, completed=step,
                          description=f"{index + 1}/{count} {name}")
            stats = "skipped (finished)" if info.get("skipped") else (
                f"loss {info['loss']:.4f} · {info['img_per_s']:.0f} img/s" if "loss" in info else "")
            bar.update(current, completed=step, stats=stats)
            bar.update(total, completed=index * suite.steps + step, stats=f"variant {index + 1}/{count}")

        try:
            run_suite(suite, out, only=only, resume=resume, device=device, extra=overrides, progress=progress)
        finally:
            distributed.cleanup()
    if main:
        console.print(f"suite directory: [bold]{out}[/] (table: {out}/results.md, figures: {out}/figures/)")


def _dry_run(suite, names: list[str], out: Path, overrides) -> None:
    import torch
    from rich.table import Table

    from ..ablation import variant_recipe, variant_status
    from ..build import build_model

    table = Table(title=f"{suite.name}: {len(names)} variants, {suite.steps:,} steps, {suite.metric} every "
                  f"{suite.eval_every:,}; output {out}")
    for col in ("variant", "factors", "overrides", "params", "status"):
        table.add_column(col)
    for name in names:
        recipe = variant_recipe(suite, name, overrides)
        with torch.device("meta"):
            n = sum(p.numel() for p in build_model(recipe).parameters())
        status, step = variant_status(suite, out, name)
        over = ", ".join(f"{k}={v}" for k, v in suite.variants[name].items()) or "(base)"
        table.add_row(name, ", ".join(suite.factors_of(name)), over, f"{n / 1e6:.2f}M",
                      status if status != "partial" else f"partial (step {step:,})")
    console.print(table)
