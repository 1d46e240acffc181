"""A meta-learned Gaussian prior in the adaptation's target (``learn_prior``): the prior's
math (engine/learned_prior.py), the potential view that puts it in place of the model's
priors (``ModelPotential.with_prior``), and the learners that meta-learn it."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch

import pyro_bmaml as pb
from pyro_bmaml import BMAML, EMAML, MAML
from pyro_bmaml.engine.learned_prior import MAX_FULL_DIM, GaussianPrior
from pyro_bmaml.engine.potential import ModelPotential
from pyro_bmaml.tasks.synthetic import NormalGammaRegression, SubspaceClassification


def _full_prior(dim=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    prior = GaussianPrior(dim, "full", torch.randn(dim, generator=g),
                          torch.rand(dim, generator=g) + 0.5)
    with torch.no_grad():
        prior.tril.copy_(torch.randn(dim, dim, generator=g))
    return prior


def test_log_prob_is_the_gaussian_with_precision_l_lt_in_both_forms():
    x = torch.randn(3, 5, 4, generator=torch.Generator().manual_seed(1))
    full = _full_prior()
    tril = full.precision_tril().detach()
    assert torch.equal(tril, torch.tril(tril)) and bool((tril.diagonal() > 0).all())
    reference = dist.MultivariateNormal(full.loc.detach(), precision_matrix=tril @ tril.T)
    torch.testing.assert_close(full.log_prob(x), reference.log_prob(x))
    torch.testing.assert_close(full.distribution().log_prob(x), reference.log_prob(x))
    # its score is -Lambda (x - mu): what a step reads
    xg = x.clone().requires_grad_(True)
    (score,) = torch.autograd.grad(full.log_prob(xg).sum(), xg)
    torch.testing.assert_close(score, -(x - full.loc.detach()) @ (tril @ tril.T))
    diag = GaussianPrior(4, "diagonal", torch.arange(4.0), torch.tensor([0.5, 1.0, 2.0, 3.0]))
    assert diag.tril.numel() == 0
    reference = dist.Normal(torch.arange(4.0), torch.tensor([0.5, 1.0, 2.0, 3.0])).to_event(1)
    torch.testing.assert_close(diag.log_prob(x), reference.log_prob(x))
    torch.testing.assert_close(diag.distribution().log_prob(x), reference.log_prob(x))


def test_from_samples_matches_the_moments_and_starts_diagonal():
    samples = torch.randn(4000, 3, generator=torch.Generator().manual_seed(0)) * torch.tensor(
        [1.0, 2.0, 0.5]) + torch.tensor([3.0, -1.0, 0.0])
    prior = GaussianPrior.from_samples(samples, "full")
    torch.testing.assert_close(prior.loc.detach(), samples.mean(0))
    torch.testing.assert_close(prior.log_scale.detach().exp(), samples.std(0))
    assert bool((prior.tril == 0).all())  # the precision starts diagonal


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="form"):
        GaussianPrior(3, "lowrank")
    with pytest.raises(ValueError, match=f"D <= {MAX_FULL_DIM}"):
        GaussianPrior(MAX_FULL_DIM + 1, "full")
    with pytest.raises(ValueError, match=r"loc must have shape \(3,\)"):
        GaussianPrior(3, loc=torch.zeros(2))
    with pytest.raises(TypeError, match="scale must be a tensor"):
        GaussianPrior(3, scale=[1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="positive and finite"):
        GaussianPrior(3, scale=torch.tensor([1.0, 0.0, 1.0]))
    with pytest.raises(ValueError, match="last dim D = 3"):
        GaussianPrior(3).log_prob(torch.zeros(2, 4))
    with pytest.raises(ValueError, match=r"\(N, D\) with N >= 2"):
        GaussianPrior.from_samples(torch.zeros(1, 3))
    with pytest.raises(TypeError, match="log_prior must be callable"):
        ModelPotential(NormalGammaRegression.model).with_prior(3.0)


def test_with_prior_replaces_the_model_prior_by_the_given_density():
    family = NormalGammaRegression()
    tasks = family.sample(2, torch.Generator().manual_seed(0))
    potential = ModelPotential(family.model).setup(tasks.x_support[0], tasks.y_support[0])
    prior = _full_prior(potential.dim)
    view = potential.with_prior(prior.log_prob)
    theta = torch.randn(2, 5, potential.dim, generator=torch.Generator().manual_seed(2))
    log_lik = potential.log_likelihood(theta, tasks.x_support, tasks.y_support).sum(-1)
    expected = log_lik + prior.log_prob(theta)
    torch.testing.assert_close(view.log_density(theta, tasks.x_support, tasks.y_support), expected)
    log_p, grad = view.log_density_and_grad(theta, tasks.x_support, tasks.y_support)
    torch.testing.assert_close(log_p, expected)
    t = theta.clone().requires_grad_(True)
    (ref,) = torch.autograd.grad(
        (potential.log_likelihood(t, tasks.x_support, tasks.y_support).sum(-1)
         + prior.log_prob(t)).sum(), t)
    torch.testing.assert_close(grad, ref)
    assert view.recorded_log_density(theta, tasks.x_support, tasks.y_support) is None
    # the potential itself keeps the model's prior, and differs from the view
    own = potential.log_density(theta, tasks.x_support, tasks.y_support)
    assert potential.prior is None and not torch.allclose(own, expected)
    assert potential.with_prior(prior.log_prob).with_prior(None).prior is None


def _regression_learner(objective="bfa", form="full", **kw):
    family = NormalGammaRegression()
    pyro.set_rng_seed(0)
    return family, BMAML(family.model, num_particles=4, objective=objective, learn_prior=form,
                         example_args=family.example_args(), **kw)


def test_learned_prior_starts_at_the_model_prior_and_is_the_exported_prior():
    family, learner = _regression_learner()
    assert isinstance(learner.learned_prior, GaussianPrior)
    # a, b ~ N(0, 5); tau ~ Gamma(2, 0.2), log tau: mean digamma(2) + log 5, sd trigamma(2)^0.5
    mean = torch.tensor([0.0, 0.0, (1 - 0.5772156649) + math.log(5.0)])
    sd = torch.tensor([5.0, 5.0, math.sqrt(math.pi ** 2 / 6 - 1)])
    tol = 4 * sd / math.sqrt(512)  # 512 draws
    assert bool(((learner.learned_prior.loc.detach() - mean).abs() < tol).all())
    assert bool(((learner.learned_prior.log_scale.detach().exp() - sd).abs() < 4 * tol).all())
    exported = learner.prior_distribution()
    assert isinstance(exported, dist.MultivariateNormal)
    x = torch.randn(6, 3)
    torch.testing.assert_close(exported.log_prob(x), learner.learned_prior.log_prob(x).detach())
    assert learner.config()["learn_prior"] == "full" and learner.describe()["learn_prior"] == "full"
    # the learned prior has its own Adam group at prior_lr
    groups = learner.optimizer_groups(5e-2)
    assert groups[-1]["lr"] == learner.prior_lr
    assert len(groups[-1]["params"]) == 3
    # a learner without one: no parameters, no config key, theta0's mixture exported
    off = BMAML(family.model, num_particles=4, example_args=family.example_args())
    assert off.learned_prior is None and "learn_prior" not in off.config()
    assert not any("learned_prior" in k for k in off.state_dict())
    with pytest.raises(ValueError, match="form='learned'"):
        off.prior_distribution(form="learned")


def test_learners_that_cannot_use_a_learned_prior_say_why():
    family = NormalGammaRegression()
    with pytest.raises(ValueError, match="objective='log_joint'"):
        EMAML(family.model, num_particles=3, learn_prior="diagonal",
              example_args=family.example_args())
    with pytest.raises(ValueError, match="objective='log_joint'"):
        MAML(family.model, learn_prior="diagonal", example_args=family.example_args())
    with pytest.raises(ValueError, match="compile=False"):
        BMAML(family.model, num_particles=3, learn_prior="full", compile=True,
              example_args=family.example_args())
    with pytest.raises(ValueError, match="learn_prior"):
        BMAML(family.model, num_particles=3, learn_prior="wishart",
              example_args=family.example_args())
    # EMAML's log-joint steps do read it
    learner = EMAML(family.model, num_particles=3, objective="log_joint", learn_prior="diagonal",
                    example_args=family.example_args())
    batch = family.sample(2, torch.Generator().manual_seed(0))
    learner.meta_loss(batch).backward()
    assert learner.learned_prior.loc.grad.abs().sum() > 0


def test_bfa_meta_gradient_in_the_learned_prior_matches_finite_differences():
    torch.set_default_dtype(torch.float64)
    family, learner = _regression_learner(
        "bfa", inner_steps=1, learn_step_size=False, step_size=5e-2, calibration="none",
        kernel=pb.RBFSteinKernel(detach_bandwidth=False))
    learner.double()
    with torch.no_grad():  # a prior with correlations, away from its start
        learner.learned_prior.tril.copy_(0.3 * torch.randn(3, 3, generator=torch.Generator().manual_seed(3)))
    batch = family.sample(3, torch.Generator().manual_seed(0)).to(torch.float64)
    learner.meta_loss(batch).backward()
    params = list(learner.learned_prior.parameters())
    grads = [p.grad.clone() for p in params]
    assert all(float(g.abs().sum()) > 0 for g in grads)
    g = torch.Generator().manual_seed(1)
    for _ in range(4):
        dirs = [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in params]
        eps = 1e-6

        def loss_at(sign):
            with torch.no_grad():
                for p, d in zip(params, dirs):
                    p.add_(sign * eps * d)
            value = learner.meta_loss(batch).detach()
            with torch.no_grad():
                for p, d in zip(params, dirs):
                    p.sub_(sign * eps * d)
            return value

        fd = (loss_at(1) - loss_at(-1)) / (2 * eps)
        analytic = sum((gr * d).sum() for gr, d in zip(grads, dirs))
        assert torch.allclose(analytic, fd, rtol=1e-5, atol=1e-8)


def test_the_chaser_trains_the_prior_by_the_query_nll_not_the_distance():
    """The chaser distance alone is minimised by a prior that holds every particle still;
    the prior's gradient is the chaser's query mixture NLL's, theta0's the distance's."""
    family, learner = _regression_learner("chaser")
    batch = family.sample(4, torch.Generator().manual_seed(0))
    loss = learner.meta_loss(batch)
    assert "step_nll" in learner.loss_terms
    params = list(learner.learned_prior.parameters())
    got = torch.autograd.grad(loss, params, retain_graph=True)
    learner.zero_grad()
    chaser, _ = learner.adapt_on(batch, "support",
                                 learner._initial_for_adaptation(batch.num_tasks),
                                 learner.inner_steps)
    want = torch.autograd.grad(learner._query_nll(chaser, batch), params, allow_unused=True)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, torch.zeros_like(a) if b is None else b)


def test_fit_and_checkpoint_carry_the_learned_prior(tmp_path):
    family, learner = _regression_learner("chaser", inner_steps=2)
    start = learner.learned_prior.loc.detach().clone()
    learner.fit(family, 20, lr=1e-2, seed=0, progress=False, select_steps=False,
                checkpoint=tmp_path / "ckpt.pt")
    assert not torch.equal(learner.learned_prior.loc.detach(), start)
    tasks = family.evaluation_tasks(5)
    post = learner.adapt(tasks.x_support, tasks.y_support)
    assert torch.isfinite(post.particles).all()
    _, again = _regression_learner("chaser", inner_steps=2)
    again.load_checkpoint(tmp_path / "ckpt.pt")
    for a, b in zip(again.learned_prior.parameters(), learner.learned_prior.parameters()):
        assert torch.equal(a, b)
    torch.testing.assert_close(again.adapt(tasks.x_support, tasks.y_support).particles,
                               post.particles)
    # a checkpoint of a learner with the model's prior does not load into one without
    _, other = _regression_learner("chaser", inner_steps=2, form="diagonal")
    with pytest.raises(ValueError):
        other.load_checkpoint(tmp_path / "ckpt.pt")


@pytest.mark.slow
def test_a_learned_full_prior_takes_the_nway_family_past_the_model_prior():
    """The N-way family's class means lie near a 2-d subspace of R^16, which the model's
    N(0, 1) weights know nothing of: every learner adapted under it plateaued at the
    accuracy of MAP under that prior (``results/families_ceilings.md``). A learned full
    prior carries the subspace: the same BFA run's query NLL is lower (600 iterations)."""
    family = SubspaceClassification()
    tasks = family.evaluation_tasks(200)
    nll = {}
    for form in (None, "full"):
        pyro.set_rng_seed(0)
        learner = BMAML(family.model, num_particles=10, objective="bfa", inner_steps=5,
                        step_size=0.1, learn_prior=form, example_args=family.example_args())
        learner.fit(family, 600, lr=5e-2, seed=0, progress=False, select_steps=False)
        post = learner.adapt(tasks.x_support, tasks.y_support)
        nll[form] = float(family.metrics(post, tasks.x_query, tasks.y_query)["nll"][0])
    refs = family.references(tasks)
    # the learned prior closes at least 0.15 more of the gap (seen: 0.32 -> 0.60)
    assert (nll[None] - nll["full"]) / (refs["broad"] - refs["true"]) > 0.15
