"""Evaluation: held-out metrics, ArviZ diagnostics and plots.

``metrics`` (regression: MSE, NLL, CRPS, coverage and reliability; classification:
accuracy, NLL, Brier, ECE / MCE), ``diagnostics`` (ArviZ ``InferenceData``: every ArviZ call
lives there) and ``plots`` (imported on demand: matplotlib stays out of the import path).
"""

from .metrics import classification_metrics, regression_metrics

__all__ = ["classification_metrics", "regression_metrics"]
