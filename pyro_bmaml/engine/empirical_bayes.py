r"""Empirical-Bayes prior: a Gaussian over the flat parameters fitted to many tasks' data.

Given tasks :math:`t = 1..T` of a family, each with support data :math:`D_t`, and for each
task a set of particles that roughly locate its posterior (e.g. the particles a meta-learner
adapted to it), fit the Gaussian prior :math:`q_\psi = \mathcal N(\mu, LL^\top)` over the flat
unconstrained vector by maximising the tasks' marginal likelihood (type-II maximum
likelihood; Robbins 1956, Morris 1983, the empirical-Bayes estimate of a task prior):

.. math::

    \hat\psi = \arg\max_\psi \frac1T \sum_t \log \int p(D_t \mid \theta)\, q_\psi(\theta)\,
        d\theta, \qquad
    \int p(D_t \mid \theta)\, q_\psi(\theta)\, d\theta \approx \frac1S \sum_s
        \frac{p(D_t \mid \theta_{ts})\, q_\psi(\theta_{ts})}{r_t(\theta_{ts})},
        \quad \theta_{ts} \sim r_t,

by importance sampling with a proposal per task: the defensive mixture :math:`r_t =
\frac12 \mathcal N(\bar\theta_t, c\,\hat\Sigma_t) + \frac12 \mathcal N(\bar\theta, c\,
\hat\Sigma)` of a Gaussian at the task's particles and one at all tasks' particles pooled,
both widened by ``inflate`` (:math:`c`) so that their tails cover the posterior under the
priors the fit visits (Hesterberg 1995). The likelihoods :math:`p(D_t \mid \theta_{ts})` do
not depend on :math:`\psi`, so they are computed once per round and the fit itself only
evaluates :math:`\log q_\psi`. Later rounds (adaptive importance sampling) centre each
task's proposal on its importance-weighted posterior under the fitted prior and the pooled
one on that prior, so the particles need only be a rough guide; a round costs one batched
likelihood call over ``T x S`` draws.

Why this and not the particles themselves: a meta-learner's initial particles are where a
few adaptation steps start, not a sample of the family's parameters, and the pooled adapted
particles (the aggregate posterior) are the family's prior only when each task's posterior
is exact under the *true* prior; after a few steps from a broad model prior they are the
prior convolved with each task's estimation error, too wide. The marginal likelihood
corrects that: on the families suite (``results/families.md``) NUTS under this prior closes
most or all of the gap to the Bayes-optimal predictive on the regression families.
"""

from __future__ import annotations

import math
import warnings
from typing import NamedTuple, Sequence

import pyro.distributions as dist
import torch

from .._checks import check_int, check_particles, check_positive_float
from .potential import ModelPotential

__all__ = ["EmpiricalBayesFit", "empirical_bayes_prior"]


class EmpiricalBayesFit(NamedTuple):
    """What :func:`empirical_bayes_prior` returns: the fitted ``prior`` (a
    :class:`~pyro.distributions.MultivariateNormal` or a diagonal ``Normal(...).to_event(1)``
    over the flat unconstrained vector), the mean log marginal likelihood per task at the
    fit (``log_marginal``, a float) and each task's effective sample size of its importance
    weights at the fit (``ess``, ``(T,)``: a task whose ESS is near 1 is estimated from one
    draw; more ``num_draws`` or a larger ``inflate`` help)."""

    prior: dist.Distribution
    log_marginal: float
    ess: torch.Tensor


def _weighted_cov(x: torch.Tensor, w) -> torch.Tensor:
    """Covariance over dim -2 of ``x (..., N, D)``: equally weighted (unbiased) when ``w`` is
    None, else with normalised weights ``w (..., N)``."""
    if w is None:
        dev = x - x.mean(-2, keepdim=True)
        return dev.transpose(-1, -2) @ dev / max(x.size(-2) - 1, 1)
    dev = x - (w.unsqueeze(-1) * x).sum(-2, keepdim=True)
    return (w.unsqueeze(-1) * dev).transpose(-1, -2) @ dev


def _defensive_draws(task_mean, task_cov, mean, cov, floor, full, shape, generator):
    """Draws ``(T, S, D)`` from the per-task mixture 1/2 N(task_mean, task_cov) + 1/2
    N(mean, cov) (half from each) and their log proposal density ``(T, S)``."""
    t, d = task_mean.shape
    if full:
        eye = torch.eye(d, dtype=task_mean.dtype)
        local = dist.MultivariateNormal(task_mean, covariance_matrix=task_cov + floor * eye)
        pooled = dist.MultivariateNormal(mean, covariance_matrix=cov + floor * eye)
    else:
        local = dist.Normal(task_mean, (task_cov.diagonal(dim1=-2, dim2=-1) + floor).sqrt()).to_event(1)
        pooled = dist.Normal(mean, (cov.diagonal() + floor).sqrt()).to_event(1)
    z = torch.randn(sum(shape), t, d, generator=generator, dtype=task_mean.dtype)
    z_local, z_pooled = z[: shape[0]], z[shape[0]:]
    if full:
        draws_local = task_mean + (local.scale_tril @ z_local.unsqueeze(-1)).squeeze(-1)
        draws_pooled = mean + z_pooled @ pooled.scale_tril.T
    else:
        draws_local = task_mean + local.base_dist.scale * z_local
        draws_pooled = mean + pooled.base_dist.scale * z_pooled
    draws = torch.cat([draws_local, draws_pooled], 0)  # (S, T, D)
    log_proposal = torch.logaddexp(local.log_prob(draws), pooled.log_prob(draws)) - math.log(2)
    return draws.transpose(0, 1), log_proposal.T


def empirical_bayes_prior(potential: ModelPotential, particles: torch.Tensor,
                          data: Sequence, num_draws: int = 400, inflate: float = 4.0,
                          covariance: str = "auto", num_iterations: int = 500,
                          lr: float = 0.05, seed: int = 0, rounds: int = 3,
                          chunk_size: int = 32) -> EmpiricalBayesFit:
    r"""The Gaussian prior over the flat unconstrained parameters that maximises the tasks'
    importance-sampled marginal likelihood (see the module docs for the estimator).

    :param potential: the model's potential (set up: it knows the sites).
    :param particles: ``(T, M, D)``, particles near each task's posterior (e.g. a
        meta-learner's adapted particles); they only shape the proposals.
    :param data: the model's arguments with a leading task dim ``T`` (e.g. ``(x_support,
        y_support)``), whose log likelihood is the evidence.
    :param num_draws: ``S``, importance draws per task.
    :param inflate: factor on the proposals' covariances.
    :param covariance: ``"full"``, ``"diag"`` or ``"auto"`` (full up to D = 64).
    :param num_iterations, lr: Adam on :math:`(\mu, L)`, started at the pooled particles'
        mean and covariance.
    :param seed: seed of the draws.
    :param rounds: rounds of adaptive importance sampling (population Monte Carlo, Cappe et
        al. 2004): after each fit every task's proposal moves to its importance-weighted
        posterior moments under the fitted prior, and the pooled one to that prior, and the
        fit resumes on fresh draws; the particles only have to be a rough guide.
    :param chunk_size: tasks per likelihood call (bounds the memory of ``T x S`` draws).
    :returns: :class:`EmpiricalBayesFit`.
    """
    if not isinstance(potential, ModelPotential):
        raise TypeError(f"potential must be a ModelPotential, got {type(potential).__name__}")
    potential._require_sites()
    particles = check_particles(particles, potential.dim).detach()
    if particles.dim() != 3 or particles.size(0) < 2:
        raise ValueError(f"particles must be (T, M, D) with at least 2 tasks, got shape "
                         f"{tuple(particles.shape)}")
    t, m, d = particles.shape
    data = tuple(data)
    for i, a in enumerate(data):
        if isinstance(a, torch.Tensor) and (a.dim() == 0 or a.size(0) != t):
            raise ValueError(f"data[{i}] must have a leading task dim {t} like particles, got "
                             f"shape {tuple(a.shape)}")
    num_draws = check_int("num_draws", num_draws, 2)
    inflate = check_positive_float("inflate", inflate)
    num_iterations = check_int("num_iterations", num_iterations, 1)
    lr = check_positive_float("lr", lr)
    rounds = check_int("rounds", rounds, 1)
    chunk_size = check_int("chunk_size", chunk_size, 1)
    if covariance not in ("auto", "full", "diag"):
        raise ValueError(f"covariance must be 'auto', 'full' or 'diag', got {covariance!r}")
    full = covariance == "full" or (covariance == "auto" and d <= 64)

    work = particles.double()
    pooled = work.reshape(-1, d)
    mean = pooled.mean(0)
    cov = _weighted_cov(pooled, None)
    floor = 1e-6 * cov.diagonal().mean().clamp_min(1e-12)
    task_mean = work.mean(1)  # (T, D)
    task_cov = _weighted_cov(work, None)  # (T, D, D)
    generator = torch.Generator().manual_seed(int(seed))
    shape = (num_draws // 2, num_draws - num_draws // 2)

    loc = mean.clone().requires_grad_(True)
    if full:
        chol = torch.linalg.cholesky(cov + floor * torch.eye(d, dtype=work.dtype))
        raw = [chol.tril(-1).clone().requires_grad_(True),
               chol.diagonal().log().clone().requires_grad_(True)]
    else:
        raw = [(cov.diagonal() + floor).sqrt().log().clone().requires_grad_(True)]

    def prior_of(loc, raw):
        if full:
            return dist.MultivariateNormal(loc, scale_tril=raw[0].tril(-1) + torch.diag(raw[1].exp()))
        return dist.Normal(loc, raw[0].exp()).to_event(1)

    optimizer = torch.optim.Adam([loc] + raw, lr=lr)
    for _ in range(rounds):
        # the task's own spread is floored at 1% of the pooled one (one particle, or
        # particles that agree, still give a proper proposal)
        local_cov = inflate * (task_cov + 0.01 * torch.diag_embed(cov.diagonal()).expand(t, d, d))
        draws, log_proposal = _defensive_draws(task_mean, local_cov, mean, inflate * cov, floor,
                                               full, shape, generator)
        with torch.no_grad():
            log_lik = torch.cat([
                potential.log_likelihood(
                    draws[i:i + chunk_size].to(particles.dtype),
                    *(a[i:i + chunk_size] if isinstance(a, torch.Tensor) else a for a in data),
                ).flatten(2).sum(-1).double()
                for i in range(0, t, chunk_size)])  # (T, S)
        base = log_lik - log_proposal
        # a draw whose likelihood is not finite (outside the model's support) gets weight 0
        base = torch.where(torch.isfinite(base), base, torch.full_like(base, -math.inf))
        if not bool(torch.isfinite(base).any(1).all()):
            raise ValueError("some task has no draw with a finite likelihood; check the data "
                             "or raise inflate")
        for _ in range(num_iterations):
            lw = base + prior_of(loc, raw).log_prob(draws)
            objective = -(torch.logsumexp(lw, 1) - math.log(num_draws)).mean()
            optimizer.zero_grad()
            objective.backward()
            optimizer.step()
        with torch.no_grad():
            fitted = prior_of(loc, raw)
            lw = base + fitted.log_prob(draws)
            w = torch.softmax(lw, 1)  # (T, S): each task's posterior under the fitted prior
            # the next round's proposals: each task's importance-weighted posterior moments
            # and the fitted prior itself
            task_mean = (w.unsqueeze(-1) * draws).sum(1)
            task_cov = _weighted_cov(draws, w)
            mean = fitted.mean.detach().clone()
            cov = (fitted.covariance_matrix if full else torch.diag(fitted.variance)).detach().clone()
    with torch.no_grad():
        log_marginal = float((torch.logsumexp(lw, 1) - math.log(num_draws)).mean())
        ess = 1.0 / w.pow(2).sum(1)
        prior = prior_of(loc.detach().to(particles.dtype),
                         [r.detach().to(particles.dtype) for r in raw])
    if float(ess.median()) < 5:
        warnings.warn(f"empirical_bayes_prior: the median effective sample size per task is "
                      f"{float(ess.median()):.1f} of {num_draws} draws; the fit rests on a few "
                      f"draws per task (raise num_draws or rounds)", stacklevel=2)
    if not math.isfinite(log_marginal):
        raise FloatingPointError("the empirical-Bayes fit ended with a non-finite marginal "
                                 "likelihood; raise num_draws or inflate")
    return EmpiricalBayesFit(prior, log_marginal, ess.to(particles.dtype))
