"""The empirical-Bayes prior (``engine/empirical_bayes.py``) against the exact type-II maximum
likelihood of linear-Gaussian task families, where the marginal likelihood is closed form."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch

from pyro_bmaml import BMAML
from pyro_bmaml.engine import ModelPotential, empirical_bayes_prior

NOISE = 0.3


def line(x, y=None):
    a = pyro.sample("a", dist.Normal(0.0, 5.0))
    b = pyro.sample("b", dist.Normal(0.0, 5.0))
    mean = a * x[:, 0] + b
    with pyro.plate("data", x.shape[0]):
        pyro.sample("y", dist.Normal(mean, NOISE), obs=y)
    return mean


def line_tasks(num_tasks, k, loc, scale_tril, seed):
    g = torch.Generator().manual_seed(seed)
    w = loc + torch.randn(num_tasks, 2, generator=g) @ scale_tril.T
    x = 4 * torch.rand(num_tasks, k, 1, generator=g) - 2
    phi = torch.cat([x, torch.ones_like(x)], -1)
    y = (phi @ w.unsqueeze(-1)).squeeze(-1) + NOISE * torch.randn(num_tasks, k, generator=g)
    return x, y, phi


def exact_type2(phi, y, iterations=400):
    """argmax over (mu, L) of sum_t log N(y_t; Phi_t mu, Phi_t L L^T Phi_t^T + noise^2 I)."""
    phi, y = phi.double(), y.double()
    mu = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    off = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    log_diag = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    eye = torch.eye(y.size(-1), dtype=torch.float64)

    def objective():
        chol = torch.diag(log_diag.exp()) + torch.zeros(2, 2, dtype=torch.float64).index_put(
            (torch.tensor([1]), torch.tensor([0])), off)
        cov = phi @ (chol @ chol.T) @ phi.transpose(-1, -2) + NOISE ** 2 * eye
        return -dist.MultivariateNormal((phi @ mu), cov).log_prob(y).mean(), chol

    opt = torch.optim.LBFGS([mu, off, log_diag], max_iter=iterations, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-10, tolerance_change=1e-14)

    def closure():
        opt.zero_grad()
        loss, _ = objective()
        loss.backward()
        return loss

    opt.step(closure)
    loss, chol = objective()
    return mu.detach(), (chol @ chol.T).detach(), -float(loss.detach())


def broad_posterior_draws(phi, y, num, seed):
    """Exact posterior draws under the model's own N(0, 5^2) prior: the proposals' centres."""
    g = torch.Generator().manual_seed(seed)
    precision = phi.transpose(-1, -2) @ phi / NOISE ** 2 + torch.eye(2) / 25.0
    cov = torch.linalg.inv(precision)
    mean = (cov @ (phi.transpose(-1, -2) @ y.unsqueeze(-1))).squeeze(-1) / NOISE ** 2
    z = torch.randn(phi.size(0), num, 2, generator=g)
    return mean.unsqueeze(1) + z @ torch.linalg.cholesky(cov).transpose(-1, -2)


@pytest.fixture(scope="module")
def family():
    loc = torch.tensor([1.0, -0.5])
    scale_tril = torch.tensor([[0.5, 0.0], [0.3, 0.4]])  # correlated slope and intercept
    x, y, phi = line_tasks(300, 3, loc, scale_tril, seed=0)
    potential = ModelPotential(line).setup(x[0], y[0])
    return x, y, phi, potential


def test_the_fit_is_the_exact_type2_maximum_likelihood(family):
    """With K = 3 points per task the evidence is closed form; the importance-sampled fit
    must land on its maximiser. The tolerance: the estimator's error is the importance-sampling
    error of each task's log evidence (ESS about 90 of 400 draws per task after the adaptive
    rounds, so of order 1/ESS ~ 1e-2 per task, averaged over 300 tasks) moved through the
    objective's curvature; 0.01 on the mean and the covariance entries (prior sds 0.5) and
    0.03 on the mean log evidence are about 4x the largest error seen over three proposal
    seeds (1e-3, 2.6e-3, 7e-3)."""
    x, y, phi, potential = family
    mu, cov, log_evidence = exact_type2(phi, y)
    particles = broad_posterior_draws(phi, y, 10, seed=1)
    fit = empirical_bayes_prior(potential, particles, (x, y), seed=2)
    assert isinstance(fit.prior, dist.MultivariateNormal)
    torch.testing.assert_close(fit.prior.mean.double(), mu, atol=0.01, rtol=0)
    torch.testing.assert_close(fit.prior.covariance_matrix.double(), cov, atol=0.01, rtol=0)
    # its estimate of the mean log evidence at the fit is the exact one at the exact optimum
    assert abs(fit.log_marginal - log_evidence) < 0.03
    assert fit.ess.shape == (300,) and float(fit.ess.median()) > 50


def test_the_diagonal_fit_keeps_the_marginal_scales(family):
    x, y, phi, potential = family
    particles = broad_posterior_draws(phi, y, 10, seed=1)
    full = empirical_bayes_prior(potential, particles, (x, y), seed=2)
    diag = empirical_bayes_prior(potential, particles, (x, y), seed=2, covariance="diag")
    assert isinstance(diag.prior, dist.Independent) and diag.prior.event_shape == (2,)
    torch.testing.assert_close(diag.prior.mean, full.prior.mean, atol=0.05, rtol=0)
    # a diagonal prior cannot hold the correlation: a lower evidence than the full one
    assert diag.log_marginal < full.log_marginal


def test_bad_input_is_refused_by_name(family):
    x, y, phi, potential = family
    particles = broad_posterior_draws(phi, y, 4, seed=1)
    with pytest.raises(ValueError, match=r"particles must be \(T, M, D\)"):
        empirical_bayes_prior(potential, particles[0], (x, y))
    with pytest.raises(ValueError, match="non-finite"):
        empirical_bayes_prior(potential, particles.masked_fill(particles > 2, math.nan), (x, y))
    with pytest.raises(ValueError, match=r"data\[1\] must have a leading task dim 300"):
        empirical_bayes_prior(potential, particles, (x, y[:5]))
    with pytest.raises(ValueError, match=r"particles must have shape \(M, 2\) or \(T, M, 2\)"):
        empirical_bayes_prior(potential, particles[..., :1], (x, y))
    with pytest.raises(ValueError, match="covariance"):
        empirical_bayes_prior(potential, particles, (x, y), covariance="dense")
    with pytest.raises(ValueError, match="num_draws"):
        empirical_bayes_prior(potential, particles, (x, y), num_draws=1)
    with pytest.raises(ValueError, match="rounds"):
        empirical_bayes_prior(potential, particles, (x, y), rounds=0)
    with pytest.raises(TypeError, match="ModelPotential"):
        empirical_bayes_prior(line, particles, (x, y))


def test_a_fit_on_few_effective_draws_warns(family):
    """One round from proposals far off the posterior (particles at the wrong place, barely
    widened) leaves each task's evidence to a few draws: said, not silent."""
    x, y, phi, potential = family
    far = broad_posterior_draws(phi, y, 4, seed=1) + 3.0
    with pytest.warns(UserWarning, match="effective sample size"):
        empirical_bayes_prior(potential, far, (x, y), rounds=1, inflate=0.05, num_draws=20)


def test_the_learner_exports_the_empirical_bayes_prior_given_tasks(family):
    """``prior_distribution(tasks=...)`` fits the Gaussian to those tasks with the learner's
    adapted particles as proposals: an un-meta-trained learner's particles are only a rough
    guide (prior draws moved three SVGD steps of 1e-3), and after the adaptive rounds the fit
    lands on the exact type-II optimum as closely as from exact posterior draws."""
    from pyro_bmaml.tasks.base import TaskBatch

    x, y, phi, _ = family
    mu, cov, _ = exact_type2(phi, y)
    tasks = TaskBatch(x, y, x, y)
    pyro.set_rng_seed(0)
    learner = BMAML(line, num_particles=10, example_args=(x[0], y[0]))
    prior = learner.prior_distribution(tasks=tasks)
    assert prior is learner.prior_fit.prior and prior.event_shape == (2,)
    torch.testing.assert_close(prior.mean.double(), mu, atol=0.01, rtol=0)
    torch.testing.assert_close(prior.covariance_matrix.double(), cov, atol=0.01, rtol=0)
    assert callable(learner.model_with_learned_prior(tasks=tasks, form="kde"))
    with pytest.raises(ValueError, match="needs tasks"):
        learner.prior_distribution(form="empirical_bayes")
    with pytest.raises(ValueError, match="form"):
        learner.prior_distribution(tasks=tasks, form="gaussian")


def test_auto_form_keeps_the_kde_for_a_neural_network():
    """Above 64 coordinates the importance-sampled evidence degenerates; ``form="auto"``
    exports the aggregate posterior there (a kernel mixture), the Gaussian fit below."""
    from pyro_bmaml import BayesianMLP, Sinusoid

    tasks = Sinusoid(num_tasks=4, num_support=5).evaluation_tasks(4)
    pyro.set_rng_seed(0)
    net = BMAML(BayesianMLP(hidden=(40,)), num_particles=3,
                example_args=(tasks.x_support[0], tasks.y_support[0]))
    assert net.potential.dim > 64
    prior = net.prior_distribution(tasks=tasks)
    assert isinstance(prior, dist.MixtureSameFamily) and net.prior_fit is None
    assert prior.component_distribution.batch_shape == (12,)
