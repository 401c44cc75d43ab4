"""The package's shape: no import cycles, package imports at the top of library modules, and every list of
choices agreeing with its one home in the recipe's types (docs/architecture.md)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import uvit_cli
from uvit_cli.choices import (PREDICTIONS_FOR, SAMPLERS_FOR, CheckpointPolicy, Crop, EvalMode, ExportFormat,
                              Formulation, LossWeighting, Metric, Precision, Prediction, Sampler, SkipMode, Spacing,
                              TimeSampling, Tracker, Weights, choices)

PACKAGE = Path(uvit_cli.__file__).parent


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _imports(path: Path, modules: dict[str, Path]) -> list[tuple[str, int, bool]]:
    """(imported package module, line, at module level) for every import of the package in a file."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text())
    top = {id(n) for n in tree.body}
    for node in ast.walk(tree):  # imports under `if TYPE_CHECKING:` or try/except at module level count as top
        if isinstance(node, (ast.If, ast.Try)) and id(node) in top:
            top |= {id(n) for n in ast.walk(node)}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("uvit_cli"):
                continue
            for alias in node.names:  # `from pkg import submodule` depends on the submodule
                sub = f"{target}.{alias.name}"
                out.append((sub if sub in modules else target, node.lineno, id(node) in top))
        elif isinstance(node, ast.Import):
            out += [(a.name, node.lineno, id(node) in top) for a in node.names if a.name.startswith("uvit_cli")]
    return out


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {m: {t for t, _, _ in _imports(p, modules) if t != m} for m, p in modules.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_the_import_graph_has_no_cycle():
    graph = _graph()
    assert len(graph) > 40 and "uvit_cli.build" in graph["uvit_cli.train"]   # the walk sees the package
    assert _cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_library_modules_import_the_package_at_the_top():
    """Deferred package imports live only at the CLI edge (cli/app.py says why)."""
    modules = _modules()
    deferred = [f"{_module_name(p)}:{line} imports {t}" for m, p in modules.items() if not m.startswith("uvit_cli.cli")
                for t, line, at_top in _imports(p, modules) if not at_top]
    assert deferred == []


def test_leaf_modules_stay_leaves():
    graph = _graph()
    assert graph["uvit_cli.errors"] == set()
    assert graph["uvit_cli.files"] <= {"uvit_cli.errors"}
    assert graph["uvit_cli.registry"] == set()
    assert graph["uvit_cli.choices"] == set()
    # the recipe layer (loading, schema, checks, choices) is torch-free and below everything that builds objects
    layer = {"uvit_cli.recipe", "uvit_cli.schema", "uvit_cli.validation", "uvit_cli.choices"}
    for name in layer:
        assert graph[name] <= layer | {"uvit_cli.errors", "uvit_cli.registry"}, name


def test_every_list_of_choices_agrees_with_the_recipe():
    from uvit_cli.bench.train import bench_train  # noqa: F401 - importable
    from uvit_cli.build import build_schedule
    from uvit_cli.cli.encode import CropChoice, Dataset
    from uvit_cli.cli.export import FormatChoice
    from uvit_cli.cli.options import PrecisionChoice, SamplerChoice, WeightsChoice
    from uvit_cli.data.crops import CROPS, DEFAULT_CROP
    from uvit_cli.data.sources import open_source
    from uvit_cli.errors import UvitError
    from uvit_cli.metrics.evaluate import DIGITS_METRICS, INCEPTION_METRICS
    from uvit_cli.metrics.features import MODES
    from uvit_cli.model import CHECKPOINT_POLICIES, SKIP_MODES
    from uvit_cli.recipe import DataName, load_recipe, replace
    from uvit_cli.registry import VAES
    from uvit_cli.runtime import DTYPES
    from uvit_cli.sampling import SAMPLERS, SPACINGS
    from uvit_cli.tracking import TRACKERS

    assert tuple(SAMPLERS) == choices(Sampler)
    assert ("auto", *SPACINGS) == choices(Spacing)
    assert SKIP_MODES == choices(SkipMode)
    assert CHECKPOINT_POLICIES == choices(CheckpointPolicy)
    assert tuple(DTYPES) == choices(Precision)
    assert tuple(TRACKERS) == choices(Tracker)
    assert {"auto", *CROPS} == set(choices(Crop))
    assert {*MODES, "digits"} == set(choices(EvalMode))
    assert (*INCEPTION_METRICS, *DIGITS_METRICS) == choices(Metric)
    assert set(DEFAULT_CROP.values()) <= set(CROPS)
    assert set(choices(DataName)) - {"digits", "latents"} <= set(DEFAULT_CROP)   # every pixel data set has a crop
    # the CLI's choices are the recipe's
    assert [e.value for e in PrecisionChoice] == list(choices(Precision))
    assert [e.value for e in SamplerChoice] == list(choices(Sampler))
    assert [e.value for e in WeightsChoice] == list(choices(Weights))
    assert [e.value for e in CropChoice] == list(choices(Crop))
    assert [e.value for e in FormatChoice] == list(choices(ExportFormat))  # export.EXPORTERS: tests/test_export.py
    assert [e.value for e in Dataset] == list(VAES)
    for kind in VAES:  # every encode-latents kind is a source kind
        with pytest.raises(UvitError, match="does not exist|missing"):
            open_source(kind, "/nonexistent/path")
    from uvit_cli.objective import LOSS_WEIGHTINGS, PREDICTIONS, TIME_SAMPLINGS

    assert ("auto", *PREDICTIONS) == choices(Prediction)
    assert TIME_SAMPLINGS == choices(TimeSampling) and LOSS_WEIGHTINGS == choices(LossWeighting)
    assert set(SAMPLERS_FOR) == set(PREDICTIONS_FOR) == set(choices(Formulation))
    base = load_recipe("digits_uvit_tiny")
    for f in choices(Formulation):  # every formulation builds a schedule, with every target and sampler it lists
        assert set(SAMPLERS_FOR[f]) <= set(choices(Sampler)) and set(PREDICTIONS_FOR[f]) <= set(PREDICTIONS)
        schedule = build_schedule(replace(base, diffusion={"formulation": f}))
        assert schedule.kind == f and schedule.target.name == PREDICTIONS_FOR[f][0] == schedule.default_prediction
        for p in PREDICTIONS_FOR[f]:
            assert build_schedule(replace(base, diffusion={"formulation": f, "prediction": p})).target.name == p


def test_no_dependency_is_capped_or_pinned():
    """pyproject.toml binds no user to one torch: lower bounds only; pins belong to CI's install line (.ci/run)."""
    import tomllib

    project = tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text())["project"]
    reqs = project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]
    assert any(r.replace(" ", "").startswith("torch>=") for r in reqs)
    assert [r for r in reqs if any(op in r for op in ("<", "==", "~=", "!="))] == []
