r"""A Gaussian prior over the flat unconstrained particles whose parameters are learned.

:class:`GaussianPrior` is :math:`q_\psi(\theta) = \mathcal N(\theta;\, \mu,\, \Lambda^{-1})`
over the flat unconstrained vector :math:`\theta \in \mathbb R^D` of
:class:`~pyro_bmaml.engine.potential.ModelPotential`, parametrised by the Cholesky factor
of its *precision*, :math:`\Lambda = L L^\top` with :math:`L` lower triangular and a
positive diagonal :math:`\operatorname{diag} L = e^{-s}`:

.. math::

    \log q_\psi(\theta) = -\tfrac12 \lVert L^\top (\theta - \mu) \rVert^2
        + \textstyle\sum_d \log L_{dd} - \tfrac D2 \log 2\pi,
    \qquad \nabla_\theta \log q_\psi = -\Lambda (\theta - \mu).

``form="diagonal"`` keeps :math:`L` diagonal (D scales, :math:`\sigma_d = e^{s_d}`);
``form="full"`` learns its strictly lower triangle too, so that the prior can carry
correlations (e.g. weights that live near a low-dimensional subspace). The precision, not
the covariance, is what an SVGD or gradient step reads, so nothing is inverted.

Used as the *target's* prior (:meth:`ModelPotential.with_prior
<pyro_bmaml.engine.potential.ModelPotential.with_prior>`) and meta-learned through the
adaptation steps, it is an explicit prior learned across tasks, in the spirit of the
Gaussian task priors learned by amortised Bayesian meta-learning (Ravi & Beatson, ICLR
2019) and of iMAML's learned proximal term (Rajeswaran et al., NeurIPS 2019); BMAML's own
prior (Yoon et al., NeurIPS 2018) is implicit in its initial particles only.
"""

from __future__ import annotations

import math
from typing import Optional

import pyro.distributions as dist
import torch
from torch import nn

from .._checks import check_choice, check_int

__all__ = ["GaussianPrior", "MAX_FULL_DIM"]

#: the largest D for ``form="full"``: its D x D factor is D^2 parameters (4.2 M at 2,048)
MAX_FULL_DIM = 2048


class GaussianPrior(nn.Module):
    """A learnable Gaussian over ``(..., D)`` flat particles (see the module docs).

    :param dim: D, the number of unconstrained coordinates.
    :param form: ``"diagonal"`` or ``"full"`` (D at most :data:`MAX_FULL_DIM`).
    :param loc: the initial mean ``(D,)`` (default zeros).
    :param scale: the initial standard deviations ``(D,)``, positive (default ones); the
        initial precision is diagonal in both forms.
    """

    def __init__(self, dim: int, form: str = "diagonal", loc: Optional[torch.Tensor] = None,
                 scale: Optional[torch.Tensor] = None, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.dim = check_int("dim", dim, 1)
        self.form = check_choice("form", form, ("diagonal", "full"))
        if self.form == "full" and self.dim > MAX_FULL_DIM:
            raise ValueError(f"form='full' learns a {self.dim} x {self.dim} factor; it is "
                             f"limited to D <= {MAX_FULL_DIM} coordinates: use "
                             f"form='diagonal'")
        loc = torch.zeros(self.dim, dtype=dtype) if loc is None else self._vector("loc", loc)
        scale = torch.ones(self.dim, dtype=dtype) if scale is None else self._vector("scale", scale)
        if not bool((scale > 0).all()) or not bool(torch.isfinite(scale).all()):
            raise ValueError("scale must be positive and finite in every coordinate")
        #: the mean, ``(D,)``
        self.loc = nn.Parameter(loc.detach().clone().to(dtype))
        #: log standard deviation of each coordinate given the others, ``(D,)``
        #: (``-log diag L``)
        self.log_scale = nn.Parameter(scale.detach().log().to(dtype))
        #: the strictly lower triangle of ``L`` (``(D, D)``, upper part unused; ``(0, 0)``
        #: for the diagonal form)
        size = self.dim if self.form == "full" else 0
        self.tril = nn.Parameter(torch.zeros(size, size, dtype=dtype))

    def _vector(self, name, value) -> torch.Tensor:
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{name} must be a tensor of shape ({self.dim},), got "
                            f"{type(value).__name__}")
        if tuple(value.shape) != (self.dim,):
            raise ValueError(f"{name} must have shape ({self.dim},), got {tuple(value.shape)}")
        return value

    @classmethod
    def from_samples(cls, samples: torch.Tensor, form: str = "diagonal",
                     min_scale: float = 1e-3) -> "GaussianPrior":
        """A prior with the per-coordinate mean and standard deviation of ``samples``
        ``(N, D)`` (e.g. draws from a model's own prior), ``N >= 2``; its precision starts
        diagonal in both forms."""
        if not isinstance(samples, torch.Tensor) or samples.dim() != 2 or samples.size(0) < 2:
            raise ValueError("samples must be a tensor of shape (N, D) with N >= 2, got "
                             f"{tuple(samples.shape) if isinstance(samples, torch.Tensor) else type(samples).__name__}")
        if not bool(torch.isfinite(samples).all()):
            raise ValueError("samples must be finite")
        samples = samples.detach()
        return cls(samples.size(1), form, samples.mean(0),
                   samples.std(0).clamp_min(min_scale), dtype=samples.dtype)

    def precision_tril(self) -> torch.Tensor:
        """``L`` ``(D, D)``, lower triangular with a positive diagonal: ``Lambda = L L^T``."""
        diag = torch.diag((-self.log_scale).exp())
        if self.form == "diagonal":
            return diag
        return diag + torch.tril(self.tril, -1)

    def log_prob(self, particles: torch.Tensor) -> torch.Tensor:
        """``log q(theta)`` of ``(..., D)`` particles: ``(...)``, differentiable in both
        the particles and the prior's parameters."""
        if particles.size(-1) != self.dim:
            raise ValueError(f"particles must have last dim D = {self.dim}, got shape "
                             f"{tuple(particles.shape)}")
        dev = particles - self.loc
        if self.form == "diagonal":
            z = dev * (-self.log_scale).exp()
        else:
            z = dev @ self.precision_tril()
        return (-0.5 * z.pow(2).sum(-1) - self.log_scale.sum()
                - 0.5 * self.dim * math.log(2 * math.pi))

    def distribution(self) -> dist.Distribution:
        """The prior as a (detached) :mod:`pyro.distributions` object over ``(D,)``: a
        diagonal ``Normal(...).to_event(1)`` or a ``MultivariateNormal`` given by its
        precision (e.g. for :func:`~pyro_bmaml.engine.posterior.model_with_prior` and NUTS)."""
        loc = self.loc.detach()
        if self.form == "diagonal":
            return dist.Normal(loc, self.log_scale.detach().exp()).to_event(1)
        tril = self.precision_tril().detach()
        return dist.MultivariateNormal(loc, precision_matrix=tril @ tril.T)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, form={self.form!r}"
