r"""Trust-region steps (TRPO; Schulman et al., "Trust Region Policy Optimization", ICML 2015),
the meta-optimizer MAML-RL uses (Finn et al., 2017) and the official BMAML RL code too.

Given a surrogate loss :math:`L(\theta)` to decrease and the mean KL divergence
:math:`\bar D(\theta) = \mathbb E_s\, \mathrm{KL}(\pi_{\theta_{old}}(\cdot \mid s) \,\|\,
\pi_\theta(\cdot \mid s))` (zero, with zero gradient, at :math:`\theta_{old}`), one step
solves the local problem

.. math::

    \min_\delta\; g^\top \delta \quad \text{s.t.} \quad \tfrac12\, \delta^\top F \delta \le
    \epsilon, \qquad g = \nabla L(\theta_{old}),\; F = \nabla^2 \bar D(\theta_{old}),

whose solution is the natural-gradient direction :math:`s = F^{-1} g` scaled to the trust
region's edge, :math:`\delta = -\sqrt{2 \epsilon / s^\top F s}\; s`. :math:`s` comes from
conjugate gradient on Fisher-vector products :math:`F v = \nabla (\nabla \bar D^\top v)`
(double backward; ``F`` is never formed), with a small damping :math:`F + \lambda I`. A
backtracking line search then shrinks :math:`\delta` by ``backtrack_ratio`` until the loss
decreases and :math:`\bar D \le \epsilon` hold for the actual (not the quadratic) functions;
if no fraction does, the parameters stay where they were.

The settings default to MAML-RL's and the public PyTorch port's (max KL 0.01, 10 CG
iterations, damping 1e-5, backtrack ratio 0.8, 15 backtracks).
"""

from __future__ import annotations

from typing import Callable, Dict, Sequence

import torch

from .._checks import check_int, check_positive_float

__all__ = ["conjugate_gradient", "fisher_vector_product", "TrustRegion"]


def conjugate_gradient(matvec: Callable[[torch.Tensor], torch.Tensor], b: torch.Tensor,
                       iterations: int = 10, tolerance: float = 1e-10) -> torch.Tensor:
    r"""Solve :math:`A x = b` for a symmetric positive-definite :math:`A` given only
    :math:`v \mapsto A v` (Hestenes & Stiefel, 1952), from :math:`x_0 = 0`; stops after
    ``iterations`` or when the squared residual falls below ``tolerance``. Exact after
    ``len(b)`` iterations in exact arithmetic."""
    iterations = check_int("iterations", iterations, 1)
    x = torch.zeros_like(b)
    r = b.clone()
    p = b.clone()
    rr = r @ r
    for _ in range(iterations):
        if rr <= tolerance:
            break
        ap = matvec(p)
        alpha = rr / (p @ ap)
        x = x + alpha * p
        r = r - alpha * ap
        rr_next = r @ r
        p = r + (rr_next / rr) * p
        rr = rr_next
    return x


def fisher_vector_product(kl: torch.Tensor, params: Sequence[torch.Tensor],
                          damping: float = 0.0) -> Callable[[torch.Tensor], torch.Tensor]:
    r""":math:`v \mapsto (\nabla^2 \bar D)\, v + \lambda v` for a scalar ``kl`` computed from
    ``params`` (the KL's Hessian at the old parameters is the Fisher information), by double
    backward through :math:`\nabla \bar D^\top v`; ``v`` is flat, over ``params`` in order."""
    grads = torch.autograd.grad(kl, list(params), create_graph=True)
    flat = torch.cat([g.reshape(-1) for g in grads])

    def product(v: torch.Tensor) -> torch.Tensor:
        hv = torch.autograd.grad(flat @ v, list(params), retain_graph=True)
        return torch.cat([h.reshape(-1) for h in hv]) + damping * v

    return product


class TrustRegion:
    """A TRPO step on ``params`` (tensors updated in place), the module's docstring's math.

    :param params: the parameters (leaf tensors requiring grad).
    :param max_kl: :math:`\\epsilon`, the trust region's size in mean KL.
    :param cg_iterations: conjugate-gradient iterations.
    :param damping: :math:`\\lambda`, added to the Fisher-vector products.
    :param backtrack_ratio: the factor the step shrinks by per backtrack.
    :param max_backtracks: backtracks before the step is given up.
    """

    def __init__(self, params: Sequence[torch.Tensor], max_kl: float = 1e-2,
                 cg_iterations: int = 10, damping: float = 1e-5, backtrack_ratio: float = 0.8,
                 max_backtracks: int = 15):
        params = list(params)
        if not params or not all(isinstance(p, torch.Tensor) and p.requires_grad for p in params):
            raise TypeError("params must be a non-empty sequence of tensors that require grad")
        self.params = params
        self.max_kl = check_positive_float("max_kl", max_kl)
        self.cg_iterations = check_int("cg_iterations", cg_iterations, 1)
        self.damping = float(damping)
        if not 0.0 <= self.damping < float("inf"):
            raise ValueError(f"damping must be a finite number >= 0, got {damping}")
        self.backtrack_ratio = check_positive_float("backtrack_ratio", backtrack_ratio)
        if self.backtrack_ratio >= 1.0:
            raise ValueError(f"backtrack_ratio must be in (0, 1), got {backtrack_ratio}")
        self.max_backtracks = check_int("max_backtracks", max_backtracks, 0)

    def _flat(self) -> torch.Tensor:
        return torch.cat([p.detach().reshape(-1) for p in self.params])

    def _assign(self, flat: torch.Tensor) -> None:
        offset = 0
        with torch.no_grad():
            for p in self.params:
                n = p.numel()
                p.copy_(flat[offset:offset + n].view_as(p))
                offset += n

    def step(self, loss_fn: Callable[[], torch.Tensor],
             kl_fn: Callable[[], torch.Tensor]) -> Dict[str, float]:
        """One trust-region step. ``loss_fn()`` and ``kl_fn()`` recompute the surrogate and
        the mean KL from the old policy at the parameters' current values (the old policy
        fixed inside them).

        :returns: ``{"loss_before", "loss_after", "kl", "step_fraction", "backtracks"}``;
            ``step_fraction`` 0 when no backtracked step was accepted (nothing moved).
        """
        loss = loss_fn()
        grads = torch.autograd.grad(loss, self.params, allow_unused=True)
        g = torch.cat([(torch.zeros_like(p) if gr is None else gr).reshape(-1)
                       for p, gr in zip(self.params, grads)]).detach()
        if not bool(torch.isfinite(g).all()):
            raise FloatingPointError("the surrogate's gradient is non-finite")
        fvp = fisher_vector_product(kl_fn(), self.params, self.damping)
        direction = conjugate_gradient(lambda v: fvp(v).detach(), -g, self.cg_iterations)
        curvature = direction @ fvp(direction).detach()
        old = self._flat()
        loss_before = float(loss.detach())
        info = {"loss_before": loss_before, "loss_after": loss_before, "kl": 0.0,
                "step_fraction": 0.0, "backtracks": self.max_backtracks + 1}
        if not bool(curvature > 0) or not bool(torch.isfinite(curvature)):
            return info  # a flat or ill-posed KL: no trustworthy step
        full_step = torch.sqrt(2.0 * self.max_kl / curvature) * direction
        fraction = 1.0
        for backtrack in range(self.max_backtracks + 1):
            self._assign(old + fraction * full_step)
            with torch.no_grad():
                new_loss, kl = float(loss_fn()), float(kl_fn())
            if new_loss < loss_before and kl <= self.max_kl:
                info.update(loss_after=new_loss, kl=kl, step_fraction=fraction,
                            backtracks=backtrack)
                return info
            fraction *= self.backtrack_ratio
        self._assign(old)  # no fraction improved within the region: stay
        return info
