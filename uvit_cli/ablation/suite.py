"""Ablation suites: the schema, YAML loading with named errors, and each variant's recipe (base + overlay).

A suite YAML names a base recipe, overrides shared by every variant, the training length, the metric to rank by,
the variants (a few ``section.key: value`` lines each) and the factors that group them (the paper's Figure 2
(a)-(e) and its scaling study). Every factor carries the paper's finding as checkable claims such as
``base > skip_none`` (better than), ``base >= depth17`` (not worse than) or ``depth13 ~ depth17`` (tied).
``seeds: K`` trains every variant with K training seeds (the recipe's seed + 0..K-1), so claims can be judged
against the spread; ``eval_steps: [10, 25, 50]`` also scores the final weights at those sampler step counts.
Running is in runner.py, the report (results.jsonl, one figure per factor, results.md) in report.py.
"""

from __future__ import annotations

import difflib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from ..errors import UvitError
from ..files import write_json
from ..metrics.evaluate import DIGITS_METRICS, parse_metrics
from ..recipe import (SECTIONS, Recipe, RecipeError, apply_overrides, read_yaml, recipe_from_dict, recipes_dir,
                      replace, resolve_recipe_path)

SUITE_KEYS = ("name", "description", "scale_note", "base", "overrides", "steps", "eval_every", "metric",
              "lower_is_better", "metric_label", "tie_tolerance", "rank_step", "seeds", "eval_steps", "variants",
              "factors")
FACTOR_KEYS = ("title", "finding", "variants", "claims")
CLAIM = re.compile(r"^\s*([A-Za-z0-9_.-]+)\s*(>=|>|~)\s*([A-Za-z0-9_.-]+)\s*$")
VARIANT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
SUITE_COPY = "suite.yaml"  # the suite as run, written into its output directory
NFE_PREFIX = "nfe_eval/"  # metrics.jsonl keys of the final weights scored at one of the suite's eval_steps
WALL_FILE = "ablation_wall.json"  # per run: cumulative seconds of this variant's training + evaluation per step


class SuiteError(RecipeError):
    """A mistake in an ablation suite: the message names the file, the variant or factor, and the key."""


@dataclass(frozen=True)
class Claim:
    """One checkable piece of a paper finding: ``left op right`` with op ">" (better), ">=" (not worse), "~" (tied)."""

    left: str
    op: str
    right: str

    def __str__(self) -> str:
        return f"{self.left} {self.op} {self.right}"


@dataclass(frozen=True)
class Factor:
    name: str
    title: str                       # e.g. "Figure 2 (a): combining the long skip"
    finding: str                     # the paper's finding in words
    labels: dict                     # variant name -> design label, in plotting order
    claims: tuple[Claim, ...] = ()


@dataclass(frozen=True)
class Suite:
    name: str
    source: str                      # the suite file (for messages)
    base: str                        # the base recipe path, resolved
    steps: int                       # training steps of every variant
    eval_every: int                  # steps between monitor evaluations
    metric: str                      # the metric to plot and rank (a key of evaluate_model's result)
    lower_is_better: bool
    variants: dict                   # variant name -> {"section.key": value} overrides
    factors: dict                    # factor name -> Factor
    overrides: dict = field(default_factory=dict)  # shared by every variant, applied before the variant's own
    description: str = ""
    scale_note: str = ""             # how this suite scales the paper's study (shown in the report)
    metric_label: str = ""           # axis label, e.g. "FID-10K (Inception, pytorch-fid)"
    tie_tolerance: float = 0.05      # relative gap within which two variants count as tied
    rank_step: Optional[int] = None  # the step at which variants are ranked (default: the last)
    seeds: int = 1                   # training seeds per variant: train.seed + 0 .. seeds - 1
    eval_steps: tuple[int, ...] = ()  # sampler step counts the final weights are also scored at (one column each)
    raw: dict = field(default_factory=dict, compare=False, repr=False)  # the YAML data, for the copy in OUT

    def factors_of(self, variant: str) -> list[str]:
        return [f for f, fac in self.factors.items() if variant in fac.labels]

    def trainings(self, names: list[str]) -> list[tuple[str, int]]:
        """(variant, seed index) of every training run, seed by seed (all variants of seed 0 first)."""
        return [(n, k) for k in range(self.seeds) for n in names]

    @property
    def ranked_at(self) -> int:
        """The step whose evaluation ranks the variants: rank_step, or the last step (always evaluated)."""
        if self.rank_step is not None and self.rank_step <= self.steps:
            return self.rank_step
        return self.steps


# ---------------------------------------------------------------------------------------------------------------------
# Loading and validation
# ---------------------------------------------------------------------------------------------------------------------

def _close(name: str, options) -> str:
    close = difflib.get_close_matches(name, list(options), n=3, cutoff=0.5)
    return f"; did you mean {', '.join(repr(c) for c in close)}?" if close else f"; known: {', '.join(options)}"


def _int(raw: dict, key: str, where: str, required: bool = True) -> Optional[int]:
    value = raw.get(key)
    if value is None:
        if required:
            raise SuiteError(f"{where}: `{key}` is missing; add e.g. `{key}: 1000`")
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise SuiteError(f"{where}: `{key}` must be an integer >= 1, got {value!r}")
    return value


def _overrides(raw: Any, where: str) -> dict:
    """A mapping of dotted ``section.key`` names to values (``{}`` or null for none)."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise SuiteError(f"{where} must be a mapping of section.key: value lines, e.g. `model.skip: none`; "
                         f"got {raw!r}")
    for key in raw:
        parts = str(key).split(".")
        if len(parts) != 2 or not all(parts):
            raise SuiteError(f"{where}: {key!r} is not a section.key name, e.g. model.skip")
        if parts[0] not in SECTIONS:
            raise SuiteError(f"{where}: {key!r}: {parts[0]!r} is not a recipe section{_close(parts[0], SECTIONS)}")
    return {str(k): v for k, v in raw.items()}


def _claims(raw: Any, labels: dict, where: str) -> tuple[Claim, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise SuiteError(f"{where}.claims must be a list like [base > skip_none, depth13 ~ depth17]")
    out = []
    for text in raw:
        m = CLAIM.match(str(text))
        if not m:
            raise SuiteError(f"{where}.claims: {text!r} is not `A > B` (better), `A >= B` (not worse) or `A ~ B` "
                             "(tied)")
        claim = Claim(m.group(1), m.group(2), m.group(3))
        for name in (claim.left, claim.right):
            if name not in labels:
                raise SuiteError(f"{where}.claims: {text!r} names {name!r}, which is not a variant of this factor"
                                 f"{_close(name, labels)}")
        out.append(claim)
    return tuple(out)


def suite_from_dict(raw: Any, source: str = "suite", base_dir: Path | None = None) -> Suite:
    """Build and check a Suite from plain YAML data (recipes are checked separately by :func:`variant_recipes`)."""
    if not isinstance(raw, dict):
        raise SuiteError(f"{source} must be a YAML mapping with keys {', '.join(SUITE_KEYS)}")
    for key in raw:
        if key not in SUITE_KEYS:
            raise SuiteError(f"{source}: {key!r} is not a suite key{_close(str(key), SUITE_KEYS)}")
    for key in ("base", "metric", "variants", "factors"):
        if not raw.get(key):
            raise SuiteError(f"{source}: `{key}` is missing or empty")
    base = str(raw["base"])
    if base_dir is not None and (base_dir / base).exists():
        base = str(base_dir / base)
    try:
        base = str(resolve_recipe_path(base))
    except RecipeError as e:
        raise SuiteError(f"{source}: base: {e}") from None

    if not isinstance(raw["variants"], dict):
        raise SuiteError(f"{source}: `variants` must map variant names to overrides, e.g. `skip_none: "
                         "{model.skip: none}`")
    variants = {}
    for name, value in raw["variants"].items():
        name = str(name)
        if not VARIANT_NAME.match(name):
            raise SuiteError(f"{source}: variant name {name!r} must use letters, digits, '_', '-' or '.' "
                             "(it names a directory)")
        variants[name] = _overrides(value, f"{source}: variant {name!r}")

    if not isinstance(raw["factors"], dict):
        raise SuiteError(f"{source}: `factors` must map factor names to title, finding, variants and claims")
    factors = {}
    for fname, fraw in raw["factors"].items():
        where = f"{source}: factor {fname!r}"
        if not isinstance(fraw, dict):
            raise SuiteError(f"{where} must be a mapping with keys {', '.join(FACTOR_KEYS)}")
        for key in fraw:
            if key not in FACTOR_KEYS:
                raise SuiteError(f"{where}: {key!r} is not a factor key{_close(str(key), FACTOR_KEYS)}")
        labels = fraw.get("variants")
        if isinstance(labels, list):
            labels = {str(v): str(v) for v in labels}
        if not isinstance(labels, dict) or not labels:
            raise SuiteError(f"{where}.variants must map variant names to design labels, e.g. "
                             "`skip_none: no long skip`")
        labels = {str(k): str(v if v is not None else k) for k, v in labels.items()}
        for v in labels:
            if v not in variants:
                raise SuiteError(f"{where}: unknown variant {v!r}{_close(v, variants)}; define it under `variants`")
        factors[str(fname)] = Factor(str(fname), str(fraw.get("title", fname)), str(fraw.get("finding", "")),
                                     labels, _claims(fraw.get("claims"), labels, where))
    orphans = [v for v in variants if not any(v in f.labels for f in factors.values())]
    if orphans:
        raise SuiteError(f"{source}: variant(s) {', '.join(orphans)} belong to no factor; list them under a "
                         "factor's `variants`")

    lower = raw.get("lower_is_better", True)
    if not isinstance(lower, bool):
        raise SuiteError(f"{source}: `lower_is_better` must be true or false")
    tol = raw.get("tie_tolerance", 0.05)
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not 0 <= tol < 1:
        raise SuiteError(f"{source}: `tie_tolerance` must be a number in [0, 1), got {tol!r}")
    eval_steps = raw.get("eval_steps") or []
    if not isinstance(eval_steps, list) or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1
                                                   for v in eval_steps):
        raise SuiteError(f"{source}: `eval_steps` must be a list of sampler step counts >= 1, e.g. [10, 25, 50]; "
                         f"got {eval_steps!r}")
    return Suite(name=str(raw.get("name") or Path(source).stem), source=source, base=base,
                 steps=_int(raw, "steps", source), eval_every=_int(raw, "eval_every", source),
                 metric=str(raw["metric"]), lower_is_better=lower, variants=variants, factors=factors,
                 overrides=_overrides(raw.get("overrides"), f"{source}: overrides"),
                 description=str(raw.get("description", "")), scale_note=str(raw.get("scale_note", "")).strip(),
                 metric_label=str(raw.get("metric_label", raw["metric"])), tie_tolerance=float(tol),
                 rank_step=_int(raw, "rank_step", source, required=False),
                 seeds=_int(raw, "seeds", source, required=False) or 1,
                 eval_steps=tuple(sorted(set(eval_steps))),
                 raw={**raw, "base": str(Path(base).resolve())})


def suites_dir() -> Path:
    return recipes_dir() / "ablations"


def resolve_suite_path(path: str | Path) -> Path:
    """A suite path as given, a suite output directory (its suite.yaml), or a shipped suite's name (``digits_fig2``)."""
    p = Path(path)
    if p.is_file():
        return p
    if (p / SUITE_COPY).is_file():
        return p / SUITE_COPY
    for cand in (suites_dir() / p, suites_dir() / f"{p}.yaml", suites_dir() / p.name):
        if cand.is_file():
            return cand
    names = [q.stem for q in sorted(suites_dir().glob("*.yaml"))]
    raise SuiteError(f"ablation suite {str(path)!r} not found{_close(p.stem, names)}")


def load_suite(path: str | Path, *, steps: Optional[int] = None, eval_every: Optional[int] = None,
               seeds: Optional[int] = None) -> Suite:
    """Load a suite YAML (a path or a shipped suite name); ``steps`` / ``eval_every`` / ``seeds`` replace the
    file's values."""
    path = resolve_suite_path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise SuiteError(f"{path} is not valid YAML: {e}") from None
    if isinstance(raw, dict):
        raw = dict(raw)
        if steps is not None:
            raw["steps"] = steps
        if eval_every is not None:
            raw["eval_every"] = eval_every
        if seeds is not None:
            raw["seeds"] = seeds
    return suite_from_dict(raw, source=str(path), base_dir=path.parent)


def shipped_suites() -> list[Path]:
    return sorted(suites_dir().glob("*.yaml"))


def variant_recipe(suite: Suite, name: str, extra: Optional[list[str]] = None, seed: int = 0) -> Recipe:
    """The recipe a variant trains: base, then the suite's shared overrides, ``extra`` (--set), the variant's own,
    then the suite's length and evaluation interval, and for seed index k > 0 the training seed + k. Errors name
    the variant and the key."""
    raw = read_yaml(suite.base)
    where = f"{suite.source}: variant {name!r}"
    try:
        for overrides, label in ((suite.overrides, "shared overrides"), (suite.variants[name], "overrides")):
            raw = apply_overrides(raw, [f"{k}={json.dumps(v)}" for k, v in overrides.items()])
        raw = apply_overrides(raw, extra)
        raw = apply_overrides(raw, [f"train.steps={suite.steps}", f"train.eval_every={suite.eval_every}",
                                    f"name={json.dumps(f'{suite.name}-{name}')}"])
        recipe = recipe_from_dict(raw, source=f"{Path(suite.base).name} + {name}")
        if seed:
            recipe = replace(recipe, train={"seed": recipe.train.seed + seed})
    except RecipeError as e:
        raise SuiteError(f"{where} makes an invalid recipe: {e}") from None
    _check_metric(suite, recipe, where)
    return recipe


def variant_recipes(suite: Suite, extra: Optional[list[str]] = None) -> dict[str, Recipe]:
    """Every variant's recipe, validated (the test that shipped suites are well formed calls this)."""
    return {name: variant_recipe(suite, name, extra) for name in suite.variants}


def _check_metric(suite: Suite, recipe: Recipe, where: str) -> None:
    mode = recipe.eval.mode
    try:
        names = parse_metrics(recipe.eval.metrics, "digits" if mode == "digits" else mode)
    except UvitError as e:
        raise SuiteError(f"{where}: eval.metrics: {e}") from None
    if mode == "digits" and recipe.conditioning != "class":
        names = tuple(n for n in names if n != "acc_digits")  # class accuracy needs class-conditional samples
    if suite.metric not in names:
        known = DIGITS_METRICS if mode == "digits" else names
        raise SuiteError(f"{where}: metric {suite.metric!r} is not measured by eval.mode {mode!r} with "
                         f"eval.metrics {list(recipe.eval.metrics)}{_close(suite.metric, known)}")
    if mode != "digits" and not recipe.eval.ref:
        raise SuiteError(f"{where}: eval.ref is empty, so the monitor has no FID reference; set it in the suite's "
                         "overrides or with --set eval.ref=PATH")


def select_variants(suite: Suite, only: Optional[list[str]] = None) -> list[str]:
    """Variant names to run: all, or those named by ``only`` (variant or factor names; commas allowed)."""
    if not only:
        return list(suite.variants)
    picked: list[str] = []
    for item in only:
        for name in (s.strip() for s in str(item).split(",")):
            if not name:
                continue
            if name in suite.variants:
                picked.append(name)
            elif name in suite.factors:
                picked += list(suite.factors[name].labels)
            else:
                raise SuiteError(f"--only {name!r}: no such variant or factor in {suite.source}"
                                 f"{_close(name, list(suite.variants) + list(suite.factors))}")
    return list(dict.fromkeys(picked))


# ---------------------------------------------------------------------------------------------------------------------
# A suite's output directory
# ---------------------------------------------------------------------------------------------------------------------

def run_dir_of(out_dir: Path, variant: str, seed: int = 0) -> Path:
    """Where a variant trains: OUT/runs/<variant>, and OUT/runs/<variant>+seed<k> for seed index k > 0 ('+' is
    not allowed in variant names, so the two never collide)."""
    return Path(out_dir) / "runs" / (variant if seed == 0 else f"{variant}+seed{seed}")


def training_label(variant: str, seed: int) -> str:
    """A training run's name in messages and progress: the variant, with its seed index when it has one."""
    return variant if seed == 0 else f"{variant} (seed {seed})"


def read_wall(run_dir: Path) -> dict[int, float]:
    """Cumulative wall seconds of a variant at each recorded step ({} when none)."""
    p = run_dir / WALL_FILE
    try:
        return {int(k): float(v) for k, v in json.loads(p.read_text()).items()} if p.exists() else {}
    except (ValueError, AttributeError):
        return {}


def write_wall(run_dir: Path, wall: dict[int, float]) -> None:
    write_json(run_dir / WALL_FILE, {str(k): round(v, 3) for k, v in sorted(wall.items())}, indent=None)
