r"""Predictive metrics of particle posteriors on query sets.

Per task, then mean and standard error over tasks:

- ``mse``: squared error of the particle-mean prediction, averaged over query points (the
  paper's sinusoid metric);
- ``nll``: negative log of the mixture predictive :math:`\frac1M\sum_m p(y|x,\theta_m)`,
  averaged over query points (not the mean of per-particle NLLs).
"""

from __future__ import annotations

import math
from typing import Dict

import torch

from .posterior import ParticlePosterior

__all__ = ["mean_and_se", "regression_metrics"]


def mean_and_se(values: torch.Tensor) -> tuple[float, float]:
    """Mean and standard error (sd / sqrt(n)) over the first dim."""
    values = values.detach().double()
    n = values.numel()
    se = values.std(unbiased=True).item() / math.sqrt(n) if n > 1 else float("nan")
    return values.mean().item(), se


def regression_metrics(
    posterior: ParticlePosterior, x_query: torch.Tensor, y_query: torch.Tensor
) -> Dict[str, object]:
    """Metrics of a batched posterior ``(T, M, D)`` on query sets ``(T, Q, in)``, ``(T, Q)``.

    :returns: ``{"mse": (mean, se), "nll": (mean, se), "per_task": {"mse": (T,), "nll": (T,)}}``.
    """
    if not posterior.batched:
        raise ValueError("regression_metrics needs a batched (T, M, D) posterior")
    with torch.no_grad():
        mean = posterior.predict(x_query)["mean"]
        mse = (mean - y_query).pow(2).mean(-1)
        nll = -posterior.log_predictive_density(x_query, y_query).mean(-1)
    return {
        "mse": mean_and_se(mse),
        "nll": mean_and_se(nll),
        "per_task": {"mse": mse, "nll": nll},
    }
