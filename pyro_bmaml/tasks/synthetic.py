r"""Synthetic task families with Bayes-optimal references: templates for your own family.

A meta-learned prior is only worth having if it beats inference under the prior a user
would write without meta-learning, and the best any meta-learner can do on a new task is the
posterior predictive under the family's *true* task prior. Each family here is a task source
(``sample``, ``evaluation_tasks``, ``metrics``), a Pyro model written the way a user would
write it (broad priors, one task, a plate over the points, the predictive mean returned),
and two exact references on the same held-out tasks, as a per-point log predictive density
:math:`\log p(y_q \mid x_q, D^{trn})` of shape ``(T, Q)``:

- ``reference_log_predictive(tasks, "true")``: under the family's true task prior (the
  Bayes-optimal predictive);
- ``reference_log_predictive(tasks, "broad")``: under a broad prior that knows nothing of the
  family (the user's own model's prior, or a conjugate one as broad).

A learner is scored by the share of the NLL gap between the two that it closes
(:func:`gap_closed`). The references are exact: in closed form for the conjugate families
(Normal-Gamma regression: Student-t predictive, Bishop 2006 sec. 3.3 and Murphy 2007;
Gaussian class means: Gaussian predictives per class), otherwise by importance sampling
with a Laplace proposal (:func:`importance_log_predictive`: a multivariate Student-t
around the posterior mode with the inverse Hessian as scale; self-normalised, consistent
as the draws grow, the effective sample size is returned).

Families (:data:`FAMILIES` lists them by name):

=============================  =================================================  =====================
class                          task and model                                    references
=============================  =================================================  =====================
:class:`NormalGammaRegression` line with unknown noise level, K from 1 to 10      closed form (both)
:class:`StudentTRegression`    line with Student-t (nu = 3) noise                  importance sampling
:class:`SubspaceClassification` N-way, class means near a low-dim subspace         closed form (both)
:class:`LogisticGLM`           logistic regression, weights near a shared vector  importance sampling
:class:`HierarchicalRegression` shared slopes plus a task-level offset             closed form (both)
=============================  =================================================  =====================

Your own family is the same three things: a ``draw(num_tasks, generator)`` of tasks, a Pyro
``model(x, y=None)``, and, if you know the family's prior, a reference.
"""

from __future__ import annotations

import math
from typing import Callable, Dict, Optional

import pyro
import pyro.distributions as dist
import torch

from .._checks import check_choice, check_int
from ..evaluation.metrics import (calibration_errors, classification_metrics, mean_and_se,
                                  pit_coverage, regression_metrics)
from .base import TaskBatch

__all__ = ["SyntheticFamily", "NormalGammaRegression", "StudentTRegression",
           "SubspaceClassification", "LogisticGLM", "HierarchicalRegression", "FAMILIES",
           "gap_closed", "importance_log_predictive", "normal_gamma_log_predictive"]


def gap_closed(nll: float, nll_broad: float, nll_optimal: float) -> float:
    """Share of the NLL gap from the broad-prior reference to the Bayes-optimal one that a
    learner closes: 1 at the optimum, 0 at the broad reference, negative when worse."""
    return (nll_broad - nll) / (nll_broad - nll_optimal)


def normal_gamma_log_predictive(phi_s, y_s, phi_q, y_q, m0, lambda0, a0, b0):
    r"""Per-point log posterior predictive of Bayesian linear regression with a Normal-Gamma
    prior :math:`\tau \sim \mathrm{Gamma}(a_0, b_0)`, :math:`w \mid \tau \sim
    \mathcal N(m_0, (\tau \Lambda_0)^{-1})`, :math:`y = \phi^\top w + \mathcal N(0, 1/\tau)`:

    .. math::

        \Lambda_n = \Lambda_0 + \Phi^\top\Phi,\ m_n = \Lambda_n^{-1}(\Lambda_0 m_0 +
        \Phi^\top y),\ a_n = a_0 + K/2,\ b_n = b_0 + \tfrac12 (y^\top y + m_0^\top\Lambda_0
        m_0 - m_n^\top \Lambda_n m_n),

    and :math:`y_* \sim t_{2a_n}\big(\phi_*^\top m_n,\ \tfrac{b_n}{a_n}(1 + \phi_*^\top
    \Lambda_n^{-1}\phi_*)\big)`.

    :param phi_s, y_s: support features ``(T, K, P)`` and targets ``(T, K)``.
    :param phi_q, y_q: query features ``(T, Q, P)`` and targets ``(T, Q)``.
    :param m0: ``(P,)``; ``lambda0``: ``(P, P)``; ``a0``, ``b0``: floats.
    :returns: ``(T, Q)``.
    """
    phi_s, y_s, phi_q, y_q = (t.double() for t in (phi_s, y_s, phi_q, y_q))
    m0, lambda0 = m0.double(), lambda0.double()
    lambda_n = lambda0 + phi_s.transpose(-1, -2) @ phi_s
    rhs = (lambda0 @ m0) + (phi_s.transpose(-1, -2) @ y_s.unsqueeze(-1)).squeeze(-1)
    m_n = torch.linalg.solve(lambda_n, rhs.unsqueeze(-1)).squeeze(-1)
    a_n = a0 + 0.5 * phi_s.size(-2)
    quad = (y_s.pow(2).sum(-1) + m0 @ lambda0 @ m0
            - (m_n.unsqueeze(-2) @ lambda_n @ m_n.unsqueeze(-1)).reshape(m_n.shape[:-1]))
    b_n = b0 + 0.5 * quad
    cov = torch.linalg.solve(lambda_n, phi_q.transpose(-1, -2))  # (T, P, Q)
    lever = (phi_q * cov.transpose(-1, -2)).sum(-1)  # phi_q^T Lambda_n^-1 phi_q, (T, Q)
    loc = (phi_q @ m_n.unsqueeze(-1)).squeeze(-1)
    scale = ((b_n / a_n).unsqueeze(-1) * (1 + lever)).sqrt()
    return dist.StudentT(2 * a_n, loc, scale).log_prob(y_q)


def _student_t_proposal(mode, cov, df=4.0):
    scale_tril = torch.linalg.cholesky(cov)
    return dist.MultivariateStudentT(torch.as_tensor(df, dtype=mode.dtype), mode, scale_tril)


def importance_log_predictive(log_prior: Callable, log_lik: Callable, init: torch.Tensor,
                              num_draws: int = 4000, seed: int = 0,
                              mode_steps: int = 300, inflate: float = 1.5):
    r"""Per-point log posterior predictive by self-normalised importance sampling:

    .. math::

        \log p(y_q \mid D) \approx \log \sum_s \bar w_s\, p(y_q \mid \theta_s), \quad
        \bar w_s \propto \frac{p(\theta_s)\, p(D \mid \theta_s)}{q(\theta_s)},\quad
        \theta_s \sim q,

    with :math:`q` a multivariate Student-t (4 degrees of freedom) at the posterior mode,
    scaled by ``inflate`` times the inverse Hessian of the negative log joint there (the
    Laplace approximation, widened so that its tails dominate the posterior's).

    :param log_prior: ``theta (T, S, P) -> (T, S)``.
    :param log_lik: ``(theta (T, S, P), which) -> (T, S, N)``, ``which`` ``"support"`` or
        ``"query"``: per-point log likelihoods.
    :param init: ``(T, P)`` starting point of the mode search (e.g. the prior mean).
    :returns: ``(log_predictive (T, Q), ess (T,), se (T, Q))``: the estimate, the
        effective sample size of the weights, and the estimate's standard error (delta
        method for the self-normalised ratio).
    """
    theta = init.detach().double().clone().requires_grad_(True)

    def neg_log_joint(t):  # (T, P) -> (T,)
        t3 = t.unsqueeze(1)
        return -(log_prior(t3) + log_lik(t3, "support").sum(-1)).squeeze(1)

    opt = torch.optim.LBFGS([theta], lr=1, max_iter=mode_steps, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-9, tolerance_change=1e-12)

    def closure():
        opt.zero_grad()
        loss = neg_log_joint(theta).sum()
        loss.backward()
        return loss

    opt.step(closure)
    mode = theta.detach()
    # the log joint is a sum of per-task terms: the Hessian of the sum is block-diagonal,
    # one row of every task's block per backward pass
    point = mode.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(neg_log_joint(point).sum(), point, create_graph=True)
    p = mode.size(-1)
    hess = torch.stack([torch.autograd.grad(grad[:, i].sum(), point, retain_graph=True)[0]
                        for i in range(p)], -2).detach()
    eye = torch.eye(p, dtype=mode.dtype)
    hess = 0.5 * (hess + hess.transpose(-1, -2)) + 1e-8 * eye
    evals, evecs = torch.linalg.eigh(hess)
    cov = (evecs / evals.clamp_min(1e-6).unsqueeze(-2)) @ evecs.transpose(-1, -2)
    proposal = _student_t_proposal(mode, inflate ** 2 * cov + 1e-10 * eye)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        draws = proposal.sample((num_draws,)).transpose(0, 1)  # (T, S, P)
    with torch.no_grad():
        log_w = (log_prior(draws) + log_lik(draws, "support").sum(-1)
                 - proposal.log_prob(draws.transpose(0, 1)).transpose(0, 1))
        log_w = log_w - torch.logsumexp(log_w, -1, keepdim=True)
        w = log_w.exp()
        ess = 1.0 / w.pow(2).sum(-1)
        log_q = log_lik(draws, "query")  # (T, S, Q)
        log_pred = torch.logsumexp(log_w.unsqueeze(-1) + log_q, 1)
        # delta method for the self-normalised ratio: se(r) ~ sqrt(sum_s w_s^2 (q_s - r)^2)
        ratio = (log_q - log_pred.unsqueeze(1)).exp()  # q_s / r
        se = (w.pow(2).unsqueeze(-1) * (ratio - 1).pow(2)).sum(1).sqrt()
    return log_pred, ess, se


class SyntheticFamily:
    """Common part of the synthetic families: a task source drawing fresh tasks every call
    (``sample``), fixed held-out tasks (``evaluation_tasks``), the family's ``model`` (a
    plain Pyro function) and its references.

    :param num_support: K, support points per task (per class for classification).
    :param num_query: query points per task (per class for classification).
    """

    name = "synthetic"
    #: ``"regression"`` or ``"classification"``: which scores apply
    kind = "regression"
    #: the model's latent site holding the noise precision (``None``: no noise site)
    noise_site: Optional[str] = "tau"
    #: the true noise sd of the family (``None``: not a Gaussian-noise family)
    true_noise_sd: Optional[float] = None
    #: importance-sampling draws per task for references without a closed form
    reference_draws = 4000

    def __init__(self, num_support: int = 3, num_query: int = 10):
        self.num_support = check_int("num_support", num_support, 1)
        self.num_query = check_int("num_query", num_query, 1)

    # -- to implement ---------------------------------------------------------------------
    def draw(self, num_tasks: int, generator: torch.Generator) -> TaskBatch:
        raise NotImplementedError

    @staticmethod
    def model(x, y=None):
        raise NotImplementedError

    def reference_log_predictive(self, tasks: TaskBatch, prior: str = "true") -> torch.Tensor:
        raise NotImplementedError

    # -- shared ---------------------------------------------------------------------------
    def sample(self, batch_size: int, generator: torch.Generator) -> TaskBatch:
        """``batch_size`` fresh tasks (the family has no finite pool)."""
        return self.draw(check_int("batch_size", batch_size, 1), generator)

    def evaluation_tasks(self, num_tasks: int = 200, seed: int = 12345) -> TaskBatch:
        """Held-out tasks, fixed by ``seed``."""
        return self.draw(check_int("num_tasks", num_tasks, 1), torch.Generator().manual_seed(seed))

    def example_args(self) -> tuple:
        """One task's ``(x, y)``: the ``example_args`` of a learner on this family."""
        task = self.evaluation_tasks(1, seed=0)
        return task.x_support[0], task.y_support[0]

    def references(self, tasks: TaskBatch) -> Dict[str, float]:
        """Mean per-point NLL of the ``"true"`` (Bayes-optimal) and ``"broad"`` references."""
        return {which: -float(self.reference_log_predictive(tasks, which).mean())
                for which in ("true", "broad")}

    def metrics(self, posterior, x_query, y_query):
        """The family's held-out scores (regression's with coverage, or classification's)."""
        if self.kind == "classification":
            return classification_metrics(posterior, x_query, y_query)
        return regression_metrics(posterior, x_query, y_query, closed_form=True, widths=False)

    def noise_sd(self, posterior) -> Optional[float]:
        """The posterior's noise sd (the noise site's precision as an sd), averaged over
        particles and tasks; ``None`` for a family without a noise site."""
        if self.noise_site is None:
            return None
        return float(posterior.named[self.noise_site].rsqrt().mean())


def _gamma(shape: float, rate: float, num: int, generator: torch.Generator) -> torch.Tensor:
    """``num`` draws of Gamma(shape, rate) from ``generator``."""
    return torch._standard_gamma(torch.full((num,), float(shape)), generator=generator) / rate


def _support_and_query(x: torch.Tensor, y: torch.Tensor, k: int) -> TaskBatch:
    """The first ``k`` points of each task as its support set, the rest as its query set."""
    return TaskBatch(x[:, :k], y[:, :k], x[:, k:], y[:, k:])


def _line_features(x):  # (T, N, 1) -> (T, N, 2): slope, intercept
    return torch.cat([x, torch.ones_like(x)], -1)


class NormalGammaRegression(SyntheticFamily):
    r"""Lines with an unknown noise level: :math:`\tau \sim \mathrm{Gamma}(a_0, b_0)` with
    mean :math:`1/0.3^2` (noise sd about 0.3), slope and intercept :math:`w \mid \tau \sim
    \mathcal N(m_0, (\tau\Lambda_0)^{-1})` with :math:`m_0 = (1, -0.5)` and sd about 0.5,
    :math:`x \sim U[-2, 2]`. The user's model has the broad priors of the issue that motivated
    it: :math:`a, b \sim \mathcal N(0, 5)`, :math:`\tau \sim \mathrm{Gamma}(2, 0.2)`.

    References in closed form (:func:`normal_gamma_log_predictive`): the true prior, and the
    broad Normal-Gamma prior with the user's Gamma(2, 0.2) and :math:`w \mid \tau` of sd 5 at
    the prior mean precision (:math:`\Lambda_0 = 1 / (25\, \mathbb E\tau)`).
    """

    name = "normal-gamma"
    true_noise_sd = 0.3
    a0 = 20.0
    b0 = 20.0 * 0.3 ** 2
    m0 = (1.0, -0.5)
    weight_sd = 0.5

    @property
    def lambda0(self):  # w | tau has sd weight_sd at tau = E[tau]
        return torch.eye(2) * (self.b0 / self.a0) / self.weight_sd ** 2

    def draw(self, num_tasks, generator):
        n = self.num_support + self.num_query
        tau = _gamma(self.a0, self.b0, num_tasks, generator)
        z = torch.randn(num_tasks, 2, generator=generator)
        w = torch.tensor(self.m0) + z / (tau[:, None] * self.lambda0.diagonal()).sqrt()
        x = 4 * torch.rand(num_tasks, n, 1, generator=generator) - 2
        y = (_line_features(x) @ w.unsqueeze(-1)).squeeze(-1)
        y = y + torch.randn(num_tasks, n, generator=generator) * tau.rsqrt()[:, None]
        return _support_and_query(x, y, self.num_support)

    @staticmethod
    def model(x, y=None):
        a = pyro.sample("a", dist.Normal(0.0, 5.0))
        b = pyro.sample("b", dist.Normal(0.0, 5.0))
        tau = pyro.sample("tau", dist.Gamma(2.0, 0.2))
        mean = a * x[:, 0] + b
        with pyro.plate("data", x.shape[0]):
            pyro.sample("y", dist.Normal(mean, tau.rsqrt()), obs=y)
        return mean

    def reference_log_predictive(self, tasks, prior="true"):
        check_choice("prior", prior, ("true", "broad"))
        if prior == "true":
            m0, lam0, a0, b0 = torch.tensor(self.m0), self.lambda0, self.a0, self.b0
        else:
            m0, lam0, a0, b0 = torch.zeros(2), torch.eye(2) * (0.2 / 2.0) / 25.0, 2.0, 0.2
        return normal_gamma_log_predictive(_line_features(tasks.x_support), tasks.y_support,
                                           _line_features(tasks.x_query), tasks.y_query,
                                           m0, lam0, a0, b0)


def _student_t_pit(y, loc, scale, df):
    """The particle mixture's CDF at ``y`` for Student-t components, ``(T, Q)`` from
    ``loc, scale (T, M, Q)``."""
    from scipy.stats import t as student_t  # scipy ships with scikit-learn and arviz

    z = ((y.unsqueeze(1) - loc) / scale).double().cpu().numpy()
    return torch.as_tensor(student_t.cdf(z, df), dtype=y.dtype).mean(1)


class StudentTRegression(SyntheticFamily):
    r"""Lines with heavy-tailed noise: :math:`y = a x + b + 0.3\, \epsilon`,
    :math:`\epsilon \sim t_3`, :math:`(a, b) \sim \mathcal N((1, -0.5), 0.5^2 I)`,
    :math:`x \sim U[-2, 2]`. The user's model: :math:`a, b \sim \mathcal N(0, 5)`, a
    precision :math:`\tau \sim \mathrm{Gamma}(2, 0.2)` setting the t's scale
    :math:`\tau^{-1/2}`, 3 degrees of freedom.

    References by importance sampling (:func:`importance_log_predictive`): over
    :math:`(a, b)` with the true prior and the true scale, and over :math:`(a, b, \log\tau)`
    with the user's prior (its log-Jacobian included). Coverage is read from the particle
    mixture of Student-t's CDF.
    """

    name = "student-t"
    df = 3.0
    scale = 0.3
    true_noise_sd = 0.3  # the t's scale (its sd is sqrt(3) times larger)
    mean = (1.0, -0.5)
    weight_sd = 0.5

    def draw(self, num_tasks, generator):
        n = self.num_support + self.num_query
        w = torch.tensor(self.mean) + self.weight_sd * torch.randn(num_tasks, 2, generator=generator)
        x = 4 * torch.rand(num_tasks, n, 1, generator=generator) - 2
        chi2 = 2 * torch._standard_gamma(torch.full((num_tasks, n), self.df / 2), generator=generator)
        noise = torch.randn(num_tasks, n, generator=generator) / (chi2 / self.df).sqrt()
        y = (_line_features(x) @ w.unsqueeze(-1)).squeeze(-1) + self.scale * noise
        return _support_and_query(x, y, self.num_support)

    @staticmethod
    def model(x, y=None):
        a = pyro.sample("a", dist.Normal(0.0, 5.0))
        b = pyro.sample("b", dist.Normal(0.0, 5.0))
        tau = pyro.sample("tau", dist.Gamma(2.0, 0.2))
        mean = a * x[:, 0] + b
        with pyro.plate("data", x.shape[0]):
            pyro.sample("y", dist.StudentT(3.0, mean, tau.rsqrt()), obs=y)
        return mean

    def reference_log_predictive(self, tasks, prior="true"):
        check_choice("prior", prior, ("true", "broad"))
        data = {"support": (_line_features(tasks.x_support).double(), tasks.y_support.double()),
                "query": (_line_features(tasks.x_query).double(), tasks.y_query.double())}
        T = tasks.num_tasks

        def loglik(theta, which):  # theta (T, S, 2 or 3)
            phi, y = data[which]
            mean = theta[..., :2] @ phi.transpose(-1, -2)  # (T, S, N)
            scale = (self.scale if theta.size(-1) == 2
                     else (-0.5 * theta[..., 2:]).exp())
            return dist.StudentT(self.df, mean, scale, validate_args=False).log_prob(y.unsqueeze(1))

        if prior == "true":
            w_prior = dist.Normal(torch.tensor(self.mean, dtype=torch.float64), self.weight_sd)
            log_prior = lambda t: w_prior.log_prob(t).sum(-1)  # noqa: E731
            init = torch.tensor(self.mean, dtype=torch.float64).expand(T, 2)
        else:
            gamma = dist.Gamma(torch.tensor(2.0, dtype=torch.float64), 0.2)

            def log_prior(t):  # (a, b) ~ N(0, 5), log tau with its Jacobian
                return (dist.Normal(0.0, 5.0).log_prob(t[..., :2]).sum(-1)
                        + gamma.log_prob(t[..., 2].exp()) + t[..., 2])
            init = torch.tensor([0.0, 0.0, math.log(10.0)], dtype=torch.float64).expand(T, 3)
        return importance_log_predictive(log_prior, loglik, init, self.reference_draws)[0]

    def metrics(self, posterior, x_query, y_query):
        out = regression_metrics(posterior, x_query, y_query, closed_form=False)
        with torch.no_grad():
            loc = posterior.potential.model_output(posterior.particles, x_query, y_query)
            scale = posterior.named[self.noise_site].rsqrt().unsqueeze(-1)
            pit = _student_t_pit(y_query, loc, scale, self.df)
        means, ses = mean_and_se(pit_coverage(pit, (0.5, 0.8, 0.9, 0.95)).mean(-1))
        out["coverage"] = {lv: (m, s) for lv, m, s in zip((0.5, 0.8, 0.9, 0.95), means, ses)}
        return out


class SubspaceClassification(SyntheticFamily):
    r"""N-way few-shot classification in :math:`\mathbb R^{16}` whose class means share a
    low-dimensional structure: :math:`\mu_c = U z_c + 0.3\, \xi_c`, :math:`z_c \sim
    \mathcal N(0, I_2)`, :math:`\xi_c \sim \mathcal N(0, I_{16})`, with a fixed
    :math:`16 \times 2` matrix :math:`U` (orthonormal columns times 2.5); points
    :math:`x \sim \mathcal N(\mu_c, I)`. Each episode draws new classes, so labels carry no
    meaning across episodes (label permutation is built in). The user's model is a
    discriminative softmax regression with :math:`\mathcal N(0, 1)` weights and biases.

    References in closed form: the class means' posterior is Gaussian under a Gaussian
    prior :math:`\mathcal N(0, \Sigma_0)`, each class's predictive is
    :math:`\mathcal N(m_c, \Sigma_c + I)`, and the class probabilities are their normalised
    densities (equal class priors). True prior: :math:`\Sigma_0 = U U^\top + 0.09 I`; broad:
    :math:`\Sigma_0 = 9 I` (isotropic, knowing nothing of the subspace).
    """

    name = "subspace-classification"
    kind = "classification"
    noise_site = None
    dim, rank, subspace_scale, off_scale, point_sd = 16, 2, 2.5, 0.3, 1.0
    broad_sd = 3.0

    def __init__(self, num_support: int = 1, num_query: int = 5, ways: int = 5):
        super().__init__(num_support, num_query)
        self.ways = check_int("ways", ways, 2)
        g = torch.Generator().manual_seed(20181203)
        q, _ = torch.linalg.qr(torch.randn(self.dim, self.rank, generator=g))
        self.basis = self.subspace_scale * q  # (dim, rank)

    def draw(self, num_tasks, generator):
        C, K, Q = self.ways, self.num_support, self.num_query
        z = torch.randn(num_tasks, C, self.rank, generator=generator)
        means = z @ self.basis.T + self.off_scale * torch.randn(num_tasks, C, self.dim, generator=generator)

        def points(n):
            labels = torch.arange(C).repeat_interleave(n).expand(num_tasks, C * n)
            x = means[torch.arange(num_tasks)[:, None], labels] + self.point_sd * torch.randn(
                num_tasks, C * n, self.dim, generator=generator)
            order = torch.argsort(torch.rand(num_tasks, C * n, generator=generator), -1)
            return x.gather(1, order[..., None].expand_as(x)), labels.gather(1, order)

        xs, ys = points(K)
        xq, yq = points(Q)
        return TaskBatch(xs, ys, xq, yq)

    def model(self, x, y=None):
        ways, dim = self.ways, x.shape[-1]
        w = pyro.sample("w", dist.Normal(torch.zeros(ways, dim), 1.0).to_event(2))
        b = pyro.sample("b", dist.Normal(torch.zeros(ways), 1.0).to_event(1))
        logits = x @ w.T + b
        with pyro.plate("data", x.shape[0]):
            pyro.sample("y", dist.Categorical(logits=logits), obs=y)
        return logits.softmax(-1)

    def prior_covariance(self, prior: str) -> torch.Tensor:
        if check_choice("prior", prior, ("true", "broad")) == "true":
            return self.basis @ self.basis.T + self.off_scale ** 2 * torch.eye(self.dim)
        return self.broad_sd ** 2 * torch.eye(self.dim)

    def reference_probs(self, tasks: TaskBatch, prior: str = "true") -> torch.Tensor:
        """Class probabilities of the query points under the prior, ``(T, Q, ways)``."""
        sigma0 = self.prior_covariance(prior).double()
        xs, ys, xq = tasks.x_support.double(), tasks.y_support, tasks.x_query.double()
        onehot = torch.nn.functional.one_hot(ys, self.ways).double()  # (T, K, C)
        counts = onehot.sum(1)  # (T, C)
        sums = onehot.transpose(1, 2) @ xs  # (T, C, dim)
        eye = torch.eye(self.dim, dtype=torch.float64)
        noise = self.point_sd ** 2
        # posterior of each class mean: precision Sigma0^-1 + n / s^2
        prec = torch.linalg.inv(sigma0) + counts[..., None, None] * eye / noise  # (T, C, d, d)
        cov = torch.linalg.inv(prec)
        mean = (cov @ (sums / noise).unsqueeze(-1)).squeeze(-1)
        pred = dist.MultivariateNormal(mean.unsqueeze(1), cov.unsqueeze(1) + noise * eye)
        log_dens = pred.log_prob(xq.unsqueeze(2))  # (T, Q, C)
        return log_dens.softmax(-1)

    def reference_log_predictive(self, tasks, prior="true"):
        probs = self.reference_probs(tasks, prior)
        return probs.gather(-1, tasks.y_query.unsqueeze(-1)).squeeze(-1).log()

    def reference_metrics(self, tasks: TaskBatch, prior: str = "true") -> Dict[str, float]:
        """Accuracy and ECE of a reference (NLL: :meth:`references`)."""
        probs = self.reference_probs(tasks, prior)
        conf, pred = probs.max(-1)
        correct = (pred == tasks.y_query).double()
        return {"accuracy": float(correct.mean()), "ece": calibration_errors(conf, correct)[0]}


def _binary_hits(p1: torch.Tensor, y: torch.Tensor):
    """``(confidence, correct)`` of the most probable label under ``p(y = 1) = p1``."""
    correct = ((p1 > 0.5).to(p1.dtype) == y.to(p1.dtype)).to(p1.dtype)
    return torch.maximum(p1, 1 - p1), correct


def _binary_metrics(posterior, x_query, y_query):
    """Accuracy, NLL, Brier and top-label ECE of a Bernoulli particle mixture."""
    with torch.no_grad():
        p1 = posterior.predict(x_query)["mean"]  # (tempered: ParticlePosterior.temperature)
        nll = -posterior.log_predictive_density(x_query, y_query).mean(-1)
    conf, correct = _binary_hits(p1, y_query)
    per_task = {"accuracy": correct.mean(-1), "nll": nll,
                "brier": 2 * (p1 - y_query).pow(2).mean(-1)}
    out: Dict[str, object] = {k: mean_and_se(v) for k, v in per_task.items()}
    out["ece"] = (calibration_errors(conf, correct)[0], float("nan"))
    out["per_task"] = per_task
    return out


class LogisticGLM(SyntheticFamily):
    r"""Logistic regression whose weights share a structure across tasks:
    :math:`(w, b) \sim \mathcal N((2, -1, 0.5, 0.3), 0.5^2 I)`, :math:`x \sim \mathcal N(0,
    I_3)`, :math:`y \sim \mathrm{Bernoulli}(\sigma(w^\top x + b))`. The user's model:
    :math:`w \sim \mathcal N(0, 5^2 I)`, :math:`b \sim \mathcal N(0, 5^2)`, a Bernoulli
    likelihood, returning :math:`p(y = 1 \mid x)`.

    References by importance sampling over the 4 coefficients, under the true prior and
    under the user's.
    """

    name = "logistic-glm"
    kind = "binary"
    noise_site = None
    mean = (2.0, -1.0, 0.5, 0.3)
    weight_sd = 0.5

    def __init__(self, num_support: int = 5, num_query: int = 20):
        super().__init__(num_support, num_query)

    def draw(self, num_tasks, generator):
        n = self.num_support + self.num_query
        coef = torch.tensor(self.mean) + self.weight_sd * torch.randn(num_tasks, 4, generator=generator)
        x = torch.randn(num_tasks, n, 3, generator=generator)
        logits = (x @ coef[:, :3, None]).squeeze(-1) + coef[:, 3:]
        y = (torch.rand(num_tasks, n, generator=generator) < logits.sigmoid()).float()
        return _support_and_query(x, y, self.num_support)

    @staticmethod
    def model(x, y=None):
        w = pyro.sample("w", dist.Normal(torch.zeros(3), 5.0).to_event(1))
        b = pyro.sample("b", dist.Normal(0.0, 5.0))
        logits = x @ w + b
        with pyro.plate("data", x.shape[0]):
            pyro.sample("y", dist.Bernoulli(logits=logits), obs=y)
        return logits.sigmoid()

    def reference_log_predictive(self, tasks, prior="true"):
        check_choice("prior", prior, ("true", "broad"))
        data = {"support": (tasks.x_support.double(), tasks.y_support.double()),
                "query": (tasks.x_query.double(), tasks.y_query.double())}

        def loglik(theta, which):  # (T, S, 4) -> (T, S, N)
            x, y = data[which]
            logits = theta[..., :3] @ x.transpose(-1, -2) + theta[..., 3:]
            return dist.Bernoulli(logits=logits).log_prob(y.unsqueeze(1))

        loc, sd = ((torch.tensor(self.mean, dtype=torch.float64), self.weight_sd) if prior == "true"
                   else (torch.zeros(4, dtype=torch.float64), 5.0))
        log_prior = lambda t: dist.Normal(loc, sd).log_prob(t).sum(-1)  # noqa: E731
        return importance_log_predictive(log_prior, loglik, loc.expand(tasks.num_tasks, 4),
                                         self.reference_draws)[0]

    def metrics(self, posterior, x_query, y_query):
        return _binary_metrics(posterior, x_query, y_query)

    def reference_metrics(self, tasks: TaskBatch, prior: str = "true") -> Dict[str, float]:
        """Accuracy of a reference's predictive (the query points' p(y=1) by importance
        sampling: exp of the log predictive of y = 1)."""
        ones = tasks._replace(y_query=torch.ones_like(tasks.y_query))
        p1 = self.reference_log_predictive(ones, prior).exp()
        conf, correct = _binary_hits(p1, tasks.y_query)
        return {"accuracy": float(correct.mean()), "ece": calibration_errors(conf, correct)[0]}


class HierarchicalRegression(SyntheticFamily):
    r"""Shared slopes and a task-level offset: :math:`y = \beta^\top x + u + 0.3\,\epsilon`
    with :math:`\beta = (1.5, -1)` the *same* for every task, :math:`u \sim \mathcal N(0, 1)`
    per task, :math:`x \sim U[-2, 2]^2`. The user's model does not know that the slopes are
    shared: :math:`\beta \sim \mathcal N(0, 5^2 I)`, :math:`u \sim \mathcal N(0, 5^2)`,
    :math:`\tau \sim \mathrm{Gamma}(2, 0.2)`; meta-learning should find :math:`\beta` (the
    particles agree on it) and the spread of :math:`u`.

    References in closed form: under the true prior only :math:`u` is unknown (Gaussian
    posterior, noise known); under the broad prior a Normal-Gamma linear regression on
    :math:`(x_1, x_2, 1)` with the user's Gamma(2, 0.2) and coefficients of sd 5 at the
    prior mean precision.
    """

    name = "hierarchical"
    true_noise_sd = 0.3
    beta = (1.5, -1.0)
    offset_sd = 1.0

    def draw(self, num_tasks, generator):
        n = self.num_support + self.num_query
        u = self.offset_sd * torch.randn(num_tasks, 1, generator=generator)
        x = 4 * torch.rand(num_tasks, n, 2, generator=generator) - 2
        y = (x @ torch.tensor(self.beta)) + u + self.true_noise_sd * torch.randn(
            num_tasks, n, generator=generator)
        return _support_and_query(x, y, self.num_support)

    @staticmethod
    def model(x, y=None):
        beta = pyro.sample("beta", dist.Normal(torch.zeros(2), 5.0).to_event(1))
        u = pyro.sample("u", dist.Normal(0.0, 5.0))
        tau = pyro.sample("tau", dist.Gamma(2.0, 0.2))
        mean = x @ beta + u
        with pyro.plate("data", x.shape[0]):
            pyro.sample("y", dist.Normal(mean, tau.rsqrt()), obs=y)
        return mean

    def reference_log_predictive(self, tasks, prior="true"):
        check_choice("prior", prior, ("true", "broad"))
        beta = torch.tensor(self.beta, dtype=torch.float64)
        if prior == "true":
            noise = self.true_noise_sd ** 2
            resid = tasks.y_support.double() - tasks.x_support.double() @ beta
            prec = 1 / self.offset_sd ** 2 + resid.size(-1) / noise
            mean = resid.sum(-1) / noise / prec
            loc = tasks.x_query.double() @ beta + mean[:, None]
            return dist.Normal(loc, (1 / prec + noise) ** 0.5).log_prob(tasks.y_query.double())

        def features(x):
            return torch.cat([x, torch.ones_like(x[..., :1])], -1)
        return normal_gamma_log_predictive(features(tasks.x_support), tasks.y_support,
                                           features(tasks.x_query), tasks.y_query,
                                           torch.zeros(3), torch.eye(3) * 0.1 / 25.0, 2.0, 0.2)


#: the suite, by name: ``FAMILIES[name](num_support=..., num_query=...)``
FAMILIES = {cls.name: cls for cls in (NormalGammaRegression, StudentTRegression,
                                      SubspaceClassification, LogisticGLM, HierarchicalRegression)}


from .registry import TaskFamily  # noqa: E402  (the CLI's entries for this module's families)


class SyntheticTaskFamily(TaskFamily):
    """``--task NAME`` for a family of the suite (the CLI's family entry): the family's own
    model and metrics, ``--shots`` support points (per class for classification; default
    the family's), its references printed beside the learner's scores."""

    eval_tasks = 200

    def __init__(self, family_cls):
        self.family_cls = family_cls
        self.name = family_cls.name

    def configure(self, task, args) -> dict:
        return {"shots": args.shots}

    def family(self, config) -> SyntheticFamily:
        return (self.family_cls() if config.get("shots") is None
                else self.family_cls(num_support=config["shots"]))

    def method_defaults(self, method, config):
        """Regression: the papers' steps (:class:`TaskFamily`); classification: the
        digits family's (BMAML 0.5 / K on the summed log joint, EMAML 0.4 and MAML 1.0 on
        the mean cross-entropy)."""
        if self.family_cls.kind != "classification":
            return super().method_defaults(method, config)
        shots = config.get("shots") or self.family_cls().num_support
        return {"bmaml": {"step_size": 0.5 / shots, "objective": "chaser"},
                "emaml": {"step_size": 0.4, "objective": "nll"},
                "maml": {"step_size": 1.0, "objective": "nll"}}[method]

    def model(self, config):
        return self.family(config).model

    def sources(self, config, learner=None):
        source = self.family(config)
        return source, source, None

    def metrics(self, posterior, x_query, y_query):
        """The family's scores, with the references on the same tasks: ``nll_optimal``
        (Bayes-optimal), ``nll_broad`` (broad prior) and ``gap_closed``."""
        family = self.family_cls()
        out = family.metrics(posterior, x_query, y_query)
        tasks = TaskBatch(posterior.x_support, posterior.y_support, x_query, y_query)
        refs = family.references(tasks.to("cpu"))
        nan = float("nan")
        out["nll_optimal"], out["nll_broad"] = (refs["true"], nan), (refs["broad"], nan)
        out["gap_closed"] = (gap_closed(out["nll"][0], refs["broad"], refs["true"]), nan)
        return out

    def summary(self, metrics, num_tasks):
        return (f"test {self.headline(metrics)} ({num_tasks} held-out tasks)\n"
                f"references (NLL per point): Bayes-optimal {metrics['nll_optimal'][0]:.4f}, "
                f"broad prior {metrics['nll_broad'][0]:.4f}; share of that gap closed "
                f"{metrics['gap_closed'][0]:.2f}")


SUITE_NORMAL_GAMMA, SUITE_STUDENT_T, SUITE_SUBSPACE_CLASSIFICATION, SUITE_LOGISTIC_GLM, \
    SUITE_HIERARCHICAL = (SyntheticTaskFamily(cls) for cls in FAMILIES.values())
