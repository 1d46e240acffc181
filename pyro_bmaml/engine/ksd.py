r"""Kernelized Stein discrepancy (KSD): how far particles are from the target posterior.

For a target :math:`p` with score :math:`s = \nabla \log p` and a kernel :math:`k`, the Stein
kernel is

.. math::

    u_p(x, y) = s(x)^\top k(x, y)\, s(y) + s(x)^\top \nabla_y k + \nabla_x k^\top s(y)
        + \operatorname{tr} \nabla_x \nabla_y k ,

and :math:`\mathrm{KSD}^2 = \mathbb{E}_{x, y \sim q}\, u_p(x, y)`, zero iff :math:`q = p` for
suitable kernels (Liu, Lee & Jordan 2016; Chwialkowski et al. 2016; Gorham & Mackey 2017,
who recommend the IMQ kernel). For a radial kernel :math:`k = f(r)`,
:math:`r = \lVert x - y \rVert^2 / h` with a scalar :math:`h`:

.. math::

    u_p = f\, s_x^\top s_y + \frac{2 f'}{h} (x - y)^\top (s_y - s_x)
        - \frac{4 r f''}{h} - \frac{2 D f'}{h}.

The estimate from M particles is the V-statistic (mean over all pairs, biased, >= 0) or the
U-statistic (pairs i != j, unbiased). Everything is computed in the engine's unconstrained
space, where the potential includes the log-Jacobian, so the target is the right one.
Unlike R-hat or ESS, KSD is meaningful for a handful of deterministic particles.
"""

from __future__ import annotations

from typing import Optional

import torch

from .._checks import check_choice, check_int
from .kernels import IMQSteinKernel, SteinKernel
from .potential import ModelPotential

__all__ = ["stein_kernel_matrix", "ksd", "ksd_trajectory", "default_ksd_kernel"]


def default_ksd_kernel() -> SteinKernel:
    """IMQ with beta = -1/2, alpha = 1 and the median bandwidth (Gorham & Mackey, 2017)."""
    return IMQSteinKernel(alpha=1.0, beta=-0.5, bandwidth="median")


def stein_kernel_matrix(
    particles: torch.Tensor, score: torch.Tensor, kernel: Optional[SteinKernel] = None
) -> torch.Tensor:
    """The Stein kernel :math:`u_p(x_i, x_j)` for ``(..., M, D)`` particles and scores.

    :returns: ``(..., M, M)``.
    """
    kernel = default_ksd_kernel() if kernel is None else kernel
    h = kernel.bandwidth(particles)  # (..., 1) or (..., D)
    if h.size(-1) != 1:
        raise ValueError("KSD needs a scalar bandwidth: use bandwidth='median' or a float")
    h = h.unsqueeze(-1)  # (..., 1, 1)
    dim = particles.size(-1)
    diff = particles.unsqueeze(-2) - particles.unsqueeze(-3)  # [i, j] = x_i - x_j
    r = diff.pow(2).sum(-1) / h
    f, df, d2f = kernel._profile_derivatives(r)
    s_dot = score @ score.transpose(-1, -2)
    # (x_i - x_j) . (s_j - s_i)
    cross = (diff * (score.unsqueeze(-3) - score.unsqueeze(-2))).sum(-1)
    return f * s_dot + 2 * df / h * cross - 4 * r * d2f / h - 2 * dim * df / h


def ksd(
    particles: torch.Tensor,
    score: torch.Tensor,
    kernel: Optional[SteinKernel] = None,
    statistic: str = "v",
) -> torch.Tensor:
    """Squared KSD estimate per task.

    :param particles: ``(..., M, D)`` flat unconstrained particles.
    :param score: ``(..., M, D)``, :math:`\\nabla \\log p` at each particle (e.g. from
        :meth:`ModelPotential.log_density_and_grad`).
    :param statistic: ``"v"`` (all pairs, >= 0) or ``"u"`` (i != j, unbiased, can be < 0).
    :returns: ``(...)``, the squared discrepancy.
    """
    check_choice("statistic", statistic, ("v", "u"))
    u = stein_kernel_matrix(particles, score, kernel)
    m = particles.size(-2)
    if statistic == "v":
        return u.mean((-1, -2))
    if m < 2:
        raise ValueError("the U-statistic needs at least 2 particles")
    off = u.sum((-1, -2)) - torch.diagonal(u, dim1=-2, dim2=-1).sum(-1)
    return off / (m * (m - 1))


def ksd_trajectory(
    potential: ModelPotential,
    particles_per_step: list,
    *args,
    scores_per_step: Optional[list] = None,
    kernel: Optional[SteinKernel] = None,
    statistic: str = "v",
    **kwargs,
) -> torch.Tensor:
    """Squared KSD of each recorded set of particles against the task posterior.

    :param particles_per_step: list of ``(..., M, D)`` particles (e.g. recorded along SVGD
        steps through :func:`~pyro_bmaml.engine.svgd.transport`'s callback).
    :param scores_per_step: optional matching list of scores (the callback's ``grad_log_p``);
        an entry that is ``None`` (or no list) is computed from the potential.
    :returns: ``(steps, ...)``.
    """
    check_int("len(particles_per_step)", len(particles_per_step), 1)
    scores = scores_per_step or [None] * len(particles_per_step)
    if len(scores) != len(particles_per_step):
        raise ValueError(
            f"scores_per_step has {len(scores)} entries, particles_per_step "
            f"{len(particles_per_step)}"
        )
    values = []
    for p, score in zip(particles_per_step, scores):
        if score is None:
            _, score = potential.log_density_and_grad(p.detach(), *args, **kwargs)
        values.append(ksd(p.detach(), score.detach(), kernel, statistic))
    return torch.stack(values)
