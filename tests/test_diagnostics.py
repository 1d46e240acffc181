"""ArviZ encoding, KSD, predictive metrics and plots."""

import math

import arviz as az
import matplotlib
import pyro
import pyro.distributions as dist
import pytest
import torch

import pyro_bmaml as pb
from pyro_bmaml.evaluation.diagnostics import summary, to_inference_data
from pyro_bmaml.engine.ksd import ksd, stein_kernel_matrix
from pyro_bmaml.meta.learners import BMAML
from pyro_bmaml.evaluation.metrics import (RELIABILITY_LEVELS, interval_scores, mixture_cdf,
                                mixture_crps, mixture_quantile, pit_coverage,
                                regression_metrics)
from pyro_bmaml.tasks.models import BayesianMLP
from pyro_bmaml.engine.posterior import ParticlePosterior
from pyro_bmaml.tasks.base import Sinusoid

matplotlib.use("Agg")


@pytest.fixture(scope="module")
def adapted():
    pyro.set_rng_seed(0)
    learner = BMAML(BayesianMLP(hidden=(6,)), num_particles=5, init="paper")
    tasks = Sinusoid(num_tasks=10, num_support=4, num_query=3).evaluation_tasks(3)
    return learner, tasks, learner.adapt(tasks.x_support, tasks.y_support, track_ksd=True)


# ------------------------------------------------------------------ ArviZ
def test_inference_data_groups_dims_and_shapes(adapted):
    learner, tasks, post = adapted
    idata = post.to_inference_data(tasks.x_query, tasks.y_query)
    assert set(idata.groups()) == {"posterior", "prior", "observed_data", "constant_data",
                                   "log_likelihood", "posterior_predictive", "predictions",
                                   "predictions_constant_data"}
    w = idata.posterior["layer0.weight"]
    assert w.dims == ("chain", "draw", "task", "layer0.weight_dim_0", "layer0.weight_dim_1")
    assert w.shape == (1, 5, 3, 1, 6)
    assert idata.posterior["noise_precision"].shape == (1, 5, 3)
    assert list(idata.posterior["particle"].values) == list(range(5))
    named = post.named
    assert torch.allclose(torch.as_tensor(w.values[0]), named["layer0.weight"].transpose(0, 1))
    assert idata.prior["layer0.weight"].dims == ("chain", "draw", "layer0.weight_dim_0",
                                                 "layer0.weight_dim_1")
    assert torch.allclose(torch.as_tensor(idata.prior["layer0.bias"].values[0]),
                          learner.potential.unpack(learner.theta0.detach())["layer0.bias"])
    assert idata.observed_data["y"].dims == ("task", "support")
    assert idata.constant_data["x"].shape == (3, 4, 1)
    assert idata.log_likelihood["y"].shape == (1, 5, 3, 4)
    assert idata.posterior_predictive["y"].shape == (1, 5, 3, 4)
    assert idata.predictions["y"].dims == ("chain", "draw", "task", "query")
    assert idata.predictions_constant_data["x"].shape == (3, 3, 1)
    ll = learner.potential.log_likelihood(post.particles, tasks.x_support, tasks.y_support)
    assert torch.allclose(torch.as_tensor(idata.log_likelihood["y"].values[0]), ll.transpose(0, 1))
    attrs = idata.posterior.attrs
    assert attrs["inference_method"] == "bmaml" and attrs["num_particles"] == 5
    assert attrs["bandwidth_rule"] == "median" and attrs["step_size"] == 1e-3
    assert "RBFSteinKernel" in attrs["kernel"] and attrs["num_steps"] == learner.inner_steps == 3


def test_single_task_posterior_has_a_task_dim_of_one(adapted):
    _, tasks, post = adapted
    idata = post.task(1).to_inference_data()
    assert idata.posterior["noise_precision"].shape == (1, 5, 1)
    assert idata.observed_data["y"].shape == (1, 4)


def test_plate_singletons_are_squeezed():
    def model(y):
        with pyro.plate("groups", 3, dim=-1):
            with pyro.plate("inner", 1, dim=-2):
                mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
            pyro.sample("y", dist.Normal(mu, 1.0), obs=y)

    y = torch.tensor([[0.5, -1.0, 2.0]])
    svgd = pb.SVGD(model, pb.RBFSteinKernel(), pyro.optim.Adam({"lr": 0.1}), 4, 2)
    svgd.step(y)
    assert svgd.get_named_particles()["mu"].shape == (4, 1, 3)
    post = ParticlePosterior(svgd.potential, pyro.param("svgd_particles").detach())
    idata = to_inference_data(post)
    assert idata.posterior["mu"].dims == ("chain", "draw", "task", "mu_dim_0")
    assert idata.posterior["mu"].shape == (1, 4, 1, 3)


def test_netcdf_round_trip(adapted, tmp_path):
    _, tasks, post = adapted
    idata = post.to_inference_data(tasks.x_query, tasks.y_query)
    path = tmp_path / "posterior.nc"
    idata.to_netcdf(str(path))
    back = az.from_netcdf(str(path))
    assert set(back.groups()) == set(idata.groups())
    for group in idata.groups():
        for name, var in getattr(idata, group).data_vars.items():
            assert (getattr(back, group)[name].values == var.values).all(), (group, name)
    assert back.posterior.attrs["inference_method"] == "bmaml"


def test_arviz_summary_and_plots(adapted, tmp_path):
    import matplotlib.pyplot as plt

    _, _, post = adapted
    idata = post.to_inference_data()
    table = summary(idata, var_names=["noise_precision"])
    assert list(table.columns) == ["mean", "sd", "hdi_3%", "hdi_97%"]
    assert len(table) == 3
    with pytest.raises(ValueError, match="kind='stats'"):
        summary(idata, kind="all")
    for i, plot in enumerate((az.plot_posterior, az.plot_forest)):
        plot(idata, var_names=["noise_precision"])
        fig = plt.gcf()
        path = tmp_path / f"plot{i}.png"
        fig.savefig(path)
        plt.close("all")
        assert path.stat().st_size > 1000


# ------------------------------------------------------------------ KSD
def _stein_kernel_autograd(x, y, s, h, kernel):
    """u_p(x, y) from autograd derivatives of k (D small)."""
    x = x.clone().requires_grad_()
    y = y.clone().requires_grad_()

    def k(a, b):
        return kernel._profile_derivatives((a - b).pow(2).sum() / h)[0]

    kv = k(x, y)
    gx, gy = torch.autograd.grad(kv, (x, y), create_graph=True)
    trace = sum(torch.autograd.grad(gx[d], y, retain_graph=True)[0][d] for d in range(x.numel()))
    return (kv * s(x) @ s(y) + s(x) @ gy + gx @ s(y) + trace).detach()


@pytest.mark.parametrize("kernel", [pb.RBFSteinKernel(bandwidth="median"),
                                    pb.IMQSteinKernel(alpha=1.0, beta=-0.5, bandwidth="median"),
                                    pb.IMQSteinKernel(alpha=0.3, beta=-0.8, bandwidth=2.0)])
def test_stein_kernel_against_autograd(kernel):
    torch.manual_seed(0)
    x = torch.randn(5, 3, dtype=torch.float64)

    def score(z):
        return -(z - 0.5) / 2.0

    u = stein_kernel_matrix(x, score(x), kernel)
    h = kernel.bandwidth(x).item()
    for i in range(5):
        for j in range(5):
            expected = _stein_kernel_autograd(x[i], x[j], score, h, kernel)
            assert torch.allclose(u[i, j], expected, rtol=1e-8, atol=1e-10)


def test_ksd_known_answer_gaussian_shift():
    """p = N(0, s^2 I), q = N(mu, s^2 I), RBF with fixed h: s_p - s_q = -mu / s^2 is constant,
    so KSD^2 = |mu|^2 / s^4 * E k(x, y) = |mu|^2 / s^4 * (1 + 4 s^2 / h)^(-D / 2)."""
    torch.manual_seed(0)
    d, s, h = 2, 1.5, 3.0
    mu = torch.tensor([0.8, -0.4], dtype=torch.float64)
    truth = mu.pow(2).sum() / s**4 * (1 + 4 * s**2 / h) ** (-d / 2)
    kernel = pb.RBFSteinKernel(bandwidth=h)
    estimates = []
    for _ in range(20):
        x = mu + s * torch.randn(400, d, dtype=torch.float64)
        estimates.append(ksd(x, -x / s**2, kernel, statistic="u"))
    est = torch.stack(estimates)
    se = est.std() / math.sqrt(len(est))
    assert abs(est.mean() - truth) < 4 * se, (est.mean(), truth, se)
    assert truth > 10 * se  # the check can tell a shift from no shift


def test_ksd_is_zero_in_expectation_at_the_target():
    torch.manual_seed(1)
    kernel = pb.RBFSteinKernel(bandwidth=2.0)
    vals = []
    for _ in range(20):
        x = torch.randn(300, 2, dtype=torch.float64)
        vals.append(ksd(x, -x, kernel, statistic="u"))
    vals = torch.stack(vals)
    assert abs(vals.mean()) < 4 * vals.std() / math.sqrt(20)


def test_ksd_decreases_along_svgd_and_is_recorded(adapted):
    learner, tasks, _ = adapted
    post = learner.adapt(tasks.x_support, tasks.y_support, num_steps=10, track_ksd=True)
    k = post.info["ksd"]
    assert k.shape == (11, 3) and (k >= 0).all()
    assert (k[-1] < k[0]).all()


# ------------------------------------------------------------------ metrics
def test_one_component_metrics_equal_closed_forms():
    loc = torch.tensor([[0.3, -1.0, 2.0]], dtype=torch.float64)  # (M=1, N=3)
    scale = torch.tensor([[0.5, 2.0, 1.0]], dtype=torch.float64)
    y = torch.tensor([0.1, 0.5, 4.0], dtype=torch.float64)
    z = (y - loc[0]) / scale[0]
    normal = torch.distributions.Normal(0.0, 1.0)
    crps = scale[0] * (z * (2 * normal.cdf(z) - 1) + 2 * normal.log_prob(z).exp() - 1 / math.sqrt(math.pi))
    assert torch.allclose(mixture_crps(y, loc, scale), crps, rtol=1e-6)
    assert torch.allclose(mixture_cdf(y, loc, scale), normal.cdf(z))
    q = mixture_quantile(0.975, loc, scale)
    assert torch.allclose(q, loc[0] + scale[0] * normal.icdf(torch.tensor(0.975, dtype=torch.float64)), atol=1e-9)
    hits, widths = interval_scores(y, loc, scale, (0.5, 0.95))
    assert torch.allclose(widths[1], 2 * 1.959963984540054 * scale[0], atol=1e-8)
    assert hits.tolist() == [[1.0, 0.0, 0.0], [1.0, 1.0, 0.0]]


def test_mixture_cdf_and_quantile_are_inverse():
    torch.manual_seed(0)
    loc, scale = torch.randn(2, 4, 5, dtype=torch.float64), torch.rand(2, 4, 5, dtype=torch.float64) + 0.2
    for p in (0.05, 0.5, 0.9):
        q = mixture_quantile(p, loc, scale)
        assert torch.allclose(mixture_cdf(q, loc, scale), torch.full_like(q, p), atol=1e-10)


def test_pit_coverage_equals_the_interval_hits():
    """y is in the central interval of level p iff its PIT lies in [(1-p)/2, (1+p)/2]."""
    torch.manual_seed(0)
    loc = torch.randn(3, 4, 50, dtype=torch.float64)
    scale = torch.rand(3, 4, 50, dtype=torch.float64) + 0.3
    y = 2 * torch.randn(3, 50, dtype=torch.float64)
    levels = (0.1, 0.5, 0.9)
    hits, _ = interval_scores(y, loc, scale, levels)
    assert torch.equal(pit_coverage(mixture_cdf(y, loc, scale), levels), hits)
    with pytest.raises(ValueError, match="levels must lie in"):
        pit_coverage(y, (0.5, 1.0))


def test_mse_per_particle_is_mse_plus_particle_spread():
    """Bias-variance identity: mean_m (f_m - y)^2 = (mean_m f_m - y)^2 + var_m f_m."""
    torch.manual_seed(0)
    x, y = torch.randn(2, 6, 1), torch.randn(2, 6)
    potential = pb.ModelPotential(_linear_model).setup(x[0], y[0])
    particles = torch.randn(2, 5, 1)
    m = regression_metrics(ParticlePosterior(potential, particles), x, y)
    f = particles * x[:, None, :, 0]  # (T, M, N)
    spread = f.var(1, unbiased=False).mean(-1)
    expected = m["per_task"]["mse"] + spread
    assert torch.allclose(m["per_task"]["mse_particles"], expected, atol=1e-5)
    assert set(m["reliability"]) == set(RELIABILITY_LEVELS)
    assert "crps" not in m and "crps" in regression_metrics(ParticlePosterior(potential, particles),
                                                          x, y, crps=True)


def _linear_model(x, y=None):
    w = pyro.sample("w", dist.Normal(0.0, 3.0))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("y", dist.Normal(w * x[:, 0], 0.5), obs=y)
    return w * x[:, 0]


def test_well_specified_model_is_calibrated_and_nll_matches():
    """Particles at the true parameter of a Normal model: the predictive is the data's law,
    so coverage is nominal up to binomial noise and the NLL is the Gaussian NLL."""
    torch.manual_seed(0)
    t, n = 4, 500
    x = torch.rand(t, n, 1) * 4 - 2
    y = 1.7 * x[:, :, 0] + 0.5 * torch.randn(t, n)
    potential = pb.ModelPotential(_linear_model).setup(x[0], y[0])
    post = ParticlePosterior(potential, torch.full((t, 3, 1), 1.7))
    m = regression_metrics(post, x, y)
    for level, (cov, _) in m["coverage"].items():
        assert abs(cov - level) < 3 * math.sqrt(level * (1 - level) / (t * n)), (level, cov)
        assert abs(m["width"][level][0] - 2 * 0.5 * torch.distributions.Normal(0, 1).icdf(
            torch.tensor((1 + level) / 2)).item()) < 1e-5
    nll = -torch.distributions.Normal(1.7 * x[:, :, 0], 0.5).log_prob(y).mean()
    assert abs(m["nll"][0] - nll.item()) < 1e-4
    assert m["pit"].shape == (t, n)


def test_metrics_reject_non_normal_likelihood():
    def model(x, y=None):
        rate = pyro.sample("rate", dist.Gamma(2.0, 1.0))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("y", dist.Poisson(rate * x[:, 0]), obs=y)
        return rate * x[:, 0]

    x, y = torch.ones(2, 3, 1), torch.ones(2, 3)
    post = ParticlePosterior(pb.ModelPotential(model).setup(x[0], y[0]), torch.zeros(2, 3, 1))
    with pytest.raises(ValueError, match="Poisson likelihood"):
        regression_metrics(post, x, y)
    # NLL and MSE need no closed form: they work for any likelihood
    m = regression_metrics(post, x, y, closed_form=False)
    rate = torch.tensor(1.0)  # exp(0): the particles sit at rate = 1
    nll = -dist.Poisson(rate).log_prob(torch.tensor(1.0))
    assert abs(m["nll"][0] - nll.item()) < 1e-6 and "crps" not in m


# ------------------------------------------------------------------ plots
def test_model_without_a_return_value_gets_a_clear_error():
    def model(x, y=None):
        w = pyro.sample("w", dist.Normal(0.0, 1.0))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("y", dist.Normal(w * x[:, 0], 1.0), obs=y)

    x = torch.ones(3, 1)
    potential = pb.ModelPotential(model).setup(x, torch.ones(3))
    with pytest.raises(ValueError, match="must return its predictive mean"):
        potential.model_output(torch.zeros(2, 1), x)
    with pytest.warns(UserWarning, match="returns no predictive mean"):  # predict falls back
        assert ParticlePosterior(potential, torch.zeros(2, 1)).predict(x)["mean"].shape == (3,)


def test_plots_write_non_empty_files(adapted, tmp_path):
    from pyro_bmaml.evaluation import plots

    _, tasks, post = adapted
    m = regression_metrics(post, tasks.x_query, tasks.y_query)
    paths = [
        plots.plot_reliability_panels({"a": {"X": m["reliability"]}, "b": {"Y": m["coverage"]}},
                                      tmp_path / "rel.png"),
        plots.plot_curve_panels({"mse": {"X": ([1, 2], [1.0, 0.5], [0.1, 0.1])},
                                 "coverage_90": {"X": ([1, 2], [0.5, 0.8], [0.0, 0.1])}},
                                tmp_path / "panels.png", "iteration"),
        plots.plot_predictive([post.task(0), post.task(1)], tmp_path / "pred.png",
                              truths=[torch.sin, torch.cos],
                              queries=[(tasks.x_query[0], tasks.y_query[0])] * 2),
        plots.plot_ksd(post.info["ksd"], tmp_path / "ksd.png"),
        plots.plot_calibration(m["coverage"], tmp_path / "cal.png"),
        plots.plot_training({"iteration": [1, 2, 3], "loss": [3.0, 2.0, 1.0],
                             "eval": [{"iteration": 3, "mse": [1.0, 0.1], "nll": [2.0, 0.2]}]},
                            tmp_path / "train.png"),
        plots.plot_curves({"a": ([1, 2], [1.0, 0.5], [0.1, 0.1])}, tmp_path / "c.png", "n", "mse"),
    ]
    for p in paths:
        assert p.stat().st_size > 5000


def test_inference_data_for_a_pyro_module_model():
    from test_potential import BayesianLinear

    model = BayesianLinear()
    x = torch.randn(3, 8, 2)
    y = x @ torch.tensor([1.0, -1.0]) + 0.3
    potential = pb.ModelPotential(model)
    init = torch.stack([potential.sample_prior(6, x[0], y[0]) for _ in range(3)])
    out = pb.transport(potential, pb.RBFSteinKernel(), init, x, y, num_steps=5, step_size=1e-3)
    post = ParticlePosterior(potential, out, x, y, info={"inference_method": "svgd"})
    idata = post.to_inference_data(x[:, :4], y[:, :4])
    assert idata.posterior["linear.weight"].dims == (
        "chain", "draw", "task", "linear.weight_dim_0", "linear.weight_dim_1")
    assert idata.posterior["linear.weight"].shape == (1, 6, 3, 1, 2)
    assert idata.posterior["sigma"].shape == (1, 6, 3)
    assert idata.log_likelihood["obs"].shape == (1, 6, 3, 8)  # the model's site name
    assert idata.predictions["obs"].shape == (1, 6, 3, 4)
    assert "prior" not in idata.groups()  # no meta-learned prior here


def test_ksd_trajectory_reuses_given_scores(adapted):
    """Scores passed in give the same KSD as scores recomputed from the potential."""
    learner, tasks, _ = adapted
    p = learner.theta0.detach().expand(3, -1, -1)
    _, score = learner.potential.log_density_and_grad(p, tasks.x_support, tasks.y_support)
    given = pb.ksd_trajectory(learner.potential, [p, p], tasks.x_support, tasks.y_support,
                              scores_per_step=[score, None])
    assert torch.allclose(given[0], given[1])
    with pytest.raises(ValueError, match="scores_per_step has 1 entries"):
        pb.ksd_trajectory(learner.potential, [p, p], tasks.x_support, tasks.y_support,
                          scores_per_step=[score])


def test_model_without_return_adapts_predicts_and_exports():
    """A model that returns nothing: adaptation and the posterior work; predict falls back
    to the mean of draws of the observed site (with a warning); ArviZ export works."""
    from pyro_bmaml import BMAML

    def silent(x, y=None):
        w = pyro.sample("w", dist.Normal(0.0, 2.0))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("y", dist.Normal(w * x[:, 0], 0.1), obs=y)

    pyro.set_rng_seed(0)
    x = torch.linspace(-1, 1, 6)[:, None]
    y = 1.5 * x[:, 0]
    with pytest.warns(UserWarning, match="returns no predictive mean"):
        learner = BMAML(silent, num_particles=4, example_args=(x, y), step_size=1e-3)
    post = learner.adapt(x, y, num_steps=20)
    with pytest.warns(UserWarning, match="estimates it from 100 draws"):
        pred = post.predict(x)
    exact = post.named["w"][:, None] * x[:, 0]  # (M, N): each particle's mean
    assert pred["particle_means"].shape == (4, 6)
    # 100 draws of sd 0.1: the estimate is within 4 s.e. = 0.04 of the exact mean
    assert (pred["particle_means"] - exact).abs().max() < 0.04
    with pytest.warns(UserWarning, match="returns no predictive mean"):
        idata = post.to_inference_data(x)
    assert idata.predictions["y"].shape == (1, 4, 1, 6)


def test_learned_prior_exports_as_a_pyro_prior_for_nuts():
    """The meta-learned particles as a Gaussian-mixture prior: its samples reproduce the
    particles' moments (mean; covariance + h^2), and NUTS with it on a new task matches the
    closed-form posterior of a Gaussian-mixture prior and a Gaussian likelihood."""
    from pyro.infer import MCMC, NUTS

    from pyro_bmaml import BMAML

    sigma, h = 0.5, 0.4

    def location(x, y=None):
        w = pyro.sample("w", dist.Normal(0.0, 10.0))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("y", dist.Normal(w + 0.0 * x[:, 0], sigma), obs=y)
        return w + 0.0 * x[:, 0]

    x = torch.zeros(4, 1)
    y = torch.tensor([1.0, 1.5, 0.9, 1.4])  # mean 1.2
    theta = torch.tensor([[-1.0], [0.5], [2.0]])
    learner = BMAML(location, num_particles=3, example_args=(x, y), init=theta,
                    calibration="none")
    prior = learner.prior_distribution(bandwidth=h)
    draws = prior.sample((40000,))
    assert abs(draws.mean().item() - theta.mean().item()) < 4 * (theta.var(unbiased=False) + h * h).sqrt().item() / 200
    assert draws.var().item() == pytest.approx(theta.var(unbiased=False).item() + h * h, rel=0.03)

    # closed form: each component's conjugate update, weights by the marginal likelihood
    n, ybar = len(y), y.mean()
    prec = 1 / h ** 2 + n / sigma ** 2
    means = (theta[:, 0] / h ** 2 + n * ybar / sigma ** 2) / prec
    logw = dist.Normal(theta[:, 0], (h ** 2 + sigma ** 2 / n) ** 0.5).log_prob(ybar)
    weights = torch.softmax(logw, 0)
    exact_mean = (weights * means).sum()
    exact_var = (weights * (1 / prec + means ** 2)).sum() - exact_mean ** 2

    pyro.set_rng_seed(0)
    model = learner.model_with_learned_prior(bandwidth=h)
    mcmc = MCMC(NUTS(model), num_samples=1000, warmup_steps=300, disable_progbar=True)
    mcmc.run(x, y)
    w = learner.potential.unpack(mcmc.get_samples()["theta"])["w"]
    # posterior sd ~0.25 and an ESS of a few hundred: mean error ~0.015, variance error ~0.005
    assert w.mean().item() == pytest.approx(exact_mean.item(), abs=0.06)
    assert w.var().item() == pytest.approx(exact_var.item(), abs=0.025)
    with pytest.raises(ValueError, match="bandwidth must be"):
        learner.prior_distribution(bandwidth="silverman")
