r"""Predictive metrics of particle posteriors on query sets (regression).

For a Normal likelihood the particle predictive is a Gaussian mixture,
:math:`\frac1M \sum_m \mathcal N(\mu_m(x), \sigma_m^2)`. Per task, then mean and standard
error over tasks:

- ``nll``: negative log of the mixture density (not the mean of per-particle NLLs),
  averaged over query points;
- ``mse`` / ``rmse``: of the particle-mean prediction (``mse`` is the paper's metric);
- ``crps``: the mixture's continuous ranked probability score, in closed form (from
  `scoringrules <https://github.com/frazane/scoringrules>`_, ``crps_mixnorm``);
- ``coverage`` / ``width``: how often the central interval of nominal probability
  0.5 / 0.8 / 0.9 / 0.95 holds the target, and how wide it is; the mixture's quantiles have
  no closed form, so they are found by bisection on its CDF (written here: no library gives
  vectorized Gaussian-mixture quantiles in torch);
- ``pit``: the probability integral transform :math:`F(y)`, uniform for a calibrated model.

The NLL is computed from the model's own likelihood, so it applies to any observation
model; CRPS, coverage and PIT use the Normal likelihood's parameters.
"""

from __future__ import annotations

import math
from typing import Dict, Sequence, Tuple

import numpy as np
import torch

from .posterior import ParticlePosterior

__all__ = [
    "mean_and_se", "mixture_cdf", "mixture_quantile", "mixture_crps", "interval_scores",
    "regression_metrics", "DEFAULT_LEVELS",
]

DEFAULT_LEVELS = (0.5, 0.8, 0.9, 0.95)


def mean_and_se(values: torch.Tensor) -> Tuple[float, float]:
    """Mean and standard error (sd / sqrt(n)) over the first dim."""
    values = values.detach().double()
    n = values.shape[0]
    mean = values.mean(0)
    se = values.std(0, unbiased=True) / math.sqrt(n) if n > 1 else torch.full_like(mean, float("nan"))
    if mean.dim() == 0:
        return mean.item(), se.item()
    return mean.tolist(), se.tolist()


def mixture_cdf(y: torch.Tensor, loc: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """CDF of the equally weighted Gaussian mixture; ``loc``/``scale`` ``(..., M, N)``,
    ``y`` ``(..., N)`` (or ``(..., K, N)`` with a leading dim of query values)."""
    z = (y.unsqueeze(-2) - loc) / scale
    return torch.special.ndtr(z).mean(-2)


def mixture_quantile(
    prob: float, loc: torch.Tensor, scale: torch.Tensor, iterations: int = 64
) -> torch.Tensor:
    """Quantile ``(..., N)`` of the mixture by bisection (64 halvings: float64 precision)."""
    lo = (loc - 10 * scale).amin(-2)
    hi = (loc + 10 * scale).amax(-2)
    for _ in range(iterations):
        mid = 0.5 * (lo + hi)
        below = mixture_cdf(mid, loc, scale) < prob
        lo = torch.where(below, mid, lo)
        hi = torch.where(below, hi, mid)
    return 0.5 * (lo + hi)


def mixture_crps(y: torch.Tensor, loc: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Closed-form CRPS ``(..., N)`` of the mixture (scoringrules' ``crps_mixnorm``)."""
    import scoringrules

    m = loc.transpose(-1, -2).detach().cpu().double().numpy()  # (..., N, M): M last
    s = scale.transpose(-1, -2).detach().cpu().double().numpy()
    out = scoringrules.crps_mixnorm(y.detach().cpu().double().numpy(), m, s, m_axis=-1)
    return torch.as_tensor(np.asarray(out), dtype=y.dtype, device=y.device)


def interval_scores(
    y: torch.Tensor, loc: torch.Tensor, scale: torch.Tensor, levels: Sequence[float] = DEFAULT_LEVELS
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Central-interval hits and widths: two tensors ``(..., L, N)`` (hits are 0/1)."""
    hits, widths = [], []
    for level in levels:
        if not 0.0 < level < 1.0:
            raise ValueError(f"levels must lie in (0, 1), got {level}")
        lower = mixture_quantile((1 - level) / 2, loc, scale)
        upper = mixture_quantile((1 + level) / 2, loc, scale)
        hits.append(((y >= lower) & (y <= upper)).to(y.dtype))
        widths.append(upper - lower)
    return torch.stack(hits, -2), torch.stack(widths, -2)


def regression_metrics(
    posterior: ParticlePosterior,
    x_query: torch.Tensor,
    y_query: torch.Tensor,
    levels: Sequence[float] = DEFAULT_LEVELS,
    closed_form: bool = True,
) -> Dict[str, object]:
    """Metrics of a batched posterior ``(T, M, D)`` on query sets ``(T, Q, in)``, ``(T, Q)``.

    :param closed_form: also compute CRPS, coverage, widths and PIT (they need a Normal
        likelihood); ``False`` gives only NLL, MSE and RMSE, for any likelihood.
    :returns: ``{"nll", "mse", "rmse", "crps": (mean, se), "coverage", "width":
        {level: (mean, se)}, "pit": (T, Q), "per_task": {name: (T,) or (T, L)}}``.
    """
    if not posterior.batched:
        raise ValueError("regression_metrics needs a batched (T, M, D) posterior")
    with torch.no_grad():
        # y passed in: the model observes it instead of sampling (any likelihood works)
        mean = posterior.potential.model_output(posterior.particles, x_query, y_query).mean(-2)
        mse = (mean - y_query).pow(2).mean(-1)
        nll = -posterior.log_predictive_density(x_query, y_query).mean(-1)
    if not closed_form:
        per_task = {"nll": nll, "mse": mse, "rmse": mse.sqrt()}
        out = {k: mean_and_se(v) for k, v in per_task.items()}
        out["per_task"] = per_task
        return out
    with torch.no_grad():
        loc, scale = posterior.potential.normal_likelihood_params(
            posterior.particles, x_query, y_query)
        crps = mixture_crps(y_query, loc, scale).mean(-1)
        hits, widths = interval_scores(y_query, loc, scale, levels)
        pit = mixture_cdf(y_query, loc, scale)
    per_task = {"nll": nll, "mse": mse, "rmse": mse.sqrt(), "crps": crps,
                "coverage": hits.mean(-1), "width": widths.mean(-1)}
    out: Dict[str, object] = {k: mean_and_se(per_task[k]) for k in ("nll", "mse", "rmse", "crps")}
    for key in ("coverage", "width"):
        means, ses = mean_and_se(per_task[key])
        out[key] = {level: (mu, se) for level, mu, se in zip(levels, means, ses)}
    out["pit"] = pit
    out["per_task"] = per_task
    return out
