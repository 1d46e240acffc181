r"""Particle posteriors and their predictive distributions.

A :class:`ParticlePosterior` holds the flat particles SVGD (or gradient adaptation) produced
for one task ``(M, D)`` or a batch of tasks ``(T, M, D)``, the model's potential, and the
support data it was adapted on. Its predictive distribution is the equally weighted mixture
of the particles' predictives,

.. math::

    p(y \mid x, D) \approx \frac{1}{M} \sum_{m=1}^{M} p(y \mid x, \theta_m).
"""

from __future__ import annotations

import math
import warnings
from typing import Dict, Optional

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from torch.distributions import constraints
from pyro.infer import Predictive

from .._checks import check_has_data, check_int, check_positive_float, value_checks_enabled
from .potential import ModelPotential

__all__ = ["ParticlePosterior", "mixture_log_likelihood", "particle_prior", "model_with_prior",
           "support_log_density", "tempered_log_predictive"]


def mixture_log_likelihood(log_lik: torch.Tensor) -> torch.Tensor:
    r"""Pointwise log of the equally weighted particle mixture,
    :math:`\log \frac1M \sum_m p(y \mid x, \theta_m)`, from per-particle log likelihoods
    ``(..., M, N)``; returns ``(..., N)`` (differentiable)."""
    return torch.logsumexp(log_lik, dim=-2) - math.log(log_lik.size(-2))


def tempered_log_predictive(support_log_lik: torch.Tensor, temperature) -> torch.Tensor:
    r"""The particle mixture's predictive over a finite support, tempered:
    :math:`\log p_T(s) = \tfrac1T \log \bar p(s) - \log \sum_{s'} \bar p(s')^{1/T}`,
    :math:`\bar p(s) = \frac1M \sum_m p(s \mid x, \theta_m)`, from per-particle log
    likelihoods of every value ``(..., M, N, S)``; returns ``(..., N, S)`` (differentiable,
    also in ``temperature``, a float or 0-dim tensor). :math:`T < 1` sharpens the
    predictive, :math:`T > 1` flattens it; the class ranking never changes (temperature
    scaling, Guo et al. 2017, applied to the mixture)."""
    mixture = torch.logsumexp(support_log_lik, dim=-3) - math.log(support_log_lik.size(-3))
    return (mixture / temperature).log_softmax(-1)


def support_log_density(log_probs: torch.Tensor, y: torch.Tensor,
                        support: torch.Tensor) -> torch.Tensor:
    """``log_probs[..., n, s]`` at each observation's value: ``log_probs`` ``(..., N, S)``
    over ``support`` ``(S,)`` (:func:`tempered_log_predictive`), ``y`` ``(..., N)``;
    raises ``ValueError`` where ``y`` holds a value outside the support."""
    match = y.unsqueeze(-1) == support.to(device=y.device, dtype=y.dtype)
    if not bool(match.any(-1).all()):
        raise ValueError(f"y holds values outside the likelihood's support {support.tolist()}")
    index = match.to(torch.int8).argmax(-1)
    return log_probs.gather(-1, index.unsqueeze(-1)).squeeze(-1)


class ParticlePosterior:
    r"""Particles of one or several tasks' posteriors.

    :param potential: the model's potential (knows the sites and the model).
    :param particles: flat unconstrained ``(M, D)`` or ``(T, M, D)``.
    :param x_support, y_support: the data adapted on (``(K, in)``/``(K,)``, or with ``T``).
    :param info: free-form description (method, kernel, steps...), kept for diagnostics.
    :param temperature: :math:`T > 0` of the predictive over a finite support (a classifier;
        :func:`tempered_log_predictive`), e.g. meta-learned by a learner's
        ``learn_predictive_temperature``; 1 (default) is the plain mixture. Any other value
        needs a likelihood over finitely many values (``potential.observation_support``). It
        applies to the mixture predictive (:meth:`predict`'s ``"mean"``,
        :meth:`log_predictive_density`, :meth:`predictive_log_probs`); the per-particle
        values (``"particle_means"``, draws of ``y``, ArviZ's log likelihood) are the
        model's own.
    """

    def __init__(
        self,
        potential: ModelPotential,
        particles: torch.Tensor,
        x_support: Optional[torch.Tensor] = None,
        y_support: Optional[torch.Tensor] = None,
        info: Optional[dict] = None,
        temperature: float = 1.0,
    ):
        self.potential = potential
        self.particles = particles.detach()
        self.x_support = x_support
        self.y_support = y_support
        self.info = dict(info or {})
        self.temperature = check_positive_float("temperature", temperature)
        if self.temperature != 1.0 and potential.observation_support is None:
            raise ValueError(
                f"temperature={self.temperature} needs a likelihood over finitely many values "
                "(Categorical or Bernoulli); the model's observations have none: use 1.0")

    @property
    def num_particles(self) -> int:
        return self.particles.size(-2)

    @property
    def batched(self) -> bool:
        """True when the posterior holds a batch of tasks ``(T, M, D)``."""
        return self.particles.dim() == 3

    @property
    def named(self) -> Dict[str, torch.Tensor]:
        """``{site: constrained particles ((T,) M, *site_shape)}``."""
        return self.potential.unpack(self.particles)

    def task(self, index: int) -> "ParticlePosterior":
        """The posterior of one task of a batch."""
        if not self.batched:
            raise ValueError("task(index) needs a batched (T, M, D) posterior")
        sup = None if self.x_support is None else (self.x_support[index], self.y_support[index])
        return ParticlePosterior(self.potential.task_view(index), self.particles[index],
                                 *(sup or (None, None)), info=self.info,
                                 temperature=self.temperature)

    def predict(self, x: torch.Tensor, num_samples: int = 0) -> Dict[str, torch.Tensor]:
        """Posterior predictive at inputs ``x`` (``(N, in)``, or ``(T, N, in)`` if batched).

        :param num_samples: draws of ``y`` per particle through :class:`pyro.infer.Predictive`
            (0: none).
        :returns: ``{"mean": ((T,) N, *out), "particle_means": ((T,) M, N, *out)}`` (the
            model's return value: ``f(x)``, or class probabilities ``out = (C,)``) and, if
            asked, ``"samples": ((T,) M * num_samples, N, ...)``.
        """
        num_samples = check_int("num_samples", num_samples, 0)
        self._check_inputs(x)
        particle_dim = 1 if self.batched else 0
        try:
            particle_means = self.potential.model_output(self.particles, x)
        except ValueError as err:  # the model returns no mean: estimate it from draws
            if "must return its predictive mean" not in str(err):
                raise
            draws = max(num_samples, self.FALLBACK_DRAWS)
            if not self._warned:
                warnings.warn(
                    f"the model returns no predictive mean; predict estimates it from {draws} "
                    "draws of the observed site per particle (return the mean from the model "
                    "for exact values)", stacklevel=2)
                self._warned = True
            samples = self._sample_y(x, draws)  # ((T,) M * draws, N, ...)
            shape = samples.shape[:particle_dim] + (self.num_particles, draws) + samples.shape[particle_dim + 1:]
            particle_means = samples.reshape(shape).to(self.particles.dtype).mean(particle_dim + 1)
        if particle_means.is_floating_point():
            self._check_not_nan("predictive mean", particle_means)
        out = {"mean": particle_means.mean(particle_dim), "particle_means": particle_means}
        if self.temperature != 1.0:
            out["mean"] = self._tempered_mean(x, out["mean"])
        if num_samples:
            out["samples"] = self._sample_y(x, num_samples)
        return out

    def _tempered_mean(self, x: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
        """The tempered predictive in the form of the model's returned mean: class
        probabilities over the support where the model returns them (``(..., N, S)``), else
        the tempered expectation of the observed value (e.g. a Bernoulli's ``p(y = 1)``)."""
        probs = self.predictive_log_probs(x).exp()  # ((T,) N, S)
        if tuple(mean.shape) == tuple(probs.shape):
            return probs.to(mean.dtype)
        support = self.potential.observation_support.to(probs)
        expected = (probs * support).sum(-1)
        if tuple(expected.shape) != tuple(mean.shape):
            raise ValueError(
                f"the model's returned mean has shape {tuple(mean.shape)}, neither the class "
                f"probabilities {tuple(probs.shape)} nor the expected label "
                f"{tuple(expected.shape)}: a tempered predictive cannot replace it")
        return expected.to(mean.dtype)

    def predictive_log_probs(self, x: torch.Tensor) -> torch.Tensor:
        """Log probability of every value of a finite support (``potential.observation_support``,
        e.g. each class) under the (tempered) mixture predictive: ``((T,) N, S)``."""
        self._check_inputs(x)
        log_lik = self.potential.support_log_likelihood(self.particles, x)
        self._check_not_nan("log likelihood", log_lik)
        return tempered_log_predictive(log_lik, self.temperature)

    def _check_inputs(self, x) -> None:
        """``x`` must be a finite floating tensor shaped like the support inputs (same
        dtype, same per-point shape, the same number of tasks), so that nothing broadcasts
        silently against the particles."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        check_has_data("x", x)
        if not x.is_floating_point():
            raise TypeError(f"x must be a floating tensor, got dtype {x.dtype}")
        like = self.x_support
        if like is not None:
            lead = (like.size(0),) if self.batched else ()
            if (x.dim() != like.dim() or tuple(x.shape[:len(lead)]) != lead
                    or x.shape[len(lead) + 1:] != like.shape[len(lead) + 1:]):
                expected = ", ".join(["T=%d" % like.size(0)] * self.batched + ["N"]
                                     + [str(d) for d in like.shape[len(lead) + 1:]])
                raise ValueError(f"x must have shape ({expected}) like the support inputs "
                                 f"{tuple(like.shape)}, got {tuple(x.shape)}")
            if x.dtype != like.dtype:
                raise TypeError(f"x is {x.dtype} but the support inputs were {like.dtype}")
        points = (1 if self.batched else 0) if like is not None else 0
        if x.dim() > points and x.size(points) == 0:
            raise ValueError(f"x has no points (shape {tuple(x.shape)})")
        if not bool(torch.isfinite(x).all()):
            raise ValueError("x contains non-finite values (NaN or inf)")

    #: draws per particle that estimate the mean of a model that returns none
    FALLBACK_DRAWS = 100
    _warned = False

    def _sample_y(self, x: torch.Tensor, num_samples: int) -> torch.Tensor:
        site = self.potential.observation_site
        if site is None:
            raise ValueError("the model has no observed site to draw predictions of")

        def draws(named, x_task, potential):
            # Each particle's values repeated num_samples times; Predictive loops over them.
            reps = {k: v.repeat_interleave(num_samples, dim=0) for k, v in named.items()}
            pred = Predictive(potential.call_model, posterior_samples=reps, return_sites=[site])
            return pred(x_task)[site]

        named = self.named
        if not self.batched:
            return draws(named, x, self.potential)
        return torch.stack([draws({k: v[t] for k, v in named.items()}, x[t],
                                  self.potential.task_view(t)) for t in range(x.size(0))])

    def log_predictive_density(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        r"""Pointwise log of the mixture predictive, :math:`\log \frac1M \sum_m p(y|x,\theta_m)`.

        :returns: ``(N,)`` or ``(T, N)``.
        :raises FloatingPointError: where a particle's log likelihood is NaN (e.g. particles
            that an adaptation carried to finite but absurd values, whose logits overflow);
            ``-inf`` (a point the particle gives no density) is a value, not an error.
        """
        if self.temperature != 1.0:
            return support_log_density(self.predictive_log_probs(x), y,
                                       self.potential.observation_support)
        log_lik = self.potential.log_likelihood(self.particles, x, y)
        self._check_not_nan("log likelihood", log_lik)
        return mixture_log_likelihood(log_lik)

    def _check_not_nan(self, what: str, values: torch.Tensor) -> None:
        """Raise a ``FloatingPointError`` naming ``what``, how many of the particles' values are
        NaN and the particles' largest magnitude (a diverged adaptation shows there); one of
        the value checks (:func:`~pyro_bmaml._checks.value_checks`), which ``fit`` turns off
        inside its meta-steps only."""
        if not value_checks_enabled():
            return
        bad = torch.isnan(values)
        if bool(bad.any()):
            largest = float(self.particles.abs().max()) if self.particles.numel() else 0.0
            raise FloatingPointError(
                f"the model's {what} is NaN for {int(bad.sum())} of {values.numel()} values; the "
                f"particles' largest magnitude is {largest:.3g} (an adaptation that diverged "
                "without a non-finite step: fewer steps or a smaller step_size)")

    def to_inference_data(self, x_query=None, y_query=None):
        """ArviZ ``InferenceData``; see :func:`pyro_bmaml.evaluation.diagnostics.to_inference_data`."""
        from ..evaluation.diagnostics import to_inference_data  # ArviZ stays out of the import path

        return to_inference_data(self, x_query, y_query)

    def __repr__(self) -> str:
        shape = tuple(self.particles.shape)
        return f"ParticlePosterior(particles={shape}, sites={self.potential.site_names})"


def particle_prior(particles: torch.Tensor, bandwidth="scott"):
    r"""A particle set as a :mod:`pyro.distributions` prior over the flat unconstrained
    vector: the equally weighted Gaussian kernel-density mixture

    .. math::

        q(u) = \frac1M \sum_{m=1}^M \mathcal N\big(u;\ \theta_m,\ \mathrm{diag}(h^2)\big),

    in the unconstrained space the particles live in (so that constrained sites keep their
    support when mapped back, see :func:`model_with_prior`). Its mean is the particles' mean
    and its covariance the particles' (population) covariance plus :math:`\mathrm{diag}(h^2)`.

    :param particles: ``(M, D)``.
    :param bandwidth: ``"scott"`` (Scott's rule per coordinate, :math:`h_d = \hat\sigma_d
        M^{-1/(D+4)}` with :math:`\hat\sigma_d` the particles' sd, floored at 1e-3 so that
        coordinates the particles agree on stay proper), a float, or a ``(D,)`` tensor.
    :returns: a ``MixtureSameFamily`` with event shape ``(D,)``.
    """
    if not isinstance(particles, torch.Tensor) or particles.dim() != 2 or particles.size(0) < 1:
        raise ValueError(f"particles must be (M, D), got "
                         f"{tuple(particles.shape) if isinstance(particles, torch.Tensor) else type(particles).__name__}")
    theta = particles.detach()
    m, d = theta.shape
    if isinstance(bandwidth, str):
        if bandwidth != "scott":
            raise ValueError(f"bandwidth must be 'scott', a float or a ({d},) tensor, got {bandwidth!r}")
        sd = theta.std(0, unbiased=m > 1) if m > 1 else torch.zeros(d, dtype=theta.dtype)
        h = sd.clamp_min(1e-3) * m ** (-1.0 / (d + 4))
    else:
        h = torch.as_tensor(bandwidth, dtype=theta.dtype).expand(d).clone()
        if not bool((h > 0).all()) or not bool(torch.isfinite(h).all()):
            raise ValueError(f"bandwidth must be finite and > 0, got {bandwidth!r}")
    components = dist.Normal(theta, h.expand(m, d)).to_event(1)
    return _KernelMixture(dist.Categorical(logits=theta.new_zeros(m)), components)


class _KernelMixture(dist.MixtureSameFamily):
    """A mixture of Gaussians over R^D whose support says so (the base class's wrapped
    support constraint has no bijection registered, which NUTS and SVI need)."""

    @property
    def support(self):
        return constraints.independent(constraints.real, 1)


class _ReplacePrior(poutine.messenger.Messenger):
    """Fix the named latent sites to given values and drop their own prior terms."""

    def __init__(self, values):
        super().__init__()
        self.values = values

    def _pyro_sample(self, msg):
        if msg["name"] in self.values:
            msg["value"] = self.values[msg["name"]]
            msg["is_observed"] = True
            msg["mask"] = False  # the learned prior replaces the model's prior on this site


def model_with_prior(potential: ModelPotential, prior, site: str = "theta"):
    """The potential's model with ``prior`` (over the flat unconstrained vector, e.g.
    :func:`particle_prior`) in place of its own priors, for any Pyro inference (NUTS, SVI).

    The returned model samples ``site`` (``(D,)``, unconstrained) from ``prior``, maps it to
    the model's latent sites with the same transforms as the particles, and runs the model
    with those values and without their original prior terms; the data sites are untouched.
    Posterior samples of ``site`` map back with ``potential.unpack``.
    """
    potential._require_sites()

    def model(*args, **kwargs):
        u = pyro.sample(site, prior)
        with _ReplacePrior(potential.unpack(u)):
            return potential.model(*args, **kwargs)

    return model
