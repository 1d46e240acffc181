"""A hand-batched pure-torch BMAML chaser meta-step for the Bayesian MLP: the speed floor.

The same math as :meth:`pyro_bmaml.BMAML.meta_loss` with ``calibration="none"`` on
:class:`~pyro_bmaml.tasks.models.BayesianMLP` (log-space precisions with their Jacobians, Gamma
priors, Normal weights, Gaussian likelihood; the package's kernel, the same stop-gradients,
the same chaser distance), written directly on ``(T, M, ...)`` tensors: no Pyro, no vmap.
It is what a careful user would write by hand for this one model; the benchmarks divide
the package's time by it. ``check_floor`` asserts that both give the same meta-gradient.
"""

from __future__ import annotations

import math

import torch

from pyro_bmaml.engine.svgd import svgd_direction


def _gamma_log_prob(log_x, shape, rate):
    return shape * math.log(rate) - math.lgamma(shape) + (shape - 1) * log_x - rate * log_x.exp()


def log_joint(learner, theta, x, y):
    """Log joint (unconstrained space) of ``(T, M, D)`` particles on ``(T, N, 1)``, ``(T, N)``."""
    model, pot = learner.model, learner.potential
    # one split into the sites (its backward is one concatenation, where a slice per site
    # would write each site's gradient into a full-size zero tensor)
    pieces = dict(zip([s.name for s in pot.sites], theta.split([s.size for s in pot.sites], -1)))
    shapes = {s.name: s.unconstrained_shape for s in pot.sites}

    def site(name):
        return pieces[name].reshape(*theta.shape[:-1], *shapes[name])

    log_lam, log_gam = site("weight_precision"), site("noise_precision")
    total = (_gamma_log_prob(log_lam, *model.weight_precision_prior) + log_lam
             + _gamma_log_prob(log_gam, *model.noise_precision_prior) + log_gam)
    h = x.unsqueeze(1)  # (T, 1, N, 1)
    num_weights = 0
    sq = 0.0
    last = len(model.layer_sizes) - 1
    for i in range(last + 1):
        w, b = site(f"layer{i}.weight"), site(f"layer{i}.bias")
        sq = sq + w.pow(2).sum((-1, -2)) + b.pow(2).sum(-1)
        num_weights += w[0, 0].numel() + b[0, 0].numel()
        h = h @ w + b.unsqueeze(-2)
        if i < last:
            h = torch.relu(h)
    lam = log_lam.exp()
    total = total + num_weights * 0.5 * (log_lam - math.log(2 * math.pi)) - 0.5 * lam * sq
    resid = h.squeeze(-1) - y.unsqueeze(1)  # (T, M, N)
    n = y.size(-1)
    total = total + n * 0.5 * (log_gam - math.log(2 * math.pi)) - 0.5 * log_gam.exp() * resid.pow(2).sum(-1)
    return total


def svgd_steps(learner, theta, x, y, num_steps, create_graph):
    for _ in range(num_steps):
        with torch.enable_grad():
            t = theta if create_graph else theta.detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(log_joint(learner, t, x, y).sum(), t,
                                          create_graph=create_graph)
        with torch.set_grad_enabled(create_graph):
            theta = theta + learner.step_sizes.to(theta) * svgd_direction(
                theta, grad, learner.kernel, "multivariate")
    return theta


def meta_loss(learner, batch):
    """The chaser loss of ``learner`` (a BMAML on BayesianMLP), hand-batched."""
    theta = learner.theta0.unsqueeze(0).expand(batch.num_tasks, -1, -1)
    chaser = svgd_steps(learner, theta, batch.x_support, batch.y_support, learner.inner_steps, True)
    x_all = torch.cat([batch.x_support, batch.x_query], 1)
    y_all = torch.cat([batch.y_support, batch.y_query], 1)
    with torch.no_grad():
        leader = svgd_steps(learner, chaser.detach(), x_all, y_all, learner.leader_steps, False)
    return ((chaser - leader).pow(2) * learner.distance_weights).sum((-1, -2)).mean()


def check_floor(learner, batch) -> None:
    """Assert the floor's meta-gradient equals the learner's (calibration must be "none")."""
    assert learner.calibration == "none", "the floor has no calibration term"
    learner.zero_grad()
    learner.meta_loss(batch).backward()
    ours = learner.theta0.grad.clone()
    learner.zero_grad()
    meta_loss(learner, batch).backward()
    scale = ours.abs().max()
    assert torch.allclose(ours, learner.theta0.grad, rtol=1e-3, atol=1e-4 * float(scale)), \
        "the hand-batched floor disagrees with BMAML.meta_loss"
    learner.zero_grad()
