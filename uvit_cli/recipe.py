"""Recipes: YAML loading, ``--set a.b=c`` overrides and dumping, and the one place callers import a recipe's parts.

A recipe says *what* to run. Its fields are in schema.py (each with a default and a one-line comment), its lists of
choices in choices.py. Unknown keys and wrong types raise :class:`RecipeError` here, impossible values in
validation.py, each naming the file, the key and the fix.
This module must not import torch.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import fields
from pathlib import Path
from typing import Any, Literal

import yaml

from .choices import (PREDICTIONS_FOR, SAMPLERS_FOR, CheckpointPolicy, Crop, DataName, EvalMode, ExportFormat, Formulation,
                      LossWeighting, LrDecay, Metric, Precision, Prediction, Sampler, SkipMode, Spacing, TimeSampling,
                      Tracker, Weights, choices, samplers_by_formulation)
from .errors import RecipeError
from .registry import size_kwargs
from .schema import SECTIONS, DataConfig, DiffusionConfig, EvalConfig, ModelConfig, Recipe, SampleConfig, TrainConfig
from .validation import validate
from .validation import where as _where

# Callers import a recipe's parts from here: its schema, its lists of choices, its error, and the functions below.
__all__ = [
    "Recipe", "ModelConfig", "DataConfig", "DiffusionConfig", "TrainConfig", "SampleConfig", "EvalConfig", "SECTIONS",
    "PREDICTIONS_FOR", "SAMPLERS_FOR", "CheckpointPolicy", "Crop", "DataName", "EvalMode", "ExportFormat", "Formulation", "LossWeighting",
    "LrDecay", "Metric", "Precision", "Prediction", "Sampler", "SkipMode", "Spacing", "TimeSampling", "Tracker",
    "Weights", "choices", "samplers_by_formulation", "RecipeError", "validate",
    "recipe_from_dict", "parse_override", "parse_sweep", "sweep_override", "apply_overrides", "read_yaml", "load_recipe", "recipe_to_dict",
    "dump_recipe", "replace", "recipes_dir", "resolve_recipe_path", "shipped_recipes",
]


# ---------------------------------------------------------------------------------------------------------------------
# Loading, overrides, dumping
# ---------------------------------------------------------------------------------------------------------------------

def _suggest(name: str, options) -> str:
    close = difflib.get_close_matches(name, list(options), n=1, cutoff=0.5)
    return f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(options)}"


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """Convert a YAML value to a field's type, or raise a RecipeError naming the key."""
    origin = typing.get_origin(hint)
    if origin is Literal:
        allowed = typing.get_args(hint)
        if value not in allowed:
            raise RecipeError(f"{where} = {value!r} is not a valid choice; use one of {', '.join(map(str, allowed))}"
                              + (_suggest(str(value), allowed).replace("valid keys", "choices") if isinstance(value, str) else ""))
        return value
    if origin is tuple:
        args = typing.get_args(hint)
        if not isinstance(value, (list, tuple)):
            raise RecipeError(f"{where} must be a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], where) for v in value)
        if len(value) != len(args):
            raise RecipeError(f"{where} must have {len(args)} items, got {len(value)}")
        return tuple(_coerce(v, a, where) for v, a in zip(value, args))
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise RecipeError(f"{where} must be true or false, got {value!r}")
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise RecipeError(f"{where} must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool):
            raise RecipeError(f"{where} must be a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise RecipeError(f"{where} must be a number, got {value!r}")
    if hint is str:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        if not isinstance(value, str):
            raise RecipeError(f"{where} must be a string, got {value!r}")
        return value
    return value


def _build_section(cls, raw: Any, source: str | None, section: str):
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise RecipeError(f"{_where(source, section)} must be a mapping of keys to values, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in fields(cls)]
    raw = dict(raw)
    if cls is ModelConfig and raw.get("size"):
        try:
            base = size_kwargs(str(raw["size"]))
        except KeyError as e:
            raise RecipeError(f"{_where(source, 'model.size')}: {e.args[0]}") from None
        raw = {**base, **raw}  # explicit fields win over the size's defaults
    kwargs = {}
    for key, value in raw.items():
        if key not in names:
            raise RecipeError(f"{_where(source, f'{section}.{key}')} is not a known key{_suggest(key, names)}")
        kwargs[key] = _coerce(value, hints[key], _where(source, f"{section}.{key}"))
    return cls(**kwargs)


def recipe_from_dict(raw: Any, source: str | None = None) -> Recipe:
    """Build and validate a Recipe from a plain dict (as read from YAML)."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise RecipeError(f"{source or 'recipe'} must be a YAML mapping with sections "
                          f"{', '.join(SECTIONS)}; got {type(raw).__name__}")
    top = [f.name for f in fields(Recipe)]
    kwargs = {}
    for key, value in raw.items():
        if key not in top:
            raise RecipeError(f"{_where(source, key)} is not a known section{_suggest(key, top)}")
        if key in SECTIONS:
            kwargs[key] = _build_section(SECTIONS[key], value, source, key)
        else:
            kwargs[key] = _coerce(value, str, _where(source, key))
    recipe = Recipe(**kwargs)
    validate(recipe, source)
    return recipe


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse ``section.key=value`` (value in YAML syntax) into (path, value)."""
    if "=" not in text:
        raise RecipeError(f"--set {text!r}: expected section.key=value, e.g. --set train.lr=1e-4")
    key, value = text.split("=", 1)
    path = key.strip().split(".")
    if len(path) not in (1, 2) or not all(path):
        raise RecipeError(f"--set {text!r}: expected section.key=value, e.g. --set train.lr=1e-4")
    try:
        parsed = yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError:
        parsed = value
    return path, parsed


def parse_sweep(text: str) -> tuple[str, list]:
    """Parse ``sample.key=v1,v2,...`` (each value in YAML syntax, lists in brackets) into (override key, values).

    Only sampling settings sweep: they change how a run's weights are sampled, never the weights (compare
    trained variants with ``uvit ablate``)."""
    usage = "expected sample.KEY=V1,V2,..., e.g. --sweep sample.cfg_scale=1,1.5,2,3 or --sweep sample.steps=10,25,50"
    if "=" not in text:
        raise RecipeError(f"--sweep {text!r}: {usage}")
    key, rhs = (x.strip() for x in text.split("=", 1))
    section, _, name = key.partition(".")
    if section != "sample" or not name:
        raise RecipeError(f"--sweep {text!r}: only sampling settings sweep (sample.KEY: "
                          f"{', '.join(f.name for f in fields(SampleConfig))}); to compare trained variants use "
                          "`uvit ablate`")
    names = [f.name for f in fields(SampleConfig)]
    if name not in names:
        raise RecipeError(f"--sweep {text!r}: sample.{name} is not a known key{_suggest(name, names)}")
    try:
        values = yaml.safe_load(f"[{rhs}]")
    except yaml.YAMLError:
        raise RecipeError(f"--sweep {text!r}: the values are not a comma list; {usage}") from None
    if len(values) < 2 or any(v is None for v in values):
        raise RecipeError(f"--sweep {text!r}: give at least two values, separated by commas; {usage}")
    if len({repr(v) for v in values}) < len(values):
        raise RecipeError(f"--sweep {text!r}: a value is repeated; give each value once")
    return key, values


def sweep_override(key: str, v: Any) -> str:
    """The ``--set`` text of one swept value (YAML flow syntax, so lists stay lists)."""
    return f"{key}={yaml.safe_dump(v, default_flow_style=True).strip().removesuffix('...').strip()}"


def apply_overrides(raw: dict, overrides: list[str] | None) -> dict:
    """Return a copy of a raw recipe dict with ``--set`` overrides applied."""
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in (raw or {}).items()}
    for text in overrides or []:
        path, value = parse_override(text)
        if len(path) == 1:
            out[path[0]] = value
        else:
            section, key = path
            if section not in SECTIONS:
                raise RecipeError(f"--set {text!r}: {section!r} is not a section{_suggest(section, list(SECTIONS))}")
            sect = out.setdefault(section, {})
            if not isinstance(sect, dict):
                raise RecipeError(f"--set {text!r}: section {section!r} is not a mapping")
            sect[key] = value
    return out


def read_yaml(path: str | Path) -> dict:
    """A recipe file's YAML mapping; a directory, a binary file, invalid YAML or a non-mapping is a RecipeError."""
    path = Path(path)
    if not path.exists():
        raise RecipeError(f"recipe file {path} does not exist; `uvit recipes` lists the shipped recipes")
    if path.is_dir():
        hint = f"; a run's recipe is {path / 'recipe.yaml'}" if (path / "recipe.yaml").is_file() else ""
        raise RecipeError(f"recipe {path} is a directory; pass a recipe YAML file{hint}")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise RecipeError(f"recipe {path} is not a text file (not UTF-8); pass a recipe YAML file") from None
    except yaml.YAMLError as e:
        raise RecipeError(f"{path} is not valid YAML: {e}") from None
    if raw is not None and not isinstance(raw, dict):
        raise RecipeError(f"recipe {path} is a YAML {type(raw).__name__}, not a mapping of sections "
                          f"({', '.join(SECTIONS)}); see recipes/digits_uvit_tiny.yaml for the layout")
    if not raw:   # an empty file would silently train the defaults (CIFAR10): never what was meant
        raise RecipeError(f"recipe {path} is empty; write its sections ({', '.join(SECTIONS)}), e.g. copy "
                          "recipes/digits_uvit_tiny.yaml")
    return raw


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Load a recipe from YAML (a path, or a shipped recipe's name), apply overrides, validate."""
    path = resolve_recipe_path(path)
    raw = apply_overrides(read_yaml(path), overrides)
    return recipe_from_dict(raw, source=str(path))


def recipe_to_dict(recipe: Recipe) -> dict:
    """The resolved recipe as plain YAML-able data (tuples become lists)."""
    def plain(v):
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v
    return plain(dataclasses.asdict(recipe))


def dump_recipe(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False)


def replace(recipe: Recipe, **sections) -> Recipe:
    """Copy a recipe with some fields changed, e.g. ``replace(r, train={"steps": 10})``; validated."""
    raw = recipe_to_dict(recipe)
    for section, values in sections.items():
        if isinstance(values, dict):
            raw[section].update(values)
        else:
            raw[section] = values
    return recipe_from_dict(raw)


# ---------------------------------------------------------------------------------------------------------------------
# Shipped recipes
# ---------------------------------------------------------------------------------------------------------------------

def recipes_dir() -> Path:
    """The shipped recipes directory (next to the package in a source checkout)."""
    return Path(__file__).resolve().parent.parent / "recipes"


def resolve_recipe_path(path: str | Path) -> Path:
    """A path as given, or the name of a shipped recipe (``digits_uvit_tiny`` or ``digits_uvit_tiny.yaml``)."""
    p = Path(path)
    if p.exists():
        return p
    for cand in (recipes_dir() / p, recipes_dir() / f"{p}.yaml", recipes_dir() / p.name):
        if cand.exists():
            return cand
    names = [q.stem for q in sorted(recipes_dir().glob("*.yaml"))]
    close = difflib.get_close_matches(p.stem, names, n=2, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else "; `uvit recipes` lists the shipped recipes"
    raise RecipeError(f"recipe {str(path)!r} not found{hint}")


def shipped_recipes() -> list[Path]:
    return sorted(recipes_dir().glob("*.yaml"))
