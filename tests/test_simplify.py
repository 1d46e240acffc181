"""The recorded graph's algebraic simplification: each rule gives the original function's
values, gradients and second derivatives (float64, to rounding), fires where it should and
leaves alone what it cannot rewrite exactly; on the Bayesian MLP's potential it leaves one
full-size operator per weight matrix (the square), as a hand-written density has."""

import math
import operator
import warnings

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

import pyro_bmaml as pb
from pyro_bmaml.engine.capture import GraphCache, operator_of
from pyro_bmaml.engine.simplify import _VIEWS, simplify
from pyro_bmaml.tasks.models import BayesianMLP

aten = torch.ops.aten


def _record(fn, *inputs):
    return make_fx(fn, tracing_mode="fake")(*inputs)


def _full_size_ops(module, numel):
    """Operators (not views, nor a split's pieces) of the graph whose result has ``numel``
    elements."""
    return [n for n in module.graph.nodes
            if n.op == "call_function" and operator_of(n) not in _VIEWS | {operator.getitem}
            and isinstance(n.meta.get("val"), torch.Tensor) and n.meta["val"].numel() == numel]


def _derivatives(fn, inputs):
    """Output, gradient of its sum and the gradient of that gradient's squared norm, with
    respect to every input."""
    xs = [x.clone().requires_grad_(True) for x in inputs]
    out = fn(*xs)
    grads = torch.autograd.grad(out.sum(), xs, create_graph=True, allow_unused=True)
    grads = [torch.zeros_like(x) if g is None else g for g, x in zip(grads, xs)]
    curved = [g.pow(2).sum() for g in grads if g.requires_grad]
    second = torch.autograd.grad(sum(curved), xs, allow_unused=True) if curved else ()
    return [out.detach()] + [g.detach() for g in grads] + [
        torch.zeros_like(x) if s is None else s for s, x in zip(second, xs)]


def _check(fn, *inputs, tol=1e-12):
    original = _record(fn, *inputs)
    simplified = simplify(original)
    for a, b in zip(_derivatives(original, inputs), _derivatives(simplified, inputs)):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)
    return original, simplified


def _normal_prior(w, s):
    """Pyro's Normal(0, s).to_event(2).log_prob(w) per particle, as it is recorded: zero loc,
    the scale broadcast to the weight's shape, then an event sum over a flattening view."""
    loc = torch.zeros_like(w)
    scale = s[:, None, None].expand_as(w)
    lp = -((w - loc) ** 2) / (2 * scale ** 2) - scale.log() - math.log(math.sqrt(2 * math.pi))
    return lp.reshape(w.size(0), -1).sum(-1)


def test_normal_prior_becomes_one_square_and_equals_the_original():
    torch.manual_seed(0)
    w = torch.randn(5, 6, 7, dtype=torch.float64)
    s = torch.rand(5, dtype=torch.float64) + 0.5
    original, simplified = _check(_normal_prior, w, s)
    assert len(_full_size_ops(original, w.numel())) >= 7
    assert [n.target for n in _full_size_ops(simplified, w.numel())] == [aten.pow.Tensor_Scalar]
    # and the closed form it is
    expected = (-(w ** 2).sum((1, 2)) / (2 * s ** 2) - 42 * s.log()
                - 21 * math.log(2 * math.pi))
    torch.testing.assert_close(simplified(w, s), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("keepdim", [False, True])
def test_sums_of_broadcast_linear_terms(keepdim):
    torch.manual_seed(1)

    def fn(a, b, c, d):
        # a: (4, 5, 6) full; b: (5, 1) broadcast; c: (4, 1, 1) scale; d: () number-like
        x = (3.0 - a * c + b.expand(4, 5, 6) - (a / c)).sub(d, alpha=0.5) + 2.5
        return x.neg().sum((0, 2), keepdim=keepdim)

    inputs = [torch.randn(4, 5, 6, dtype=torch.float64), torch.randn(5, 1, dtype=torch.float64),
              torch.rand(4, 1, 1, dtype=torch.float64) + 0.5, torch.randn((), dtype=torch.float64)]
    _check(fn, *inputs)


def test_sum_of_everything_and_of_size_one_dims():
    torch.manual_seed(2)

    def fn(a, b):
        total = (a - b).sum()  # all dims
        ones = a[:, :1].unsqueeze(1).sum(1)  # a size-1 dim only
        return total + ones.sum(-1) + (a * b.exp()).sum(dim=[])  # dim=[]: all dims

    a, b = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 1, dtype=torch.float64)
    _check(fn, a, b)


def test_zero_terms_and_unit_factors_are_dropped():
    def fn(a):
        zero_jacobian = torch.zeros_like(a).sum(-1)  # an identity transform's log-Jacobian
        return (a * torch.ones_like(a) + torch.zeros_like(a)).pow(2).sum(-1) + zero_jacobian

    a = torch.randn(3, 50, dtype=torch.float64)
    original, simplified = _check(fn, a)
    targets = {n.target for n in simplified.graph.nodes if n.op == "call_function"}
    assert not targets & {aten.zeros_like.default, aten.ones_like.default, aten.mul.Tensor}


def test_broadcast_sinking_runs_elementwise_operators_on_the_small_tensor():
    def fn(a, s):
        big = s.expand(8, 100)
        return a * (big.log() + big.pow(2)).exp()  # log, pow, add, exp on (8, 1)

    original, simplified = _check(fn, torch.randn(8, 100, dtype=torch.float64),
                                  torch.rand(8, 1, dtype=torch.float64) + 0.5)
    assert len(_full_size_ops(original, 800)) == 5
    assert [n.target for n in _full_size_ops(simplified, 800)] == [aten.mul.Tensor]


def test_what_cannot_be_rewritten_exactly_is_left_alone():
    def shared(a, b):
        u = a + b  # used twice: pushing the sum into it would add work
        return u.sum(-1) + u.pow(2).sum(-1)

    def mixed(a, b):
        return (a.exp() + b.double()).sum(-1)  # the float32 operand is cast first

    def varying(a, b):
        return (a * b).sum(-1)  # b varies along the summed dim: a plain sum

    a, b = torch.randn(3, 9, dtype=torch.float64), torch.randn(3, 9, dtype=torch.float64)
    for fn, inputs in [(shared, (a, b)), (varying, (a, b))]:
        original, simplified = _check(fn, *inputs)
        count = lambda m: sum(n.op == "call_function" for n in m.graph.nodes)  # noqa: E731
        assert count(simplified) <= count(original)
    _check(mixed, a, b.float(), tol=1e-6)


def test_bayesian_mlp_potential_keeps_one_full_size_operator_per_weight_matrix():
    torch.manual_seed(3)
    model = BayesianMLP(hidden=(16, 16))
    x, y = torch.randn(2, 5, 1, dtype=torch.float64), torch.randn(2, 5, dtype=torch.float64)
    plain = pb.ModelPotential(model)
    plain._graphs["log_density"].simplify = False
    fast = pb.ModelPotential(model)
    fast.setup(x[0], y[0])
    particles = torch.randn(2, 3, fast.dim, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a rewrite that fails would warn and keep the graph
        for potential in (plain, fast):
            potential.log_density(particles, x, y)
    graphs = [next(iter(p._graphs["log_density"]._graphs.values())) for p in (plain, fast)]
    numel = 2 * 3 * 16 * 16  # tasks x particles x the 16 x 16 weight
    assert len(_full_size_ops(graphs[0], numel)) >= 9
    assert [operator_of(n) for n in _full_size_ops(graphs[1], numel)] == [aten.pow.Tensor_Scalar]
    slow = pb.ModelPotential(model, capture=False)
    p = particles.clone().requires_grad_(True)
    q = particles.clone().requires_grad_(True)
    (g_fast,) = torch.autograd.grad(fast.log_density(p, x, y).sum(), p, create_graph=True)
    (g_slow,) = torch.autograd.grad(slow.log_density(q, x, y).sum(), q, create_graph=True)
    torch.testing.assert_close(g_fast, g_slow, rtol=1e-10, atol=1e-10)
    (h_fast,) = torch.autograd.grad(g_fast.pow(2).sum(), p)
    (h_slow,) = torch.autograd.grad(g_slow.pow(2).sum(), q)
    torch.testing.assert_close(h_fast, h_slow, rtol=1e-10, atol=1e-10)


def test_slices_of_a_flat_particle_become_one_split():
    def fn(p):  # three sites of a flat particle, a gap of unused columns, a negative index
        a, b, c = p[:, 0:3], p[:, 5:9], p[:, -3:]
        return a.exp().sum(-1) + b.pow(2).sum(-1) * c.sin().sum(-1)

    original, simplified = _check(fn, torch.randn(4, 12, dtype=torch.float64))
    targets = [n.target for n in simplified.graph.nodes if n.op == "call_function"]
    assert aten.slice.Tensor not in targets and targets.count(aten.split_with_sizes.default) == 1


def test_overlapping_slices_are_left_alone():
    def fn(p):
        return p[:, 0:4].exp().sum(-1) * p[:, 2:6].sum(-1)

    original, simplified = _check(fn, torch.randn(3, 6, dtype=torch.float64))
    targets = [n.target for n in simplified.graph.nodes if n.op == "call_function"]
    assert targets.count(aten.slice.Tensor) == 2 and aten.split_with_sizes.default not in targets


def test_reshape_chains_and_repeated_operators_collapse():
    def fn(a, s):
        u = a.unsqueeze(-1).squeeze(-1).view(6, 4).view(24)  # back to a's shape: a itself
        v = s.unsqueeze(0).unsqueeze(0).view(1, 1)  # one view of s
        w = s.unsqueeze(0).unsqueeze(0).view(1, 1)  # the same again: merged
        return u.exp() * v.log().squeeze() + w.log().squeeze()

    original, simplified = _check(fn, torch.randn(24, dtype=torch.float64),
                                  torch.rand((), dtype=torch.float64) + 0.5)
    targets = [n.target for n in simplified.graph.nodes if n.op == "call_function"]
    assert targets.count(aten.log.default) == 1
    assert not {aten.unsqueeze.default} & set(targets)
    assert targets.count(aten.view.default) <= 1


def test_the_recorded_module_is_left_unchanged():
    original = _record(_normal_prior, torch.randn(2, 3, 3), torch.rand(2) + 0.5)
    code, count = original.code, len(original.graph.nodes)
    simplified = simplify(original)
    assert original.code == code and len(original.graph.nodes) == count
    assert len(simplified.graph.nodes) < count


def test_graphs_with_in_place_operators_are_left_alone():
    def fn(a):
        b = a * 2.0
        b.add_(0.0)  # an in-place write: nothing is rewritten
        return (b + torch.zeros_like(b)).exp().sum(-1)

    original, simplified = _check(fn, torch.randn(3, 4, dtype=torch.float64))
    assert simplified.code == original.code


def _random_program(rng):
    """A random expression over broadcasting inputs (the shapes Pyro's densities mix: a full
    tensor, per-row scales, a column, a scalar, a row), reduced by a random sum."""
    shapes = {"a": (4, 5, 6), "s": (4, 1, 1), "b": (5, 1), "c": (), "d": (6,)}

    def expr(depth):
        kind = rng.choice(["leaf"] * 2 + ["unary", "binary", "binary", "expand", "zero", "one",
                                          "scale", "power"] if depth > 0 else ["leaf"])
        if kind == "leaf":
            name = rng.choice(list(shapes))
            return lambda v: v[name]
        inner = expr(depth - 1)
        if kind == "unary":
            f = rng.choice([lambda x: (0.1 * x).exp(), lambda x: (1 + x * x).log(), torch.neg,
                            lambda x: x.pow(2), torch.tanh])
            return lambda v: f(inner(v))
        if kind == "expand":
            return lambda v: inner(v).expand(4, 5, 6)
        if kind == "zero":
            return lambda v: inner(v) + torch.zeros_like(inner(v))
        if kind == "one":
            return lambda v: inner(v) * torch.ones_like(inner(v))
        if kind == "scale":  # constant factors (merged, moved to a broadcast operand)
            c = rng.choice([2.0, -1.0, 0.5, 1.0])
            if rng.random() < 0.5:
                return lambda v: -(c * inner(v))
            return lambda v: inner(v) * c
        if kind == "power":  # x ** 1 (a square's backward has it) and a constant numerator
            return lambda v: inner(v).pow(1.0) + 2.0 / (1.5 + torch.tanh(inner(v)))
        other = expr(depth - 1)
        op = rng.choice(["add", "sub", "mul", "div"])
        alpha = rng.choice([1.0, -0.5, 2.0])
        if op == "add":
            return lambda v: torch.add(inner(v), other(v), alpha=alpha)
        if op == "sub":
            return lambda v: torch.sub(inner(v), other(v), alpha=alpha)
        if op == "mul":
            return lambda v: inner(v) * other(v)
        return lambda v: inner(v) / (1.5 + torch.tanh(other(v)))

    body = expr(4)
    dims = sorted(rng.sample(range(3), rng.randint(1, 3)))
    keepdim = rng.random() < 0.5
    flatten = rng.random() < 0.3

    def fn(a, s, b, c, d):
        x = body({"a": a, "s": s, "b": b, "c": c, "d": d}).expand(4, 5, 6) * (1 + a * 0.01)
        if flatten:
            return x.reshape(4, 30).sum(-1)
        return x.sum(dims, keepdim=keepdim)

    return fn


def test_random_programs_keep_their_values_and_derivatives():
    """40 random broadcasting programs: the simplified graph agrees with the recorded one
    to second order (a fuzz test of every rule's preconditions)."""
    import random

    rng = random.Random(0)
    gen = torch.Generator().manual_seed(0)
    inputs = [torch.randn(shape, dtype=torch.float64, generator=gen)
              for shape in [(4, 5, 6), (4, 1, 1), (5, 1), (), (6,)]]
    for _ in range(40):
        _check(_random_program(rng), *inputs)


def test_random_programs_recorded_with_their_gradient_keep_both():
    """The same fuzz on graphs of a value and its gradient recorded together (as
    ``GraphCache.value_and_grad`` records them: the backward's operators are rewritten too,
    and its detaches dropped), against autograd of the original."""
    import random

    rng = random.Random(1)
    gen = torch.Generator().manual_seed(1)
    inputs = [torch.randn(shape, dtype=torch.float64, generator=gen)
              for shape in [(4, 5, 6), (4, 1, 1), (5, 1), (), (6,)]]
    for _ in range(40):
        fn = _random_program(rng)
        cache = GraphCache("fuzz")
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a rewrite that fails would warn
            value, grad = cache.value_and_grad(fn, *inputs)
        first = inputs[0].clone().requires_grad_(True)
        expected = fn(first, *inputs[1:])
        (expected_grad,) = torch.autograd.grad(expected.sum(), first)
        torch.testing.assert_close(value, expected.detach(), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(grad, expected_grad, rtol=1e-12, atol=1e-12)
        assert not value.requires_grad and not grad.requires_grad


def test_constant_factors_merge_and_move_to_the_small_operand():
    """A square's backward, ``expand(s) * (2 * w ** 1)`` negated, is one full-size product
    with the factors on the small operand."""
    def fn(w, s):
        return -(s.expand(8, 100) * (2.0 * w.pow(1.0))) * -0.5

    original, simplified = _check(fn, torch.randn(8, 100, dtype=torch.float64),
                                  torch.rand(8, 1, dtype=torch.float64) + 0.5)
    assert len(_full_size_ops(original, 800)) == 5
    assert [n.target for n in _full_size_ops(simplified, 800)] == [aten.mul.Tensor]


def test_constant_tensors_become_numbers():
    """Tensors filled with a constant known when recording (a backward starts from ones,
    negates and scales them) become numbers: a unit factor then disappears, and a constant
    numerator makes a reciprocal; a constant the model makes (``torch.tensor``) is not
    copied at each call."""
    def fn(a, s):
        ones = torch.ones_like(a)
        minus = ones.neg() * 2.0
        return (a * minus * -0.5 + 3.0 * ones / s) * torch.tensor(1.5, dtype=a.dtype)

    a = torch.randn(6, 4, dtype=torch.float64)
    original, simplified = _check(fn, a, torch.rand(6, 4, dtype=torch.float64) + 0.5)
    targets = [n.target for n in simplified.graph.nodes if n.op == "call_function"]
    assert aten.ones_like.default not in targets and aten.lift_fresh_copy.default not in targets
    assert aten.div.Tensor not in targets and aten.reciprocal.default in targets
    assert len(_full_size_ops(simplified, 24)) < len(_full_size_ops(original, 24))


def test_products_over_an_inner_dim_of_one_become_elementwise():
    def fn(x, w, v, u):  # a one-input layer (batched and not), and a one-output layer
        hidden = torch.bmm(x, w).relu()  # (3, 7, 1) @ (3, 1, 5)
        return torch.bmm(hidden, v).sum((1, 2)) + (x[0] @ u).sum()  # (7, 1) @ (1, 4)

    inputs = [torch.randn(3, 7, 1, dtype=torch.float64), torch.randn(3, 1, 5, dtype=torch.float64),
              torch.randn(3, 5, 1, dtype=torch.float64), torch.randn(1, 4, dtype=torch.float64)]
    original, simplified = _check(fn, *inputs)
    targets = [n.target for n in simplified.graph.nodes if n.op == "call_function"]
    assert targets.count(aten.bmm.default) == 1 and aten.mm.default not in targets
    cache = GraphCache("outer")  # and in the backward recorded with the value
    value, grad = cache.value_and_grad(fn, *inputs)
    joint = [g for k, g in cache._graphs.items() if k[0] == "value_and_grad"][0]
    first = inputs[0].clone().requires_grad_(True)
    (expected,) = torch.autograd.grad(fn(first, *inputs[1:]).sum(), first)
    torch.testing.assert_close(grad, expected, rtol=1e-12, atol=1e-12)
    shapes = [tuple(n.args[0].meta["val"].shape) for n in joint.graph.nodes
              if n.op == "call_function" and operator_of(n) is aten.bmm.default]
    assert shapes and all(shape[-1] != 1 for shape in shapes)


def test_additions_of_a_product_are_fused():
    def fn(h, w, b, s, t):
        layer = torch.bmm(h, w) + b  # a layer's bias: baddbmm
        scaled = s * t + layer  # a product of full tensors added: addcmul
        wide = h.sum(-1, keepdim=True) * b  # (3, 4, 1) * (3, 1, 5), used twice: left alone
        return (scaled.exp() + (wide + s[:, :1, :1]) * wide).sum(-1)

    inputs = [torch.randn(3, 4, 2, dtype=torch.float64), torch.randn(3, 2, 5, dtype=torch.float64),
              torch.randn(3, 1, 5, dtype=torch.float64), torch.randn(3, 4, 5, dtype=torch.float64),
              torch.randn(3, 4, 5, dtype=torch.float64)]
    original, simplified = _check(fn, *inputs)
    targets = [n.target for n in simplified.graph.nodes if n.op == "call_function"]
    assert aten.baddbmm.default in targets and aten.bmm.default not in targets
    assert targets.count(aten.addcmul.default) == 1


def test_detaches_are_dropped_only_for_graphs_replayed_without_autograd():
    def fn(a):
        return a.exp().detach() * a

    a = torch.randn(5, dtype=torch.float64)
    recorded = _record(fn, a)
    kept = [n.target for n in simplify(recorded).graph.nodes if n.op == "call_function"]
    dropped = [n.target for n in simplify(recorded, inference=True).graph.nodes
               if n.op == "call_function"]
    assert aten.detach.default in kept and aten.detach.default not in dropped
    torch.testing.assert_close(simplify(recorded, inference=True)(a), fn(a))


def test_a_softmax_regression_with_a_transposed_weight_replays():
    """A user's model computing ``x @ w.T`` (the families suite's softmax regression): its
    log density and gradient replay from the recorded joint graph, equal to autograd's.
    Rule 9 used to fuse ``c + a * b`` with ``c`` a transpose into ``addcmul``, which takes
    ``c``'s strides, and a later ``view`` of the sum failed at replay; the sum is now left
    unfused where the fused operator's layout would differ."""
    import pyro
    import pyro.distributions as dist

    def model(x, y=None):
        w = pyro.sample("w", dist.Normal(torch.zeros(3, 4), 1.0).to_event(2))
        logits = x @ w.T
        with pyro.plate("data", x.shape[0]):
            pyro.sample("y", dist.Categorical(logits=logits), obs=y)
        return logits.softmax(-1)

    x, y = torch.randn(2, 6, 4), torch.randint(0, 3, (2, 6))
    potential = pb.ModelPotential(model)
    potential.setup(x[0], y[0])
    theta = torch.randn(2, 5, potential.dim)
    log_p, grad = potential.log_density_and_grad(theta, x, y)
    reference = pb.ModelPotential(model, capture=False)
    reference.setup(x[0], y[0])
    t = theta.clone().requires_grad_(True)
    expected = reference.log_density(t, x, y)
    (expected_grad,) = torch.autograd.grad(expected.sum(), t)
    torch.testing.assert_close(log_p, expected.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-5, atol=1e-5)
