"""Small Pyro models with closed-form posteriors, shared by the tests."""

import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule, PyroSample


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


def linear_regression(x, y=None):
    """A user's Bayesian linear regression with a learned noise precision (one task)."""
    tau = pyro.sample("tau", dist.Gamma(2.0, 0.5))
    w = pyro.sample("w", dist.Normal(torch.zeros(2), 2.0).to_event(1))
    mean = w[0] * x[:, 0] + w[1]
    with pyro.plate("data", x.shape[0]):
        pyro.sample("y", dist.Normal(mean, tau.rsqrt()), obs=y)
    return mean


class LinearTasks:
    """Tasks y = a x + b + N(0, noise^2), a ~ N(1, 0.5^2), b ~ N(0, 0.5^2), x ~ U[-2, 2]:
    a small task family with a known noise level, for meta-learning tests."""

    def __init__(self, num_support=5, num_query=50, noise=0.3, num_tasks=None, seed=0):
        from pyro_bmaml.tasks.base import TaskBatch

        self.TaskBatch = TaskBatch
        self.num_support, self.num_query, self.noise = num_support, num_query, noise
        self.pool = None if num_tasks is None else self._draw(
            num_tasks, torch.Generator().manual_seed(seed))

    def _draw(self, t, g):
        a = 1.0 + 0.5 * torch.randn(t, 1, generator=g)
        b = 0.5 * torch.randn(t, 1, generator=g)
        n = self.num_support + self.num_query
        x = 4 * torch.rand(t, n, generator=g) - 2
        y = a * x + b + self.noise * torch.randn(t, n, generator=g)
        k = self.num_support
        return self.TaskBatch(x[:, :k, None], y[:, :k], x[:, k:, None], y[:, k:])

    def sample(self, batch_size, generator):
        if self.pool is None:
            return self._draw(batch_size, generator)
        index = torch.randperm(self.pool.num_tasks, generator=generator)[:batch_size]
        return self.pool[index]

    def evaluation_tasks(self, num_tasks=100, seed=12345):
        return self._draw(num_tasks, torch.Generator().manual_seed(seed))


class BayesianLinear(PyroModule):
    """A PyroModule regression with PyroSample priors on a Linear layer's weights."""

    def __init__(self):
        super().__init__()
        self.linear = PyroModule[torch.nn.Linear](2, 1)
        self.linear.weight = PyroSample(dist.Normal(0.0, 1.0).expand([1, 2]).to_event(2))
        self.linear.bias = PyroSample(dist.Normal(0.0, 10.0).expand([1]).to_event(1))

    def forward(self, x, y=None):
        sigma = pyro.sample("sigma", dist.LogNormal(0.0, 1.0))
        mean = self.linear(x).squeeze(-1)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("obs", dist.Normal(mean, sigma), obs=y)
        return mean
