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
from torch import nn

from .._checks import check_choice, check_int, check_nonnegative_float, check_positive_float

__all__ = ["BayesianMLP", "BayesianClassifier", "GaussianMLPPolicy"]

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


class BayesianClassifier(nn.Module):
    r"""N-way classifier with a categorical likelihood over logits, for few-shot episodes.

    .. math::

        W_l \sim \mathcal N(0, s^2) \text{ elementwise (the Bayesian layers)}, \qquad
        y_n \mid x_n \sim \mathrm{Categorical}\big(\mathrm{softmax}(f_W(x_n))\big).

    The network is an MLP or the conv4 network of the MAML literature (Vinyals et al. 2016,
    Finn et al. 2017: four blocks of 3x3 convolution, batch normalization over the task's
    points, ReLU and 2x2 max-pooling; a linear head). With ``shared="features"`` the body
    (every layer but the head) is an ordinary :class:`torch.nn.Module` whose parameters are
    shared by all particles and tasks and meta-learned by the outer loop, and only the
    head's weights are latent sites, as BMAML does for miniImageNet (the particles, and so
    the SVGD kernel, cover the head alone; the meta-gradient reaches both). With
    ``shared="none"`` every layer is latent.

    :param num_classes: N, the number of ways.
    :param input_shape: one input's shape: ``(features,)`` or ``(C, H, W)`` (flattened for
        the MLP).
    :param network: ``"mlp"`` or ``"conv4"``.
    :param hidden: MLP hidden sizes (default ``(64, 64)``), or conv4's filters per block
        (one int for all four blocks, or four; default 32, the miniImageNet width; 64 for
        Omniglot).
    :param shared: ``"none"`` or ``"features"`` (see above).
    :param prior_scale: s, the prior sd of the latent weights.

    Latent sites: ``body{i}.weight``/``body{i}.bias`` (``shared="none"``), then
    ``head.weight`` ``(F, N)`` and ``head.bias`` ``(N,)``. Call ``model(x, y=None)`` with
    ``x`` ``(n, *input_shape)`` and integer labels ``y`` ``(n,)`` in ``[0, N)``; returns the
    class probabilities ``(n, N)`` (the predictive mean of the one-hot label).
    """

    def __init__(self, num_classes: int, input_shape: Sequence[int], network: str = "mlp",
                 hidden=None, shared: str = "none", prior_scale: float = 1.0):
        super().__init__()
        self.num_classes = check_int("num_classes", num_classes, 2)
        if isinstance(input_shape, int):
            input_shape = (input_shape,)
        self.input_shape = tuple(check_int(f"input_shape[{i}]", n, 1)
                                 for i, n in enumerate(input_shape))
        self.network = check_choice("network", network, ("mlp", "conv4"))
        self.shared = check_choice("shared", shared, ("none", "features"))
        self.prior_scale = check_positive_float("prior_scale", prior_scale)
        if self.network == "conv4":
            if len(self.input_shape) != 3:
                raise ValueError(f"network='conv4' needs input_shape (C, H, W), got {self.input_shape}")
            widths = (32,) * 4 if hidden is None else (
                (hidden,) * 4 if isinstance(hidden, int) else tuple(hidden))
            widths = widths * 4 if len(widths) == 1 else widths
            if len(widths) != 4:
                raise ValueError(f"conv4 takes one width or four, got hidden={hidden!r}")
            channels, size = self.input_shape[0], self.input_shape[1:]
            self.body_shapes = []
            self._pool = []
            for i, w in enumerate(widths):
                check_int(f"hidden[{i}]", w, 1)
                self.body_shapes.append(((w, channels, 3, 3), (w,)))
                pool = min(size) >= 2
                self._pool.append(pool)
                size = tuple(s // 2 for s in size) if pool else size
                channels = w
            self.feature_size = channels * size[0] * size[1]
        else:
            widths = (64, 64) if hidden is None else (
                (hidden,) if isinstance(hidden, int) else tuple(hidden))
            n_in = math.prod(self.input_shape)
            self.body_shapes = []
            for i, w in enumerate(widths):
                check_int(f"hidden[{i}]", w, 1)
                self.body_shapes.append(((n_in, w), (w,)))
                n_in = w
            self.feature_size = n_in
        self.hidden = widths
        if self.shared == "features":
            self.features = nn.ParameterList()
            for i, (w_shape, b_shape) in enumerate(self.body_shapes):
                init = self._xavier(w_shape, 1, None, torch.get_default_dtype())[0]
                self.features.append(nn.Parameter(init))
                self.features.append(nn.Parameter(torch.zeros(b_shape)))
            if self.network == "conv4":  # the batch norms' scale and shift
                self.norm = nn.ParameterList(
                    [nn.Parameter(torch.ones(w)) for w in widths]
                    + [nn.Parameter(torch.zeros(w)) for w in widths])

    def extra_repr(self) -> str:
        return (f"{self.num_classes}-way, input {self.input_shape}, {self.network} "
                f"{self.hidden}, shared={self.shared!r}")

    @staticmethod
    def _xavier(shape, m, generator, dtype):
        fan_in = shape[0] if len(shape) == 2 else shape[1] * shape[2] * shape[3]
        fan_out = shape[1] if len(shape) == 2 else shape[0] * shape[2] * shape[3]
        bound = math.sqrt(6.0 / (fan_in + fan_out))
        return (2 * torch.rand(m, *shape, generator=generator, dtype=dtype) - 1) * bound

    def _inputs(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != len(self.input_shape) + 1 or tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(f"x must have shape (n, {', '.join(map(str, self.input_shape))}), "
                             f"got {tuple(x.shape)}")
        return x

    def body(self, x: torch.Tensor, weights: Dict[str, torch.Tensor]) -> torch.Tensor:
        """Features ``(n, F)`` of inputs ``(n, *input_shape)``: the shared module's
        parameters, or the latent ``body{i}`` sites in ``weights``."""
        h = x if self.network == "conv4" else x.flatten(1)
        for i in range(len(self.body_shapes)):
            if self.shared == "features":
                w, b = self.features[2 * i], self.features[2 * i + 1]
            else:
                w, b = weights[f"body{i}.weight"], weights[f"body{i}.bias"]
            if self.network == "conv4":
                h = torch.nn.functional.conv2d(h, w, b, padding=1)
                scale, shift = ((self.norm[i], self.norm[len(self.hidden) + i])
                                if self.shared == "features" else (None, None))
                # batch statistics of the task's points, as MAML's transductive batch norm
                h = torch.nn.functional.batch_norm(h, None, None, scale, shift, training=True)
                h = torch.relu(h)
                if self._pool[i]:
                    h = torch.nn.functional.max_pool2d(h, 2)
            else:
                h = torch.relu(h @ w + b)
        return h.flatten(1)

    def forward(self, x: torch.Tensor, y: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = self._inputs(x)
        scale = x.new_tensor(self.prior_scale)
        weights = {}
        if self.shared == "none":
            for i, (w_shape, b_shape) in enumerate(self.body_shapes):
                weights[f"body{i}.weight"] = pyro.sample(
                    f"body{i}.weight", dist.Normal(x.new_zeros(w_shape), scale).to_event(len(w_shape)))
                weights[f"body{i}.bias"] = pyro.sample(
                    f"body{i}.bias", dist.Normal(x.new_zeros(b_shape), scale).to_event(1))
        head_w = pyro.sample("head.weight", dist.Normal(
            x.new_zeros(self.feature_size, self.num_classes), scale).to_event(2))
        head_b = pyro.sample("head.bias", dist.Normal(
            x.new_zeros(self.num_classes), scale).to_event(1))
        logits = self.body(x, weights) @ head_w + head_b
        with pyro.plate("data", x.shape[0]):
            pyro.sample("y", dist.Categorical(logits=logits), obs=y)
        return torch.softmax(logits, -1)

    def example_args(self):
        """Small dummy ``(x, y)`` to trace the model's sites with."""
        return torch.zeros(2, *self.input_shape), torch.zeros(2, dtype=torch.long)

    def paper_init(self, num_particles: int, generator: Optional[torch.Generator] = None,
                   dtype: Optional[torch.dtype] = None) -> Dict[str, torch.Tensor]:
        """Initial particles of the MAML literature (constrained values, leading dim M):
        Xavier-uniform weights, zero biases (a small N(0, 0.01) jitter so that particles
        differ)."""
        m = check_int("num_particles", num_particles, 1)
        dtype = torch.get_default_dtype() if dtype is None else dtype
        named = {}
        shapes = [] if self.shared == "features" else [
            (f"body{i}", shape) for i, shape in enumerate(self.body_shapes)]
        shapes.append(("head", ((self.feature_size, self.num_classes), (self.num_classes,))))
        for name, (w_shape, b_shape) in shapes:
            named[f"{name}.weight"] = self._xavier(w_shape, m, generator, dtype)
            named[f"{name}.bias"] = 0.01 * torch.randn(m, *b_shape, generator=generator, dtype=dtype)
        return named


class GaussianMLPPolicy:
    r"""A Gaussian MLP policy with a prior over its weights: the meta-RL task model.

    .. math::

        W \sim \mathcal N(0, s^2), \quad \log\sigma \sim \mathcal N(\log\sigma_0, 1), \quad
        \pi_W(a \mid o) = \mathcal N\big(a;\, f_W(o),\, \mathrm{diag}(\sigma^2)\big).

    Called as ``model(observations, actions, weights)`` with ``(N, obs_dim)``,
    ``(N, act_dim)`` and per-step weights ``(N,)``, its log joint is

    .. math::

        \alpha \log p_0(W, \sigma) + \sum_n w_n \log \pi_W(a_n \mid o_n),

    the prior statements scaled by the temperature :math:`\alpha` and each step's log
    probability by its weight (a ``pyro.factor``; without weights ``action`` is an ordinary
    observed site). With :math:`w_n = \hat A_n / B` (advantages over B episodes)
    the second term's gradient is the REINFORCE policy-gradient estimate, so SVGD on this
    potential with its repulsion scaled by :math:`\alpha` (``transport(...,
    temperature=alpha)``) is Stein variational policy gradient (Liu et al., 2017) for the
    target :math:`q \propto \exp(J/\alpha) p_0`, the adaptation step of BMAML's meta-RL.
    With ``alpha = 0`` and one particle it is plain REINFORCE (tested).

    :param obs_dim, act_dim: observation and action sizes (2 and 2 for point navigation).
    :param hidden: hidden sizes (MAML-RL: ``(100, 100)``), ReLU.
    :param prior_scale: s.
    :param init_std: :math:`\sigma_0`, the prior mean (and ``paper_init``) of the action sd.
    :param temperature: :math:`\alpha \ge 0`.

    Latent sites: ``layer{i}.weight`` ``(in, out)``, ``layer{i}.bias`` and ``log_std``
    ``(act_dim,)``. Returns the action mean.
    """

    def __init__(self, obs_dim: int = 2, act_dim: int = 2, hidden: Sequence[int] = (100, 100),
                 prior_scale: float = 1.0, init_std: float = 1.0, temperature: float = 1.0):
        self.obs_dim = check_int("obs_dim", obs_dim, 1)
        self.act_dim = check_int("act_dim", act_dim, 1)
        self.hidden = tuple(check_int(f"hidden[{i}]", h, 1) for i, h in enumerate(hidden))
        self.prior_scale = check_positive_float("prior_scale", prior_scale)
        self.init_std = check_positive_float("init_std", init_std)
        self.temperature = check_nonnegative_float("temperature", temperature)
        sizes = (self.obs_dim,) + self.hidden + (self.act_dim,)
        self.layer_sizes = list(zip(sizes[:-1], sizes[1:]))

    #: no noise sites to calibrate (the action sd is part of the policy)
    noise_sites: list = []

    def __repr__(self) -> str:
        sizes = "-".join(map(str, (self.obs_dim,) + self.hidden + (self.act_dim,)))
        return f"GaussianMLPPolicy({sizes}, temperature={self.temperature:g})"

    def forward(self, weights: Dict[str, torch.Tensor], observations: torch.Tensor):
        """``(mean, std)`` of the action at ``observations`` ``(..., N, obs_dim)``; the
        weights may carry the same leading dims (a pure function, used by the rollouts)."""
        h = observations
        last = len(self.layer_sizes) - 1
        for i in range(last + 1):
            h = h @ weights[f"layer{i}.weight"] + weights[f"layer{i}.bias"].unsqueeze(-2)
            if i < last:
                h = torch.relu(h)
        return h, weights["log_std"].exp().unsqueeze(-2)

    def distribution(self, weights: Dict[str, torch.Tensor],
                     observations: torch.Tensor) -> dist.Distribution:
        """The action distribution at ``observations`` (batch shape ``(..., N)``, event
        ``(act_dim,)``): what TRPO's KL is taken between."""
        mean, std = self.forward(weights, observations)
        return dist.Normal(mean, std.expand_as(mean)).to_event(1)

    def __call__(self, observations: torch.Tensor, actions: Optional[torch.Tensor] = None,
                 weights: Optional[torch.Tensor] = None) -> torch.Tensor:
        o = observations
        if o.dim() != 2 or o.size(-1) != self.obs_dim:
            raise ValueError(f"observations must have shape (N, {self.obs_dim}), got {tuple(o.shape)}")
        params = {}
        # the prior scaled by alpha (masked out at alpha = 0, which poutine.scale refuses)
        prior = (pyro.poutine.scale(scale=self.temperature) if self.temperature > 0
                 else pyro.poutine.mask(mask=False))
        with prior:
            for i, (n_in, n_out) in enumerate(self.layer_sizes):
                params[f"layer{i}.weight"] = pyro.sample(
                    f"layer{i}.weight",
                    dist.Normal(o.new_zeros(n_in, n_out), self.prior_scale).to_event(2))
                params[f"layer{i}.bias"] = pyro.sample(
                    f"layer{i}.bias", dist.Normal(o.new_zeros(n_out), self.prior_scale).to_event(1))
            params["log_std"] = pyro.sample("log_std", dist.Normal(
                o.new_full((self.act_dim,), math.log(self.init_std)), 1.0).to_event(1))
        mean, std = self.forward(params, o)
        policy = dist.Normal(mean, std).to_event(1)
        with pyro.plate("steps", o.size(0)):
            if weights is None:
                pyro.sample("action", policy, obs=actions)
            else:  # signed weights (advantages): a factor, not a (positive) poutine.scale
                if actions is None or weights.shape != (o.size(0),):
                    raise ValueError(f"weights need actions and shape ({o.size(0)},), got "
                                     f"{None if weights is None else tuple(weights.shape)}")
                pyro.factor("action", weights * policy.log_prob(actions))
        return mean

    def example_args(self):
        """Small dummy ``(observations, actions, weights)`` to trace the sites with."""
        return torch.zeros(2, self.obs_dim), torch.zeros(2, self.act_dim), torch.ones(2)

    def paper_init(self, num_particles: int, generator: Optional[torch.Generator] = None,
                   dtype: Optional[torch.dtype] = None) -> Dict[str, torch.Tensor]:
        """Initial particles (constrained values, leading dim M): Xavier-uniform weights,
        the output layer's scaled by 0.01 (a near-zero initial mean action, the usual policy
        initialization: the point starts as a random walk of sd ``init_std`` instead of
        drifting away), biases N(0, 0.01) (so that particles differ), log sd
        :math:`\\log\\sigma_0`."""
        m = check_int("num_particles", num_particles, 1)
        dtype = torch.get_default_dtype() if dtype is None else dtype
        named = {}
        last = len(self.layer_sizes) - 1
        for i, (n_in, n_out) in enumerate(self.layer_sizes):
            bound = math.sqrt(6.0 / (n_in + n_out)) * (0.01 if i == last else 1.0)
            u = torch.rand(m, n_in, n_out, generator=generator, dtype=dtype)
            named[f"layer{i}.weight"] = (2 * u - 1) * bound
            named[f"layer{i}.bias"] = 0.01 * torch.randn(m, n_out, generator=generator, dtype=dtype)
        named["log_std"] = torch.full((m, self.act_dim), math.log(self.init_std), dtype=dtype)
        return named
