"""Meta-learners: chaser loss semantics, meta-gradients, baselines, training, checkpoints."""

import math

import pyro
import pytest
import torch

import pyro_bmaml as pb
from pyro_bmaml.meta.learners import BMAML, EMAML, MAML
from pyro_bmaml.tasks.models import BayesianMLP
from pyro_bmaml.tasks.base import Sinusoid
from pyro_bmaml.meta.training import evaluate, fit


def tiny_model():
    return BayesianMLP(hidden=(4,))


def tiny_batch(dtype=torch.float64, tasks=2, k=4, seed=0):
    src = Sinusoid(num_tasks=10, num_support=k, seed=seed)
    return src.sample(tasks, torch.Generator().manual_seed(seed)).to(dtype)


def _bmaml64(**kw):
    torch.set_default_dtype(torch.float64)
    model = tiny_model()
    kw.setdefault("kernel", pb.RBFSteinKernel(detach_bandwidth=False))
    kw.setdefault("calibration", "none")  # the chaser alone; query_nll is tested below
    kw.setdefault("init", "paper")
    # the chaser's own math: a fixed step, the meta-gradient reaching every coordinate
    kw.setdefault("learn_step_size", False)
    kw.setdefault("chaser_trains_noise", True)
    kw.setdefault("inner_steps", 1)
    learner = BMAML(model, num_particles=3, step_size=1e-2, **kw)
    learner.theta0.data = learner.theta0.data.double()
    return learner


def _chaser_and_leader(learner, theta0, batch, step=1e-2):
    """By hand: the chaser (one SVGD step on the support) from ``theta0`` (M, D), with its
    graph, and the leader (one more step on support + query), a constant."""
    chaser = pb.transport(learner.potential, learner.kernel, theta0.expand(2, -1, -1),
                          batch.x_support, batch.y_support, num_steps=1, step_size=step)
    xa = torch.cat([batch.x_support, batch.x_query], 1)
    ya = torch.cat([batch.y_support, batch.y_query], 1)
    leader = pb.transport(learner.potential, learner.kernel, chaser.detach(), xa, ya,
                          num_steps=1, step_size=step)
    return chaser, leader


def test_leader_is_detached_meta_gradient_goes_through_chaser_only():
    learner = _bmaml64()
    batch = tiny_batch()
    learner.meta_loss(batch).backward()
    grad = learner.theta0.grad.clone()
    # explicit: vector-Jacobian product of the chaser with 2 (chaser - leader) / T
    theta0 = learner.theta0.detach().requires_grad_()
    chaser, leader = _chaser_and_leader(learner, theta0, batch)
    xa = torch.cat([batch.x_support, batch.x_query], 1)
    ya = torch.cat([batch.y_support, batch.y_query], 1)
    # only the network sites enter the distance (the precisions are left out, as upstream)
    mask = learner.distance_weights
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

    mask = learner.distance_weights

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
    assert bool((everything.distance_weights == 1).all())
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
    bmaml = BMAML(model, num_particles=4, step_size=4e-3, init="paper",
                  kernel=pb.RBFSteinKernel(bandwidth=1e-12))
    emaml = EMAML(model, num_particles=4, step_size=1e-3, init=bmaml.theta0.detach().clone(),
                  objective="log_joint")  # gradient ascent on the log joint, as SVGD's drift
    a = bmaml.adapt(batch.x_support, batch.y_support, num_steps=3).particles
    b = emaml.adapt(batch.x_support, batch.y_support, num_steps=3).particles
    assert torch.allclose(a, b, rtol=1e-10, atol=1e-10)


def test_maml_inner_step_is_finns_step():
    """MAML's adaptation equals a hand-written Finn et al. step on the network's weights:
    theta' = theta - alpha * grad mean_n (f(x_n) - y_n)^2; precisions do not move."""
    torch.set_default_dtype(torch.float64)
    batch = tiny_batch()
    model = tiny_model()
    maml = MAML(model, step_size=1e-2, init="paper")
    assert maml.objective == "mse" and maml.step_size == 1e-2
    adapted = maml.adapt(batch.x_support, batch.y_support).named
    start = maml.potential.unpack(maml.theta0.detach()[0])
    for t in range(batch.num_tasks):
        weights = {k: v.clone().requires_grad_() for k, v in start.items() if k.startswith("layer")}
        mse = (model.forward(weights, batch.x_support[t]) - batch.y_support[t]).pow(2).mean()
        grads = torch.autograd.grad(mse, list(weights.values()))
        for (name, w), g in zip(weights.items(), grads):
            assert torch.allclose(adapted[name][t, 0], w - 1e-2 * g, atol=1e-12), name
        for name in ("weight_precision", "noise_precision"):
            assert torch.allclose(adapted[name][t, 0], start[name])
    # the meta-loss is the query MSE of the adapted network (plus the noise-only NLL term)
    loss = maml.meta_loss(batch)
    query = torch.stack([
        (model.forward({k: v[t, 0] for k, v in adapted.items()}, batch.x_query[t])
         - batch.y_query[t]).pow(2).mean() for t in range(batch.num_tasks)]).mean()
    assert math.isclose(maml.loss_terms["query_mse"], query.item(), rel_tol=1e-10)
    assert math.isclose(loss.item(), query.item() + maml.loss_terms["calibration_nll"], rel_tol=1e-10)


def test_emaml_with_one_particle_is_maml():
    torch.set_default_dtype(torch.float64)
    batch = tiny_batch()
    maml = MAML(tiny_model(), step_size=1e-2, init="paper")
    emaml = EMAML(tiny_model(), num_particles=1, step_size=1e-2,
                  init=maml.theta0.detach().clone())
    maml.meta_loss(batch).backward()
    emaml.meta_loss(batch).backward()
    assert torch.allclose(maml.theta0.grad, emaml.theta0.grad, rtol=1e-12, atol=1e-14)
    # the paper's defaults differ: Finn's alpha for MAML, the official EMAML's for EMAML
    assert MAML(tiny_model()).step_size == 1e-2 and EMAML(tiny_model()).step_size == 1e-3


def _query_nll_by_hand(learner, particles, batch):
    """Query mixture NLL per point of a BayesianMLP posterior, written out."""
    named = learner.potential.unpack(particles)
    t, m = particles.shape[:2]
    mean = torch.stack([torch.stack([learner.model.forward(
        {k: v[i, j] for k, v in named.items()}, batch.x_query[i]) for j in range(m)])
        for i in range(t)])  # (T, M, Q)
    sd = named["noise_precision"].rsqrt()[..., None]
    log_lik = torch.distributions.Normal(mean, sd).log_prob(batch.y_query[:, None])
    return -(torch.logsumexp(log_lik, 1) - math.log(m)).mean()


def test_noise_offset_is_learned_by_the_query_nll_alone():
    """The default calibration: theta0's gradient is the uncalibrated chaser's, exactly; the
    offset's is the derivative of the query NLL of the shifted adapted particles."""
    torch.set_default_dtype(torch.float64)
    batch = tiny_batch()
    learner = _bmaml64(calibration="noise_offset")
    assert learner.noise_sites == ["noise_precision"] and learner.noise_offset.shape == (1,)
    with torch.no_grad():
        learner.noise_offset.fill_(-0.7)
    plain = _bmaml64(calibration="none", init=learner.theta0.detach().clone())
    learner.meta_loss(batch).backward()
    plain.meta_loss(batch).backward()
    assert torch.equal(learner.theta0.grad, plain.theta0.grad)
    chaser = plain.adapt_particles(plain._expand(2).detach(), (batch.x_support, batch.y_support), 1)
    offset = torch.tensor([-0.7], requires_grad=True)
    shifted = chaser + learner.noise_mask * offset.sum()  # the noise column moves by -0.7
    (expected,) = torch.autograd.grad(_query_nll_by_hand(learner, shifted, batch), offset)
    assert torch.allclose(learner.noise_offset.grad, expected, rtol=1e-8)
    # the learner's posterior carries the offset; its adaptation is the uncalibrated one
    post = learner.adapt(batch.x_support, batch.y_support)
    assert torch.allclose(post.particles, shifted.detach(), atol=1e-12)
    # the offset has its own, larger learning rate in fit's optimizer
    groups = learner.optimizer_groups(1e-3)
    assert groups[1]["params"][0] is learner.noise_offset and groups[1]["lr"] == 1e-2


def test_initial_noise_calibration_routes_gradients():
    """calibration='initial_noise': the network coordinates get the chaser loss's gradient
    with the noise held fixed, the noise coordinates only the query-NLL term's (first order)."""
    torch.set_default_dtype(torch.float64)
    batch = tiny_batch()
    learner = _bmaml64(calibration="initial_noise")
    assert learner.noise_sites == ["noise_precision"]
    noise = learner.noise_mask
    learner.meta_loss(batch).backward()
    grad = learner.theta0.grad
    reference = _bmaml64(calibration="none", init=learner.theta0.detach().clone())
    theta = reference.theta0.detach().clone().requires_grad_()
    fixed = torch.where(noise, theta.detach(), theta)  # noise coordinates held fixed
    chaser, leader = _chaser_and_leader(reference, fixed, batch)
    chaser_loss = ((chaser - leader).pow(2) * reference.distance_weights).sum((-1, -2)).mean()
    (g_net,) = torch.autograd.grad(chaser_loss, theta)
    assert torch.allclose(grad[:, ~noise], g_net[:, ~noise], rtol=1e-8, atol=1e-12)
    # noise coordinates: d/d(adapted noise) of the query mixture NLL per point, by hand
    adapted = chaser.detach().clone().requires_grad_()
    (g_noise,) = torch.autograd.grad(_query_nll_by_hand(reference, adapted, batch), adapted)
    assert torch.allclose(grad[:, noise], g_noise.sum(0)[:, noise], rtol=1e-8, atol=1e-12)
    assert bool((g_noise[..., noise].abs() > 0).all())


# EMAML's meta-gradient equals MAML's at M = 1 (test_emaml_with_one_particle_is_maml); its
# paper step (1e-3 on the MSE) learns too slowly for a per-task test at this budget
@pytest.mark.parametrize("cls,iterations", [(BMAML, 300), (MAML, 300)])
def test_meta_training_lowers_held_out_mse(cls, iterations):
    """A real learning signal with a small budget (fixed seed)."""
    pyro.set_rng_seed(0)
    tasks = Sinusoid(num_tasks=100, num_support=10, seed=0)
    held_out = tasks.evaluation_tasks(50)
    kw = {} if cls is MAML else {"num_particles": 5}
    learner = cls(BayesianMLP(hidden=(40, 40)), init="paper", **kw)
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
    with pytest.raises(ValueError, match="x_query must have a leading task dim 2"):
        learner.meta_loss(batch._replace(x_query=batch.x_query[0]))
    with pytest.raises(ValueError, match=r"x_support .* and x_query .* must share"):
        learner.meta_loss(batch._replace(x_query=batch.x_query[..., 0]))
    with pytest.raises(TypeError, match="x_support must be a floating tensor"):
        learner.meta_loss(batch._replace(x_support=batch.x_support.long()))
    with pytest.raises(ValueError, match="input_shape=\\(1,\\)"):
        learner.adapt(torch.randn(5, 2), y)
    with pytest.raises(ValueError, match="y_support contains non-finite"):
        learner.meta_loss(batch._replace(y_support=batch.y_support * float("nan")))
    with pytest.raises(ValueError, match=r"x_support has no points \(K = 0"):
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


def _linear_learner(seed, **kw):
    from models_for_tests import LinearTasks, linear_regression

    pyro.set_rng_seed(seed)
    tasks = LinearTasks(seed=seed)
    held_out = tasks.evaluation_tasks(200)
    learner = BMAML(linear_regression, num_particles=10, step_size=5e-2,
                    example_args=(held_out.x_support[0], held_out.y_support[0]), **kw)
    return learner, tasks, held_out


def _learned_noise_sd(learner):
    """The meta-learned noise level: the initial particles' noise precision, offset."""
    log_tau = learner.theta0.detach()[:, learner.noise_mask] + learner.noise_offset.detach()
    return (-0.5 * log_tau).exp()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_user_model_noise_scale_neither_collapses_nor_runs_away(seed):
    """A user's linear regression with a learned noise precision (true noise sd 0.3), the
    default calibration, a few hundred meta-iterations: the learned noise sd stays within a
    factor ~3 of the truth (it also absorbs the few-step posterior's error, so it sits above
    0.3), and the noise sites were found without being named."""
    learner, tasks, _ = _linear_learner(seed, inner_steps=3)
    assert learner.noise_sites == ["tau"] and learner.distance_sites == ["w"]
    assert learner.calibration == "noise_offset"
    learner.fit(tasks, 300, lr=1e-2, progress=False, seed=seed)
    sd = _learned_noise_sd(learner)
    assert bool(torch.isfinite(sd).all())
    assert 0.1 < sd.mean().item() < 1.0, sd


def test_linear_regression_coverage_is_near_nominal():
    """Default BMAML on a small simulated task family (linear tasks, noise sd 0.3, K = 5):
    after 600 meta-iterations the 50% and 90% central predictive intervals on 200 held-out
    tasks x 50 points cover near their nominal level. The band ([0.40, 0.60] / [0.80, 0.95],
    the families suite's) is the calibration target; the sampling error of the coverage
    estimate (s.e. over tasks, <= 0.01) is far inside it."""
    learner, tasks, held_out = _linear_learner(0, inner_steps=5)
    learner.fit(tasks, 600, lr=1e-2, progress=False, seed=0)
    m = evaluate(learner, held_out, closed_form=True, widths=False)
    c50, c90 = m["coverage"][0.5], m["coverage"][0.9]
    assert c50[1] < 0.01 and c90[1] < 0.01
    assert 0.40 <= c50[0] <= 0.60 and 0.80 <= c90[0] <= 0.95, (c50, c90)


def test_fit_chooses_the_adaptation_steps_on_held_out_tasks(tmp_path):
    """``fit`` ends by scoring the adaptation at inner_steps x (1, 2, 3, 5, 10) on 1,000
    fresh tasks of the source (a generator of its own, adapted in chunks) and keeps the
    count with the lowest query NLL; ``adapt`` then uses it, the checkpoint keeps it, and
    ``select_steps=False`` leaves ``inner_steps``."""
    learner, tasks, _ = _linear_learner(0, inner_steps=2)
    path = tmp_path / "ckpt.pt"
    history = learner.fit(tasks, 20, lr=1e-2, progress=False, seed=0, checkpoint=str(path))
    chosen = history["adapt_steps"]
    assert chosen["steps"] == [2, 4, 6, 10, 20]
    batch = tasks.sample(1000, torch.Generator().manual_seed(1))  # the selection's tasks
    per_task = {n: -learner.adapt(batch.x_support, batch.y_support, num_steps=n)
                .log_predictive_density(batch.x_query, batch.y_query).double().mean(-1)
                for n in chosen["steps"]}
    nll = [float(per_task[n].mean()) for n in chosen["steps"]]
    assert nll == pytest.approx(chosen["nll"], rel=1e-6)
    best = chosen["steps"][min(range(5), key=nll.__getitem__)]
    se = [float((per_task[n] - per_task[best]).std() / math.sqrt(1000)) for n in chosen["steps"]]
    assert se == pytest.approx(chosen["se"], rel=1e-6, abs=1e-12)
    expected = best
    assert chosen["chosen"] == expected == learner.adapt_steps
    # chunked adaptation scores the same tasks alike
    assert learner.select_adapt_steps(batch, chunk=300)["nll"] == pytest.approx(chosen["nll"],
                                                                                 rel=1e-6)
    assert learner.adapt(batch.x_support[0], batch.y_support[0]).info["num_steps"] == expected
    assert learner.describe()["adapt_steps"] == expected
    assert "adapt_steps" not in learner.config()  # a learned value, not configuration
    # the checkpoint keeps it; a state saved before the count existed loads as inner_steps
    loaded, _, _ = _linear_learner(0, inner_steps=2)
    loaded.load_checkpoint(path)
    assert loaded.adapt_steps == expected
    old = {k: v for k, v in learner.state_dict().items() if k != "selected_steps"}
    loaded.load_state_dict(old)
    assert loaded.adapt_steps == 2
    # a count that does no step from particles started as broad prior draws loses
    assert learner.select_adapt_steps(batch, candidates=[0, 2])["chosen"] == 2
    plain, _, _ = _linear_learner(0, inner_steps=2)
    assert "adapt_steps" not in plain.fit(tasks, 5, lr=1e-2, progress=False, select_steps=False)
    assert plain.adapt_steps == 2
    plain.adapt_steps = 7
    assert plain.adapt_steps == 7
    plain.adapt_steps = None
    assert plain.adapt_steps == 2


class _Hidden:
    """A user's wrapper of a finite pool that does not pass ``num_tasks`` on."""

    def __init__(self, pool):
        self.pool = pool

    def sample(self, batch_size, generator):
        return self.pool.sample(batch_size, generator)


def test_fit_keeps_its_training_when_the_source_cannot_give_the_selection_tasks():
    """A finite pool behind a wrapper that hides its size cannot give the selection's 1,000
    tasks: ``fit`` warns, says why, keeps ``inner_steps`` and returns its history instead of
    raising after the training (found in CI: a 20-task pool behind a test's wrapper)."""
    learner, _, held_out = _linear_learner(0, inner_steps=2)
    pool = pb.TaskPool(held_out[:20])
    with pytest.warns(UserWarning, match=r"not chosen: the task source could not give 1000 "
                                         r"held-out tasks \(batch_size \(1000\) exceeds"):
        history = learner.fit(_Hidden(pool), 3, meta_batch_size=4, progress=False)
    assert "adapt_steps" not in history and len(history["loss"]) == 3
    assert learner.adapt_steps == learner.inner_steps == 2
    # the pool itself says its size, and the selection takes all of it
    chosen = learner.fit(pool, 1, meta_batch_size=4, progress=False)["adapt_steps"]
    assert chosen["chosen"] == learner.adapt_steps


def test_select_adapt_steps_skips_counts_whose_adaptation_diverges(monkeypatch):
    """A count whose adaptation takes a non-finite step (the SVGD step's FloatingPointError)
    scores inf and is never chosen, and the longer counts, which repeat its steps, are not
    run; the training that came before is kept."""
    learner, tasks, held_out = _linear_learner(0, inner_steps=2)
    adapt, asked = learner.adapt, []

    def diverging(x, y, num_steps=None, **kw):
        asked.append(num_steps)
        if num_steps >= 6:
            raise FloatingPointError("SVGD step 5: the log density is non-finite")
        return adapt(x, y, num_steps=num_steps, **kw)

    monkeypatch.setattr(learner, "adapt", diverging)
    chosen = learner.select_adapt_steps(held_out)
    assert chosen["diverged"] == [6, 10, 20] and chosen["nll"][2:] == [math.inf] * 3
    assert asked == [2, 4, 6] and chosen["chosen"] in (2, 4)
    assert math.isfinite(chosen["nll"][0]) and math.isfinite(chosen["nll"][1])


def test_select_adapt_steps_rejects_bad_input():
    learner, tasks, held_out = _linear_learner(0, inner_steps=2)
    with pytest.raises(TypeError, match="candidates must be a non-empty list"):
        learner.select_adapt_steps(held_out, candidates=[])
    with pytest.raises(ValueError, match="candidates"):
        learner.select_adapt_steps(held_out, candidates=[1, -1])
    with pytest.raises(ValueError, match="at least 2 tasks"):
        learner.select_adapt_steps(held_out[:1])
    with pytest.raises(ValueError, match="adapt_steps"):
        learner.adapt_steps = -2
    with pytest.raises(TypeError, match="adapt_steps"):
        learner.adapt_steps = 2.5
    with pytest.raises(TypeError, match="select_steps must be a bool"):
        learner.fit(tasks, 1, select_steps="no", progress=False)


def test_schedule_decays_over_the_nominal_budget():
    """As the official code: lr x0.98 every 1% of the nominal budget, whatever the run length."""
    learner = EMAML(tiny_model(), num_particles=2, init="paper")
    tasks = Sinusoid(num_tasks=20, num_support=5)
    history = learner.fit(tasks, 30, meta_batch_size=2, progress=False, schedule_iterations=1000)
    assert history["lr"][8] == pytest.approx(1e-3) and history["lr"][9] == pytest.approx(0.98e-3)
    assert history["lr"][29] == pytest.approx(1e-3 * 0.98 ** 3)
    short = learner.fit(tasks, 30, meta_batch_size=2, progress=False)  # default: this run's
    assert short["lr"][0] == pytest.approx(0.98e-3)
    assert history["terms"][0].keys() == {"query_mse", "calibration_nll"}


def test_non_finite_meta_gradient_is_never_stepped_or_saved(tmp_path, monkeypatch):
    """Fault injection: at meta-iteration 2 the loss is finite but its gradient is NaN. Training
    stops naming the iteration and the likely cause; the checkpoint on disk still holds
    iteration 2's finite state, and resuming from it follows the clean run exactly."""
    def make():
        pyro.set_rng_seed(0)
        return EMAML(tiny_model(), num_particles=2, init="paper")

    tasks = Sinusoid(num_tasks=20, num_support=5)
    clean = make()
    clean.fit(tasks, 5, meta_batch_size=2, progress=False)

    learner = make()
    original = learner.meta_loss
    calls = {"n": 0}

    def faulty(batch):
        calls["n"] += 1
        loss = original(batch)
        if calls["n"] == 3:  # sqrt at 0: value 0, gradient NaN
            loss = loss + torch.sqrt(torch.zeros(()) * learner.theta0.sum())
        return loss

    monkeypatch.setattr(learner, "meta_loss", faulty)
    path = tmp_path / "ckpt.pt"
    with pytest.raises(FloatingPointError,
                       match="meta-iteration 2: non-finite meta-gradient; likely cause: the meta "
                             "learning rate .* still holds the last good state"):
        learner.fit(tasks, 5, meta_batch_size=2, progress=False, checkpoint=str(path),
                    checkpoint_every=1)
    state = torch.load(path, weights_only=True)
    assert state["iteration"] == 2
    assert all(bool(torch.isfinite(v).all()) for v in state["learner"].values())
    monkeypatch.undo()
    resumed = make()
    resumed.fit(tasks, 5, meta_batch_size=2, progress=False, checkpoint=str(path))
    assert torch.equal(resumed.theta0, clean.theta0)


def test_divergence_inside_adaptation_names_the_meta_iteration():
    learner = BMAML(tiny_model(), num_particles=3, init="paper", step_size=1e6, inner_steps=1)
    with pytest.raises(FloatingPointError, match="meta-iteration 0: SVGD step 0: .* likely "
                                                 "cause: the adaptation step size"):
        learner.fit(Sinusoid(num_tasks=20, num_support=5), 3, meta_batch_size=2, progress=False)


def test_noise_sites_found_or_warned():
    import pyro.distributions as dist

    def silent(x, y=None):  # returns nothing: the mean cannot be told from the noise
        tau = pyro.sample("tau", dist.Gamma(2.0, 1.0))
        w = pyro.sample("w", dist.Normal(0.0, 1.0))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("y", dist.Normal(w * x[:, 0], tau.rsqrt()), obs=y)

    x, y = torch.randn(4, 1), torch.randn(4)
    with pytest.warns(UserWarning, match="noise sites cannot be found"):
        learner = BMAML(silent, num_particles=3, example_args=(x, y))
    assert learner.noise_sites == [] and learner.calibration == "mixture"
    named = BMAML(silent, num_particles=3, example_args=(x, y), noise_sites=["tau"])
    assert named.calibration == "noise_offset" and named.distance_sites == ["w"]
    with pytest.raises(ValueError, match="unknown latent sites \\['sigma'\\]"):
        BMAML(silent, num_particles=3, example_args=(x, y), noise_sites=["sigma"])
    with pytest.raises(ValueError, match="needs noise sites"):
        EMAML(silent, num_particles=3, example_args=(x, y), calibration="noise_offset",
              noise_sites=None)


def test_noise_sites_of_a_saturating_classifier_under_a_broad_prior():
    # prior draws of a broad weight prior give logits so large that the class probabilities
    # are exactly one-hot: their derivative vanishes in every weight, and the weights were
    # taken for noise sites (the likelihood's derivative does not vanish)
    from pyro_bmaml.tasks.models import BayesianClassifier

    model = BayesianClassifier(5, (16,), hidden=(32, 32), prior_scale=30.0)
    x, y = torch.randn(6, 16), torch.arange(6) % 5
    pyro.set_rng_seed(0)
    learner = BMAML(model, num_particles=3, example_args=(x, y), calibration="none",
                    learn_step_size=True)
    assert learner.potential.noise_sites(x, y) == [] and learner.noise_sites == []
    assert learner.learned_step_sites == learner.potential.site_names


def test_resume_refuses_another_configuration_and_load_api(tmp_path):
    from pyro_bmaml.tasks.models import BayesianMLP

    def make(m=3):
        pyro.set_rng_seed(0)
        return BMAML(BayesianMLP(hidden=(6,)), num_particles=m, init="paper")

    tasks = Sinusoid(num_tasks=20, num_support=5)
    path = tmp_path / "ckpt.pt"
    trained = make()
    trained.fit(tasks, 4, meta_batch_size=2, progress=False, checkpoint=str(path))
    with pytest.raises(ValueError, match=r"lr: 0.001 \(saved\) != 0.01 \(now\)"):
        make().fit(tasks, 6, meta_batch_size=2, lr=0.01, progress=False, checkpoint=str(path))
    with pytest.raises(ValueError, match="inference_method: 'bmaml' \\(saved\\) != 'emaml'"):
        EMAML(BayesianMLP(hidden=(6,)), num_particles=3, init="paper").fit(
            tasks, 6, meta_batch_size=2, progress=False, checkpoint=str(path))
    with pytest.raises(ValueError, match="beyond num_iterations=2"):
        make().fit(tasks, 2, meta_batch_size=2, progress=False, checkpoint=str(path))
    loaded = make()
    state = loaded.load_checkpoint(path)
    assert state["iteration"] == 4 and torch.equal(loaded.theta0, trained.theta0)
    assert torch.equal(loaded.noise_offset, trained.noise_offset)
    with pytest.raises(ValueError, match="num_particles: 3 \\(saved\\) != 4"):
        make(4).load_checkpoint(path)
    prior = loaded.prior_particles()
    assert set(prior) == set(loaded.potential.site_names)
    assert prior["layer0.weight"].shape == (3, 1, 6) and bool((prior["noise_precision"] > 0).all())
    assert torch.allclose(prior["noise_precision"].log(),
                          loaded.theta0[:, loaded.noise_mask].squeeze(-1))


def test_learned_step_sizes_get_the_meta_gradient_of_the_chaser():
    """Meta-SGD's per-site steps (``learn_step_size``, BMAML's default) trained by the chaser
    distance (``step_size_objective="chaser"``): one log-step per
    non-noise site, the step of every coordinate of a site equal, the noise sites' step
    fixed, and the chaser loss's gradient in the log-steps equal to finite differences."""
    torch.set_default_dtype(torch.float64)
    learner = BMAML(tiny_model(), num_particles=3, step_size=1e-2, init="paper", inner_steps=1,
                    calibration="none", kernel=pb.RBFSteinKernel(detach_bandwidth=False),
                    step_size_objective="chaser")
    learner.theta0.data = learner.theta0.data.double()
    assert learner.learned_step_sites == [n for n in learner.potential.site_names
                                          if n not in learner.noise_sites]
    steps = learner.step_sizes
    assert torch.allclose(steps, torch.full_like(steps, 1e-2))
    assert "learned_step_sizes" in learner.describe()
    batch = tiny_batch()
    learner.meta_loss(batch).backward()
    grad = learner.log_step_size.grad.clone()
    xa = torch.cat([batch.x_support, batch.x_query], 1)
    ya = torch.cat([batch.y_support, batch.y_query], 1)
    theta0 = learner.theta0.detach().expand(2, -1, -1)

    def chaser(log_step):
        with torch.no_grad():
            learner.log_step_size.copy_(log_step)
            return pb.transport(learner.potential, learner.kernel, theta0, batch.x_support,
                                batch.y_support, num_steps=1, step_size=learner.step_sizes)

    start = learner.log_step_size.detach().clone()
    # the leader is a constant target (stop-gradient), adapted with the current steps scaled
    # by the support's share of its points (leader_step_scale="auto" with learned steps)
    share = batch.x_support.shape[1] / xa.shape[1]
    leader = pb.transport(learner.potential, learner.kernel, chaser(start), xa, ya,
                          num_steps=1, step_size=learner.step_sizes.detach() * share)

    def loss(log_step):
        return ((chaser(log_step) - leader).pow(2) * learner.distance_weights).sum((-1, -2)).mean()

    for i in range(start.numel()):
        e, eps = torch.zeros_like(start), 1e-6
        e[i] = 1.0
        fd = (loss(start + eps * e) - loss(start - eps * e)) / (2 * eps)
        assert torch.allclose(grad[i], fd, rtol=1e-5, atol=1e-8), (i, grad[i], fd)
    # the network's sites' steps are trained by the chaser; with one step, the weight
    # precision's step does not reach the distance (over the weights only)
    trained = [s in learner.distance_sites for s in learner.learned_step_sites]
    assert bool((grad[torch.tensor(trained)] != 0).all()), grad
    fixed = BMAML(tiny_model(), num_particles=3, init="paper", learn_step_size=False)
    assert fixed.log_step_size.numel() == 0 and "learned_step_sizes" not in fixed.describe()


def test_the_leaders_step_is_scaled_to_its_points_with_learned_steps():
    """``leader_step_scale="auto"`` (default): with learned steps the leader steps by the
    chaser's steps times K / (K + Q) (the log likelihood's gradient grows with the points),
    with fixed steps (the paper's) and on rollouts by the chaser's own; a float scales
    them; the chaser distance is taken to that leader."""
    from pyro_bmaml.tasks.models import GaussianMLPPolicy

    torch.set_default_dtype(torch.float64)
    batch = tiny_batch()  # K = 4 support, Q query points per task
    k, n = batch.x_support.shape[1], batch.x_support.shape[1] + batch.x_query.shape[1]
    assert n > k
    kw = dict(num_particles=3, step_size=1e-2, init="paper", calibration="none",
              step_size_objective="chaser")
    learned = BMAML(tiny_model(), **kw)
    assert learned.leader_step_size(batch) == pytest.approx(1e-2 * k / n)
    assert learned.config()["leader_step_scale"] == "auto"
    assert BMAML(tiny_model(), learn_step_size=False, **kw).leader_step_size(batch) is None
    assert BMAML(tiny_model(), leader_step_scale=0.5, **kw).leader_step_size(batch) == pytest.approx(5e-3)
    assert BMAML(tiny_model(), leader_step_scale=1.0, **kw).leader_step_size(batch) is None

    class Rollouts:  # a batch whose data depend on the particles: no points to count
        resample_each_step = True

    policy = BMAML(GaussianMLPPolicy(hidden=(4,)), num_particles=2, init="paper")
    assert policy.leader_step_size(Rollouts()) is None
    for bad in (0.0, -1.0, "half", float("nan")):
        with pytest.raises((ValueError, TypeError), match="leader_step_scale"):
            BMAML(tiny_model(), leader_step_scale=bad, **kw)
    # the meta-loss's chaser distance is to the scaled leader, not to the unscaled one
    learned.theta0.data = learned.theta0.data.double()
    loss = learned.meta_loss(batch)
    with torch.no_grad():
        chaser, _ = learned.adapt_on(batch, "support", learned._expand(2), learned.inner_steps)
        distances = {}
        for name, share in (("scaled", k / n), ("unscaled", 1.0)):
            leader, _ = learned.adapt_on(batch, "leader", chaser, 1, step_size=1e-2 * share)
            distances[name] = ((chaser - leader).pow(2) * learned.distance_weights).sum((-1, -2)).mean()
    torch.testing.assert_close(loss.detach(), distances["scaled"])
    assert not torch.allclose(distances["scaled"], distances["unscaled"])


def test_bfa_learns_the_noise_level_by_the_calibration_term():
    """``objective="bfa"`` on a model with noise sites meta-learns the noise offset by the
    calibration term, as the chaser does (default ``"noise_offset"``; before, its noise
    stayed at the initial draws: ``theta0``'s noise coordinates are cut from the graph), and
    its BFA term is unchanged; a calibration that adds to a chaser distance is refused."""
    torch.set_default_dtype(torch.float64)
    batch = tiny_batch()
    learner = _bmaml64(objective="bfa", calibration=None)
    assert learner.calibration == "noise_offset" and learner.has_calibration_term
    plain = _bmaml64(objective="bfa", calibration="none", init=learner.theta0.detach().clone())
    loss = learner.meta_loss(batch)
    assert set(learner.loss_terms) == {"bfa", "calibration_nll"}
    torch.testing.assert_close(loss.detach(), learner.loss_terms["bfa"] + learner.loss_terms["calibration_nll"])
    loss.backward()
    plain.meta_loss(batch).backward()
    assert torch.equal(learner.theta0.grad, plain.theta0.grad)  # the BFA term's alone
    assert bool((learner.noise_offset.grad != 0).all())
    for bad in ("distance", "mixture"):
        with pytest.raises(ValueError, match="does not have"):
            _bmaml64(objective="bfa", calibration=bad)


def test_learned_steps_are_bounded_by_the_priors_curvature():
    """Each learned step is at most ``2 / c``, ``c`` the log prior's curvature in the site:
    ``2 s^2`` for a ``Normal(0, s)`` prior, past which one step's pull toward the prior's
    mode overshoots it. The bound holds in ``step_sizes`` and in what the learner reports,
    and a log-step past it gets no gradient."""
    import pyro.distributions as dist

    def two_priors(x, y=None):
        a = pyro.sample("a", dist.Normal(0.0, 0.5))
        b = pyro.sample("b", dist.Normal(torch.zeros(3), 3.0).to_event(1))
        mean = a * x + b.sum()
        with pyro.plate("data", x.shape[0]):
            pyro.sample("y", dist.Normal(mean, 1.0), obs=y)
        return mean

    torch.set_default_dtype(torch.float64)
    x, y = torch.linspace(-1, 1, 5), torch.linspace(0, 1, 5)
    learner = BMAML(two_priors, num_particles=4, example_args=(x, y), step_size=0.1)
    assert learner.learned_step_sites == ["a", "b"]
    torch.testing.assert_close(learner.max_step_sizes, torch.tensor([0.5, 18.0]))
    with torch.no_grad():
        learner.log_step_size.copy_(torch.tensor([math.log(5.0), math.log(5.0)]))
    torch.testing.assert_close(learner.step_sizes, torch.tensor([0.5, 5.0, 5.0, 5.0]))
    assert learner.learned_step_sizes() == pytest.approx({"a": 0.5, "b": 5.0})
    learner.step_sizes.sum().backward()
    assert learner.log_step_size.grad[0] == 0 and learner.log_step_size.grad[1] == pytest.approx(15.0)
    # fixed steps: no bound to keep
    assert BMAML(two_priors, num_particles=4, example_args=(x, y),
                 learn_step_size=False).max_step_sizes.numel() == 0


def test_default_chaser_leaves_the_initial_noise_coordinates_alone():
    """``chaser_trains_noise=False`` (the default): the chaser's meta-gradient does not
    reach ``theta0``'s noise coordinates. Through them the chaser rewarded a larger noise
    precision (it is the adaptation's step size), until the precision's own SVGD update,
    proportional to it, overflowed (``tests/test_families.py``'s stability sweep)."""
    learner = _bmaml64(chaser_trains_noise=False)
    learner.meta_loss(tiny_batch()).backward()
    grad = learner.theta0.grad
    assert bool((grad[:, learner.noise_mask] == 0).all())
    assert bool((grad[:, ~learner.noise_mask] != 0).any())
    official = _bmaml64()
    official.meta_loss(tiny_batch()).backward()
    assert bool((official.theta0.grad[:, official.noise_mask] != 0).any())


def test_the_aggregate_posterior_is_the_kde_prior_given_tasks():
    """``prior_distribution(tasks=..., form="kde")``: the particles adapted to each task
    (calibrated), pooled: a mixture of T * M kernels centred on them; without tasks,
    theta0's M. (The default with tasks, the empirical-Bayes Gaussian, is tested in
    ``test_empirical_bayes.py``.)"""
    from models_for_tests import LinearTasks, linear_regression

    tasks = LinearTasks(seed=0).evaluation_tasks(6)
    learner = BMAML(linear_regression, num_particles=4,
                    example_args=(tasks.x_support[0], tasks.y_support[0]))
    own = learner.prior_distribution()
    assert own.component_distribution.batch_shape == (4,)
    pooled = learner.prior_distribution(tasks=tasks, form="kde")
    adapted = learner.adapt(tasks.x_support, tasks.y_support).particles.reshape(-1, learner.potential.dim)
    assert pooled.component_distribution.batch_shape == (24,)
    torch.testing.assert_close(pooled.component_distribution.mean, adapted)
    torch.testing.assert_close(pooled.mean, adapted.mean(0))
    assert callable(learner.model_with_learned_prior(tasks=tasks, form="kde"))
    with pytest.raises(TypeError, match="TaskBatch"):
        learner.prior_distribution(tasks=(tasks.x_support, tasks.y_support))


def test_steps_learned_by_the_query_nll_route_the_gradients_apart():
    """``step_size_objective="query_nll"``: the log-steps and ``theta0``'s noise coordinates
    (the initial precision scales each particle's steps) get the gradient of the chaser
    particles' calibrated query NLL, the rest of ``theta0`` that of the chaser distance
    alone, and the loss's value is the chaser's (the rerouting adds zero)."""
    torch.set_default_dtype(torch.float64)
    kw = dict(num_particles=3, step_size=1e-2, init="paper", calibration="none",
              kernel=pb.RBFSteinKernel(detach_bandwidth=False))
    routed = BMAML(tiny_model(), step_size_objective="query_nll", **kw)
    plain = BMAML(tiny_model(), step_size_objective="chaser", **kw)
    assert routed.initial_noise_in_graph and not plain.initial_noise_in_graph
    plain.load_state_dict(routed.state_dict())
    batch = tiny_batch()
    loss = routed.meta_loss(batch)
    loss.backward()
    reference = plain.meta_loss(batch)
    reference.backward()
    torch.testing.assert_close(loss, reference)
    noise = routed.noise_mask
    assert bool(noise.any()) and bool((~noise).any())
    torch.testing.assert_close(routed.theta0.grad[:, ~noise], plain.theta0.grad[:, ~noise])
    assert bool((plain.theta0.grad[:, noise] == 0).all())  # the chaser never reaches them
    # the query NLL's gradients, computed directly from the chaser with theta0's noise in graph
    chaser, _ = routed.adapt_on(batch, "support", routed._initial_for_adaptation(2),
                                routed.inner_steps)
    nll = routed.mixture_nll(chaser, *batch.adaptation_data("query", chaser)).mean()
    expected, expected_theta0 = torch.autograd.grad(nll, (routed.log_step_size, routed.theta0))
    torch.testing.assert_close(routed.log_step_size.grad, expected)
    torch.testing.assert_close(routed.theta0.grad[:, noise], expected_theta0[:, noise])
    assert bool((expected_theta0[:, noise] != 0).all())
    assert not torch.allclose(expected, plain.log_step_size.grad)  # the routing matters
    with pytest.raises(ValueError, match="step_size_objective"):
        BMAML(tiny_model(), step_size_objective="mse", **kw)


def test_steps_are_learned_by_the_query_nll_by_default_except_on_a_policy():
    """``step_size_objective="auto"`` (default) is the query NLL where the model observes its
    data, and the chaser distance on a policy (its data are a factor of weighted rollouts,
    with no NLL) and with compiled steps; the resolved objective is what the learner
    records."""
    from pyro_bmaml.tasks.models import GaussianMLPPolicy

    learner = BMAML(tiny_model(), num_particles=3, init="paper")
    assert learner.step_size_objective == "query_nll"
    assert learner.config()["step_size_objective"] == "query_nll"
    policy = BMAML(GaussianMLPPolicy(hidden=(4,)), num_particles=2, init="paper")
    assert policy.step_size_objective == "chaser"
    assert BMAML(tiny_model(), num_particles=3, init="paper",
                 step_size_objective="chaser").step_size_objective == "chaser"
    # compiled steps run their backward once; the query NLL's routing takes three passes
    assert BMAML(tiny_model(), num_particles=3, init="paper",
                 compile=True).step_size_objective == "chaser"
    with pytest.raises(ValueError, match="compile=False or step_size_objective='chaser'"):
        BMAML(tiny_model(), num_particles=3, init="paper", compile=True,
              step_size_objective="query_nll")


def test_init_auto_starts_from_the_models_own_initialisation():
    """``init="auto"`` (default) is the model's ``paper_init`` when it has one, else prior
    draws. Prior draws of the paper's 1-40-40-40-1 network predict values of order 100 and
    the first SVGD step on them overflows; the paper's initialisation meta-trains."""
    from pyro_bmaml import BayesianMLP, Sinusoid
    from models_for_tests import linear_regression

    source = Sinusoid(num_tasks=20, num_support=5)
    example = source.evaluation_tasks(1)
    args = (example.x_support[0], example.y_support[0])
    built = {}
    for init in ("auto", "paper", "prior"):
        pyro.set_rng_seed(0)
        built[init] = BMAML(BayesianMLP(), num_particles=4, example_args=args, init=init)
    torch.testing.assert_close(built["auto"].theta0, built["paper"].theta0)
    built["auto"].fit(source, 2, meta_batch_size=2, progress=False)
    assert bool(torch.isfinite(built["auto"].theta0).all())
    with pytest.raises(FloatingPointError, match="non-finite"):
        built["prior"].fit(source, 2, meta_batch_size=2, progress=False)
    plain = {}
    for init in ("auto", "prior"):  # a model without paper_init: prior draws
        pyro.set_rng_seed(0)
        plain[init] = BMAML(linear_regression, num_particles=4, init=init,
                            example_args=(torch.zeros(3, 1), torch.zeros(3)))
    torch.testing.assert_close(plain["auto"].theta0, plain["prior"].theta0)


def test_a_classifier_meta_learns_its_confidence_by_the_mixture_term():
    """A model without noise sites (a softmax classifier) gets ``calibration="mixture"`` by
    default: its meta-loss is the chaser distance plus the query mixture NLL per point
    (BFA's summed term over the Q query points, divided by Q), and ``theta0``'s
    meta-gradient is the chaser learner's plus the BFA learner's over Q, exactly; with a
    ``calibration_weight`` the BFA term is summed and weighted; with BFA the default stays
    ``"none"`` (the term is BFA's own loss)."""
    from pyro_bmaml.tasks.synthetic import SubspaceClassification

    torch.set_default_dtype(torch.float64)
    family = SubspaceClassification(num_support=1, num_query=2, ways=3)
    batch = family.draw(2, torch.Generator().manual_seed(0)).to(torch.float64)
    q = batch.y_query.shape[1]
    assert q == 6
    kw = dict(num_particles=3, step_size=0.1, inner_steps=2, learn_step_size=False,
              example_args=family.example_args())
    pyro.set_rng_seed(0)
    mixed = BMAML(family.model, **kw)
    assert mixed.calibration == "mixture" and mixed.noise_sites == []
    assert mixed.describe()["calibration_weight"] == "per point"
    init = mixed.theta0.detach().clone()
    weighted = BMAML(family.model, calibration="mixture", calibration_weight=0.5, init=init, **kw)
    chaser = BMAML(family.model, calibration="none", init=init, **kw)
    bfa = BMAML(family.model, objective="bfa", init=init, **kw)
    assert bfa.calibration == "none"
    losses = {}
    for name, learner in (("mixed", mixed), ("weighted", weighted), ("chaser", chaser), ("bfa", bfa)):
        losses[name] = learner.meta_loss(batch)
        losses[name].backward()
    assert set(mixed.loss_terms) == {"chaser", "mixture_nll"}
    torch.testing.assert_close(losses["mixed"].detach(), losses["chaser"].detach() + losses["bfa"].detach() / q)
    torch.testing.assert_close(losses["weighted"].detach(), losses["chaser"].detach() + 0.5 * losses["bfa"].detach())
    torch.testing.assert_close(mixed.theta0.grad, chaser.theta0.grad + bfa.theta0.grad / q)
    torch.testing.assert_close(weighted.theta0.grad, chaser.theta0.grad + 0.5 * bfa.theta0.grad)
    assert bool(bfa.theta0.grad.abs().sum() > 0) and bool(chaser.theta0.grad.abs().sum() > 0)
