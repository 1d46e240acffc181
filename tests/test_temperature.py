"""The predictive temperature of a classifier's particle mixture: the tempered predictive's
math (engine/posterior.py) and its meta-learned temperature (``learn_predictive_temperature``).
"""

import math

import pyro
import pytest
import torch

from pyro_bmaml import BMAML, EMAML
from pyro_bmaml.engine.posterior import (ParticlePosterior, mixture_log_likelihood,
                                         tempered_log_predictive)
from pyro_bmaml.engine.potential import ModelPotential
from pyro_bmaml.tasks.synthetic import LogisticGLM, NormalGammaRegression, SubspaceClassification


def _prior_posterior(family, temperature, num_tasks=6, num_particles=8, seed=0):
    tasks = family.sample(num_tasks, torch.Generator().manual_seed(seed))
    potential = ModelPotential(family.model).setup(tasks.x_support[0], tasks.y_support[0])
    pyro.set_rng_seed(seed)
    draws = potential.sample_prior(num_particles, tasks.x_support[0], tasks.y_support[0])
    particles = draws.unsqueeze(0).expand(num_tasks, -1, -1)
    return ParticlePosterior(potential, particles, tasks.x_support, tasks.y_support,
                             temperature=temperature), tasks


@pytest.mark.parametrize("family_cls", [SubspaceClassification, LogisticGLM])
def test_tempered_predictive_normalises_keeps_the_ranking_and_is_the_mixture_at_one(family_cls):
    family = family_cls()
    plain, tasks = _prior_posterior(family, 1.0)
    assert torch.equal(plain.potential.observation_support,
                       torch.arange(5) if family_cls is SubspaceClassification
                       else torch.tensor([0.0, 1.0]))
    log_lik = plain.potential.support_log_likelihood(plain.particles, tasks.x_query)
    # at T = 1 it is the mixture itself, already normalised over the support
    at_one = tempered_log_predictive(log_lik, 1.0)
    mixture = torch.stack([mixture_log_likelihood(log_lik[..., s]) for s in range(log_lik.size(-1))], -1)
    torch.testing.assert_close(at_one, mixture)
    torch.testing.assert_close(mixture.exp().sum(-1), torch.ones(mixture.shape[:-1]))
    entropies = []
    for t in (0.5, 1.0, 2.0):
        post, _ = _prior_posterior(family, t)
        log_probs = post.predictive_log_probs(tasks.x_query)
        torch.testing.assert_close(log_probs.exp().sum(-1), torch.ones(log_probs.shape[:-1]))
        assert torch.equal(log_probs.argmax(-1), at_one.argmax(-1))  # the ranking never changes
        entropies.append(float(-(log_probs.exp() * log_probs).sum(-1).mean()))
        # the density of the observed values and the returned mean are the tempered ones
        torch.testing.assert_close(
            post.log_predictive_density(tasks.x_query, tasks.y_query),
            log_probs.gather(-1, tasks.y_query.long().unsqueeze(-1)).squeeze(-1))
        mean = post.predict(tasks.x_query)["mean"]
        expected = log_probs.exp() if family_cls is SubspaceClassification else log_probs[..., 1].exp()
        torch.testing.assert_close(mean, expected)
    assert entropies[0] < entropies[1] < entropies[2]  # T < 1 sharpens, T > 1 flattens
    # untempered, the density is the plain mixture's
    torch.testing.assert_close(plain.log_predictive_density(tasks.x_query, tasks.y_query),
                               at_one.gather(-1, tasks.y_query.long().unsqueeze(-1)).squeeze(-1))


def test_temperature_needs_a_finite_support_and_labels_inside_it():
    regression = NormalGammaRegression(num_support=3)
    tasks = regression.sample(2, torch.Generator().manual_seed(0))
    potential = ModelPotential(regression.model).setup(tasks.x_support[0], tasks.y_support[0])
    assert potential.observation_support is None
    particles = potential.sample_prior(4, tasks.x_support[0], tasks.y_support[0])
    with pytest.raises(ValueError, match="temperature"):
        ParticlePosterior(potential, particles, temperature=0.5)
    with pytest.raises(ValueError, match="temperature"):
        ParticlePosterior(potential, particles, temperature=-1.0)
    with pytest.raises(ValueError, match="learn_predictive_temperature"):
        BMAML(regression.model, num_particles=4, example_args=regression.example_args(),
              learn_predictive_temperature=True)
    post, cls_tasks = _prior_posterior(SubspaceClassification(), 0.7)
    with pytest.raises(ValueError, match="support"):
        post.log_predictive_density(cls_tasks.x_query, cls_tasks.y_query + 5)


def _learner(family, on, seed=0, cls=BMAML, **options):
    pyro.set_rng_seed(seed)
    return cls(family.model, num_particles=6, example_args=family.example_args(),
               learn_predictive_temperature=on, **options)


def test_the_temperature_term_trains_only_the_temperature():
    """The term is cut from the adapted particles' graph: ``theta0``'s meta-gradient is the
    same with and without it, and the temperature gets one."""
    family = SubspaceClassification()
    batch = family.sample(5, torch.Generator().manual_seed(3))
    grads = []
    for on in (False, True):
        learner = _learner(family, on)
        loss = learner.meta_loss(batch)
        loss.backward()
        grads.append(learner.theta0.grad.clone())
        if on:
            assert "temperature_nll" in learner.loss_terms
            assert learner.log_predictive_temperature.grad.abs().item() > 0
    torch.testing.assert_close(grads[0], grads[1])


def test_the_temperature_term_is_minimised_at_the_tempered_nll_argmin():
    """Descending the term alone (the particles fixed) reaches the temperature that a grid
    search of the tempered query NLL (through ParticlePosterior) finds on the same tasks
    (here above 1: three steps from prior draws leave an over-confident mixture)."""
    family = SubspaceClassification()
    learner = _learner(family, True)
    batch = family.sample(40, torch.Generator().manual_seed(5))
    with torch.no_grad():
        adapted, _ = learner.adapt_on(batch, "support", learner._expand(40), learner.inner_steps)
    opt = torch.optim.LBFGS([learner.log_predictive_temperature], max_iter=200,
                            line_search_fn="strong_wolfe", tolerance_grad=1e-9)

    def closure():
        opt.zero_grad()
        loss = learner.temperature_loss(adapted, batch)
        loss.backward()
        return loss

    opt.step(closure)
    grid = torch.linspace(-2.0, 4.0, 301)  # log T, steps of 0.02

    def nll(log_t):
        post = ParticlePosterior(learner.potential, adapted, batch.x_support, batch.y_support,
                                 temperature=math.exp(log_t))
        return -float(post.log_predictive_density(batch.x_query, batch.y_query).mean())

    best = min(grid.tolist(), key=nll)
    assert -2.0 < best < 4.0  # an interior minimum
    assert abs(float(learner.log_predictive_temperature.detach()) - best) <= 0.011  # half a grid step


@pytest.mark.parametrize("cls", [BMAML, EMAML])
def test_fit_learns_the_temperature_and_adapt_and_checkpoints_carry_it(cls):
    family = SubspaceClassification()
    learner = _learner(family, True, cls=cls)
    learner.fit(family, 60, lr=5e-2, seed=0, progress=False, select_steps=False)
    t = learner.predictive_temperature
    assert t != 1.0 and math.isfinite(t)
    assert learner.describe()["predictive_temperature"] == t
    assert learner.config()["learn_predictive_temperature"] is True
    tasks = family.evaluation_tasks(10)
    post = learner.adapt(tasks.x_support, tasks.y_support)
    assert post.temperature == t and post.task(0).temperature == t
    again = _learner(family, True, seed=1, cls=cls)
    again.load_state_dict(learner.state_dict())
    assert again.predictive_temperature == t
    # a learner without it: no parameter, no config key, and a state saved before the
    # temperature existed (no key) loads
    off = _learner(family, False, cls=cls)
    assert off.predictive_temperature == 1.0 and "learn_predictive_temperature" not in off.config()
    state = off.state_dict()
    del state["log_predictive_temperature"]
    off.load_state_dict(state)


def test_step_count_selection_refits_the_temperature_for_each_count():
    """Each candidate count is scored at the temperature that minimises its query NLL on
    the selection tasks; the chosen count's temperature is the learner's afterwards, and
    its NLL is the tempered posterior's there (a minimum: nudging T either way is worse)."""
    family = SubspaceClassification()
    learner = _learner(family, True)
    learner.fit(family, 60, lr=5e-2, seed=0, progress=False, select_steps=False)
    tasks = family.sample(30, torch.Generator().manual_seed(8))
    report = learner.select_adapt_steps(tasks, candidates=[1, 3, 6])
    assert len(report["temperature"]) == 3 and len(set(report["temperature"])) == 3
    best = report["steps"].index(report["chosen"])
    t = learner.predictive_temperature
    assert math.isclose(t, report["temperature"][best], rel_tol=1e-6)
    for i, n in enumerate(report["steps"]):
        adapted = learner.adapt(tasks.x_support, tasks.y_support, num_steps=n)

        def nll(temperature):
            post = ParticlePosterior(adapted.potential, adapted.particles, tasks.x_support,
                                     tasks.y_support, temperature=temperature)
            return -float(post.log_predictive_density(tasks.x_query, tasks.y_query).mean())

        fitted = report["temperature"][i]
        assert 1e-2 < fitted < 1e2  # an interior minimum on these tasks
        assert math.isclose(nll(fitted), report["nll"][i], rel_tol=1e-5)
        assert nll(fitted) < min(nll(fitted * 1.05), nll(fitted / 1.05))
