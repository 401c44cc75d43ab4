"""The suite report: results.jsonl, one figure per factor (metric against training iterations, like the paper's
Figure 2; and against NFE when the suite scores several sampler step counts) and results.md, which ranks the
variants of each factor and checks the paper's finding beside them.

With ``seeds: K`` every value is the mean and standard deviation over the K training seeds, and a claim must clear
the spread (a two-sided 95 % t-test on the seed means) instead of the fixed tie tolerance.
"""

from __future__ import annotations

import json
import logging
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..build import parameter_count
from ..figures import pyplot, save_png
from ..files import atomic_path
from ..recipe import load_recipe
from ..run import RUN_RECIPE, read_metrics
from .suite import NFE_PREFIX, Claim, Factor, Suite, read_wall, run_dir_of

log = logging.getLogger(__name__)

RESULTS = "results.jsonl"
TABLE = "results.md"
FIGURES = "figures"


# ---------------------------------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------------------------------

def _numbers(m: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in m.items()
            if k.startswith(prefix) and isinstance(v, (int, float)) and not isinstance(v, bool)}


def collect_results(suite: Suite, out_dir: str | Path) -> list[dict]:
    """One row per (factor, variant, seed, evaluation step up to ``suite.steps``) from the runs under OUT/runs, and
    one per (factor, variant, seed, sampler step count of ``eval_steps``) with ``sampler_steps`` and ``nfe``.

    A variant shared by several factors (the paper's default design) appears once per factor, with equal values."""
    rows = []
    for fname, factor in suite.factors.items():
        for variant, label in factor.labels.items():
            for seed in range(suite.seeds):
                run_dir = run_dir_of(Path(out_dir), variant, seed)
                wall = read_wall(run_dir)
                base = {"suite": suite.name, "factor": fname, "variant": variant, "label": label, "seed": seed}
                for m in sorted(read_metrics(run_dir), key=lambda m: m.get("step", 0)):
                    if m.get("step", 0) > suite.steps:
                        continue
                    if "sampler_steps" in m:
                        values, protocol = _numbers(m, NFE_PREFIX), m.get("nfe_eval_protocol") or {}
                        if suite.metric in values and m["sampler_steps"] in suite.eval_steps:
                            rows.append({**base, "step": m["step"], "sampler_steps": m["sampler_steps"],
                                         "nfe": m.get("nfe"), "metric": suite.metric, "value": values[suite.metric],
                                         **values, "eval_samples": protocol.get("count")})
                        continue
                    values = _numbers(m, "monitor/")
                    if suite.metric not in values:
                        continue
                    protocol = m.get("monitor_protocol") or m.get("monitor/protocol") or {}  # the older runs used the latter
                    rows.append({**base, "step": m["step"], "metric": suite.metric, "value": values[suite.metric],
                                 **values, "eval_samples": protocol.get("count"), "wall_s": wall.get(m["step"])})
    return rows


def write_results(rows: list[dict], path: Path) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@dataclass(frozen=True)
class Stat:
    """A value over a variant's training seeds: mean, sample standard deviation (0 for one seed), count."""

    mean: float
    std: float = 0.0
    n: int = 1

    @classmethod
    def of(cls, values: list[float]) -> "Stat":
        return cls(statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0, len(values))


def _stat(v) -> Optional[Stat]:
    return v if isinstance(v, Stat) or v is None else Stat(float(v))


def _grouped(rows: list[dict], key) -> dict:
    out: dict = {}
    for r in rows:
        out.setdefault(key(r), []).append(r["value"])
    return {k: Stat.of(v) for k, v in out.items()}


def values_at(rows: list[dict], factor: str, step: int) -> dict:
    """variant -> Stat of the metric at a training step, over the seeds evaluated there."""
    return _grouped([r for r in rows if r["factor"] == factor and r["step"] == step and "sampler_steps" not in r],
                    lambda r: r["variant"])


def nfe_values(rows: list[dict], factor: str) -> dict:
    """(variant, NFE) -> Stat of the final weights' metric at that NFE."""
    return _grouped([r for r in rows if r["factor"] == factor and "sampler_steps" in r],
                    lambda r: (r["variant"], r["nfe"]))


# ---------------------------------------------------------------------------------------------------------------------
# Ranking and the paper's claims
# ---------------------------------------------------------------------------------------------------------------------

@dataclass
class ClaimCheck:
    claim: Claim
    left: Optional[float]            # means
    right: Optional[float]
    gap: Optional[float]             # relative advantage of left over right (positive: left is better)
    holds: Optional[bool]            # None when a value is missing
    margin: Optional[float] = None   # the relative gap a claim must clear: the tie tolerance, or the seed spread's
    left_std: float = 0.0
    right_std: float = 0.0
    seeds: int = 1


def advantage(a: float, b: float, lower_is_better: bool) -> float:
    """How much better a is than b, relative to the larger magnitude (0.1 = 10 % better)."""
    scale = max(abs(a), abs(b)) or 1.0
    return ((b - a) if lower_is_better else (a - b)) / scale


def spread_margin(a: Stat, b: Stat) -> float:
    """The absolute gap of two seed means that a two-sided 95 % t-test calls real: t(0.975, n_a + n_b - 2) x
    sqrt(s_a^2 / n_a + s_b^2 / n_b)."""
    from scipy.stats import t as student  # scipy.stats takes ~0.5 s to import; only reports with seeds need it

    return float(student.ppf(0.975, a.n + b.n - 2)) * math.sqrt(a.std ** 2 / a.n + b.std ** 2 / b.n)


def check_claim(claim: Claim, values: dict, suite: Suite) -> ClaimCheck:
    """``A > B``: A better by more than the margin; ``A >= B``: A not worse by more than it; ``A ~ B``: within it.

    The margin is the seed spread's (``spread_margin``) when both sides have two or more seeds, else the suite's
    fixed tie tolerance. Values are floats (one seed) or :class:`Stat`."""
    a, b = _stat(values.get(claim.left)), _stat(values.get(claim.right))
    if a is None or b is None:
        return ClaimCheck(claim, a and a.mean, b and b.mean, None, None)
    g = advantage(a.mean, b.mean, suite.lower_is_better)
    if a.n >= 2 and b.n >= 2:
        tol = spread_margin(a, b) / (max(abs(a.mean), abs(b.mean)) or 1.0)
    else:
        tol = suite.tie_tolerance
    holds = {">": g > tol, ">=": g >= -tol, "~": abs(g) <= tol}[claim.op]
    return ClaimCheck(claim, a.mean, b.mean, g, holds, tol, a.std, b.std, min(a.n, b.n))


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
    """The factor's variants best first (by the mean over seeds); unevaluated ones last."""
    have = [v for v in factor.labels if v in values]
    have.sort(key=lambda v: _stat(values[v]).mean if suite.lower_is_better else -_stat(values[v]).mean)
    return have + [v for v in factor.labels if v not in values]


# ---------------------------------------------------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------------------------------------------------

def _axes(suite: Suite, title: str):
    fig, ax = pyplot().subplots(figsize=(5.6, 3.8), dpi=120)
    ax.set_ylabel(f"{suite.metric_label} ({'lower' if suite.lower_is_better else 'higher'} is better)", fontsize=8)
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    return fig, ax


def _curves(ax, factor: Factor, series: dict) -> list[float]:
    """One line per variant (mean over seeds, a band of +- one standard deviation when there are several)."""
    ys = []
    for variant, label in factor.labels.items():
        pts = sorted(series.get(variant, {}).items())
        if not pts:
            continue
        xs, st = zip(*pts)
        mean = [s.mean for s in st]
        ys += mean
        line, = ax.plot(xs, mean, marker="o", markersize=3.5, linewidth=1.6, label=label)
        if any(s.n > 1 for s in st):
            ax.fill_between(xs, [s.mean - s.std for s in st], [s.mean + s.std for s in st], color=line.get_color(),
                            alpha=0.15, linewidth=0)
            ys += [s.mean - s.std for s in st] + [s.mean + s.std for s in st]
    return ys


def _finish(fig, ax, suite: Suite, ys: list[float], path: Path) -> Path:
    from matplotlib import ticker

    positive = ys and min(ys) > 0
    if positive and max(ys) / min(ys) > 4:  # early evaluations dwarf the final gaps on a linear axis
        ax.set_yscale("log")
        plain = ticker.FuncFormatter(lambda v, _: f"{v:g}")
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(plain)
        ax.tick_params(axis="y", which="minor", labelsize=7)
    if ys:
        ax.legend(fontsize=7, frameon=False)
    else:
        ax.text(0.5, 0.5, "no evaluations yet", ha="center", va="center", transform=ax.transAxes)
    fig.text(0.99, 0.01, suite.name + (f", {suite.seeds} seeds (mean ± sd)" if suite.seeds > 1 else ""), ha="right",
             va="bottom", fontsize=6, color="gray")
    return save_png(fig, path)


def plot_factor(suite: Suite, factor: Factor, rows: list[dict], path: Path) -> Path:
    """Metric against training iterations, one line per variant (the paper's Figure 2 layout)."""
    from matplotlib import ticker

    fig, ax = _axes(suite, factor.title)
    steps = sorted({r["step"] for r in rows if r["factor"] == factor.name and "sampler_steps" not in r})
    series: dict = {}
    for step in steps:
        for variant, st in values_at(rows, factor.name, step).items():
            series.setdefault(variant, {})[step] = st
    ys = _curves(ax, factor, series)
    ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
    ax.set_xlabel("training iterations")
    return _finish(fig, ax, suite, ys, path)


def plot_factor_nfe(suite: Suite, factor: Factor, rows: list[dict], path: Path) -> Path:
    """The final weights' metric against NFE (network evaluations per sample), one line per variant."""
    fig, ax = _axes(suite, f"{factor.title}: at {suite.steps:,} steps, by NFE")
    series: dict = {}
    for (variant, nfe), st in nfe_values(rows, factor.name).items():
        series.setdefault(variant, {})[nfe] = st
    ys = _curves(ax, factor, series)
    ax.set_xscale("log")
    nfes = sorted({n for s in series.values() for n in s})
    if nfes:
        ax.set_xticks(nfes, [str(n) for n in nfes])
        ax.minorticks_off()
    ax.set_xlabel("NFE per sample")
    return _finish(fig, ax, suite, ys, path)


# ---------------------------------------------------------------------------------------------------------------------
# The markdown table
# ---------------------------------------------------------------------------------------------------------------------

def _fmt(x) -> str:
    if x is None:
        return "—"
    if isinstance(x, Stat):
        return _fmt(x.mean) if x.n < 2 else f"{_fmt(x.mean)} ± {x.std:.2g}"
    return f"{x:.4g}" if abs(x) < 1000 else f"{x:,.0f}"


def _minutes(s: Optional[float]) -> str:
    if s is None:
        return "—"
    return f"{s:.0f} s" if s < 90 else (f"{s / 60:.1f} min" if s < 5400 else f"{s / 3600:.1f} h")


def _params(out_dir: Path, variant: str) -> Optional[int]:
    p = run_dir_of(out_dir, variant) / RUN_RECIPE
    return parameter_count(load_recipe(p)) if p.exists() else None


def _nfe_table(suite: Suite, factor: Factor, rows: list[dict], order: list[str]) -> list[str]:
    """The final weights at each NFE: one column per NFE, the best of each column in bold."""
    vals = nfe_values(rows, factor.name)
    nfes = sorted({nfe for _, nfe in vals})
    if not nfes:
        return []
    best = {}
    for nfe in nfes:
        col = [vals[(v, nfe)].mean for v in order if (v, nfe) in vals]
        best[nfe] = min(col) if suite.lower_is_better else max(col)
    lines = ["", f"At {suite.steps:,} steps, sampled with {', '.join(map(str, suite.eval_steps))} sampler steps "
             f"({suite.metric}; NFE = network evaluations per sample, a guided one counted once):", "",
             "| variant | " + " | ".join(f"NFE {n}" for n in nfes) + " |", "|---|" + "---:|" * len(nfes)]
    for v in order:
        cells = []
        for nfe in nfes:
            st = vals.get((v, nfe))
            text = _fmt(st)
            cells.append(f"**{text}**" if st is not None and st.mean == best[nfe] else text)
        lines.append(f"| `{v}` | " + " | ".join(cells) + " |")
    return lines + ["", f"![{factor.title} by NFE]({FIGURES}/{factor.name}_nfe.png)"]


def factor_section(suite: Suite, factor: Factor, rows: list[dict], out_dir: Path) -> tuple[list[str], str]:
    """The markdown lines for one factor, and its verdict."""
    step = suite.ranked_at
    values = values_at(rows, factor.name, step)
    final = {r["variant"]: r.get("wall_s") for r in rows if r["factor"] == factor.name and r["step"] == suite.steps
             and r.get("seed", 0) == 0 and "sampler_steps" not in r}
    order = ranking(suite, factor, values)
    best = values[order[0]] if order and order[0] in values else None
    checks = [check_claim(c, values, suite) for c in factor.claims]
    v = verdict(checks)
    spread = suite.seeds > 1
    col = f"{suite.metric} @ {step:,}" + (f" (mean ± sd, {suite.seeds} seeds)" if spread else "")
    lines = [f"## {factor.title}", "", f"**Paper:** {factor.finding}", "",
             f"![{factor.title}]({FIGURES}/{factor.name}.png)", "",
             f"| rank | variant | design | {col} | vs best | params | time |",
             "|---:|---|---|---:|---:|---:|---:|"]
    for i, name in enumerate(order, 1):
        val = values.get(name)
        rel = "—"
        if val is not None and best is not None:
            rel = "best" if name == order[0] else f"{-advantage(val.mean, best.mean, suite.lower_is_better) * 100:+.1f} %"
            if spread and name != order[0] and not check_claim(Claim(order[0], ">", name), values, suite).holds:
                rel += " (within noise)"
        params = _params(out_dir, name)
        lines.append(f"| {i if val is not None else '—'} | `{name}` | {factor.labels[name]} | {_fmt(val)} | {rel} | "
                     f"{'—' if params is None else f'{params / 1e6:.2f}M'} | {_minutes(final.get(name))} |")
    if checks:
        margin = "noise margin" if spread else "tie tolerance"
        lines += ["", f"| claim | values | advantage of left | {margin} | holds |", "|---|---|---:|---:|:---:|"]
        for c in checks:
            mark = "n/a" if c.holds is None else ("yes" if c.holds else "**no**")
            gap = "—" if c.gap is None else f"{c.gap * 100:+.1f} %"
            tol = "—" if c.margin is None else f"{c.margin * 100:.1f} %"
            left, right = (_fmt(Stat(c.left, c.left_std, c.seeds)), _fmt(Stat(c.right, c.right_std, c.seeds))) \
                if c.holds is not None else (_fmt(c.left), _fmt(c.right))
            lines.append(f"| `{c.claim}` | {left} vs {right} | {gap} | {tol} | {mark} |")
    lines += _nfe_table(suite, factor, rows, order)
    lines += ["", f"**Reproduced at this scale:** {v}", ""]
    return lines, v


def claims_rule(suite: Suite) -> str:
    """How the report decides a claim (its header states it)."""
    tol = suite.tie_tolerance * 100
    if suite.seeds > 1:
        return (f"**Claims:** each variant trains with {suite.seeds} seeds; values are the mean ± sample standard "
                f"deviation over them. `A > B` holds when A's mean is better than B's by more than the noise margin "
                f"m = t(0.975, 2K − 2) · sqrt((s_A² + s_B²) / K) (a two-sided 95 % t-test on the seed means; "
                f"t = {_student(suite.seeds):.2f} for K = {suite.seeds}), `A >= B` when A is not worse by more than "
                "m, `A ~ B` when the gap is within m. Gaps and margins are relative to the larger of the two means; "
                "a variant whose gap to the best is within the margin is marked \"within noise\". Time is the "
                "training + evaluation wall time of seed 0.")
    return (f"**Claims:** `A > B` holds when A is better than B by more than {tol:g} % (the tie tolerance), "
            f"`A >= B` when A is not worse by more than {tol:g} %, `A ~ B` when they are within {tol:g} %. Gaps are "
            "relative to the larger of the two values. Time is the training + evaluation wall time of the variant.")


def _student(k: int) -> float:
    from scipy.stats import t as student  # see spread_margin

    return float(student.ppf(0.975, 2 * k - 2))


def write_table(suite: Suite, rows: list[dict], out_dir: Path) -> Path:
    head = [f"# Ablation suite `{suite.name}`", ""]
    if suite.description:
        head += [suite.description, ""]
    if suite.scale_note:
        head += [f"**Scale:** {suite.scale_note}", ""]
    seeds = ("Every variant trains with the same seed and data order." if suite.seeds == 1 else
             f"Every variant trains with the same {suite.seeds} seeds (train.seed + 0..{suite.seeds - 1}): seed k gives "
             "every variant the same data order and noise.")
    head += [f"**Metric:** {suite.metric_label} — {'lower' if suite.lower_is_better else 'higher'} is better; "
             f"variants are ranked at step {suite.ranked_at:,} of {suite.steps:,} (evaluated every "
             f"{suite.eval_every:,}). {seeds}", "", claims_rule(suite), ""]
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
    """Write results.jsonl, figures/<factor>.png (and <factor>_nfe.png with eval_steps) and results.md from the runs
    under OUT; returns their paths."""
    out_dir = Path(out_dir)
    rows = collect_results(suite, out_dir)
    figures = [plot_factor(suite, f, rows, out_dir / FIGURES / f"{f.name}.png") for f in suite.factors.values()]
    if suite.eval_steps:
        figures += [plot_factor_nfe(suite, f, rows, out_dir / FIGURES / f"{f.name}_nfe.png")
                    for f in suite.factors.values()]
    paths = {"results": write_results(rows, out_dir / RESULTS), "table": write_table(suite, rows, out_dir),
             "figures": figures}
    log.debug("ablation report: %s", paths["table"])
    return paths
