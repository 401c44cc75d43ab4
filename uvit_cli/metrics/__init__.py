"""Image-generation metrics matching the reference evaluators: FID, sFID, IS, precision/recall, the digits metric.

Entry points: :func:`evaluate` (score a folder / .npz / array against a reference) and :func:`evaluate_model`
(sample with a recipe's protocol, then score; used by the training monitor and the ablation suite).
"""

from .evaluate import DIGITS_METRICS, INCEPTION_METRICS, EvalResult, evaluate, parse_metrics
from .frechet import GaussianStats, frechet_distance
from .inception_score import inception_score
from .model_eval import evaluate_model, sample_for_eval
from .precision_recall import precision_recall

__all__ = ["evaluate", "evaluate_model", "sample_for_eval", "EvalResult", "parse_metrics", "frechet_distance",
           "GaussianStats", "inception_score", "precision_recall", "INCEPTION_METRICS", "DIGITS_METRICS"]
