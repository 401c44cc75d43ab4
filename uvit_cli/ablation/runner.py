"""Running a suite: each variant trains in OUT/runs/<variant> (OUT/runs/<variant>+seed<k> for further training seeds)
with the suite's seed and data order; finished runs are skipped on resume and an interrupted one continues exactly
(training's own resume)."""

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
from ..errors import Interrupted, UvitError
from ..files import write_text
from ..metrics.model_eval import evaluate_model, monitor_record
from ..recipe import Recipe, load_recipe, replace
from ..run import RUN_EMA, RUN_RECIPE, MetricsLog, check_resume_compatible, read_metrics
from ..train import train
from .report import write_report
from .suite import (NFE_PREFIX, SUITE_COPY, Suite, read_wall, run_dir_of, select_variants, training_label,
                    variant_recipe, write_wall)

log = logging.getLogger(__name__)


def _evaluated(metrics: list[dict], suite: Suite) -> bool:
    return any(m.get("step") == suite.steps and f"monitor/{suite.metric}" in m for m in metrics)


def _nfe_done(metrics: list[dict], suite: Suite) -> set[int]:
    """The sampler step counts of ``eval_steps`` already scored at the last step."""
    return {m["sampler_steps"] for m in metrics if m.get("step") == suite.steps and "sampler_steps" in m
            and f"{NFE_PREFIX}{suite.metric}" in m}


def variant_status(suite: Suite, out_dir: Path, variant: str, seed: int = 0) -> tuple[str, int]:
    """("new" | "partial" | "done", last checkpointed step) of one training run. Done: trained to ``steps`` and
    evaluated there, at the recipe's sampler steps and at every ``eval_steps`` count."""
    run_dir = run_dir_of(out_dir, variant, seed)
    states = list_states(run_dir)
    step = states[-1][0] if states else 0
    if not states:
        return "new", 0
    metrics = read_metrics(run_dir)
    done = step >= suite.steps and _evaluated(metrics, suite) and set(suite.eval_steps) <= _nfe_done(metrics, suite)
    return ("done" if done else "partial"), step


def _as_nfe(record: dict, steps: int) -> dict:
    """A monitor record as the record of one ``eval_steps`` entry: ``nfe_eval/`` keys, the step count, the NFE."""
    card = record.get("monitor_protocol", {})
    out = {"sampler_steps": steps, "nfe": card.get("nfe")}
    out.update({NFE_PREFIX + k.split("/", 1)[1]: v for k, v in record.items() if k.startswith("monitor/")})
    out["nfe_eval_protocol"] = card
    return out


def nfe_record(model, recipe: Recipe, steps: int, device) -> dict | None:
    """The monitor metric of the final weights sampled with ``steps`` sampler steps, under ``nfe_eval/`` keys with
    the step count, the NFE and the protocol card."""
    record = monitor_record(model, replace(recipe, sample={"steps": steps}), device)
    return None if record is None else _as_nfe(record, steps)


def _final_eval(recipe: Recipe, run_dir: Path, suite: Suite, device) -> None:
    """Evaluate the final EMA when the last step was not an evaluation step (or an interruption skipped it), and at
    each of the suite's ``eval_steps`` not scored yet (the recipe's own step count reuses the monitor's value)."""
    metrics = read_metrics(run_dir)
    todo = [k for k in suite.eval_steps if k not in _nfe_done(metrics, suite)]
    if _evaluated(metrics, suite) and not todo:
        return
    sd, meta = load_weights(run_dir / RUN_EMA)
    if int(json.loads(meta.get("step", "-1"))) != suite.steps:
        log.warning("%s: the EMA weights are not from step %d; no final evaluation", run_dir, suite.steps)
        return
    model = build_model(recipe).to(device)
    load_into(model, sd, str(run_dir / RUN_EMA))
    model.eval()
    log_ = MetricsLog(run_dir)
    final = next((m for m in metrics if m.get("step") == suite.steps and f"monitor/{suite.metric}" in m), None)
    if final is None:
        final = monitor_record(model, recipe, device)
        if final is None:
            return
        final = {"step": suite.steps, **final}
        log_.write(final)
    for k in todo:
        # the recipe's own step count: the monitor already sampled with it
        record = _as_nfe(final, k) if k == recipe.sample.steps else nfe_record(model, recipe, k, device)
        if record is not None:
            log_.write({"step": suite.steps, **record})


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
    """Train every selected variant (with each of the suite's seeds) into OUT/runs/ and write the report; returns OUT.

    Finished runs are skipped with ``resume``; an interrupted one continues from its last checkpoint (training's
    exact resume). ``progress(run, index, count, step, total, info)`` is called after every step (info holds the
    last logged metrics, or {"skipped": True}). Under torchrun every rank calls this; rank 0 writes the report.
    """
    out_dir = Path(out_dir)
    names = select_variants(suite, only)
    units = suite.trainings(names)
    recipes = {(n, k): variant_recipe(suite, n, extra, k) for n, k in units}  # every overlay checked before training
    dev = dist.init(device)
    plan = dist.broadcast_object({u: variant_status(suite, out_dir, *u) for u in units} if dist.is_main() else None)
    started = [u for u in units if plan[u][0] != "new"]
    if started and not resume:
        raise UvitError(f"{out_dir} already holds runs of {', '.join(training_label(*u) for u in started)}; pass "
                        "--resume to continue them (finished runs are skipped) or pick a new --out")
    for u in started:
        check_resume_compatible(load_recipe(run_dir_of(out_dir, *u) / RUN_RECIPE), recipes[u], run_dir_of(out_dir, *u))
    todo = [u for u in units if plan[u][0] != "done"]
    error = None
    if dist.is_main() and todo:
        try:
            check_monitor(recipes[todo[0]], todo[0][0], dev)
        except UvitError as e:
            error = str(e)
    error = dist.broadcast_object(error)  # every rank stops, not only rank 0
    if error:
        raise UvitError(error)
    if dist.is_main():
        out_dir.mkdir(parents=True, exist_ok=True)
        _write_suite_copy(suite, out_dir)

    for i, unit in enumerate(units):
        status, step0 = plan[unit]
        label, run_dir, recipe = training_label(*unit), run_dir_of(out_dir, *unit), recipes[unit]
        if status == "done":
            log.info("%s: finished earlier, skipped", label)
            if progress:
                progress(label, i, len(units), suite.steps, suite.steps, {"skipped": True})
            continue
        wall = read_wall(run_dir)
        offset = max((w for s, w in wall.items() if s <= step0), default=0.0)
        start, save_every = time.perf_counter(), recipe.train.save_every

        def on_step(step, total, info, label=label, i=i, wall=wall, offset=offset, start=start, run_dir=run_dir,
                    save_every=save_every):
            if dist.is_main() and (step % suite.eval_every == 0 or step % save_every == 0 or step == total):
                wall[step] = offset + time.perf_counter() - start
                write_wall(run_dir, wall)
            if progress:
                progress(label, i, len(units), step, total, info)

        log.info("%s (%d/%d): training %d steps in %s", label, i + 1, len(units), suite.steps, run_dir)
        try:
            train(recipe, run_dir, device=device, resume=resume, progress=on_step)
        except Interrupted as e:   # name the suite, not the one run: resuming the run alone skips its evaluation
            done = i + sum(plan[u][0] == "done" for u in units[i + 1:])
            raise Interrupted(f"{e.args[0].split(';')[0]} of {label} ({i + 1}/{len(units)} in suite {suite.name}); "
                              f"kept {done} finished run(s) and this run's training state in {out_dir}") from None
        if dist.is_main():
            _final_eval(recipe, run_dir, suite, dev)
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
