"""The compiled SVGD step (``engine/compiled.py``) against the replayed graph: values, the
adaptation and the meta-gradient to rounding, on three models; the exact fallback; the
cache per input signature. Compiling takes seconds per signature: slow."""

import warnings

import pyro
import pytest
import torch

from pyro_bmaml import BMAML, BayesianClassifier, BayesianMLP, TaskBatch
from pyro_bmaml.engine import RBFSteinKernel, transport
from pyro_bmaml.engine import compiled as compiled_module

from models_for_tests import BayesianLinear


def _regression_batch(tasks, k, features, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tasks, 2 * k, features, generator=g)
    y = torch.sin(x.sum(-1)) + 0.1 * torch.randn(tasks, 2 * k, generator=g)
    return TaskBatch(x[:, :k], y[:, :k], x[:, k:], y[:, k:])


def _classification_batch(tasks, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(tasks, 6, 1, 4, 4, generator=g)
    y = torch.arange(3).repeat(tasks, 2)
    return TaskBatch(x, y, x.flip(1), y.flip(1))


def _pair(model_fn, batch, **options):
    # compiled steps take the chaser's step objective by default (their backward runs once);
    # the replayed learner takes the same
    options.setdefault("step_size_objective", "chaser")
    learners = []
    for compile in (False, True):
        pyro.set_rng_seed(0)
        learners.append(BMAML(model_fn(), num_particles=4, compile=compile,
                              example_args=(batch.x_support[0], batch.y_support[0]), **options))
    return learners


def _assert_meta_step_equal(replayed, compiled, batch, tol):
    grads = []
    for learner in (replayed, compiled):
        learner.zero_grad()
        loss = learner.meta_loss(batch)
        loss.backward()
        grads.append((loss.detach(), {n: p.grad.clone() for n, p in learner.named_parameters()
                                      if p.grad is not None}))
    (loss_r, grad_r), (loss_c, grad_c) = grads
    torch.testing.assert_close(loss_c, loss_r, rtol=tol, atol=tol)
    assert set(grad_c) == set(grad_r) and "theta0" in grad_r
    for name in grad_r:
        scale = grad_r[name].abs().max().clamp_min(1e-12)
        err = float((grad_c[name] - grad_r[name]).abs().max() / scale)
        assert err < tol, f"meta-gradient of {name} differs by {err:.2e} of its largest entry"
    post_r = replayed.adapt(batch.x_support, batch.y_support).particles
    post_c = compiled.adapt(batch.x_support, batch.y_support).particles
    torch.testing.assert_close(post_c, post_r, rtol=tol, atol=tol)


@pytest.mark.slow
@pytest.mark.parametrize("model", ["mlp", "pyro_module", "classifier"])
def test_compiled_steps_equal_the_replayed_graph(model):
    """Float32: Inductor reassociates sums and fuses operators, so the compiled step agrees
    with the replay to a few ulps of the values it sums (relative 1e-4 here over two SVGD
    steps, the chaser and the leader); the meta-gradient reaches theta0, the learned step
    sizes and, for the classifier, the shared feature weights (module parameters)."""
    if model == "mlp":
        batch = _regression_batch(3, 5, 1, seed=0)
        replayed, compiled = _pair(lambda: BayesianMLP(hidden=(8, 8)), batch, init="paper",
                                   inner_steps=2)
    elif model == "pyro_module":
        batch = _regression_batch(3, 6, 2, seed=1)
        replayed, compiled = _pair(BayesianLinear, batch, calibration="none", inner_steps=2)
    else:
        batch = _classification_batch(3, seed=2)
        replayed, compiled = _pair(
            lambda: BayesianClassifier(3, (1, 4, 4), hidden=(5,), shared="features"), batch,
            init="paper", inner_steps=2)
    _assert_meta_step_equal(replayed, compiled, batch, tol=1e-4)
    assert compiled_module.compile_seconds() > 0


def test_a_failed_compilation_falls_back_to_the_replayed_step(monkeypatch):
    """No compiler (simulated: the compiled function raises when first called): one warning
    for the signature, then the replayed step, bit for bit the uncompiled result."""
    calls = []

    def broken(fn, **options):
        def run(*args, **kwargs):
            calls.append(1)
            raise RuntimeError("no C++ compiler found")
        return run

    monkeypatch.setattr(compiled_module.torch, "compile", broken)
    batch = _regression_batch(2, 4, 1, seed=3)
    replayed, compiled = _pair(lambda: BayesianMLP(hidden=(4,)), batch, init="paper")
    with pytest.warns(UserWarning, match="compiling failed .*no C\\+\\+ compiler"):
        loss_c = compiled.meta_loss(batch)
    loss_r = replayed.meta_loss(batch)
    assert torch.equal(loss_c, loss_r)
    tries = len(calls)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning for the same signature
        compiled.meta_loss(batch)
    assert len(calls) == tries  # the failed signature is not compiled again


def test_compiled_steps_are_cached_per_signature_and_refuse_a_callback(monkeypatch):
    """One compiled function per recorded graph (input signature); another task count makes
    another. A callback needs the log density and gradient the compiled step does not give:
    refused by name. A model that is not recorded takes the replayed path, silently."""
    made = []

    def counting(fn, **options):
        made.append(options)
        return fn  # run the step function eagerly: the cache, not the compiler, is tested

    monkeypatch.setattr(compiled_module.torch, "compile", counting)
    kernel = RBFSteinKernel(bandwidth="median")
    pyro.set_rng_seed(0)
    learner = BMAML(BayesianMLP(hidden=(4,)), num_particles=3, init="paper",
                    example_args=(torch.zeros(4, 1), torch.zeros(4)))
    x, y = torch.randn(2, 4, 1), torch.randn(2, 4)
    particles = learner.theta0.detach().expand(2, -1, -1)
    for _ in range(2):
        transport(learner.potential, kernel, particles, x, y, num_steps=2, step_size=1e-3,
                  compile=True)
    assert len(made) == 1 and made[0]["dynamic"] is False
    transport(learner.potential, kernel, learner.theta0.detach().expand(3, -1, -1),
              torch.randn(3, 4, 1), torch.randn(3, 4), num_steps=1, step_size=1e-3,
              compile=True)
    assert len(made) == 2
    eager = transport(learner.potential, kernel, particles, x, y, num_steps=2, step_size=1e-3)
    same = transport(learner.potential, kernel, particles, x, y, num_steps=2, step_size=1e-3,
                     compile=True)
    torch.testing.assert_close(same, eager, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="callback"):
        transport(learner.potential, kernel, particles, x, y, num_steps=1, step_size=1e-3,
                  compile=True, callback=lambda *a: None)
    learner.potential.capture = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = transport(learner.potential, kernel, particles, x, y, num_steps=1,
                        step_size=1e-3, compile=True)
    assert len(made) == 2 and out.shape == particles.shape
    with pytest.raises(TypeError, match="compile must be a bool"):
        BMAML(BayesianMLP(hidden=(4,)), num_particles=3, compile="yes",
              example_args=(torch.zeros(4, 1), torch.zeros(4)))


@pytest.mark.slow
def test_each_signature_compiles_past_dynamos_recompile_limit():
    """Dynamo keeps at most ``recompile_limit`` compiled entries per code object; every
    compiled step has a code object of its own, so a process with more signatures than that
    (here the limit lowered to 1, three task counts) still compiles each one instead of
    running it through Dynamo's uncompiled fallback; the steps equal the replayed ones."""
    from torch._dynamo.utils import counters

    kernel = RBFSteinKernel(bandwidth="median")
    pyro.set_rng_seed(0)
    learner = BMAML(BayesianMLP(hidden=(4,)), num_particles=3, init="paper",
                    example_args=(torch.zeros(4, 1), torch.zeros(4)))
    g = torch.Generator().manual_seed(0)
    with torch._dynamo.config.patch(recompile_limit=1), torch.no_grad():
        for tasks in (1, 2, 3):
            x, y = torch.randn(tasks, 4, 1, generator=g), torch.randn(tasks, 4, generator=g)
            particles = learner.theta0.detach().expand(tasks, -1, -1)
            graphs = counters["stats"]["unique_graphs"]
            out = transport(learner.potential, kernel, particles, x, y, num_steps=1,
                            step_size=1e-3, compile=True)
            assert counters["stats"]["unique_graphs"] > graphs, f"{tasks} tasks: not compiled"
            eager = transport(learner.potential, kernel, particles, x, y, num_steps=1,
                              step_size=1e-3)
            torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["univariate", "multivariate"])
def test_svgd_class_with_compiled_directions_follows_the_replayed_one(mode):
    """``SVGD(..., compile=True)``: the same particles after five Adam steps as the class
    without it, from the same start (float32 rounding of reassociated sums, amplified a
    little by Adam's normalisation: relative 1e-4)."""
    from pyro.optim import Adam

    from pyro_bmaml import RBFSteinKernel as Kernel, SVGD

    x = torch.randn(8, 2, generator=torch.Generator().manual_seed(0))
    y = x @ torch.tensor([1.0, -1.0]) + 0.3
    out = []
    for compile in (False, True):
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        svgd = SVGD(BayesianLinear(), Kernel(), Adam({"lr": 0.05}), 6, mode=mode,
                    compile=compile)
        for _ in range(5):
            svgd.step(x, y)
        out.append(pyro.param("svgd_particles").unconstrained().detach().clone())
    torch.testing.assert_close(out[1], out[0], rtol=1e-4, atol=1e-5)
