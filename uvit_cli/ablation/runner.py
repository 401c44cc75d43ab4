"""Running a suite: each variant trains in OUT/runs/<variant> with the suite's seed and data order; finished
variants are skipped on resume and an interrupted one continues exactly (training's own resume)."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Callable, Optional

import yaml

from .. import distributed as dist
from ..build import build_model
from ..checkpoint import list_states, load_into, load_weights
from ..errors import UvitError
from ..files import write_text
from ..metrics.model_eval import evaluate_model, monitor_record
from ..recipe import Recipe, load_recipe, replace
from ..run import RUN_EMA, RUN_RECIPE, MetricsLog, check_resume_compatible, read_metrics
from ..train import train
from .report import write_report
from .suite import SUITE_COPY, Suite, read_wall, run_dir_of, select_variants, variant_recipe, write_wall

log = logging.getLogger(__name__)


def variant_status(suite: Suite, out_dir: Path, variant: str) -> tuple[str, int]:
    """("new" | "partial" | "done", last checkpointed step). Done: trained to ``steps`` and evaluated there."""
    run_dir = run_dir_of(out_dir, variant)
    states = list_states(run_dir)
    step = states[-1][0] if states else 0
    if not states:
        return "new", 0
    evaluated = any(m.get("step") == suite.steps and f"monitor/{suite.metric}" in m for m in read_metrics(run_dir))
    return ("done" if step >= suite.steps and evaluated else "partial"), step


def _final_eval(recipe: Recipe, run_dir: Path, suite: Suite, device) -> None:
    """Evaluate the final EMA when the last step was not an evaluation step (or an interruption skipped it)."""
    if any(m.get("step") == suite.steps and f"monitor/{suite.metric}" in m for m in read_metrics(run_dir)):
        return
    sd, meta = load_weights(run_dir / RUN_EMA)
    if int(json.loads(meta.get("step", "-1"))) != suite.steps:
        log.warning("%s: the EMA weights are not from step %d; no final evaluation", run_dir, suite.steps)
        return
    model = build_model(recipe).to(device)
    load_into(model, sd, str(run_dir / RUN_EMA))
    result = monitor_record(model.eval(), recipe, device)
    if result is not None:
        MetricsLog(run_dir).write({"step": suite.steps, **result})


def check_monitor(recipe: Recipe, variant: str, device) -> None:
    """Score a few samples of an untrained model with the suite's protocol, so a missing reference or Inception
    weights fail before hours of training rather than leaving the suite without a metric."""
    quick = replace(recipe, sample={"steps": min(recipe.sample.steps, 2)})
    try:
        evaluate_model(build_model(quick).to(device).eval(), quick, num_samples=4, device=device)
    except UvitError as e:
        raise UvitError(f"the monitor cannot score variant {variant!r} ({e}); an ablation suite needs it: fix "
                        "eval.ref / eval.mode, or the missing weights, in the suite's overrides or with --set") \
            from None


def run_suite(suite: Suite, out_dir: str | Path, *, only: Optional[list[str]] = None, resume: bool = False,
              device: str = "auto", extra: Optional[list[str]] = None,
              progress: Optional[Callable[[str, int, int, int, int, dict], None]] = None) -> Path:
    """Train every selected variant into OUT/runs/<variant> and write the report; returns OUT.

    Finished variants are skipped with ``resume``; an interrupted one continues from its last checkpoint (training's
    exact resume). ``progress(variant, index, count, step, total, info)`` is called after every step (info holds the
    last logged metrics, or {"skipped": True}). Under torchrun every rank calls this; rank 0 writes the report.
    """
    out_dir = Path(out_dir)
    names = select_variants(suite, only)
    recipes = {n: variant_recipe(suite, n, extra) for n in names}  # every overlay is checked before any training
    dev = dist.init(device)
    plan = dist.broadcast_object({n: variant_status(suite, out_dir, n) for n in names} if dist.is_main() else None)
    started = [n for n in names if plan[n][0] != "new"]
    if started and not resume:
        raise UvitError(f"{out_dir} already holds runs of {', '.join(started)}; pass --resume to continue them "
                        "(finished variants are skipped) or pick a new --out")
    for n in started:
        check_resume_compatible(load_recipe(run_dir_of(out_dir, n) / RUN_RECIPE), recipes[n], run_dir_of(out_dir, n))
    todo = [n for n in names if plan[n][0] != "done"]
    error = None
    if dist.is_main() and todo:
        try:
            check_monitor(recipes[todo[0]], todo[0], dev)
        except UvitError as e:
            error = str(e)
    error = dist.broadcast_object(error)  # every rank stops, not only rank 0
    if error:
        raise UvitError(error)
    if dist.is_main():
        out_dir.mkdir(parents=True, exist_ok=True)
        _write_suite_copy(suite, out_dir)

    for i, name in enumerate(names):
        status, step0 = plan[name]
        run_dir = run_dir_of(out_dir, name)
        if status == "done":
            log.info("%s: finished earlier, skipped", name)
            if progress:
                progress(name, i, len(names), suite.steps, suite.steps, {"skipped": True})
            continue
        wall = read_wall(run_dir)
        offset = max((w for s, w in wall.items() if s <= step0), default=0.0)
        start, save_every = time.perf_counter(), recipes[name].train.save_every

        def on_step(step, total, info, name=name, i=i, wall=wall, offset=offset, start=start, run_dir=run_dir,
                    save_every=save_every):
            if dist.is_main() and (step % suite.eval_every == 0 or step % save_every == 0 or step == total):
                wall[step] = offset + time.perf_counter() - start
                write_wall(run_dir, wall)
            if progress:
                progress(name, i, len(names), step, total, info)

        log.info("%s (%d/%d): training %d steps in %s", name, i + 1, len(names), suite.steps, run_dir)
        train(recipes[name], run_dir, device=device, resume=resume, progress=on_step)
        if dist.is_main():
            _final_eval(recipes[name], run_dir, suite, dev)
            wall.setdefault(suite.steps, offset + time.perf_counter() - start)
            write_wall(run_dir, wall)
            write_report(suite, out_dir)
        dist.barrier()
    if dist.is_main():
        write_report(suite, out_dir)
    return out_dir


def _write_suite_copy(suite: Suite, out_dir: Path) -> None:
    """The suite as run (its length included, the base as an absolute path), so OUT describes itself and
    ``uvit ablate OUT --report-only`` can redraw the report."""
    raw = {**suite.raw, "steps": suite.steps, "eval_every": suite.eval_every}
    write_text(out_dir / SUITE_COPY, f"# {suite.name} as run by `uvit ablate` (from {suite.source})\n"
               + yaml.safe_dump(raw, sort_keys=False, allow_unicode=True))
