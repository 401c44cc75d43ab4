"""The suite report: results.jsonl, one figure per factor (metric against training iterations, like the paper's
Figure 2) and results.md, which ranks the variants of each factor and checks the paper's finding beside them."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import matplotlib

from ..build import parameter_count
from ..files import atomic_path
from ..recipe import load_recipe
from ..run import RUN_RECIPE, read_metrics
from .suite import Claim, Factor, Suite, read_wall, run_dir_of

log = logging.getLogger(__name__)

RESULTS = "results.jsonl"
TABLE = "results.md"
FIGURES = "figures"


# ---------------------------------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------------------------------

def collect_results(suite: Suite, out_dir: str | Path) -> list[dict]:
    """One row per (factor, variant, evaluation step up to ``suite.steps``) from the runs under OUT/runs.

    A variant shared by several factors (the paper's default design) appears once per factor, with equal values."""
    rows = []
    for fname, factor in suite.factors.items():
        for variant, label in factor.labels.items():
            run_dir = run_dir_of(Path(out_dir), variant)
            wall = read_wall(run_dir)
            for m in sorted(read_metrics(run_dir), key=lambda m: m.get("step", 0)):
                values = {k.split("/", 1)[1]: v for k, v in m.items()
                          if k.startswith("monitor/") and isinstance(v, (int, float)) and not isinstance(v, bool)}
                if suite.metric not in values or m.get("step", 0) > suite.steps:
                    continue
                protocol = m.get("monitor_protocol") or m.get("monitor/protocol") or {}  # the older runs used the latter
                rows.append({"suite": suite.name, "factor": fname, "variant": variant, "label": label,
                             "step": m["step"], "metric": suite.metric, "value": values[suite.metric], **values,
                             "eval_samples": protocol.get("count"), "wall_s": wall.get(m["step"])})
    return rows


def write_results(rows: list[dict], path: Path) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ---------------------------------------------------------------------------------------------------------------------
# Ranking and the paper's claims
# ---------------------------------------------------------------------------------------------------------------------

@dataclass
class ClaimCheck:
    claim: Claim
    left: Optional[float]
    right: Optional[float]
    gap: Optional[float]             # relative advantage of left over right (positive: left is better)
    holds: Optional[bool]            # None when a value is missing


def advantage(a: float, b: float, lower_is_better: bool) -> float:
    """How much better a is than b, relative to the larger magnitude (0.1 = 10 % better)."""
    scale = max(abs(a), abs(b)) or 1.0
    return ((b - a) if lower_is_better else (a - b)) / scale


def check_claim(claim: Claim, values: dict, suite: Suite) -> ClaimCheck:
    """``A > B``: A better by more than the tie tolerance; ``A >= B``: A not worse by more than it; ``A ~ B``: within it."""
    a, b = values.get(claim.left), values.get(claim.right)
    if a is None or b is None:
        return ClaimCheck(claim, a, b, None, None)
    g, tol = advantage(a, b, suite.lower_is_better), suite.tie_tolerance
    holds = {">": g > tol, ">=": g >= -tol, "~": abs(g) <= tol}[claim.op]
    return ClaimCheck(claim, a, b, g, holds)


def values_at(rows: list[dict], factor: str, step: int) -> dict:
    return {r["variant"]: r["value"] for r in rows if r["factor"] == factor and r["step"] == step}


def verdict(checks: list[ClaimCheck]) -> str:
    if not checks:
        return "no claim to check"
    if any(c.holds is None for c in checks):
        return "incomplete"
    n = sum(c.holds for c in checks)
    if n == len(checks):
        return "reproduced"
    return "not reproduced" if n == 0 else f"partly ({n} of {len(checks)} claims)"


def ranking(suite: Suite, factor: Factor, values: dict) -> list[str]:
    """The factor's variants best first; unevaluated ones last."""
    have = [v for v in factor.labels if v in values]
    have.sort(key=lambda v: values[v] if suite.lower_is_better else -values[v])
    return have + [v for v in factor.labels if v not in values]


# ---------------------------------------------------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------------------------------------------------

def plot_factor(suite: Suite, factor: Factor, rows: list[dict], path: Path) -> Path:
    """Metric against training iterations, one line per variant (the paper's Figure 2 layout)."""
    matplotlib.use("Agg")  # files only, never a window; set here, not at import, so importing has no side effects
    from matplotlib import pyplot as plt  # after the backend choice, as matplotlib asks
    from matplotlib import ticker

    fig, ax = plt.subplots(figsize=(5.6, 3.8), dpi=120)
    ys = []
    for variant, label in factor.labels.items():
        pts = sorted((r["step"], r["value"]) for r in rows if r["factor"] == factor.name and r["variant"] == variant)
        if not pts:
            continue
        xs, vs = zip(*pts)
        ys += vs
        ax.plot(xs, vs, marker="o", markersize=3.5, linewidth=1.6, label=label)
    positive = ys and min(ys) > 0
    if positive and max(ys) / min(ys) > 4:  # early evaluations dwarf the final gaps on a linear axis
        ax.set_yscale("log")
        plain = ticker.FuncFormatter(lambda v, _: f"{v:g}")
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(plain)
        ax.tick_params(axis="y", which="minor", labelsize=7)
    ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
    ax.set_xlabel("training iterations")
    ax.set_ylabel(f"{suite.metric_label} ({'lower' if suite.lower_is_better else 'higher'} is better)", fontsize=8)
    ax.set_title(factor.title, fontsize=10)
    ax.grid(True, alpha=0.3)
    if ys:
        ax.legend(fontsize=7, frameon=False)
    else:
        ax.text(0.5, 0.5, "no evaluations yet", ha="center", va="center", transform=ax.transAxes)
    fig.text(0.99, 0.01, suite.name, ha="right", va="bottom", fontsize=6, color="gray")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------------------------------
# The markdown table
# ---------------------------------------------------------------------------------------------------------------------

def _fmt(x: Optional[float]) -> str:
    if x is None:
        return "—"
    return f"{x:.4g}" if abs(x) < 1000 else f"{x:,.0f}"


def _minutes(s: Optional[float]) -> str:
    if s is None:
        return "—"
    return f"{s:.0f} s" if s < 90 else (f"{s / 60:.1f} min" if s < 5400 else f"{s / 3600:.1f} h")


def _params(out_dir: Path, variant: str) -> Optional[int]:
    p = run_dir_of(out_dir, variant) / RUN_RECIPE
    return parameter_count(load_recipe(p)) if p.exists() else None


def factor_section(suite: Suite, factor: Factor, rows: list[dict], out_dir: Path) -> tuple[list[str], str]:
    """The markdown lines for one factor, and its verdict."""
    step = suite.ranked_at
    values = values_at(rows, factor.name, step)
    final = {r["variant"]: r.get("wall_s") for r in rows if r["factor"] == factor.name and r["step"] == suite.steps}
    order = ranking(suite, factor, values)
    best = values.get(order[0]) if order and order[0] in values else None
    checks = [check_claim(c, values, suite) for c in factor.claims]
    v = verdict(checks)
    lines = [f"## {factor.title}", "", f"**Paper:** {factor.finding}", "",
             f"![{factor.title}]({FIGURES}/{factor.name}.png)", "",
             f"| rank | variant | design | {suite.metric} @ {step:,} | vs best | params | time |",
             "|---:|---|---|---:|---:|---:|---:|"]
    for i, name in enumerate(order, 1):
        val = values.get(name)
        rel = "—" if val is None or best is None else \
            ("best" if name == order[0] else f"{-advantage(val, best, suite.lower_is_better) * 100:+.1f} %")
        params = _params(out_dir, name)
        lines.append(f"| {i if val is not None else '—'} | `{name}` | {factor.labels[name]} | {_fmt(val)} | {rel} | "
                     f"{'—' if params is None else f'{params / 1e6:.2f}M'} | {_minutes(final.get(name))} |")
    if checks:
        lines += ["", "| paper's claim | values | advantage of left | holds |", "|---|---|---:|:---:|"]
        for c in checks:
            mark = "n/a" if c.holds is None else ("yes" if c.holds else "**no**")
            gap = "—" if c.gap is None else f"{c.gap * 100:+.1f} %"
            lines.append(f"| `{c.claim}` | {_fmt(c.left)} vs {_fmt(c.right)} | {gap} | {mark} |")
    lines += ["", f"**Reproduced at this scale:** {v}", ""]
    return lines, v


def write_table(suite: Suite, rows: list[dict], out_dir: Path) -> Path:
    tol = suite.tie_tolerance * 100
    head = [f"# Ablation suite `{suite.name}`", ""]
    if suite.description:
        head += [suite.description, ""]
    if suite.scale_note:
        head += [f"**Scale:** {suite.scale_note}", ""]
    head += [f"**Metric:** {suite.metric_label} — {'lower' if suite.lower_is_better else 'higher'} is better; "
             f"variants are ranked at step {suite.ranked_at:,} of {suite.steps:,} (evaluated every "
             f"{suite.eval_every:,}). Every variant trains with the same seed and data order.", "",
             f"**Claims:** `A > B` holds when A is better than B by more than {tol:g} % (the tie tolerance), "
             f"`A >= B` when A is not worse by more than {tol:g} %, `A ~ B` when they are within {tol:g} %. Gaps are "
             "relative to the larger of the two values. Time is the training + evaluation wall time of the variant.",
             ""]
    body, summary = [], ["| factor | paper's finding | reproduced here |", "|---|---|---|"]
    for factor in suite.factors.values():
        lines, v = factor_section(suite, factor, rows, out_dir)
        body += lines
        summary.append(f"| {factor.title} | {factor.finding} | {v} |")
    path = out_dir / TABLE
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(head + ["## Summary", ""] + summary + [""] + body))
    return path


def write_report(suite: Suite, out_dir: str | Path) -> dict:
    """Write results.jsonl, figures/<factor>.png and results.md from the runs under OUT; returns their paths."""
    out_dir = Path(out_dir)
    rows = collect_results(suite, out_dir)
    paths = {"results": write_results(rows, out_dir / RESULTS), "table": write_table(suite, rows, out_dir),
             "figures": [plot_factor(suite, f, rows, out_dir / FIGURES / f"{f.name}.png")
                         for f in suite.factors.values()]}
    log.debug("ablation report: %s", paths["table"])
    return paths
