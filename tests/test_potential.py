"""Potential over flat particles: log density, Jacobians, pack/unpack, PyroModule models."""

import pyro
import pyro.distributions as dist
import torch

import pyro_bmaml as pb
from models_for_tests import BayesianLinear, normal_gamma_regression, regression_data


def test_log_density_includes_log_jacobian():
    X, y = regression_data()
    potential = pb.ModelPotential(normal_gamma_regression).setup(X, y)
    assert potential.site_names == ["tau", "w"] and potential.dim == 4
    u = torch.randn(6, 4)
    tau, w = u[:, 0].exp(), u[:, 1:]
    expected = (
        dist.Gamma(2.0, 2.0).log_prob(tau) + u[:, 0]  # log |d tau / d u| = u
        + dist.Normal(0.0, tau.rsqrt()[:, None]).log_prob(w).sum(-1)
        + dist.Normal(w @ X.T, tau.rsqrt()[:, None]).log_prob(y).sum(-1)
    )
    assert torch.allclose(potential.log_density(u, X, y), expected, rtol=1e-5)
    _, grad = potential.log_density_and_grad(u, X, y)
    for i in range(6):
        ui = u[i].clone().requires_grad_()
        g = torch.autograd.grad(potential.log_density(ui[None].expand(2, 4), X, y)[0], ui)[0]
        assert torch.allclose(grad[i], g, rtol=1e-5, atol=1e-5)


def test_pack_unpack_round_trip_and_shapes():
    def model():
        pyro.sample("simplex", dist.Dirichlet(torch.ones(4)))
        with pyro.plate("p", 3):
            pyro.sample("pos", dist.Gamma(2.0, 1.0))
        pyro.sample("m", dist.Normal(torch.zeros(2, 2), 1.0).to_event(2))

    potential = pb.ModelPotential(model).setup()
    assert potential.dim == 3 + 3 + 4  # the simplex has 3 free coordinates
    flat = potential.sample_prior(5)
    named = potential.unpack(flat)
    assert named["simplex"].shape == (5, 4) and named["pos"].shape == (5, 3)
    assert named["m"].shape == (5, 2, 2)
    assert torch.allclose(named["simplex"].sum(-1), torch.ones(5))
    assert torch.allclose(potential.pack(named), flat, atol=1e-5)
    # task-batched leading dims pass through
    assert potential.unpack(flat.expand(2, 5, 10))["m"].shape == (2, 5, 2, 2)


def test_pyro_module_with_pyro_sample_priors():
    model = BayesianLinear()
    x = torch.randn(8, 2)
    y = x @ torch.tensor([1.0, -1.0]) + 0.3
    potential = pb.ModelPotential(model)
    svgd = pb.SVGD(model, pb.RBFSteinKernel(), pyro.optim.Adam({"lr": 0.05}), 10, 1,
                   mode="multivariate")
    for _ in range(3):
        svgd.step(x, y)
    named = svgd.get_named_particles(compact=True)
    assert set(named) == {"linear.weight", "linear.bias", "sigma"}
    assert named["linear.weight"].shape == (10, 1, 2)
    flat = svgd.potential.pack(named)
    # log density equals a hand computation on the constrained values
    u_sigma = flat[:, svgd.potential.sites[[s.name for s in svgd.potential.sites].index("sigma")].columns]
    w, b, s = named["linear.weight"], named["linear.bias"], named["sigma"]
    expected = (
        dist.Normal(0.0, 1.0).log_prob(w).sum((-1, -2)) + dist.Normal(0.0, 10.0).log_prob(b).sum(-1)
        + dist.LogNormal(0.0, 1.0).log_prob(s) + u_sigma.squeeze(-1)
        + dist.Normal((x @ w.squeeze(1).T).T + b, s[:, None]).log_prob(y).sum(-1)
    )
    assert torch.allclose(potential.log_density(flat, x, y), expected, rtol=1e-4)
    # batched over tasks
    xb, yb = torch.stack([x, x]), torch.stack([y, y + 1])
    lp = potential.log_density(torch.stack([flat, flat]), xb, yb)
    assert lp.shape == (2, 10) and torch.allclose(lp[0], expected, rtol=1e-4)


def test_validation_is_restored_after_vectorized_call():
    X, y = regression_data()
    potential = pb.ModelPotential(normal_gamma_regression)
    with pyro.validation_enabled(True):
        potential.log_density(torch.randn(3, 4), X, y)
        assert pyro.poutine.util.is_validation_enabled()
        assert torch.distributions.Distribution._validate_args
