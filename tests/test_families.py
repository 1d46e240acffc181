"""The synthetic families' exact references against Monte Carlo, and the defaults on them.

Monte Carlo here is the plainest estimator there is: draws of a task's parameters from the
family's prior, weighted by the support likelihood, p(y_q | D) = E[p(D|th) p(y_q|th)] / E[p(D|th)].
Its tolerance is set from its own standard error (delta method on the ratio, 5 s.e.).
"""

import math

import pyro
import pytest
import torch
import pyro.distributions as dist

from pyro_bmaml import BMAML, evaluate
from pyro_bmaml.tasks.synthetic import (FAMILIES, HierarchicalRegression, LogisticGLM,
                                        NormalGammaRegression, StudentTRegression,
                                        SubspaceClassification, gap_closed,
                                        importance_log_predictive, normal_gamma_log_predictive)


def _mc_log_predictive(log_lik_support, log_lik_query):
    """``(estimate, s.e.)`` of log p(y_q | D) per query point from prior draws: the log
    likelihoods ``(S, Q)`` of the query points and ``(S,)`` of the support set."""
    w = (log_lik_support - log_lik_support.max()).exp()  # (S,)
    q = log_lik_query.exp()  # (S, Q)
    num, den = (w[:, None] * q).mean(0), w.mean()
    ratio = num / den
    # delta method for the ratio of means
    s = len(w)
    resid = (w[:, None] * q - ratio * w[:, None]) / den
    se = resid.std(0) / math.sqrt(s)
    return ratio.log(), se / ratio


def test_normal_gamma_reference_matches_monte_carlo():
    family = NormalGammaRegression(num_support=2, num_query=4)
    tasks = family.evaluation_tasks(3, seed=7).to(torch.float64)
    exact = family.reference_log_predictive(tasks, "true")
    g = torch.Generator().manual_seed(0)
    S = 400_000
    for t in range(3):
        tau = torch._standard_gamma(torch.full((S,), family.a0, dtype=torch.float64),
                                    generator=g) / family.b0
        z = torch.randn(S, 2, generator=g, dtype=torch.float64)
        w = torch.tensor(family.m0, dtype=torch.float64) + z / (
            tau[:, None] * family.lambda0.diagonal().double()).sqrt()

        def lik(x, y):
            mean = w[:, :1] * x[:, 0] + w[:, 1:]
            return dist.Normal(mean, tau.rsqrt()[:, None]).log_prob(y)

        mc, se = _mc_log_predictive(lik(tasks.x_support[t], tasks.y_support[t]).sum(-1),
                                    lik(tasks.x_query[t], tasks.y_query[t]))
        assert (mc - exact[t]).abs().max() < 5 * se.max() + 1e-3, (mc, exact[t], se)


def test_importance_sampling_matches_the_normal_gamma_closed_form():
    """The importance sampler (used where there is no closed form) on a problem that has
    one: the broad Normal-Gamma prior over (a, b, log tau), K = 3."""
    family = NormalGammaRegression(num_support=3, num_query=5)
    tasks = family.evaluation_tasks(20, seed=3)
    m0, lam0, a0, b0 = torch.zeros(2), torch.eye(2) * 0.004, 2.0, 0.2
    exact = normal_gamma_log_predictive(
        torch.cat([tasks.x_support, torch.ones_like(tasks.x_support)], -1), tasks.y_support,
        torch.cat([tasks.x_query, torch.ones_like(tasks.x_query)], -1), tasks.y_query,
        m0, lam0, a0, b0)
    xs, ys = tasks.x_support.double()[..., 0], tasks.y_support.double()
    xq, yq = tasks.x_query.double()[..., 0], tasks.y_query.double()

    def log_prior(t):  # (a, b) | tau ~ N(0, (tau lam0)^-1), log tau with its Jacobian
        tau = t[..., 2].exp()
        w = dist.Normal(0.0, (tau * 0.004).rsqrt().unsqueeze(-1)).log_prob(t[..., :2]).sum(-1)
        return w + dist.Gamma(torch.tensor(a0, dtype=torch.float64), b0).log_prob(tau) + t[..., 2]

    def log_lik(t, which):
        x, y = (xs, ys) if which == "support" else (xq, yq)
        mean = t[..., :1] * x.unsqueeze(1) + t[..., 1:2]
        return dist.Normal(mean, (-0.5 * t[..., 2:]).exp()).log_prob(y.unsqueeze(1))

    init = torch.tensor([0.0, 0.0, math.log(10.0)], dtype=torch.float64).expand(20, 3)
    approx, ess, se = importance_log_predictive(log_prior, log_lik, init, num_draws=20_000)
    assert ess.min() > 500
    assert ((approx - exact).abs() < 5 * se + 1e-3).all(), ((approx - exact).abs() / se).max()
    assert se.max() < 0.05  # the check has power: the estimates are this tight


def test_classification_reference_matches_monte_carlo():
    family = SubspaceClassification(num_support=1, num_query=2, ways=3)
    tasks = family.evaluation_tasks(2, seed=5)
    exact = family.reference_probs(tasks, "true")  # (T, Q, C)
    g = torch.Generator().manual_seed(0)
    S = 200_000
    cov = family.prior_covariance("true").double()
    chol = torch.linalg.cholesky(cov)
    for t in range(2):
        dens = []
        for c in range(family.ways):  # class means are independent: one class at a time
            mu = torch.randn(S, family.dim, generator=g, dtype=torch.float64) @ chol.T
            pts = tasks.x_support[t][tasks.y_support[t] == c].double()
            lik_s = dist.Normal(mu[:, None], 1.0).log_prob(pts).sum((-1, -2))
            lik_q = dist.Normal(mu[:, None], 1.0).log_prob(tasks.x_query[t].double()).sum(-1)
            dens.append(_mc_log_predictive(lik_s, lik_q)[0])
        mc = torch.stack(dens, -1).softmax(-1)
        assert (mc - exact[t]).abs().max() < 0.02, (mc, exact[t])


def test_hierarchical_reference_matches_monte_carlo():
    family = HierarchicalRegression(num_support=2, num_query=3)
    tasks = family.evaluation_tasks(3, seed=2)
    exact = family.reference_log_predictive(tasks, "true")
    g = torch.Generator().manual_seed(0)
    u = torch.randn(200_000, 1, generator=g, dtype=torch.float64)
    beta = torch.tensor(family.beta, dtype=torch.float64)
    for t in range(3):
        def lik(x, y):
            return dist.Normal(x.double() @ beta + u, 0.3).log_prob(y.double())
        mc, se = _mc_log_predictive(lik(tasks.x_support[t], tasks.y_support[t]).sum(-1),
                                    lik(tasks.x_query[t], tasks.y_query[t]))
        assert (mc - exact[t]).abs().max() < 5 * se.max() + 1e-3


@pytest.mark.parametrize("family_cls", [StudentTRegression, LogisticGLM])
def test_importance_sampled_references_match_monte_carlo(family_cls):
    """Under the true (tight) prior, plain prior sampling is accurate enough to check the
    Laplace-proposal importance sampler."""
    family = family_cls()
    family.reference_draws = 40_000  # its own error well below the check's (about 0.003)
    tasks = family.evaluation_tasks(3, seed=11)
    exact = family.reference_log_predictive(tasks, "true")
    g = torch.Generator().manual_seed(0)
    S = 300_000
    mean = torch.tensor(family.mean, dtype=torch.float64)
    theta = mean + family.weight_sd * torch.randn(S, len(mean), generator=g, dtype=torch.float64)
    for t in range(3):
        def lik(x, y):
            x, y = x.double(), y.double()
            if family_cls is StudentTRegression:
                return dist.StudentT(3.0, theta[:, :1] * x[:, 0] + theta[:, 1:], 0.3).log_prob(y)
            return dist.Bernoulli(logits=theta[:, :3] @ x.T + theta[:, 3:]).log_prob(y)
        mc, se = _mc_log_predictive(lik(tasks.x_support[t], tasks.y_support[t]).sum(-1),
                                    lik(tasks.x_query[t], tasks.y_query[t]))
        assert (mc - exact[t]).abs().max() < 5 * se.max() + 0.01, (mc, exact[t], se)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_every_family_is_a_task_source_with_a_usable_model(name):
    """Shapes, the references' order (Bayes-optimal beats broad on average), and a default
    BMAML built from the family's model alone adapts and scores on it."""
    family = FAMILIES[name]()
    tasks = family.evaluation_tasks(40)
    refs = family.references(tasks)
    assert refs["true"] < refs["broad"]
    assert gap_closed(refs["true"], refs["broad"], refs["true"]) == 1.0
    batch = family.sample(4, torch.Generator().manual_seed(0)).validate()
    assert batch.num_tasks == 4
    learner = BMAML(family.model, num_particles=4, example_args=family.example_args())
    assert learner.noise_sites == ([family.noise_site] if family.noise_site else [])
    posterior = learner.adapt(tasks.x_support, tasks.y_support)
    scores = family.metrics(posterior, tasks.x_query, tasks.y_query)
    assert math.isfinite(scores["nll"][0])


@pytest.mark.parametrize("lr", [1e-2, 5e-2])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_default_bmaml_takes_no_non_finite_step(lr, seed):
    """The stability sweep at small scale: the default BMAML on a user's linear regression
    with a learned noise level (broad priors, particles started as prior draws) for 300
    meta-iterations at large Adam rates. Before the fix, the chaser's meta-gradient drove the
    initial noise precision up (it acts as the adaptation's step size) until its own SVGD
    update overflowed."""
    family = NormalGammaRegression(num_support=3)
    pyro.set_rng_seed(seed)
    learner = BMAML(family.model, num_particles=10, example_args=family.example_args())
    learner.fit(family, 300, lr=lr, seed=seed, progress=False)
    assert bool(torch.isfinite(learner.theta0).all())


@pytest.mark.slow
def test_default_bmaml_coverage_lands_in_the_band():
    """Default BMAML on the Normal-Gamma family (K = 3, true noise sd 0.3), 1,000
    meta-iterations at lr 0.05: the 90% intervals cover [0.80, 0.95] and the 50% ones
    [0.40, 0.60] of 200 held-out tasks' points (the issue's band; the coverage's s.e. over
    tasks is about 0.01), and with the adaptation's step count ``fit`` chose on fresh tasks
    the predictive closes at least 70% of the NLL gap from the broad prior to the
    Bayes-optimal one (the issue's target; three steps closed 0.36 on this seed)."""
    family = NormalGammaRegression(num_support=3)
    pyro.set_rng_seed(0)
    learner = BMAML(family.model, num_particles=10, example_args=family.example_args())
    history = learner.fit(family, 1000, lr=5e-2, seed=0, progress=False)
    tasks = family.evaluation_tasks(200)
    m = evaluate(learner, tasks, metrics=family.metrics)
    c50, c90 = m["coverage"][0.5][0], m["coverage"][0.9][0]
    assert 0.80 <= c90 <= 0.95 and 0.40 <= c50 <= 0.60, (c50, c90)
    refs = family.references(tasks)
    assert learner.adapt_steps == history["adapt_steps"]["chosen"] > learner.inner_steps
    assert gap_closed(m["nll"][0], refs["broad"], refs["true"]) >= 0.70, history["adapt_steps"]


def _ceilings_script():
    import importlib.util
    import sys
    from pathlib import Path

    examples = Path(__file__).resolve().parents[1] / "examples"
    sys.path.insert(0, str(examples))  # its helpers (_runs)
    try:
        spec = importlib.util.spec_from_file_location("families_ceilings",
                                                      examples / "families_ceilings.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(examples))
    return module


def test_ceilings_script_reproduces_the_references_and_draws_the_true_prior():
    """``examples/families_ceilings.py``: its generative N-way classifier (class scores with
    the norm term) is the family's own reference under either prior, to rounding; dropping
    the norm term changes the predictions; its Normal-Gamma draws have the family's prior
    moments (tolerance 5 s.e. of the Monte Carlo mean); zero SVGD steps leave the draws as
    they are, whatever the step size and whichever prior the target has, and a step under
    the family's true prior differs from one under the user's broad prior."""
    ceilings = _ceilings_script()
    family = SubspaceClassification()
    result = ceilings.subspace_ceiling(300)
    tasks = family.evaluation_tasks(300)
    for prior in ("true", "broad"):
        reference = family.reference_metrics(tasks, prior)["accuracy"]
        assert result[prior]["with_norm_term"] == pytest.approx(reference, abs=1e-12)
        assert result[prior]["without_norm_term"] != pytest.approx(reference, abs=1e-3)
    ng = NormalGammaRegression()
    draws = ceilings.true_prior_draws(ng, 20000, seed=0)
    tau = draws[:, 2].exp()
    mean_tau, sd_tau = ng.a0 / ng.b0, math.sqrt(ng.a0) / ng.b0
    assert abs(float(tau.mean()) - mean_tau) < 5 * sd_tau / math.sqrt(20000)
    slope_sd = float((draws[:, 0] - ng.m0[0]).std())
    expected_sd = math.sqrt(float((1.0 / (tau * ng.lambda0[0, 0])).mean()))
    assert slope_sd == pytest.approx(expected_sd, rel=0.03)  # s.e. of an sd: 1 / sqrt(2n)
    table = ceilings.normal_gamma_ceiling([0], [0.01, 0.04], [1], particles=4, eval_tasks=10)
    gaps = table["rows"][0]["gap_by_step"]
    assert math.isfinite(gaps[0.01]) and gaps[0.01] == gaps[0.04]
    # the true prior as the target: the same start (zero steps: the same gap), another step
    true = ceilings.normal_gamma_ceiling([0, 1], [0.04], [1], particles=4, eval_tasks=10,
                                         target="true")
    broad = ceilings.normal_gamma_ceiling([1], [0.04], [1], particles=4, eval_tasks=10)
    assert true["rows"][0]["gap_by_step"][0.04] == gaps[0.04]
    moved, moved_broad = true["rows"][1]["gap_by_step"][0.04], broad["rows"][0]["gap_by_step"][0.04]
    assert math.isfinite(moved) and moved != moved_broad


def test_softmax_map_ceiling_needs_the_structure_in_the_prior():
    """``examples/families_ceilings.py``'s MAP ceiling of the user's softmax regression on
    the N-way family (300 tasks, 7,500 query points: an accuracy's s.e. is about 0.006):
    under the user's N(0, 1) it stays below the broad-prior reference's accuracy, as every
    meta-learner does; under a prior with the family's class-mean covariance it passes it,
    and the isotropic prior of the same scale does not (the structure, not the scale); the
    rows' gap closed is the script's NLL against the family's references."""
    ceilings = _ceilings_script()
    result = ceilings.softmax_map_ceiling(300)
    user, isotropic, structured = result["rows"]
    broad = result["reference_accuracy"]["broad"]
    assert user["accuracy"] < broad - 0.02 and isotropic["accuracy"] < broad - 0.01
    assert structured["accuracy"] > broad + 0.03
    assert structured["nll"] < isotropic["nll"] < result["refs"]["broad"]
    refs = result["refs"]
    for row in result["rows"]:
        assert row["gap_closed"] == pytest.approx(gap_closed(row["nll"], refs["broad"], refs["true"]))
