"""TRPO's pieces against exact references: conjugate gradient against a direct solve, the
Fisher-vector product against the KL's Hessian, and a trust-region step on a softmax policy
whose surrogate and KL are exact (no sampling): the step improves the surrogate and keeps
the KL within the region, hitting its edge when the quadratic model is good."""

import pytest
import torch

from pyro_bmaml.meta.trpo import TrustRegion, conjugate_gradient, fisher_vector_product


def test_conjugate_gradient_solves_a_positive_definite_system():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(12, 12, generator=g, dtype=torch.float64)
    matrix = a @ a.T + 0.5 * torch.eye(12, dtype=torch.float64)
    b = torch.randn(12, generator=g, dtype=torch.float64)
    exact = torch.linalg.solve(matrix, b)
    x = conjugate_gradient(lambda v: matrix @ v, b, iterations=12)  # n steps: exact
    torch.testing.assert_close(x, exact, rtol=1e-8, atol=1e-8)
    residuals = [float((matrix @ conjugate_gradient(lambda v: matrix @ v, b, k) - b).norm())
                 for k in (1, 4, 8)]
    assert residuals[0] > residuals[1] > residuals[2]
    with pytest.raises(ValueError, match="iterations must be >= 1"):
        conjugate_gradient(lambda v: v, b, iterations=0)


def _softmax_problem(dtype=torch.float64):
    old = torch.tensor([0.3, -0.2, 0.1, 0.0], dtype=dtype)
    advantages = torch.tensor([1.0, -0.5, 0.2, -0.7], dtype=dtype)
    logits = old.clone().requires_grad_(True)
    old_probs = torch.softmax(old, 0)

    def loss():  # -E_old[ratio * A], exactly: -sum_a pi_theta(a) A(a)
        return -(torch.softmax(logits, 0) * advantages).sum()

    def kl():  # KL(pi_old || pi_theta)
        return (old_probs * (old_probs.log() - torch.log_softmax(logits, 0))).sum()

    return logits, loss, kl, old


def test_fisher_vector_product_is_the_kl_hessian_times_v():
    logits, _, kl, old = _softmax_problem()
    hessian = torch.autograd.functional.hessian(
        lambda t: (torch.softmax(old, 0) * (torch.log_softmax(old, 0)
                                            - torch.log_softmax(t, 0))).sum(), old)
    v = torch.tensor([0.5, -1.0, 2.0, 0.25], dtype=torch.float64)
    product = fisher_vector_product(kl(), [logits], damping=0.1)(v)
    torch.testing.assert_close(product, hessian @ v + 0.1 * v)


@pytest.mark.parametrize("max_kl", [1e-4, 1e-2])
def test_a_trust_region_step_improves_the_surrogate_within_the_region(max_kl):
    logits, loss, kl, old = _softmax_problem()
    region = TrustRegion([logits], max_kl=max_kl, cg_iterations=10, damping=1e-8)
    info = region.step(loss, kl)
    assert info["loss_after"] < info["loss_before"]
    assert float(loss().detach()) == pytest.approx(info["loss_after"])
    assert float(kl().detach()) == pytest.approx(info["kl"]) and info["kl"] <= max_kl
    # a small region: the quadratic model holds, and the step lands at the region's edge
    # (the full step, or one backtrack when the actual KL exceeds the quadratic one a little)
    assert info["step_fraction"] >= 0.8 and info["kl"] >= 0.6 * max_kl
    # the direction is the natural gradient: it moves the best action's logit up most
    moved = logits.detach() - old
    assert int(moved.argmax()) == 0 and int(moved.argmin()) == 3


def test_a_large_region_backtracks_until_the_constraint_holds():
    """A Gaussian policy N(mu, exp(s)^2) from N(0, 1), advantages 1 - a^2 (surrogate, exact:
    mu^2 + sigma^2 - 1): the natural step shrinks s by sqrt(max_kl), and at max_kl = 3 the
    quadratic model badly underestimates the KL of a narrowed Gaussian (13.8 at the full
    step): the line search halves the step once (KL 1.47) and takes it."""
    theta = torch.zeros(2, dtype=torch.float64, requires_grad=True)  # (mu, s)

    def loss():
        return theta[0] ** 2 + torch.exp(2 * theta[1]) - 1

    def kl():  # KL(N(0, 1) || N(mu, sigma^2))
        return theta[1] + (1 + theta[0] ** 2) / (2 * torch.exp(2 * theta[1])) - 0.5

    info = TrustRegion([theta], max_kl=3.0, damping=0.0, backtrack_ratio=0.5).step(loss, kl)
    assert info["backtracks"] == 1 and info["step_fraction"] == 0.5
    assert float(theta[1].detach()) == pytest.approx(-0.5 * 3 ** 0.5)
    assert float(theta[0].detach()) == 0.0
    assert info["kl"] == pytest.approx(float(kl().detach())) and info["kl"] <= 3.0
    assert info["loss_after"] < info["loss_before"] == 0.0


def test_no_improving_step_leaves_the_parameters():
    """At the optimum of a surrogate (zero advantages) no step improves it: nothing moves."""
    logits = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    old_probs = torch.full((3,), 1 / 3, dtype=torch.float64)
    info = TrustRegion([logits], max_kl=0.01, max_backtracks=3).step(
        lambda: (logits - logits.detach()).pow(2).sum(),
        lambda: (old_probs * (old_probs.log() - torch.log_softmax(logits, 0))).sum())
    assert info["step_fraction"] == 0.0 and torch.equal(logits.detach(), torch.zeros(3,
                                                                                     dtype=torch.float64))


def test_arguments_are_checked():
    p = torch.zeros(2, requires_grad=True)
    with pytest.raises(TypeError, match="params"):
        TrustRegion([torch.zeros(2)])
    with pytest.raises(ValueError, match="max_kl"):
        TrustRegion([p], max_kl=0.0)
    with pytest.raises(ValueError, match="backtrack_ratio"):
        TrustRegion([p], backtrack_ratio=1.5)
    with pytest.raises(ValueError, match="damping"):
        TrustRegion([p], damping=-1.0)
