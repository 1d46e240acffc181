r"""Meta-learners: Bayesian MAML (chaser loss or BFA) and the MAML / EMAML baselines.

All learners are :class:`torch.nn.Module` s whose one parameter is ``theta0``: the initial
particles, flat and unconstrained, shape ``(M, D)``, one row per particle. That set of
particles *is* the learned prior (Yoon et al., "Bayesian Model-Agnostic Meta-Learning",
NeurIPS 2018). A meta-batch of ``T`` tasks is processed at once: ``theta0`` is expanded to
``(T, M, D)`` and adapted by the engine's batched transport; no python loop over tasks or
particles.

Chaser loss (BMAML's meta-objective), for each task:

.. math::

    \Theta^n = \mathrm{SVGD}_n(\Theta_0; D^{trn}), \quad
    \Theta^{n+s} = \mathrm{SVGD}_s(\Theta^n; D^{trn} \cup D^{val}), \quad
    L = \sum_m \lVert \theta^{n,m} - \mathrm{stopgrad}(\theta^{n+s,m}) \rVert^2,

averaged over tasks; the gradient flows through the chaser only. BFA instead minimizes
:math:`-\sum_{val} \log \frac1M \sum_m p(y \mid x, \theta^{n,m})`.

EMAML adapts M particles independently by gradient ascent on the log joint (no kernel) and
sums their query losses; MAML is EMAML with M = 1. The query loss is the model's negative
log likelihood, averaged over query points.
"""

from __future__ import annotations

import math
from typing import Callable, Dict, Optional, Sequence, Union

import torch
from torch import nn

from ._checks import check_choice, check_int, check_positive_float
from .kernels import RBFSteinKernel, SteinKernel, as_differentiable_kernel
from .ksd import ksd_trajectory
from .posterior import ParticlePosterior
from .potential import ModelPotential
from .svgd import transport
from .tasks import TaskBatch

__all__ = ["MetaLearner", "BMAML", "EMAML", "MAML"]

InitSpec = Union[str, torch.Tensor, Dict[str, torch.Tensor]]


class MetaLearner(nn.Module):
    """Common part of the meta-learners: the initial particles and the public methods.

    :param model: a Pyro task model called as ``model(x, y)`` (see :mod:`pyro_bmaml.models`).
    :param num_particles: M.
    :param inner_steps: adaptation steps on the support set (n).
    :param step_size: adaptation step size.
    :param init: ``"prior"`` (draws from the model's prior), ``"paper"`` (the model's
        ``paper_init``, e.g. :meth:`BayesianMLP.paper_init`), a flat ``(M, D)`` tensor or a
        dict of constrained site values with leading dim M.
    :param example_args: one task's ``(x, y)`` to discover the model's sites; defaults to
        ``model.example_args()`` when the model has it.
    """

    method = "meta"

    def __init__(
        self,
        model: Callable,
        num_particles: int,
        inner_steps: int,
        step_size: float,
        init: InitSpec = "prior",
        example_args: Optional[Sequence] = None,
    ):
        super().__init__()
        self.model = model
        self.potential = ModelPotential(model)
        self.num_particles = check_int("num_particles", num_particles, 1)
        self.inner_steps = check_int("inner_steps", inner_steps, 0)
        self.step_size = check_positive_float("step_size", step_size)
        if example_args is None:
            if not hasattr(model, "example_args"):
                raise TypeError(
                    "example_args=(x, y) is required for a model without an example_args() method"
                )
            example_args = model.example_args()
        self.potential.setup(*example_args)
        self.theta0 = nn.Parameter(self._initial_particles(init, example_args))

    def _initial_particles(self, init: InitSpec, example_args) -> torch.Tensor:
        m, d = self.num_particles, self.potential.dim
        if isinstance(init, str):
            check_choice("init", init, ("prior", "paper"))
            if init == "prior":
                return self.potential.sample_prior(m, *example_args)
            if not hasattr(self.model, "paper_init"):
                raise ValueError("init='paper' needs a model with a paper_init(num_particles) method")
            return self.potential.pack(self.model.paper_init(m)).detach()
        if isinstance(init, dict):
            init = self.potential.pack(init)
        if not isinstance(init, torch.Tensor):
            raise TypeError(
                f"init must be 'prior', 'paper', a ({m}, {d}) tensor or a dict of site values, "
                f"got {type(init).__name__}"
            )
        if tuple(init.shape) != (m, d):
            raise ValueError(f"init must have shape ({m}, {d}) (M, D), got {tuple(init.shape)}")
        if not bool(torch.isfinite(init).all()):
            raise ValueError("init contains non-finite values")
        return init.detach().clone()

    # -- to implement -----------------------------------------------------------------
    def adapt_particles(
        self, particles: torch.Tensor, x: torch.Tensor, y: torch.Tensor, num_steps: int,
        callback=None,
    ) -> torch.Tensor:
        """Adapt ``(T, M, D)`` particles on task data ``(T, N, in)``, ``(T, N)``.

        ``callback(step, particles, log_p, grad_log_p)`` is called before each step and after
        the last with ``None`` scores (as :func:`~pyro_bmaml.svgd.transport` does)."""
        raise NotImplementedError

    def meta_loss(self, batch: TaskBatch) -> torch.Tensor:
        """The meta-objective of a batch of tasks (a scalar, differentiable in theta0)."""
        raise NotImplementedError

    # -- shared -----------------------------------------------------------------------
    def _expand(self, num_tasks: int) -> torch.Tensor:
        return self.theta0.unsqueeze(0).expand(num_tasks, -1, -1)

    def _check_xy(self, x, y):
        for name, t in (("x", x), ("y", y)):
            if not isinstance(t, torch.Tensor) or not t.is_floating_point():
                raise TypeError(f"{name} must be a floating torch.Tensor, got {type(t).__name__}")
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"{name} contains non-finite values (NaN or inf)")
        if x.dim() == 1:
            x = x.unsqueeze(-1)
        if x.dim() not in (2, 3) or y.shape != x.shape[:-1]:
            raise ValueError(
                "x must be (N, in) or (T, N, in) and y (N,) or (T, N) with the same N and T; "
                f"got x {tuple(x.shape)} and y {tuple(y.shape)}"
            )
        if x.size(-2) == 0:
            raise ValueError("the support set is empty (N = 0)")
        return x, y

    def adapt(
        self, x: torch.Tensor, y: torch.Tensor, num_steps: Optional[int] = None,
        track_ksd: bool = False,
    ) -> ParticlePosterior:
        """Adapt the learned prior to a task's support set; returns its particle posterior.

        :param x: ``(K, in)`` (or ``(K,)``), or ``(T, K, in)`` for T tasks at once.
        :param y: ``(K,)`` or ``(T, K)``.
        :param num_steps: adaptation steps (default: ``inner_steps``).
        :param track_ksd: record the squared kernelized Stein discrepancy (IMQ, V-statistic)
            to each task's posterior before every step and after the last, in
            ``posterior.info["ksd"]`` of shape ``(steps + 1, T)`` (or ``(steps + 1,)``).
        """
        x, y = self._check_xy(x, y)
        steps = self.inner_steps if num_steps is None else check_int("num_steps", num_steps, 0)
        single = x.dim() == 2
        xb, yb = (x[None], y[None]) if single else (x, y)
        recorded, scores = [], []

        def record(step, p, log_p, grad):  # the step's scores are reused for the KSD
            recorded.append(p.detach())
            scores.append(None if grad is None else grad.detach())

        callback = record if track_ksd else None
        with torch.no_grad():
            particles = self.adapt_particles(
                self._expand(xb.size(0)).detach(), xb, yb, steps, callback=callback
            )
        particles = particles[0] if single else particles
        info = self.describe(steps)
        info["initial_particles"] = self.theta0.detach().clone()
        if track_ksd:
            values = ksd_trajectory(self.potential, recorded, xb, yb,
                                    scores_per_step=scores)  # (steps + 1, T)
            info["ksd"] = values[:, 0] if single else values
        return ParticlePosterior(self.potential, particles, x, y, info=info)

    def describe(self, steps: Optional[int] = None) -> dict:
        """Attributes for diagnostics and checkpoints."""
        return {
            "inference_method": self.method,
            "num_particles": self.num_particles,
            "num_steps": self.inner_steps if steps is None else steps,
            "step_size": self.step_size,
        }

    def forward(self, batch: TaskBatch) -> torch.Tensor:
        """``learner(batch)`` is the meta-loss (so ``torch.func.functional_call`` works)."""
        return self.meta_loss(batch)

    def fit(self, tasks, num_iterations: int, **kwargs):
        """Meta-train on a task source; see :func:`pyro_bmaml.training.fit`."""
        from .training import fit

        return fit(self, tasks, num_iterations, **kwargs)


class BMAML(MetaLearner):
    """Bayesian MAML: SVGD adaptation from learned particles, chaser or BFA meta-loss.

    :param kernel: a Stein kernel (default :class:`RBFSteinKernel` with the paper's scalar
        median bandwidth and a stop-gradient through it).
    :param leader_steps: s, extra SVGD steps of the leader on support + query.
    :param objective: ``"chaser"`` (the paper's) or ``"bfa"``.
    :param mode: SVGD kernel mode, ``"multivariate"`` (the paper's) or ``"univariate"``.
    :param distance_sites: the latent sites whose coordinates enter the chaser distance.
        ``"auto"`` (default): the model's ``chaser_sites`` attribute when it has one, else all
        sites. :class:`~pyro_bmaml.models.BayesianMLP` names its network weights there,
        leaving out the precisions, as the official code does: with them in, the loss
        rewards moving the noise precision, whose SVGD steps scale with it, and meta-training
        diverged in our runs (see the README's notes).
    See :class:`MetaLearner` for the other arguments (paper: M = 10, n = s = 1, eps = 1e-3).
    """

    method = "bmaml"

    def __init__(
        self,
        model: Callable,
        num_particles: int = 10,
        inner_steps: int = 1,
        leader_steps: int = 1,
        step_size: float = 1e-3,
        kernel: Optional[SteinKernel] = None,
        objective: str = "chaser",
        mode: str = "multivariate",
        distance_sites: Union[str, Sequence[str]] = "auto",
        init: InitSpec = "prior",
        example_args: Optional[Sequence] = None,
    ):
        num_particles = check_int("num_particles", num_particles, 2)
        super().__init__(model, num_particles, inner_steps, step_size, init, example_args)
        self.distance_sites, self._distance_columns = self._resolve_sites(distance_sites)
        self.leader_steps = check_int("leader_steps", leader_steps, 1)
        self.kernel = RBFSteinKernel(bandwidth="median") if kernel is None else as_differentiable_kernel(kernel)
        self.objective = check_choice("objective", objective, ("chaser", "bfa"))
        self.mode = check_choice("mode", mode, ("multivariate", "univariate"))

    def _resolve_sites(self, distance_sites):
        names = self.potential.site_names
        if isinstance(distance_sites, str):
            check_choice("distance_sites", distance_sites, ("auto",))
            distance_sites = getattr(self.model, "chaser_sites", names)
        distance_sites = list(distance_sites)
        unknown = [n for n in distance_sites if n not in names]
        if unknown or not distance_sites:
            raise ValueError(
                f"distance_sites must be a non-empty list of the model's latent sites {names}, "
                f"got unknown {unknown}" if unknown else "distance_sites must not be empty"
            )
        columns = torch.zeros(self.potential.dim, dtype=torch.bool)
        for site in self.potential.sites:
            if site.name in distance_sites:
                columns[site.columns] = True
        if bool(columns.all()):
            return distance_sites, None
        return distance_sites, columns

    def adapt_particles(self, particles, x, y, num_steps, callback=None):
        return transport(
            self.potential, self.kernel, particles, x, y,
            num_steps=num_steps, step_size=self.step_size, mode=self.mode, callback=callback,
        )

    def meta_loss(self, batch: TaskBatch) -> torch.Tensor:
        batch = batch.validate()
        chaser = self.adapt_particles(
            self._expand(batch.num_tasks), batch.x_support, batch.y_support, self.inner_steps
        )
        if self.objective == "bfa":
            log_lik = self.potential.log_likelihood(chaser, batch.x_query, batch.y_query)
            mixture = torch.logsumexp(log_lik, dim=-2) - math.log(self.num_particles)
            return -mixture.sum(-1).mean()
        x_all = torch.cat([batch.x_support, batch.x_query], dim=1)
        y_all = torch.cat([batch.y_support, batch.y_query], dim=1)
        with torch.no_grad():  # the leader is a target: no graph, stop-gradient
            leader = self.adapt_particles(chaser.detach(), x_all, y_all, self.leader_steps)
        diff = chaser - leader
        if self._distance_columns is not None:
            diff = diff[..., self._distance_columns.to(diff.device)]
        return diff.pow(2).sum((-1, -2)).mean()

    def describe(self, steps=None):
        info = super().describe(steps)
        info.update(kernel=self.kernel.describe(), mode=self.mode, objective=self.objective,
                    bandwidth_rule=str(self.kernel.bandwidth_rule),
                    leader_steps=self.leader_steps, distance_sites=",".join(self.distance_sites))
        return info


class EMAML(MetaLearner):
    """M independent MAML copies: gradient ascent on the log joint, no kernel; the meta-loss
    is the query negative log likelihood summed over particles, averaged over tasks.

    See :class:`MetaLearner` for the arguments.
    """

    method = "emaml"

    def __init__(self, model: Callable, num_particles: int = 10, inner_steps: int = 1,
                 step_size: float = 1e-3, init: InitSpec = "prior",
                 example_args: Optional[Sequence] = None):
        super().__init__(model, num_particles, inner_steps, step_size, init, example_args)

    def adapt_particles(self, particles, x, y, num_steps, callback=None):
        create_graph = torch.is_grad_enabled() and particles.requires_grad
        theta = particles if create_graph else particles.detach()
        for step in range(num_steps):
            log_p, grad = self.potential.log_density_and_grad(theta, x, y, create_graph=create_graph)
            if not bool(torch.isfinite(log_p).all()):
                raise FloatingPointError(f"gradient step {step}: the log density is non-finite")
            if callback is not None:
                callback(step, theta, log_p, grad)
            theta = theta + self.step_size * grad
        if callback is not None:
            callback(num_steps, theta, None, None)
        return theta

    def meta_loss(self, batch: TaskBatch) -> torch.Tensor:
        batch = batch.validate()
        adapted = self.adapt_particles(
            self._expand(batch.num_tasks), batch.x_support, batch.y_support, self.inner_steps
        )
        log_lik = self.potential.log_likelihood(adapted, batch.x_query, batch.y_query)
        return -log_lik.mean(-1).sum(-1).mean()


class MAML(EMAML):
    """MAML (Finn et al., 2017) on the same Pyro task model: EMAML with one particle."""

    method = "maml"

    def __init__(self, model: Callable, inner_steps: int = 1, step_size: float = 1e-3,
                 init: InitSpec = "prior", example_args: Optional[Sequence] = None):
        super().__init__(model, 1, inner_steps, step_size, init, example_args)
