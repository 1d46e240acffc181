"""Meta-learners: chaser loss semantics, meta-gradients, baselines, training, checkpoints."""

import math

import pyro
import pytest
import torch

import pyro_bmaml as pb
from pyro_bmaml.meta import BMAML, EMAML, MAML
from pyro_bmaml.models import BayesianMLP
from pyro_bmaml.tasks import Sinusoid
from pyro_bmaml.training import evaluate, fit


def tiny_model():
    return BayesianMLP(hidden=(4,))


def tiny_batch(dtype=torch.float64, tasks=2, k=4, seed=0):
    src = Sinusoid(num_tasks=10, num_support=k, seed=seed)
    return src.sample(tasks, torch.Generator().manual_seed(seed)).to(dtype)


def _bmaml64(**kw):
    torch.set_default_dtype(torch.float64)
    model = tiny_model()
    kw.setdefault("kernel", pb.RBFSteinKernel(detach_bandwidth=False))
    learner = BMAML(model, num_particles=3, step_size=1e-2, init="paper", **kw)
    learner.theta0.data = learner.theta0.data.double()
    return learner


def test_leader_is_detached_meta_gradient_goes_through_chaser_only():
    learner = _bmaml64()
    batch = tiny_batch()
    learner.meta_loss(batch).backward()
    grad = learner.theta0.grad.clone()
    # explicit: vector-Jacobian product of the chaser with 2 (chaser - leader) / T
    theta0 = learner.theta0.detach().requires_grad_()
    chaser = pb.transport(learner.potential, learner.kernel, theta0.expand(2, -1, -1),
                          batch.x_support, batch.y_support, num_steps=1, step_size=1e-2)
    xa = torch.cat([batch.x_support, batch.x_query], 1)
    ya = torch.cat([batch.y_support, batch.y_query], 1)
    leader = pb.transport(learner.potential, learner.kernel, chaser.detach(), xa, ya,
                          num_steps=1, step_size=1e-2)
    # only the network sites enter the distance (the precisions are left out, as upstream)
    mask = learner._distance_columns.double()
    assert 0 < mask.sum() < mask.numel()
    (explicit,) = torch.autograd.grad(chaser, theta0,
                                      grad_outputs=2 * (chaser - leader) * mask / 2,
                                      retain_graph=True)
    assert torch.allclose(grad, explicit, rtol=1e-8, atol=1e-10)
    # without the stop-gradient the gradient would differ: the test has power
    leader_graph = pb.transport(learner.potential, learner.kernel, chaser, xa, ya,
                                num_steps=1, step_size=1e-2)
    (no_stop,) = torch.autograd.grad(
        ((chaser - leader_graph) * mask).pow(2).sum((-1, -2)).mean(), theta0)
    assert not torch.allclose(no_stop, explicit, rtol=1e-3)


def test_chaser_meta_gradient_matches_finite_differences():
    learner = _bmaml64()
    batch = tiny_batch()
    learner.meta_loss(batch).backward()
    grad = learner.theta0.grad.clone()
    theta_star = learner.theta0.detach().clone()
    xa = torch.cat([batch.x_support, batch.x_query], 1)
    ya = torch.cat([batch.y_support, batch.y_query], 1)

    def chaser(theta):
        return pb.transport(learner.potential, learner.kernel, theta.expand(2, -1, -1),
                            batch.x_support, batch.y_support, num_steps=1, step_size=1e-2)

    # the leader is a constant target (stop-gradient): fix it at theta0
    leader = pb.transport(learner.potential, learner.kernel, chaser(theta_star), xa, ya,
                          num_steps=1, step_size=1e-2)

    mask = learner._distance_columns.double()

    def loss(theta):
        return ((chaser(theta) - leader) * mask).pow(2).sum((-1, -2)).mean()

    g = torch.Generator().manual_seed(1)
    for _ in range(6):
        d = torch.randn(theta_star.shape, generator=g)
        eps = 1e-6
        fd = (loss(theta_star + eps * d) - loss(theta_star - eps * d)) / (2 * eps)
        assert torch.allclose((grad * d).sum(), fd, rtol=1e-5, atol=1e-8)


def test_distance_sites():
    model = tiny_model()
    auto = BMAML(model, num_particles=3, init="paper")
    assert auto.distance_sites == model.chaser_sites
    everything = BMAML(model, num_particles=3, init="paper",
                       distance_sites=auto.potential.site_names)
    assert everything._distance_columns is None
    batch = tiny_batch(torch.float32)
    everything.theta0.data = auto.theta0.data.clone()
    # leaving the precisions out drops terms from the sum: a smaller loss
    assert auto.meta_loss(batch) < everything.meta_loss(batch)
    with pytest.raises(ValueError, match="unknown \\['gamma'\\]"):
        BMAML(model, num_particles=3, distance_sites=["gamma"])


def test_bfa_meta_gradient_matches_finite_differences():
    learner = _bmaml64(objective="bfa")
    batch = tiny_batch()
    theta = learner.theta0.detach().clone().requires_grad_()

    def loss(t):
        return torch.func.functional_call(learner, {"theta0": t}, (batch,))

    assert torch.autograd.gradcheck(loss, (theta,), eps=1e-6, atol=1e-5, rtol=1e-4)


def test_bmaml_without_repulsion_is_emaml():
    """A vanishing bandwidth gives K = I and no repulsion: phi_i = grad_i / M."""
    torch.set_default_dtype(torch.float64)
    model = tiny_model()
    batch = tiny_batch()
    bmaml = BMAML(model, num_particles=4, step_size=4e-2, init="paper",
                  kernel=pb.RBFSteinKernel(bandwidth=1e-12))
    emaml = EMAML(model, num_particles=4, step_size=1e-2, init=bmaml.theta0.detach().clone())
    a = bmaml.adapt(batch.x_support, batch.y_support, num_steps=3).particles
    b = emaml.adapt(batch.x_support, batch.y_support, num_steps=3).particles
    assert torch.allclose(a, b, rtol=1e-10, atol=1e-10)


def test_maml_is_emaml_with_one_particle():
    torch.set_default_dtype(torch.float64)
    batch = tiny_batch()
    maml = MAML(tiny_model(), step_size=1e-2, init="paper")
    emaml = EMAML(tiny_model(), num_particles=1, step_size=1e-2, init=maml.theta0.detach().clone())
    assert maml.theta0.shape[0] == 1
    assert torch.allclose(maml.meta_loss(batch), emaml.meta_loss(batch))


@pytest.mark.parametrize("cls,iterations", [(BMAML, 300), (EMAML, 150)])
def test_meta_training_lowers_held_out_mse(cls, iterations):
    """A real learning signal with a small budget (fixed seed)."""
    pyro.set_rng_seed(0)
    tasks = Sinusoid(num_tasks=100, num_support=10, seed=0)
    held_out = tasks.evaluation_tasks(50)
    learner = cls(BayesianMLP(hidden=(40, 40)), num_particles=5, init="paper")
    before = evaluate(learner, held_out)["per_task"]["mse"]
    learner.fit(tasks, iterations, lr=3e-3, progress=False)
    after = evaluate(learner, held_out)["per_task"]["mse"]
    # sign test: with no learning, each task improves with probability 1/2; demand a
    # fraction of improved tasks 3 binomial standard deviations above 1/2
    improved = (after < before).double().mean().item()
    assert improved > 0.5 + 3 * 0.5 / math.sqrt(50), (improved, before.mean(), after.mean())


def test_checkpoint_resume_gives_the_same_trajectory(tmp_path):
    def run(path, stop_after=None):
        pyro.set_rng_seed(0)
        learner = BMAML(tiny_model(), num_particles=3, init="paper")
        tasks = Sinusoid(num_tasks=20, num_support=5, seed=1)
        return learner, fit(learner, tasks, 6, meta_batch_size=4, checkpoint=path,
                            checkpoint_every=2, progress=False, stop_after=stop_after,
                            decay_every=2, lr=1e-2)

    ref_learner, ref = run(None)
    path = tmp_path / "ckpt.pt"
    run(str(path), stop_after=3)
    state = torch.load(path, weights_only=True)
    assert state["iteration"] == 3
    resumed_learner, resumed = run(str(path))
    assert resumed["loss"] == ref["loss"]
    assert torch.equal(resumed_learner.theta0, ref_learner.theta0)
    assert not list(tmp_path.glob("*.tmp"))  # atomic write leaves no temp file


def test_non_finite_meta_loss_names_the_iteration(monkeypatch):
    learner = EMAML(tiny_model(), num_particles=2, init="paper")
    calls = {"n": 0}
    original = learner.meta_loss

    def flaky(batch):
        calls["n"] += 1
        loss = original(batch)
        return loss * float("nan") if calls["n"] == 3 else loss

    monkeypatch.setattr(learner, "meta_loss", flaky)
    with pytest.raises(FloatingPointError, match="meta-iteration 2"):
        learner.fit(Sinusoid(num_tasks=20, num_support=5), 5, meta_batch_size=2, progress=False)


def test_bad_inputs():
    model = tiny_model()
    with pytest.raises(ValueError, match="num_particles must be >= 2"):
        BMAML(model, num_particles=1)
    with pytest.raises(ValueError, match="objective must be one of"):
        BMAML(model, objective="elbo")
    with pytest.raises(ValueError, match="init must have shape"):
        EMAML(model, num_particles=3, init=torch.zeros(2, 5))
    with pytest.raises(ValueError, match="init must be one of"):
        EMAML(model, init="xavier")
    learner = BMAML(model, num_particles=3, init="paper")
    x, y = torch.randn(5, 1), torch.randn(5)
    with pytest.raises(ValueError, match="support set is empty"):
        learner.adapt(x[:0], y[:0])
    with pytest.raises(ValueError, match="x must be"):
        learner.adapt(x, y[:3])
    with pytest.raises(ValueError, match="y contains non-finite"):
        learner.adapt(x, y * float("inf"))
    batch = tiny_batch(torch.float32)
    with pytest.raises(ValueError, match="x_query must have 3 dims"):
        learner.meta_loss(batch._replace(x_query=batch.x_query[0]))
    with pytest.raises(ValueError, match="y_support contains non-finite"):
        learner.meta_loss(batch._replace(y_support=batch.y_support * float("nan")))
    with pytest.raises(ValueError, match="support set is empty"):
        learner.meta_loss(batch._replace(x_support=batch.x_support[:, :0],
                                         y_support=batch.y_support[:, :0]))
    with pytest.raises(TypeError, match="example_args"):
        BMAML(lambda x, y: None)


def test_adapt_returns_a_usable_posterior():
    pyro.set_rng_seed(0)
    learner = BMAML(BayesianMLP(hidden=(8,)), num_particles=4, init="paper")
    x = torch.linspace(-3, 3, 6)[:, None]
    y = torch.sin(x[:, 0])
    post = learner.adapt(x, y)
    xq = torch.linspace(-4, 4, 7)[:, None]
    pred = post.predict(xq, num_samples=5)
    assert pred["particle_means"].shape == (4, 7) and pred["mean"].shape == (7,)
    assert pred["samples"].shape == (20, 7)
    named = post.named
    manual = learner.model.forward({k: v for k, v in named.items()}, xq)
    assert torch.allclose(pred["particle_means"], manual, atol=1e-5)
    # mixture log density by hand
    noise_sd = named["noise_precision"].rsqrt()[:, None]
    yq = torch.cos(xq[:, 0])
    comp = torch.distributions.Normal(manual, noise_sd).log_prob(yq)
    expected = torch.logsumexp(comp, 0) - math.log(4)
    assert torch.allclose(post.log_predictive_density(xq, yq), expected, atol=1e-4)
