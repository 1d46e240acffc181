r"""Task models: plain Pyro models with priors, written to be copied.

:class:`BayesianMLP` is the regression model of the BMAML paper (Yoon et al., 2018), itself
Liu & Wang's (2016) Bayesian neural network:

.. math::

    \lambda \sim \mathrm{Gamma}(2, 2), \quad \gamma \sim \mathrm{Gamma}(2, 0.2), \quad
    W \sim \mathcal{N}(0, \lambda^{-1}) \text{ elementwise}, \quad
    y \mid x \sim \mathcal{N}\big(f_W(x), \gamma^{-1}\big)

(Gamma in shape/rate form). A task model is called with one task's data ``model(x, y)``
(``y=None`` to sample), observes ``y`` inside a plate over data points (so pointwise
likelihoods exist), and returns the predictive mean :math:`f_W(x)`: the conventions the
meta-learners and predictive utilities rely on. It need not broadcast over particles.
"""

from __future__ import annotations

import math
from typing import Dict, Optional, Sequence

import pyro
import pyro.distributions as dist
import torch

from ._checks import check_choice, check_int, check_positive_float

__all__ = ["BayesianMLP"]

_ACTIVATIONS = {"relu": torch.relu, "tanh": torch.tanh}


class BayesianMLP:
    """Bayesian MLP regression with the paper's hierarchical Gamma priors.

    :param in_features: input size (1 for sinusoid regression).
    :param hidden: hidden layer sizes (paper: ``(40, 40, 40)``).
    :param out_features: output size.
    :param activation: ``"relu"`` (paper) or ``"tanh"``.
    :param weight_precision_prior: ``(shape, rate)`` of lambda's Gamma prior.
    :param noise_precision_prior: ``(shape, rate)`` of gamma's Gamma prior.

    Latent sites: ``weight_precision`` (lambda), ``noise_precision`` (gamma), then
    ``layer{i}.weight`` of shape ``(in, out)`` and ``layer{i}.bias`` of shape ``(out,)``.
    Call: ``model(x, y=None)`` with ``x`` of shape ``(N, in_features)`` (or ``(N,)`` when
    ``in_features == 1``) and ``y`` of shape ``(N,)`` (or ``(N, out_features)``).
    """

    def __init__(
        self,
        in_features: int = 1,
        hidden: Sequence[int] = (40, 40, 40),
        out_features: int = 1,
        activation: str = "relu",
        weight_precision_prior: Sequence[float] = (2.0, 2.0),
        noise_precision_prior: Sequence[float] = (2.0, 0.2),
    ):
        self.in_features = check_int("in_features", in_features, 1)
        self.out_features = check_int("out_features", out_features, 1)
        hidden = tuple(hidden)
        for i, h in enumerate(hidden):
            check_int(f"hidden[{i}]", h, 1)
        self.hidden = hidden
        self.activation = check_choice("activation", activation, _ACTIVATIONS)
        self.weight_precision_prior = tuple(
            check_positive_float(f"weight_precision_prior[{i}]", v)
            for i, v in enumerate(weight_precision_prior)
        )
        self.noise_precision_prior = tuple(
            check_positive_float(f"noise_precision_prior[{i}]", v)
            for i, v in enumerate(noise_precision_prior)
        )
        sizes = (self.in_features,) + hidden + (self.out_features,)
        self.layer_sizes = list(zip(sizes[:-1], sizes[1:]))

    def __repr__(self) -> str:
        sizes = [self.in_features] + list(self.hidden) + [self.out_features]
        return f"BayesianMLP({'-'.join(map(str, sizes))}, activation={self.activation!r})"

    def _inputs(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 1 and self.in_features == 1:
            x = x.unsqueeze(-1)
        if x.dim() != 2 or x.size(-1) != self.in_features:
            raise ValueError(
                f"x must have shape (N, {self.in_features})"
                + (" or (N,)" if self.in_features == 1 else "")
                + f", got {tuple(x.shape)}"
            )
        return x

    def forward(self, weights: Dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """The network :math:`f_W(x)`; weights may carry leading dims ``(...)`` (a pure
        function, usable outside Pyro, e.g. by batched baselines).

        :returns: ``(..., N)`` (or ``(..., N, out_features)``).
        """
        act = _ACTIVATIONS[self.activation]
        h = self._inputs(x)
        last = len(self.layer_sizes) - 1
        for i in range(len(self.layer_sizes)):
            h = h @ weights[f"layer{i}.weight"] + weights[f"layer{i}.bias"].unsqueeze(-2)
            if i < last:
                h = act(h)
        return h.squeeze(-1) if self.out_features == 1 else h

    def sample_prior_sites(self, x: torch.Tensor):
        """The prior part of the model: sample lambda, gamma and the weights.

        :returns: ``(weights, noise_precision)``; weights as :meth:`forward` takes them.
        """
        # prior parameters on x's device and dtype (a CPU scalar breaks vmap on CUDA)
        lam = pyro.sample("weight_precision", dist.Gamma(*map(x.new_tensor, self.weight_precision_prior)))
        gam = pyro.sample("noise_precision", dist.Gamma(*map(x.new_tensor, self.noise_precision_prior)))
        w_scale = lam.rsqrt()
        weights = {}
        for i, (n_in, n_out) in enumerate(self.layer_sizes):
            weights[f"layer{i}.weight"] = pyro.sample(
                f"layer{i}.weight",
                dist.Normal(x.new_zeros(n_in, n_out), w_scale[..., None, None]).to_event(2),
            )
            weights[f"layer{i}.bias"] = pyro.sample(
                f"layer{i}.bias", dist.Normal(x.new_zeros(n_out), w_scale[..., None]).to_event(1)
            )
        return weights, gam

    def __call__(self, x: torch.Tensor, y: Optional[torch.Tensor] = None) -> torch.Tensor:
        weights, gam = self.sample_prior_sites(x)
        mean = self.forward(weights, x)
        with pyro.plate("data", x.shape[0]):
            obs = dist.Normal(mean, gam.rsqrt())
            pyro.sample("y", obs.to_event(1) if self.out_features > 1 else obs, obs=y)
        return mean

    @property
    def chaser_sites(self):
        """The network's weight and bias sites: the coordinates BMAML's chaser loss compares
        (the official code leaves the precisions out)."""
        return [f"layer{i}.{kind}" for i in range(len(self.layer_sizes)) for kind in ("weight", "bias")]

    def example_args(self):
        """Small dummy ``(x, y)`` to trace the model's sites with."""
        x = torch.zeros(2, self.in_features)
        y = torch.zeros(2) if self.out_features == 1 else torch.zeros(2, self.out_features)
        return x, y

    def paper_init(
        self, num_particles: int, generator: Optional[torch.Generator] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> Dict[str, torch.Tensor]:
        """The official code's initial particles (constrained values, leading dim M).

        log lambda ~ N(0, 0.001), log gamma ~ N(log 100, 0.001), weights Xavier-uniform,
        biases N(0, 0.01).
        """
        m = check_int("num_particles", num_particles, 1)
        dtype = torch.get_default_dtype() if dtype is None else dtype

        def randn(*shape):
            return torch.randn(*shape, generator=generator, dtype=dtype)

        named = {
            "weight_precision": (0.001 * randn(m)).exp(),
            "noise_precision": (math.log(100.0) + 0.001 * randn(m)).exp(),
        }
        for i, (n_in, n_out) in enumerate(self.layer_sizes):
            bound = math.sqrt(6.0 / (n_in + n_out))
            u = torch.rand(m, n_in, n_out, generator=generator, dtype=dtype)
            named[f"layer{i}.weight"] = (2 * u - 1) * bound
            named[f"layer{i}.bias"] = 0.01 * randn(m, n_out)
        return named
