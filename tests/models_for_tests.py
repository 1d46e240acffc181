"""Small Pyro models with closed-form posteriors, shared by the tests."""

import pyro
import pyro.distributions as dist
import torch


def normal_gamma_regression(X, y, a0=2.0, b0=2.0):
    """w | tau ~ N(0, I / tau), tau ~ Gamma(a0, b0), y ~ N(X w, 1 / tau).

    Written so that it also runs under pyro.infer.SVGD's particle plate (dim -1).
    """
    tau = pyro.sample("tau", dist.Gamma(a0, b0))
    scale = tau.rsqrt()[..., None]
    w = pyro.sample("w", dist.Normal(torch.zeros(X.shape[-1]), scale).to_event(1))
    mean = (w[..., None, :] * X).sum(-1)
    pyro.sample("y", dist.Normal(mean, scale).to_event(1), obs=y)


def normal_gamma_posterior(X, y, a0=2.0, b0=2.0):
    """Exact posterior moments: (mean w, cov w, mean tau, var tau)."""
    n, d = X.shape
    precision = X.T @ X + torch.eye(d, dtype=X.dtype)
    mean_w = torch.linalg.solve(precision, X.T @ y)
    a_n = a0 + n / 2
    b_n = b0 + 0.5 * (y @ y - mean_w @ precision @ mean_w)
    cov_w = b_n / (a_n - 1) * torch.linalg.inv(precision)  # multivariate t marginal
    return mean_w, cov_w, a_n / b_n, a_n / b_n**2


def regression_data(n=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 3, generator=g)
    y = X @ torch.tensor([1.0, -2.0, 0.5]) + 0.7 * torch.randn(n, generator=g)
    return X, y
