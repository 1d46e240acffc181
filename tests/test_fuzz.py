"""Property-based fuzzing of the public entry points with Hypothesis.

Random shapes (empty dims included), dtypes, devices (``meta`` tensors, which hold no data),
NaN/inf entries, mismatched sizes and bad scalar arguments go into ``TaskBatch`` /
``TaskPool``, ``adapt``, ``predict``, ``SVGD.step``, ``transport``, ``evaluate`` and the CLI.
The property: either the call succeeds with finite results of the documented shapes (no
silent broadcast: the shapes that came in are the shapes that went through), or it raises a
``ValueError`` / ``TypeError`` whose message names the offending argument. Anything else (an
``IndexError``, a ``RuntimeError`` from deep inside torch, a NaN result) fails the test.

Fixed seed (``derandomize``) and bounded examples, so the run is reproducible and short.
"""

import math
import re

import pyro
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from pyro.optim import Adam

import pyro_bmaml as pb
from pyro_bmaml.meta.training import evaluate
from pyro_bmaml.tasks.models import BayesianMLP
from models_for_tests import linear_regression

FUZZ = settings(max_examples=60, deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck))

DTYPES = (torch.float32, torch.float64, torch.int64, torch.bool)


@st.composite
def tensors(draw, min_dims=0, max_dims=3, sizes=(0, 1, 2, 3, 5), dtypes=DTYPES,
            shape=None, bad_values=True, meta=True):
    """A tensor of a random shape and dtype; floating ones sometimes hold NaN / inf, and now
    and then it is a ``meta`` tensor (a shape without data)."""
    if shape is None:
        shape = tuple(draw(st.lists(st.sampled_from(sizes), min_size=min_dims, max_size=max_dims)))
    dtype = draw(st.sampled_from(dtypes))
    if meta and draw(st.integers(0, 19)) == 0:
        return torch.empty(shape, dtype=dtype, device="meta")
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.rand(shape, generator=g) > 0.5
    if not dtype.is_floating_point:
        return torch.randint(0, 3, shape, generator=g, dtype=dtype)
    t = torch.randn(shape, generator=g, dtype=dtype)
    if bad_values and t.numel() and draw(st.integers(0, 5)) == 0:
        t.view(-1)[draw(st.integers(0, t.numel() - 1))] = draw(
            st.sampled_from([math.nan, math.inf, -math.inf]))
    return t


MUTATIONS = ("none",) * 5 + ("x dtype", "y dtype", "x shape", "y shape", "x values",
                             "y values", "empty", "meta", "arbitrary")


@st.composite
def regression_pairs(draw, tasks=(None, None, 1, 2)):
    """``(x, y)`` for a regression call: valid (``(N, 1)`` and ``(N,)``, with a leading task
    dim now and then) about a third of the time, else with one thing wrong: a dtype, a
    shape, a NaN / inf, no points, a meta tensor, or two arbitrary tensors."""
    mutation = draw(st.sampled_from(MUTATIONS))
    event(f"mutation: {mutation}")
    if mutation == "arbitrary":
        return draw(tensors(max_dims=4)), draw(tensors(max_dims=3))
    n = 0 if mutation == "empty" else draw(st.sampled_from([1, 3, 5]))
    t = draw(st.sampled_from(tasks))
    lead = () if t is None else (t,)
    x_shape, y_shape = lead + (n, 1), lead + (n,)
    if mutation == "x shape":
        x_shape = draw(st.sampled_from([lead + (n, 2), (n, 1, 1), lead + (n + 1, 1), (2,) + x_shape]))
    if mutation == "y shape":
        y_shape = draw(st.sampled_from([lead + (n + 1,), lead + (n, 1), (), (3,) + y_shape]))
    fixed = {"dtypes": (torch.float32,), "bad_values": False, "meta": False}
    x = draw(tensors(shape=x_shape, **{**fixed, **({"dtypes": DTYPES[1:]} if mutation == "x dtype" else {}),
                                       **({"bad_values": True} if mutation == "x values" else {})}))
    y = draw(tensors(shape=y_shape, **{**fixed, **({"dtypes": DTYPES[1:]} if mutation == "y dtype" else {}),
                                       **({"bad_values": True} if mutation == "y values" else {})}))
    if mutation.endswith("values") and x.numel() and y.numel():
        (x if mutation[0] == "x" else y).view(-1)[0] = draw(st.sampled_from([math.nan, math.inf]))
    if mutation == "meta":
        x = x.to("meta")
    return x, y


STEPS = st.one_of(st.none(), st.integers(0, 2), st.sampled_from([-1, 1.5, True, "2"]))


def refused_naming(err: Exception, *names: str) -> None:
    """The error is a ValueError/TypeError naming one of ``names`` (as a word), or a
    FloatingPointError (finite input that a too-large step drives to inf) naming them."""
    assert isinstance(err, (ValueError, TypeError, FloatingPointError)), \
        f"{type(err).__name__}: {err}"
    text = str(err)
    assert any(re.search(rf"(?<![A-Za-z_]){re.escape(n)}(?![A-Za-z_])", text) for n in names), \
        f"the message names none of {names}: {text}"


def outcome(call, *names):
    """``call()``'s result, or ``None`` after checking that it refused properly."""
    try:
        return call()
    except Exception as err:  # noqa: BLE001 - the property is about which errors escape
        refused_naming(err, *names)
        return None


def _finite(t: torch.Tensor) -> bool:
    return bool(torch.isfinite(t).all())


# ---------------------------------------------------------------- TaskBatch / TaskPool
FIELDS = ("x_support", "y_support", "x_query", "y_query")


@st.composite
def task_fields(draw):
    """The four tensors of a TaskBatch: near valid (two tasks, each half possibly off in
    one way), or four arbitrary tensors."""
    if draw(st.integers(0, 3)) == 0:
        return tuple(draw(tensors(max_dims=4, sizes=(0, 1, 2, 3))) for _ in FIELDS)
    return draw(regression_pairs(tasks=(2,))) + draw(regression_pairs(tasks=(2,)))


@FUZZ
@given(task_fields())
def test_task_batch_validates_or_names_the_field(fields):
    batch = outcome(lambda: pb.TaskBatch(*fields).validate(), *FIELDS)
    event("valid" if batch is not None else "refused")
    if batch is None:
        return
    T = batch.x_support.size(0)
    for x, y in ((batch.x_support, batch.y_support), (batch.x_query, batch.y_query)):
        assert x.is_floating_point() and _finite(x) and x.shape[:2] == y.shape[:2]
        assert x.size(0) == T and x.device.type != "meta"
    assert batch.x_support.size(1) > 0


@FUZZ
@given(st.integers(1, 6), st.one_of(st.integers(-2, 9), st.floats(allow_nan=True),
                                   st.booleans(), st.none()))
def test_task_pool_sample_sizes(num_tasks, batch_size):
    x = torch.randn(num_tasks, 3, 1)
    pool = pb.TaskPool(pb.TaskBatch(x, x[..., 0], x, x[..., 0]))
    batch = outcome(lambda: pool.sample(batch_size, torch.Generator().manual_seed(0)),
                    "batch_size")
    if batch is not None:
        assert batch.num_tasks == batch_size and len(set(batch.x_support[:, 0, 0].tolist())) \
            == batch_size  # distinct tasks


# ---------------------------------------------------------------- adapt / predict
@pytest.fixture(scope="module")
def learner():
    pyro.set_rng_seed(0)
    return pb.BMAML(BayesianMLP(hidden=(4,)), num_particles=2, init="paper")


@FUZZ
@given(data=regression_pairs(), steps=STEPS)
def test_adapt_and_predict(learner, data, steps):
    x, y = data
    posterior = outcome(lambda: learner.adapt(x, y, num_steps=steps), "x", "y", "num_steps")
    event("adapted" if posterior is not None else "refused")
    if posterior is None:
        return
    if x.dim() == y.dim():  # 1-D inputs given as (N,) or (T, N)
        x = x.unsqueeze(-1)
    assert x.shape[:-1] == y.shape and x.shape[-1] == 1  # what went in matched
    assert x.dtype == torch.float32 and y.size(-1) > 0 and _finite(x) and _finite(y)
    assert _finite(posterior.particles)
    assert posterior.particles.shape == y.shape[:-1] + (2, learner.potential.dim)
    mean = posterior.predict(x)["mean"]
    assert mean.shape == y.shape and _finite(mean)


@FUZZ
@given(data=regression_pairs(tasks=(None,)), samples=STEPS.filter(lambda v: v is not None))
def test_predict_inputs(learner, data, samples):
    x = data[0]
    posterior = learner.adapt(torch.randn(4, 1), torch.randn(4))
    out = outcome(lambda: posterior.predict(x, num_samples=samples), "x", "num_samples")
    event("predicted" if out is not None else "refused")
    if out is not None:
        assert x.dim() == 2 and x.shape[-1] == 1 and x.dtype == torch.float32 and _finite(x)
        assert out["mean"].shape == x.shape[:1] and _finite(out["mean"])
        if samples:
            assert out["samples"].shape == (2 * samples, x.size(0)) and _finite(out["samples"])


@FUZZ
@given(task_fields())
def test_evaluate_on_fuzzed_tasks(learner, fields):
    scores = outcome(lambda: evaluate(learner, pb.TaskBatch(*fields)), *FIELDS)
    event("scored" if scores is not None else "refused")
    if scores is not None:
        assert all(math.isfinite(v[0]) for v in scores.values()
                   if isinstance(v, tuple) and isinstance(v[0], float))


# ---------------------------------------------------------------- the engine
regression = linear_regression  # w (2,), tau: D = 3


@FUZZ
@given(data=regression_pairs(tasks=(None,)))
def test_svgd_step_on_fuzzed_data(data):
    x, y = data
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    svgd = pb.SVGD(regression, pb.RBFSteinKernel(), Adam({"lr": 0.01}), 3)
    # the arguments by position, or the observed site they feed
    squares = outcome(lambda: svgd.step(x, y), "args[0]", "args[1]", "'y'")
    event("stepped" if squares is not None else "refused")
    if squares is not None:
        assert set(squares) == {"w", "tau"} and all(map(math.isfinite, squares.values()))
        assert x.dim() == 2 and y.shape == x.shape[:1] and _finite(x) and _finite(y)


BAD_NUMBERS = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-2, 3),
                        st.booleans(), st.none(), st.just("0.1"))


@FUZZ
@given(particles=st.one_of(tensors(shape=(3, 3), dtypes=(torch.float32,)),
                           tensors(shape=(2, 3, 3), dtypes=(torch.float32,)),
                           tensors(min_dims=1, max_dims=4, sizes=(0, 1, 2, 3))),
       steps=st.one_of(st.integers(0, 3), BAD_NUMBERS),
       step_size=st.one_of(st.floats(1e-4, 0.5), BAD_NUMBERS,
                           tensors(max_dims=2, sizes=(1, 2, 3))),
       mode=st.sampled_from(["multivariate", "univariate", "diagonal"]))
def test_transport_arguments(particles, steps, step_size, mode):
    potential = pb.ModelPotential(regression)
    x, y = torch.linspace(-1, 1, 4).unsqueeze(-1), torch.zeros(4)
    if particles.is_floating_point() and particles.device.type != "meta":
        particles = particles.to(torch.float32)
    out = outcome(lambda: pb.transport(potential, pb.RBFSteinKernel(), particles, x, y,
                                       num_steps=steps, step_size=step_size, mode=mode),
                  "particles", "num_steps", "step_size", "mode")
    event("transported" if out is not None else "refused")
    if out is not None:
        assert out.shape == particles.shape and _finite(out)


# ---------------------------------------------------------------- the CLI
OPTIONS = {
    "--task": ["sinusoid", "normal-gamma", "nope", "folder:/nonexistent"],
    "--method": ["bmaml", "emaml", "maml", "other"],
    "--particles": ["0", "1", "2", "x", "-3"],
    "--hidden": ["4", "4,x", "0", "", "3,3"],
    "--lr": ["0", "-1", "nan", "inf", "1e-3", "1e300"],
    "--meta-batch": ["0", "3", "2"],
    "--shots": ["0", "2", "1.5"],
    "--eval-tasks": ["0", "3"],
    "--step-size": ["nan", "0", "1e-3", "inf"],
    "--inner-steps": ["0", "1", "-1"],
    "--iterations": ["0", "1", "-2", "1e9"],
    "--device": ["cpu", "cuda", "tpu", "cuda:x"],
    "--timeout": ["0", "5"],
}


@settings(max_examples=30, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
@given(st.dictionaries(st.sampled_from(sorted(OPTIONS)), st.integers(0, 5), max_size=5))
def test_cli_arguments(tmp_path_factory, capsys, picks):
    from pyro_bmaml.cli import main

    argv = ["train", "--no-progress", "--out", str(tmp_path_factory.mktemp("cli")),
            "--iterations", "1", "--eval-tasks", "2", "--hidden", "4", "--particles", "2",
            "--meta-batch", "2", "--num-tasks", "10"]
    for option, pick in picks.items():
        values = OPTIONS[option]
        argv += [option, values[pick % len(values)]]
    try:
        code = main(argv)
    except SystemExit as stop:  # argparse's own refusal
        code = stop.code
    captured = capsys.readouterr()
    assert code in (0, 2), (argv, captured.err[-2000:])
    if code == 2:
        lines = [line for line in captured.err.strip().splitlines() if line]
        assert lines and "error:" in lines[-1] and "Traceback" not in captured.err, captured.err
