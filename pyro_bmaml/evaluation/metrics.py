r"""Predictive metrics of particle posteriors on query sets: regression, and classification
(:func:`classification_metrics`, at the end of the module).

For a Normal likelihood the particle predictive is a Gaussian mixture,
:math:`\frac1M \sum_m \mathcal N(\mu_m(x), \sigma_m^2)`. Per task, then mean and standard
error over tasks:

- ``nll``: negative log of the mixture density (not the mean of per-particle NLLs),
  averaged over query points;
- ``mse`` / ``rmse``: of the particle-mean prediction (``mse`` is the BMAML paper's metric);
- ``mse_particles``: the mean over particles of each particle's MSE (what the official EMAML
  code logs; by the bias-variance identity it is ``mse`` plus the particles' spread, so it
  is never below ``mse``);
- ``crps``: the mixture's continuous ranked probability score, in closed form (from
  `scoringrules <https://github.com/frazane/scoringrules>`_, ``crps_mixnorm``);
- ``coverage`` / ``width``: how often the central interval of nominal probability
  0.5 / 0.8 / 0.9 / 0.95 holds the target, and how wide it is. The target lies in the
  central interval of level :math:`p` exactly when its PIT value :math:`F(y)` lies in
  :math:`[(1-p)/2, (1+p)/2]`, so coverage comes from the PIT; the widths need the mixture's
  quantiles, which have no closed form and are found by bisection on its CDF (written here:
  no library gives vectorized Gaussian-mixture quantiles in torch);
- ``pit``: the probability integral transform :math:`F(y)`, uniform for a calibrated model;
- ``reliability``: the coverage at the levels 0.05, 0.1, ..., 0.95 (a reliability diagram:
  observed against nominal coverage), from the PIT.

The NLL is computed from the model's own likelihood, so it applies to any observation
model; CRPS, coverage and PIT use the Normal likelihood's parameters.
"""

from __future__ import annotations

import math
from typing import Dict, Sequence, Tuple

import numpy as np
import torch

from ..engine.posterior import ParticlePosterior

__all__ = [
    "mean_and_se", "mixture_cdf", "mixture_quantile", "mixture_crps", "interval_scores",
    "regression_metrics", "pit_coverage", "DEFAULT_LEVELS", "RELIABILITY_LEVELS",
    "calibration_errors", "classification_metrics",
]

DEFAULT_LEVELS = (0.5, 0.8, 0.9, 0.95)
RELIABILITY_LEVELS = tuple(round(0.05 * i, 2) for i in range(1, 20))


def pit_coverage(pit: torch.Tensor, levels: Sequence[float]) -> torch.Tensor:
    """Hits of the central intervals from PIT values: ``(..., L, N)`` of 0/1.

    ``y`` lies in the central interval of level ``p`` iff ``(1-p)/2 <= F(y) <= (1+p)/2``.
    """
    for level in levels:
        if not 0.0 < level < 1.0:
            raise ValueError(f"levels must lie in (0, 1), got {level}")
    p = pit.new_tensor(levels).unsqueeze(-1)  # (L, 1)
    return ((pit.unsqueeze(-2) - 0.5).abs() <= p / 2).to(pit.dtype)


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
    crps: bool = False,
    widths: bool = True,
) -> Dict[str, object]:
    """Metrics of a batched posterior ``(T, M, D)`` on query sets ``(T, Q, in)``, ``(T, Q)``.

    :param closed_form: also compute coverage, reliability, PIT (and widths, CRPS if asked);
        they need a Normal likelihood. ``False`` gives only NLL and the MSEs, for any
        likelihood.
    :param crps: compute the mixture CRPS (O(M^2) per point, through scoringrules).
    :param widths: compute the intervals' widths (64 bisection steps per level and bound).
    :returns: ``{"nll", "mse", "mse_particles", "rmse", ["crps"]: (mean, se), "coverage",
        ["width"]: {level: (mean, se)}, "reliability": {level: (mean, se)}, "pit": (T, Q),
        "per_task": {name: (T,) or (T, L)}}``; NLL is per query point, averaged per task.
    """
    if not posterior.batched:
        raise ValueError("regression_metrics needs a batched (T, M, D) posterior")
    with torch.no_grad():
        # y passed in: the model observes it instead of sampling (any likelihood works)
        particle_means = posterior.potential.model_output(posterior.particles, x_query, y_query)
        target = y_query.unsqueeze(1)
        mse = (particle_means.mean(1) - y_query).pow(2).flatten(1).mean(-1)
        mse_particles = (particle_means - target).pow(2).flatten(2).mean(-1).mean(-1)
        nll = -posterior.log_predictive_density(x_query, y_query).mean(-1)
    per_task = {"nll": nll, "mse": mse, "mse_particles": mse_particles, "rmse": mse.sqrt()}
    scalars = list(per_task)
    out: Dict[str, object] = {}
    if closed_form:
        with torch.no_grad():
            loc, scale = posterior.potential.normal_likelihood_params(
                posterior.particles, x_query, y_query)
            pit = mixture_cdf(y_query, loc, scale)
            per_task["coverage"] = pit_coverage(pit, levels).mean(-1)
            per_task["reliability"] = pit_coverage(pit, RELIABILITY_LEVELS).mean(-1)
            if widths:
                per_task["width"] = interval_scores(y_query, loc, scale, levels)[1].mean(-1)
            if crps:
                per_task["crps"] = mixture_crps(y_query, loc, scale).mean(-1)
                scalars.append("crps")
        out["pit"] = pit
    out.update({k: mean_and_se(per_task[k]) for k in scalars})
    for key, lv in (("coverage", levels), ("width", levels), ("reliability", RELIABILITY_LEVELS)):
        if key in per_task:
            means, ses = mean_and_se(per_task[key])
            out[key] = {level: (mu, se) for level, mu, se in zip(lv, means, ses)}
    out["per_task"] = per_task
    return out


def calibration_errors(confidence: torch.Tensor, correct: torch.Tensor, num_bins: int = 15):
    r"""Top-label expected and maximum calibration error over equal-width confidence bins
    (Naeini et al. 2015; Guo et al. 2017):

    .. math::

        \mathrm{ECE} = \sum_b \frac{|B_b|}{n} \left|\mathrm{acc}(B_b) - \mathrm{conf}(B_b)
        \right|, \qquad \mathrm{MCE} = \max_{b: B_b \neq \emptyset}
        \left|\mathrm{acc}(B_b) - \mathrm{conf}(B_b)\right|.

    Bin ``b`` holds the confidences in ``[b/num_bins, (b+1)/num_bins)`` (1.0 in the last),
    the binning of torchmetrics' ``multiclass_calibration_error``.

    :param confidence: predicted probability of the predicted class, any shape (pooled).
    :param correct: whether the predicted class is right, same shape.
    :returns: ``(ece, mce, bins)`` with ``bins = {"confidence", "accuracy", "count"}``, three
        ``(num_bins,)`` tensors (NaN confidence/accuracy in empty bins).
    """
    if confidence.shape != correct.shape:
        raise ValueError(f"confidence {tuple(confidence.shape)} and correct "
                         f"{tuple(correct.shape)} must have the same shape")
    conf = confidence.detach().flatten().double()
    hit = correct.detach().flatten().double()
    if conf.numel() == 0:
        raise ValueError("calibration_errors needs at least one prediction")
    boundaries = torch.linspace(0, 1, num_bins + 1, dtype=conf.dtype, device=conf.device)
    index = (torch.bucketize(conf, boundaries, right=True) - 1).clamp(0, num_bins - 1)
    count = torch.zeros(num_bins, dtype=conf.dtype, device=conf.device).index_add_(
        0, index, torch.ones_like(conf))
    conf_sum = torch.zeros_like(count).index_add_(0, index, conf)
    hit_sum = torch.zeros_like(count).index_add_(0, index, hit)
    mean_conf, mean_acc = conf_sum / count, hit_sum / count  # NaN where empty
    gap = (mean_acc - mean_conf).abs()
    filled = count > 0
    ece = (gap[filled] * count[filled]).sum() / conf.numel()
    mce = gap[filled].max()
    return ece.item(), mce.item(), {"confidence": mean_conf, "accuracy": mean_acc, "count": count}


def classification_metrics(
    posterior: ParticlePosterior,
    x_query: torch.Tensor,
    y_query: torch.Tensor,
    num_bins: int = 15,
) -> Dict[str, object]:
    r"""Few-shot classification metrics of a batched posterior ``(T, M, D)`` on query sets
    ``x_query (T, Q, ...)`` and integer labels ``y_query (T, Q)``, from the particle
    mixture's class probabilities :math:`\bar p(c \mid x) = \frac1M \sum_m
    p(c \mid x, \theta_m)` (the model's return value, averaged over particles):

    - ``accuracy`` / ``error_rate``: of the mixture's most probable class, per episode; mean
      and s.e. over episodes, and ``accuracy_ci95``, the half-width of the 95% interval
      (1.96 s.e., the few-shot literature's convention);
    - ``nll``: negative log of the mixture's probability of the true class, per point;
    - ``brier``: :math:`\sum_c (\bar p(c \mid x) - [c = y])^2`, per point;
    - ``ece`` / ``mce``: top-label calibration errors over ``num_bins`` equal-width bins,
      pooled over every episode's query points (:func:`calibration_errors`); one value each
      (their s.e. is NaN), and ``reliability``, the bins (confidence, accuracy, count);
    - ``entropy_correct`` / ``entropy_wrong``: mean predictive entropy (nats) on correctly
      and wrongly classified points (a useful model is less certain where it is wrong).

    :returns: ``{name: (mean, se)}`` for the scalars, ``accuracy_ci95`` (float),
        ``reliability`` (dict of ``(num_bins,)`` tensors) and ``per_task``.
    """
    if not posterior.batched:
        raise ValueError("classification_metrics needs a batched (T, M, D) posterior")
    if y_query.is_floating_point() or y_query.shape != x_query.shape[:2]:
        raise ValueError(f"y_query must hold integer labels of shape {tuple(x_query.shape[:2])}, "
                         f"got {tuple(y_query.shape)} ({y_query.dtype})")
    with torch.no_grad():
        probs = posterior.predict(x_query)["mean"]  # (tempered: ParticlePosterior.temperature)
        if probs.dim() != 3 or probs.shape[:2] != y_query.shape:
            raise ValueError("the model must return class probabilities (n, num_classes) per "
                             f"task; got {tuple(probs.shape)} for queries {tuple(y_query.shape)}")
        nll = -posterior.log_predictive_density(x_query, y_query).mean(-1)
        confidence, predicted = probs.max(-1)
        correct = (predicted == y_query).to(probs.dtype)
        onehot = torch.nn.functional.one_hot(y_query, probs.size(-1)).to(probs.dtype)
        brier = (probs - onehot).pow(2).sum(-1).mean(-1)
        entropy = -(probs * probs.clamp_min(1e-30).log()).sum(-1)
    per_task = {"accuracy": correct.mean(-1), "error_rate": 1 - correct.mean(-1), "nll": nll,
                "brier": brier}
    out: Dict[str, object] = {k: mean_and_se(v) for k, v in per_task.items()}
    out["accuracy_ci95"] = 1.96 * out["accuracy"][1] if y_query.size(0) > 1 else float("nan")
    ece, mce, bins = calibration_errors(confidence, correct, num_bins)
    out["ece"], out["mce"] = (ece, float("nan")), (mce, float("nan"))
    out["reliability"] = bins
    right, wrong = correct.bool(), ~correct.bool()
    out["entropy_correct"] = (entropy[right].mean().item() if right.any() else float("nan"),
                              float("nan"))
    out["entropy_wrong"] = (entropy[wrong].mean().item() if wrong.any() else float("nan"),
                            float("nan"))
    out["per_task"] = per_task
    return out
