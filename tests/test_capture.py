"""The recorded-graph fast path of the potential equals the traced path (values, first and
second derivatives), keeps gradients to module parameters, and falls back on models whose
control flow depends on data."""

import warnings

import pyro
import pyro.distributions as dist
import torch

import pyro_bmaml as pb
from pyro_bmaml.tasks.models import BayesianClassifier, BayesianMLP
from test_potential import BayesianLinear


def _both(model, particles, *args):
    """(captured, traced) potentials of ``model``, set up on ``args``."""
    fast, slow = pb.ModelPotential(model), pb.ModelPotential(model, capture=False)
    return fast, slow


def _derivatives(potential, particles, *args):
    """Log density, its gradient and the gradient of the gradient's squared norm (the
    second-order term the meta-gradient needs), all with respect to the particles."""
    p = particles.clone().requires_grad_(True)
    log_p = potential.log_density(p, *args)
    (grad,) = torch.autograd.grad(log_p.sum(), p, create_graph=True)
    (second,) = torch.autograd.grad(grad.pow(2).sum(), p)
    return log_p.detach(), grad.detach(), second


def _assert_same(fast, slow, particles, *args, tol=1e-10):
    """Equal up to rounding: the replay runs the same operators, so float64 agrees to
    ~1e-12 and float32 to ~1e-6 relative."""
    for a, b in zip(_derivatives(fast, particles, *args), _derivatives(slow, particles, *args)):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)
    assert fast._graphs["log_density"].captures >= 1  # the fast path did run
    assert slow._graphs["log_density"].captures == 0


def test_captured_bayesian_mlp_equals_traced_to_second_order():
    torch.manual_seed(0)
    model = BayesianMLP(hidden=(8, 8))
    x = torch.randn(3, 5, 1, dtype=torch.float64)
    y = torch.randn(3, 5, dtype=torch.float64)
    fast, slow = _both(model, None)
    fast.setup(x[0], y[0])
    particles = 0.5 * torch.randn(3, 4, fast.dim, dtype=torch.float64)
    _assert_same(fast, slow, particles, x, y)
    _assert_same(fast, slow, particles[0], x[0], y[0])  # one task: its own graph
    assert fast._graphs["log_density"].captures == 2
    # log likelihood too
    torch.testing.assert_close(fast.log_likelihood(particles, x, y),
                               slow.log_likelihood(particles, x, y), rtol=1e-10, atol=1e-10)


def test_captured_pyro_module_equals_traced():
    torch.manual_seed(1)
    model = BayesianLinear()  # its PyroSample priors are float32
    x, y = torch.randn(2, 6, 2), torch.randn(2, 6)
    fast, slow = _both(model, None)
    fast.setup(x[0], y[0])
    particles = torch.randn(2, 5, fast.dim)
    _assert_same(fast, slow, particles, x, y, tol=1e-5)


def test_captured_graph_keeps_gradients_to_module_parameters():
    """Shared features (nn.Parameters) are inputs of the recorded graph, not constants:
    their gradient equals the traced path's, and later parameter values are used."""
    torch.manual_seed(2)
    model = BayesianClassifier(3, (1, 4, 4), hidden=(5,), shared="features").double()
    x = torch.rand(2, 6, 1, 4, 4, dtype=torch.float64)
    y = torch.arange(3).repeat(2, 2)
    fast, slow = _both(model, None)
    fast.setup(x[0], y[0])
    particles = torch.randn(2, 3, fast.dim, dtype=torch.float64)
    grads = []
    for potential in (fast, slow):
        model.zero_grad()
        potential.log_density(particles, x, y).sum().backward()
        grads.append(model.features[0].grad.clone())
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-10, atol=1e-10)
    with torch.no_grad():
        model.features[0].mul_(2.0)
    torch.testing.assert_close(fast.log_density(particles, x, y), slow.log_density(particles, x, y))


def _joint_graphs(potential):
    return [k for k in potential._graphs["log_density"]._graphs if k[0] == "value_and_grad"]


def test_log_density_and_grad_from_one_graph_equals_the_autograd_path():
    """Without create_graph the log density and its gradient replay from one recorded
    graph (the forward and its backward, no autograd): equal to the traced path's, for
    task batches and one task, float64 and a float32 PyroModule, with module parameters
    read at each call."""
    torch.manual_seed(4)
    model = BayesianMLP(hidden=(8, 8))
    x, y = torch.randn(3, 5, 1, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64)
    fast, slow = _both(model, None)
    fast.setup(x[0], y[0])
    particles = 0.5 * torch.randn(3, 4, fast.dim, dtype=torch.float64)
    for args in [(particles, x, y), (particles[0], x[0], y[0])]:
        log_p, grad = fast.log_density_and_grad(args[0].clone().requires_grad_(True),
                                                *args[1:])
        expected = slow.log_density_and_grad(args[0], *args[1:])
        torch.testing.assert_close(log_p, expected[0], rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(grad, expected[1], rtol=1e-10, atol=1e-10)
        assert not log_p.requires_grad and not grad.requires_grad
    assert len(_joint_graphs(fast)) == 2
    captures = fast._graphs["log_density"].captures
    fast.log_density_and_grad(particles, x, y)  # replayed, not recorded again
    assert fast._graphs["log_density"].captures == captures

    linear = BayesianLinear()  # float32 PyroSample priors
    xs, ys = torch.randn(2, 6, 2), torch.randn(2, 6)
    fast, slow = _both(linear, None)
    fast.setup(xs[0], ys[0])
    theta = torch.randn(2, 5, fast.dim)
    for a, b in zip(fast.log_density_and_grad(theta, xs, ys),
                    slow.log_density_and_grad(theta, xs, ys)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert _joint_graphs(fast)

    classifier = BayesianClassifier(3, (1, 4, 4), hidden=(5,), shared="features").double()
    images, labels = torch.rand(2, 6, 1, 4, 4, dtype=torch.float64), torch.arange(3).repeat(2, 2)
    fast, slow = _both(classifier, None)
    fast.setup(images[0], labels[0])
    theta = torch.randn(2, 3, fast.dim, dtype=torch.float64)
    for step in range(2):  # the second time with changed shared parameters
        for a, b in zip(fast.log_density_and_grad(theta, images, labels),
                        slow.log_density_and_grad(theta, images, labels)):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
        with torch.no_grad():
            classifier.features[0].mul_(2.0)


def test_data_dependent_control_flow_falls_back_with_one_notice():
    def model(x, y=None):
        z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
        scale = 1.0 if x.sum() > 0 else 2.0  # branches on the data's values
        with pyro.plate("data", x.shape[0]):
            pyro.sample("y", dist.Normal(z.sum() * x, scale), obs=y)

    fast, slow = _both(model, None)
    x, y = torch.randn(4), torch.randn(4)
    particles = torch.randn(3, 2)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        first = fast.log_density(particles, x, y)
        second = fast.log_density(particles, -x.abs(), y)  # same signature: no new notice
        both = fast.log_density_and_grad(particles, x, y)  # nor for value and gradient
    notices = [r for r in record if "could not record the model" in str(r.message)]
    assert len(notices) == 1 and fast._graphs["log_density"].fallbacks == 1
    torch.testing.assert_close(first, slow.log_density(particles, x, y))
    torch.testing.assert_close(second, slow.log_density(particles, -x.abs(), y))
    for a, b in zip(both, slow.log_density_and_grad(particles, x, y)):
        torch.testing.assert_close(a, b)
    assert not _joint_graphs(fast)


def test_models_reading_pyro_params_are_not_recorded():
    pyro.clear_param_store()

    def model(y=None):
        loc = pyro.param("loc", torch.tensor(0.0))
        z = pyro.sample("z", dist.Normal(loc, 1.0))
        pyro.sample("y", dist.Normal(z, 1.0), obs=y)

    potential = pb.ModelPotential(model)
    particles = torch.zeros(3, 1)
    before = potential.log_density(particles, torch.tensor(0.5))
    pyro.param("loc").data.fill_(3.0)
    after = potential.log_density(particles, torch.tensor(0.5))
    assert potential.reads_params and potential._graphs["log_density"].captures == 0
    assert not torch.allclose(before, after)
    pyro.clear_param_store()


def test_meta_learning_is_unchanged_by_the_fast_path():
    """A BMAML meta-gradient on sinusoid tasks is the same with the capture on and off."""
    torch.manual_seed(3)
    batch = pb.Sinusoid(num_tasks=20, num_support=5).sample(3, torch.Generator().manual_seed(0))
    grads = []
    for capture in (True, False):
        pyro.set_rng_seed(0)
        learner = pb.BMAML(BayesianMLP(hidden=(10, 10)), num_particles=4, init="paper")
        learner.potential.capture = capture
        learner.meta_loss(batch).backward()
        grads.append(learner.theta0.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-6)


def test_recorded_graphs_call_their_operators_directly():
    """Cached graphs call each ATen operator's kernel directly (no OpOverload.__call__ frame,
    one global per operator): the same values bitwise, and autograd through them to second
    order, as the graph calling the operators by name."""
    import copy

    from torch.fx.experimental.proxy_tensor import make_fx

    from pyro_bmaml.engine.capture import direct_calls, operator_of

    def fn(a, b):
        return (a.exp() * b - torch.tensor(2.0, dtype=a.dtype)).pow(2).sum(-1, keepdim=True)

    a, b = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    by_name = make_fx(fn)(a, b)
    direct = direct_calls(copy.deepcopy(by_name))
    assert "torch.ops.aten" not in direct.code and "torch.ops.aten" in by_name.code
    assert [operator_of(n) for n in direct.graph.nodes] == [n.target for n in by_name.graph.nodes]
    assert torch.equal(direct(a, b), by_name(a, b))
    results = []
    for module in (by_name, direct):
        x = a.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(module(x, b).sum(), x, create_graph=True)
        (h,) = torch.autograd.grad(g.pow(2).sum(), x)
        results.append((g.detach(), h))
    assert all(torch.equal(u, v) for u, v in zip(*results))
    model = BayesianMLP(hidden=(4,))
    potential = pb.ModelPotential(model)
    x, y = torch.randn(5, 1), torch.randn(5)
    potential.setup(x, y)
    potential.log_density_and_grad(torch.randn(3, potential.dim), x, y)
    for graph in potential._graphs["log_density"]._graphs.values():
        calls = [n for n in graph.graph.nodes if n.op == "call_function"]
        assert all(operator_of(n) is not n.target for n in calls
                   if isinstance(operator_of(n), torch._ops.OpOverload))
