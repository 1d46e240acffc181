"""Bad input raises a clear TypeError/ValueError naming the argument."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.optim import Adam

import pyro_bmaml as pb
from models_for_tests import normal_gamma_regression, regression_data


def _svgd(model=normal_gamma_regression, **kw):
    args = dict(kernel=pb.RBFSteinKernel(), optim=Adam({"lr": 0.1}), num_particles=5,
                max_plate_nesting=0)
    args.update(kw)
    return pb.SVGD(model, **args)


def test_discrete_latent_site():
    def model():
        pyro.sample("k", dist.Categorical(torch.ones(3) / 3))

    with pytest.raises(ValueError, match="discrete latent site 'k'"):
        _svgd(model).step()


def test_no_latent_site():
    def model(y):
        pyro.sample("y", dist.Normal(0.0, 1.0), obs=y)

    with pytest.raises(ValueError, match="no latent sample site"):
        _svgd(model).step(torch.tensor(1.0))


@pytest.mark.parametrize("kw,err,match", [
    (dict(num_particles=1), ValueError, "num_particles must be >= 2"),
    (dict(num_particles=2.5), TypeError, "num_particles must be an int"),
    (dict(mode="joint"), ValueError, "mode must be one of"),
    (dict(kernel="rbf"), TypeError, "kernel must be"),
    (dict(optim=torch.optim.Adam), TypeError, "optim must be a pyro.optim.PyroOptim"),
    (dict(max_plate_nesting=-1), ValueError, "max_plate_nesting"),
])
def test_constructor_arguments(kw, err, match):
    with pytest.raises(err, match=match):
        _svgd(**kw)


def test_model_not_callable():
    with pytest.raises(TypeError, match="model must be callable"):
        pb.ModelPotential(3)


def test_transport_arguments():
    X, y = regression_data()
    svgd = _svgd()
    init = svgd.init_particles(X, y)
    with pytest.raises(ValueError, match=r"particles must have shape \(M, 4\)"):
        svgd.transport(init[:, :3], X, y, num_steps=1, step_size=0.1)
    with pytest.raises(ValueError, match="at least 2 particles"):
        svgd.transport(init[:1], X, y, num_steps=1, step_size=0.1)
    with pytest.raises(TypeError, match="floating dtype"):
        svgd.transport(init.long(), X, y, num_steps=1, step_size=0.1)
    with pytest.raises(TypeError, match="torch.Tensor"):
        svgd.transport(init.tolist(), X, y, num_steps=1, step_size=0.1)
    with pytest.raises(ValueError, match="particles contains non-finite"):
        svgd.transport(init * float("nan"), X, y, num_steps=1, step_size=0.1)
    with pytest.raises(ValueError, match="num_steps must be >= 0"):
        svgd.transport(init, X, y, num_steps=-1, step_size=0.1)
    with pytest.raises(ValueError, match="step_size must be a finite number > 0"):
        svgd.transport(init, X, y, num_steps=1, step_size=0.0)
    with pytest.raises(ValueError, match="step_size"):
        svgd.transport(init, X, y, num_steps=1, step_size=-1e-3)
    bad_y = y.clone()
    bad_y[3] = float("inf")
    with pytest.raises(ValueError, match=r"args\[1\] contains non-finite"):
        svgd.transport(init, X, bad_y, num_steps=1, step_size=0.1)
    with pytest.raises(ValueError, match="leading task dim of size 2"):
        svgd.transport(init.expand(2, 5, 4), X, y, num_steps=1, step_size=0.1)


def test_step_rejects_non_finite_data():
    X, y = regression_data()
    with pytest.raises(ValueError, match=r"args\[0\] contains non-finite"):
        _svgd().step(X * float("nan"), y)


def test_step_rejects_param_store_in_stock_layout():
    X, y = regression_data()
    pyro.param("svgd_particles", torch.zeros(20))
    with pytest.raises(ValueError, match="one row per particle"):
        _svgd().step(X, y)


def test_pack_errors():
    X, y = regression_data()
    potential = pb.ModelPotential(normal_gamma_regression).setup(X, y)
    with pytest.raises(ValueError, match="missing \\['w'\\]"):
        potential.pack({"tau": torch.ones(3)})
    with pytest.raises(ValueError, match=r"named\['w'\] must have shape"):
        potential.pack({"tau": torch.ones(3), "w": torch.ones(3, 2)})
    with pytest.raises(ValueError, match=r"flat must have shape \(\.\.\., 4\)"):
        potential.unpack(torch.ones(3, 5))
    with pytest.raises(RuntimeError, match="setup"):
        _ = pb.ModelPotential(normal_gamma_regression).dim


def test_broadcasting_likelihood_is_an_error_naming_the_site():
    """The natural mistake ``mean = a * x + b`` with x of shape (N, 1): Pyro broadcasts the
    likelihood to N x N terms silently; setting the learner up names the site and the fix."""
    from pyro_bmaml import BMAML

    def line(x, y=None):
        a = pyro.sample("a", dist.Normal(0.0, 1.0))
        b = pyro.sample("b", dist.Normal(0.0, 1.0))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("y", dist.Normal(a * x + b, 0.5), obs=y)  # (N, 1) vs (N,)
        return a * x + b

    x, y = torch.randn(5, 1), torch.randn(5)
    with pytest.raises(ValueError, match=r"observed site 'y'.*\(5, 5\).*data=5.*x\[:, 0\]"):
        BMAML(line, num_particles=3, example_args=(x, y))


def test_engine_refuses_silent_wrong_answers():
    pyro.clear_param_store()
    x, y = regression_data()

    def infinite(x, y):  # a likelihood of zero: log density -inf for every particle
        w = pyro.sample("w", dist.Normal(0.0, 1.0))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("y", dist.Uniform(w + 100.0, w + 101.0), obs=y)

    with pytest.raises(FloatingPointError, match="log density is non-finite for 5 particle"):
        with pyro.validation_enabled(False):
            _svgd(infinite).step(x, y)
    pyro.clear_param_store()
    with pytest.raises(ValueError, match=r"args\[0\] is empty"):
        _svgd().step(x[:0], y[:0])
    pyro.clear_param_store()
    with pytest.raises(TypeError, match=r"args\[1\] is torch.float64 but the particles are torch.float32"):
        _svgd().step(x, y.double())
    pyro.clear_param_store()
    svgd = _svgd()
    theta = svgd.init_particles(x, y)
    with pytest.warns(UserWarning, match="all particles are identical"):
        svgd.transport(theta[:1].expand(5, -1).clone(), x, y, num_steps=1, step_size=1e-3)
    post = pb.ParticlePosterior(svgd.potential, theta, x, y)
    with pytest.raises(ValueError, match="non-finite"):
        post.predict(x * float("nan"))


class _ConstantProfile(pb.SteinKernel):
    """A custom kernel whose profile is one constant value (NaN, or huge but finite)."""

    def __init__(self, log_value):
        super().__init__(bandwidth=1.0)
        self.log_value = log_value

    def _log_profile(self, r):
        return torch.full_like(r, self.log_value), 0.0


def test_svgd_step_refuses_a_non_finite_direction_but_not_an_overflowing_square():
    """The step reads every site's mean square in one transfer: a non-finite one means a
    non-finite direction, unless the squares of finite values overflowed (then the values
    themselves are checked)."""
    x, y = regression_data()
    pyro.clear_param_store()
    svgd = _svgd(kernel=_ConstantProfile(float("nan")))
    with pytest.raises(FloatingPointError, match="update direction is non-finite"):
        svgd.step(x, y)
    pyro.clear_param_store()
    huge = _svgd(kernel=_ConstantProfile(60.0), optim=Adam({"lr": 1e-3}))  # f = e^60 ~ 1e26
    squares = huge.step(x, y)
    assert not any(map(math.isfinite, squares.values()))  # the squares overflow float32
    assert torch.isfinite(pyro.param("svgd_particles").unconstrained()).all()  # and it stepped
    pyro.clear_param_store()


def test_unknown_model_arguments_name_the_signature():
    x, y = regression_data()
    with pytest.raises(TypeError, match=r"unexpected keyword argument 'noise'.*signature is \(X, y, a0=2.0"):
        pb.ModelPotential(normal_gamma_regression).setup(x, y, noise=0.1)


def test_temperature_is_checked_alike_everywhere():
    """SVPG's temperature: one check (a finite real >= 0) in the kernel step, the learner and
    the policy model."""
    from pyro_bmaml.tasks.models import GaussianMLPPolicy

    X, y = regression_data()
    svgd = _svgd()
    init = svgd.init_particles(X, y)
    with pytest.raises(ValueError, match="temperature must be a finite number >= 0, got -1"):
        svgd.transport(init, X, y, num_steps=1, step_size=0.1, temperature=-1.0)
    with pytest.raises(TypeError, match="temperature must be a real number, got str"):
        GaussianMLPPolicy(temperature="hot")
    with pytest.raises(ValueError, match="temperature must be a finite number >= 0, got nan"):
        pb.BMAML(GaussianMLPPolicy(hidden=(4,)), num_particles=2, init="paper",
                 temperature=float("nan"))


def test_finiteness_check_is_exact_when_a_sum_overflows():
    """The one-pass value check (a finite sum means every value is finite) falls back to the
    elementwise check when the sum itself overflows: huge finite values pass, NaN and inf
    do not."""
    from pyro_bmaml._checks import all_finite

    huge = torch.full((4,), 3e38)  # float32: the sum overflows to inf
    assert all_finite(huge) and all_finite(torch.empty(0))
    for bad in (float("nan"), float("inf"), -float("inf")):
        x = torch.ones(5)
        x[3] = bad
        assert not all_finite(x)
    x = torch.tensor([float("inf"), -float("inf")])  # a sum of NaN
    assert not all_finite(x)


def test_a_model_returning_a_scalar_instead_of_its_mean_is_refused_at_setup():
    """The convention a learner relies on (the return value is the predictive mean, one entry
    per observed point) is checked when the learner is built, naming both shapes; SVGD alone,
    which never reads the return value, still takes such a model (Pyro's own tests' models
    return whatever they like)."""
    x, y = torch.linspace(-1, 1, 6).unsqueeze(-1), torch.zeros(6)

    def line(x, y=None, returned="mean"):
        a = pyro.sample("a", dist.Normal(0.0, 1.0))
        b = pyro.sample("b", dist.Normal(0.0, 1.0))
        mean = a * x[:, 0] + b
        with pyro.plate("data", x.shape[0]):
            pyro.sample("y", dist.Normal(mean, 0.1), obs=y)
        return {"mean": mean, "scalar": a, "column": mean.unsqueeze(0)}[returned]

    learner = pb.BMAML(line, num_particles=2, example_args=(x, y))
    assert learner.adapt(x, y).predict(x)["mean"].shape == (6,)
    for returned, shape in (("scalar", r"\(\)"), ("column", r"\(1, 6\)")):
        model = lambda x, y=None, r=returned: line(x, y, r)  # noqa: E731
        for cls in (pb.BMAML, pb.EMAML, pb.MAML):
            kwargs = {} if cls is pb.MAML else {"num_particles": 2}
            with pytest.raises(ValueError, match=rf"returns a tensor of shape {shape}, but its "
                                                 r"observed site 'y' has shape \(6,\)"):
                cls(model, example_args=(x, y), **kwargs)
        svgd = pb.SVGD(model, pb.RBFSteinKernel(), Adam({"lr": 0.01}), 3)
        assert set(svgd.step(x, y)) == {"a", "b"}


def _overflowing_classifier(x, y=None):
    """Two classes with logits (w x, 2 w x): finite for any finite w x, NaN after softmax
    normalisation once w x overflows to inf (inf - inf)."""
    w = pyro.sample("w", dist.Normal(0.0, 1.0))
    logits = torch.stack([w * x, 2 * w * x], -1)
    with pyro.plate("data", x.shape[0]):
        pyro.sample("y", dist.Categorical(logits=logits), obs=y)
    return torch.softmax(logits, -1)


def test_posterior_refuses_nan_outputs_of_finite_but_diverged_particles():
    """An adaptation can end on finite particles so large that the model's outputs are NaN
    (found on the digits MLP: weights near 3e18 after ten learned steps, and a NaN NLL and
    ECE reported without an error). The posterior's log predictive density and predictive
    mean raise, naming the count and the particles' magnitude; -inf (no density) is kept."""
    x, y = torch.tensor([1.0, -2.0, 10.0]), torch.tensor([1, 0, 1])
    potential = pb.ModelPotential(_overflowing_classifier)
    potential.setup(x, y)
    diverged = pb.ParticlePosterior(potential, torch.tensor([[0.5], [3e38]]), x, y)
    with pytest.raises(FloatingPointError, match=r"log likelihood is NaN for 3 of 6 values; "
                                                 r"the particles' largest magnitude is 3e\+38"):
        diverged.log_predictive_density(x, y)
    with pytest.raises(FloatingPointError, match=r"predictive mean is NaN for 6 of 12 values"):
        diverged.predict(x)
    sane = pb.ParticlePosterior(potential, torch.tensor([[0.5], [1e3]]), x, y)
    lpd = sane.log_predictive_density(x, y)  # the 1e3 particle gives ~0 density: a value
    p = torch.sigmoid(torch.tensor([0.5, -1.0, 5.0]))  # particle 0's P(y = 1) = sigmoid(w x)
    expected = torch.log(0.5 * torch.where(y == 1, p, 1 - p)
                         + 0.5 * torch.tensor([1.0, 1.0, 1.0]))
    assert torch.allclose(lpd, expected, atol=1e-5)
