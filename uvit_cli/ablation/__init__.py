"""The paper's ablation suite (Figure 2 (a)-(e) and the scaling study) as YAML suites of recipe overlays:
suite.py (schema, loading, variant recipes), runner.py (training every variant), report.py (results and figures)."""

from .report import write_report
from .runner import run_suite, variant_status
from .suite import Suite, SuiteError, load_suite, select_variants, shipped_suites, variant_recipe, variant_recipes

__all__ = ["Suite", "SuiteError", "load_suite", "run_suite", "select_variants", "shipped_suites", "variant_recipe",
           "variant_recipes", "variant_status", "write_report"]
