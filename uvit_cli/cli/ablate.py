"""`uvit ablate`: run the paper's ablation suite (Figure 2 and the scaling study) and report it."""

from __future__ import annotations

import os
import shlex
from pathlib import Path
from typing import List, Optional

import typer

from rich.table import Table

from ..errors import Interrupted
from ..files import prepare_output
from .app import app, console, setup_logging
from .options import DeviceOption, NprocOption, SetOption, VerboseOption, command_args, relaunch
from .progress import progress_bar


@app.command("ablate")
def ablate_cmd(
    suite_path: str = typer.Argument(..., metavar="SUITE", help="suite YAML, a shipped suite name (digits_fig2) or "
                                     "a suite output directory"),
    steps: Optional[int] = typer.Option(None, "--steps", min=1, help="training steps of every variant (default: "
                                        "the suite's)", rich_help_panel="Hyperparameters"),
    eval_every: Optional[int] = typer.Option(None, "--eval-every", min=1, help="steps between monitor "
                                             "evaluations (default: the suite's)", rich_help_panel="Hyperparameters"),
    seeds: Optional[int] = typer.Option(None, "--seeds", min=1, help="training seeds per variant (default: the "
                                        "suite's `seeds`, 1 if it has none)", rich_help_panel="Hyperparameters"),
    only: Optional[List[str]] = typer.Option(None, "--only", metavar="NAME", help="run only these variants or "
                                             "factors (repeatable, or comma-separated)"),
    overrides: Optional[List[str]] = SetOption,
    resume: bool = typer.Option(False, "--resume", help="continue: skip finished variants, resume an interrupted "
                                "one from its last checkpoint"),
    dry_run: bool = typer.Option(False, "--dry-run", help="list the variants, their overrides, sizes and status, "
                                 "and the command that runs them, then exit"),
    report_only: bool = typer.Option(False, "--report-only", help="redraw results.jsonl, the figures and "
                                     "results.md from the runs already in --out, without training"),
    out: Optional[Path] = typer.Option(None, "--out", help="suite output directory (default: ablations/<suite "
                                       "name>, or SUITE itself when it is an output directory)",
                                       rich_help_panel="I/O"),
    device: str = DeviceOption,
    nproc_per_node: int = NprocOption,
    verbose: bool = VerboseOption,
) -> None:
    """Train the variants of an ablation suite with the same seeds and data order, then plot and rank them.

    Examples:
      uvit ablate digits_fig2 --out runs/digits_fig2   (41 min on 2 CPU cores; on a busy CPU: OMP_NUM_THREADS=1)
      uvit ablate recipes/ablations/digits_scaling.yaml --only depth --steps 200 --eval-every 50
      uvit ablate digits_formulations --dry-run        (variants, trainings, and the command to run them)
      uvit ablate cifar10_fig2 --nproc-per-node 8 --set data.source=/data/cifar10 --resume
    """
    from .. import ablation, distributed, runtime  # deferred: loads torch (cli/app.py)

    setup_logging(verbose)
    suite = ablation.load_suite(suite_path, steps=steps, eval_every=eval_every, seeds=seeds)
    if out is None:
        given = Path(suite_path)
        out = given if (given / ablation.suite.SUITE_COPY).is_file() else Path("ablations") / suite.name
    names = ablation.select_variants(suite, only)

    if dry_run:
        given = {"--steps": steps, "--eval-every": eval_every, "--seeds": seeds}
        _dry_run(suite, names, out, overrides, suite_path, only, {k: v for k, v in given.items() if v is not None})
        return
    if report_only:
        paths = ablation.write_report(suite, out)
        console.print(f"report: [bold]{paths['table']}[/] ({len(paths['figures'])} figures, {paths['results']})")
        return
    for name in names:  # a bad overlay fails here, before any progress display or training
        ablation.variant_recipe(suite, name, overrides)
    prepare_output(out, "--out", directory=True)
    # every rank must agree on one directory
    relaunch(nproc_per_node, [] if "--out" in command_args() else ["--out", str(out)])

    runtime.setup_runtime(runtime.resolve_device(device))
    main = int(os.environ.get("RANK", "0")) == 0
    with progress_bar("step", stats=True, disable=not main) as bar:
        total = bar.add_task("suite", total=len(suite.trainings(names)) * suite.steps, stats="")
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
            bar.update(total, completed=index * suite.steps + step, stats=f"run {index + 1}/{count}")

        try:
            ablation.run_suite(suite, out, only=only, resume=resume, device=device, extra=overrides, progress=progress)
        except Interrupted as e:
            again = command_args()
            again += [] if "--resume" in again else ["--resume"]
            again += [] if "--out" in again else ["--out", str(out)]
            raise Interrupted(f"{e}. Resume with: uvit {shlex.join(again)}") from None
        finally:
            distributed.cleanup()
    if main:
        console.print(f"suite directory: [bold]{out}[/] (table: {out}/results.md, figures: {out}/figures/)")


def _dry_run(suite, names: list[str], out: Path, overrides, suite_path: str, only, options: dict) -> None:
    from .. import ablation, build  # deferred: loads torch (cli/app.py)

    units = suite.trainings(names)
    nfe = f"; final weights also scored at {', '.join(map(str, suite.eval_steps))} sampler steps" \
        if suite.eval_steps else ""
    table = Table(title=f"{suite.name}: {len(names)} variants x {suite.seeds} seed(s) = {len(units)} trainings of "
                  f"{suite.steps:,} steps, {suite.metric} every {suite.eval_every:,}{nfe}; output {out}")
    for col in ("variant", "factors", "overrides", "params", "status"):
        table.add_column(col)
    for name in names:
        recipe = ablation.variant_recipe(suite, name, overrides)
        n = build.parameter_count(recipe)
        states = []
        for k in range(suite.seeds):
            status, step = ablation.variant_status(suite, out, name, k)
            text = status if status != "partial" else f"partial (step {step:,})"
            states.append(text if suite.seeds == 1 else f"seed {k}: {text}")
        over = ", ".join(f"{k}={v}" for k, v in suite.variants[name].items()) or "(base)"
        if len({s.split(": ", 1)[-1] for s in states}) == 1 and suite.seeds > 1:
            states = [f"{states[0].split(': ', 1)[1]} (all {suite.seeds} seeds)"]
        table.add_row(name, ", ".join(suite.factors_of(name)), over, f"{n / 1e6:.2f}M", "; ".join(states))
    console.print(table)
    command = ["uvit", "ablate", suite_path, "--out", str(out)]
    for key, v in options.items():
        command += [key, str(v)]
    for item in only or []:
        command += ["--only", item]
    for item in overrides or []:
        command += ["--set", item]
    console.print("run it with (add --resume to continue an interrupted run; on a busy CPU prefix "
                  "OMP_NUM_THREADS=1):", highlight=False)
    console.print("  " + " ".join(shlex.quote(c) for c in command), highlight=False, markup=False, soft_wrap=True)
