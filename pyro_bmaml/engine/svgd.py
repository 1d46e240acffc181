r"""The SVGD engine: differentiable Stein variational transport of flat particles.

One SVGD step (Liu & Wang, 2016) moves every particle :math:`\theta_i` along

.. math::

    \phi(\theta_i) = \frac{1}{M} \sum_{j=1}^{M} \Big[ k(\theta_j, \theta_i)\,
        \nabla_{\theta_j} \log p(\theta_j \mid D) + \nabla_{\theta_j} k(\theta_j, \theta_i) \Big],
    \qquad \theta_i \leftarrow \theta_i + \epsilon\, \phi(\theta_i).

The step is a deterministic, differentiable map of the particles, so :func:`transport` can
keep the autograd graph from its output back to the initial particles (the property
Bayesian MAML's meta-update needs, Yoon et al. 2018).

Two kernels are available (``mode``):

- ``"multivariate"``: one kernel over the whole vector, as in Liu & Wang and the BMAML paper;
- ``"univariate"``: one kernel per coordinate, :class:`pyro.infer.SVGD`'s default
  (Singhal et al., "Kernelized Complete Conditional Stein Discrepancy").

:class:`SVGD` extends :class:`pyro.infer.SVGD` with the same constructor and ``step``; it keeps
its particles in the param store as ``svgd_particles`` but one row per particle (Pyro's own
class lays the flat vector out site by site and then reshapes it to rows, which mixes
particles and sites for models with more than one latent site).
"""

from __future__ import annotations

import math
import warnings

from typing import Callable, Dict, Optional, Union

import pyro
import pyro.infer
import pyro.optim
import torch

from .._checks import (all_finite, check_bool, check_choice, check_finite_data, check_has_data,
                      check_int, check_nonnegative_float, check_particles, check_step_size,
                      value_checks, value_checks_enabled)
from .compiled import compiled_svgd_direction
from .kernels import SteinKernel, as_differentiable_kernel
from .potential import ModelPotential, check_task_batched

__all__ = ["svgd_direction", "transport", "SVGD", "MODES"]

MODES = ("multivariate", "univariate")


def warn_if_identical(particles: torch.Tensor) -> None:
    """Warn when a set of particles holds one point M times: the kernel's repulsion between
    identical particles is zero, so SVGD moves them together and they never separate."""
    if not value_checks_enabled():
        return
    with torch.no_grad():
        flat = particles.detach().reshape(-1, *particles.shape[-2:])
        # the second particle against the first settles it unless they agree (one row each)
        if flat.size(-2) > 1 and bool((flat[:, 1] == flat[:, 0]).all()) \
                and bool((flat == flat[:, :1]).all()):
            warnings.warn("all particles are identical: SVGD cannot separate them (the "
                          "kernel's repulsion vanishes); initialize them apart, e.g. from the "
                          "prior", stacklevel=3)


def svgd_direction(
    particles: torch.Tensor, grad_log_p: torch.Tensor, kernel: SteinKernel, mode: str,
    temperature: float = 1.0, bandwidth: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    r"""The SVGD update direction :math:`\phi` for ``(..., M, D)`` particles,
    :math:`\phi(x_i) = \frac1M \sum_j k(x_j, x_i) \nabla \log p(x_j) + \alpha
    \nabla_{x_j} k(x_j, x_i)` with the repulsion scaled by ``temperature`` :math:`\alpha`
    (1: SVGD; SVPG's temperature otherwise, see
    :class:`~pyro_bmaml.tasks.models.GaussianMLPPolicy`).

    :param particles: ``(..., M, D)`` flat unconstrained particles.
    :param grad_log_p: ``(..., M, D)``, :math:`\nabla \log p` at each particle.
    :param kernel: a :class:`~pyro_bmaml.engine.kernels.SteinKernel`.
    :param mode: ``"multivariate"`` or ``"univariate"``.
    :param bandwidth: optional, the kernel's bandwidth for these particles as
        ``kernel.bandwidth(particles, per_dimension=(mode == "univariate"))`` gives it (the
        compiled step computes it outside the compiled code); by default the kernel's own.
    :returns: ``(..., M, D)``.
    """
    num_particles = particles.size(-2)
    if mode == "multivariate":
        kernel_matrix, repulsion = kernel.kernel_and_repulsion(particles, bandwidth)
        return (kernel_matrix @ grad_log_p + temperature * repulsion) / num_particles
    return kernel.coordinatewise_direction(particles, grad_log_p, temperature,
                                           bandwidth) / num_particles


def _check_log_density(step: int, log_p: torch.Tensor) -> None:
    if not all_finite(log_p):
        raise FloatingPointError(
            f"SVGD step {step}: the log density is non-finite for "
            f"{int((~torch.isfinite(log_p)).sum())} particle(s); lower step_size or check "
            "the model's priors"
        )


def transport(
    potential: ModelPotential,
    kernel: SteinKernel,
    particles: torch.Tensor,
    *args,
    num_steps: int,
    step_size: Union[float, torch.Tensor],
    mode: str = "multivariate",
    create_graph: Optional[bool] = None,
    callback: Optional[Callable[..., None]] = None,
    temperature: float = 1.0,
    compile: bool = False,
    **kwargs,
) -> torch.Tensor:
    r"""Run ``num_steps`` SVGD steps from ``particles``; differentiable in ``particles``.

    :param potential: the model's :class:`~pyro_bmaml.engine.potential.ModelPotential`.
    :param kernel: a differentiable kernel.
    :param particles: ``(M, D)``, or ``(T, M, D)`` for T tasks whose model arguments all
        carry a leading task dim ``T``.
    :param args: the model's positional arguments (one task's, or batched over tasks).
    :param num_steps: number of SVGD steps, ``>= 0``.
    :param step_size: :math:`\epsilon > 0`, a float or a ``(D,)`` tensor of per-coordinate
        step sizes (e.g. a separate step for a model's noise-precision coordinates).
    :param mode: ``"multivariate"`` (default here, as the paper) or ``"univariate"``.
    :param create_graph: keep the autograd graph to ``particles`` (second-order terms
        included). Defaults to ``True`` when grad mode is on and ``particles`` requires grad.
    :param callback: optional ``callback(step, particles, log_p, grad_log_p)`` called before
        each step, and once after the last one with ``step == num_steps`` (its ``log_p`` and
        ``grad_log_p`` are then ``None``: they would cost one more model evaluation).
    :param temperature: scale of the kernel's repulsion (1: SVGD; SVPG's temperature, see
        :func:`svgd_direction`).
    :param compile: take each step as compiled code
        (:func:`~pyro_bmaml.engine.compiled.compiled_svgd_direction`: the recorded log
        density, its gradient and the SVGD direction as one :func:`torch.compile` d
        function, its backward compiled too; differentiable once, not twice), falling back to the replayed graph
        with a warning where compiling fails; not with a ``callback``.
    :param kwargs: the model's keyword arguments.
    :returns: particles after ``num_steps`` steps, same shape as ``particles``.
    :raises FloatingPointError: naming the step at which particles or log densities became
        non-finite.
    """
    num_steps = check_int("num_steps", num_steps, 0)
    check_choice("mode", mode, MODES)
    temperature = check_nonnegative_float("temperature", temperature)
    check_finite_data(args, kwargs, particles.dtype if isinstance(particles, torch.Tensor)
                      and particles.is_floating_point() else None)
    if isinstance(particles, torch.Tensor):
        check_has_data("particles", particles)
    if isinstance(particles, torch.Tensor) and particles.dim() == 3:
        check_task_batched(particles.size(0), args, kwargs)  # before set-up slices task 0
    potential.setup_from(particles, args, kwargs)
    check_particles(particles, potential.dim)  # one particle: only with a fixed bandwidth
    warn_if_identical(particles)
    step_size = check_step_size(step_size, potential.dim)
    if create_graph is None:
        create_graph = torch.is_grad_enabled() and particles.requires_grad
    if compile and callback is not None:
        raise ValueError("compile=True takes the steps as compiled code, which gives no "
                         "log density or gradient to a callback; pass callback=None")
    x = particles if create_graph else particles.detach()
    for step in range(num_steps):
        checks = value_checks_enabled()
        phi = None
        if compile:  # the direction as compiled code (None: the replayed path)
            with torch.set_grad_enabled(create_graph):
                done = compiled_svgd_direction(potential, kernel, x, args, kwargs, mode,
                                               temperature)
            if done is not None:
                phi, log_p = done
        if phi is None:
            log_p, grad = potential.log_density_and_grad(x, *args, create_graph=create_graph,
                                                         **kwargs)
        if checks:
            _check_log_density(step, log_p)
        if callback is not None:  # (never with compile)
            callback(step, x, log_p, grad)
        with torch.set_grad_enabled(create_graph):
            if phi is None:
                phi = svgd_direction(x, grad, kernel, mode, temperature)
            x = x + step_size * phi
        if checks and not all_finite(x):
            raise FloatingPointError(
                f"SVGD step {step}: particles became non-finite; lower step_size"
            )
    if callback is not None:
        callback(num_steps, x, None, None)
    return x


class SVGD(pyro.infer.SVGD):
    """Stein Variational Gradient Descent on a Pyro model, one row per particle.

    A drop-in subclass of :class:`pyro.infer.SVGD` (same constructor, :meth:`step` and
    :meth:`get_named_particles`; the particles live in the param store as
    ``svgd_particles``, shape ``(num_particles, D)``), plus the differentiable functional
    :meth:`transport` used for meta-learning.

    Differences from Pyro's class: the model need not be vectorized (it is ``vmap``-ed over
    particles); each row of ``svgd_particles`` is one particle with all its sites; kernels are
    differentiable; bad arguments raise ``TypeError``/``ValueError``. The named particles
    have Pyro's shapes (``get_named_particles(compact=True)`` for the unpadded ones).

    :param model: a Pyro model with continuous latent sites.
    :param kernel: :class:`~pyro_bmaml.RBFSteinKernel`, :class:`~pyro_bmaml.IMQSteinKernel`,
        or Pyro's stock RBF/IMQ kernels (converted, keeping Pyro's bandwidth rule).
    :param optim: a :class:`pyro.optim.PyroOptim` used by :meth:`step`.
    :param num_particles: M >= 2.
    :param max_plate_nesting: as Pyro's: the vectorization here does not need it, but
        :meth:`get_named_particles` pads the sites' plate dims to it, as Pyro does.
    :param mode: ``"univariate"`` (Pyro's default) or ``"multivariate"``.
    :param compile: compute each step's direction (log density, gradient, kernel terms) as
        one compiled function (:func:`~pyro_bmaml.engine.compiled.compiled_svgd_direction`;
        the first step compiles, seconds; the replayed graph where compiling fails). Not in
        Pyro's class.
    """

    def __init__(
        self,
        model: Callable,
        kernel,
        optim: pyro.optim.PyroOptim,
        num_particles: int,
        max_plate_nesting: int = 0,
        mode: str = "univariate",
        compile: bool = False,
    ):
        if not callable(model):
            raise TypeError(f"model must be callable (a Pyro model), got {type(model).__name__}")
        #: compute each step's direction as compiled code (see :func:`transport`)
        self.compile = check_bool("compile", compile)
        #: a Pyro stock kernel the user passed: its settings (e.g. an annealed
        #: ``bandwidth_factor``, as Pyro's own tests do) are read again at every step
        self._source_kernel = None if isinstance(kernel, SteinKernel) else kernel
        kernel = as_differentiable_kernel(kernel)
        if not isinstance(optim, pyro.optim.PyroOptim):
            raise TypeError(
                f"optim must be a pyro.optim.PyroOptim (e.g. pyro.optim.Adam), "
                f"got {type(optim).__name__}"
            )
        num_particles = check_int("num_particles", num_particles, 2)
        max_plate_nesting = check_int("max_plate_nesting", max_plate_nesting, 0)
        check_choice("mode", mode, MODES)
        super().__init__(model, kernel, optim, num_particles, max_plate_nesting, mode=mode)
        self.potential = ModelPotential(model)

    def _particles_param(self, args: tuple, kwargs: dict) -> torch.Tensor:
        if not self.potential.is_setup:
            self.potential.setup(*args, **kwargs)
        param = pyro.param(
            "svgd_particles",
            lambda: self.potential.sample_prior(self.num_particles, *args, **kwargs),
        ).unconstrained()
        expected = (self.num_particles, self.potential.dim)
        if tuple(param.shape) != expected:
            raise ValueError(
                f"param store value 'svgd_particles' has shape {tuple(param.shape)}, expected "
                f"{expected} (one row per particle); was it written by another SVGD object? "
                "call pyro.clear_param_store()"
            )
        return param

    def init_particles(self, *args, **kwargs) -> torch.Tensor:
        """Draw ``(num_particles, D)`` initial particles from the prior (unconstrained)."""
        check_finite_data(args, kwargs)
        self.potential.setup_from(None, args, kwargs)
        return self.potential.sample_prior(self.num_particles, *args, **kwargs)

    def step(self, *args, **kwargs) -> Dict[str, float]:
        """Take one SVGD step with the optimizer, passing ``args``/``kwargs`` to the model.

        :returns: ``{site: mean squared SVGD direction}``, to monitor convergence (as Pyro).
        """
        check_finite_data(args, kwargs)
        if self._source_kernel is not None:  # follow changes made to the user's Pyro kernel
            self.kernel.bandwidth_factor = self._source_kernel.bandwidth_factor
        param = self._particles_param(args, kwargs)
        with value_checks(False):  # the values were checked above: the dtypes only
            check_finite_data(args, kwargs, param.dtype)
        warn_if_identical(param.detach())
        done = None
        if self.compile:
            with torch.no_grad():
                done = compiled_svgd_direction(self.potential, self.kernel, param.detach(),
                                               args, kwargs, self.mode)
        if done is None:
            log_p, grad = self.potential.log_density_and_grad(param.detach(), *args, **kwargs)
        else:
            phi, log_p = done
        if not all_finite(log_p):  # as transport: never step on -inf / NaN
            bad = int((~torch.isfinite(log_p)).sum())
            raise FloatingPointError(
                f"SVGD step: the log density is non-finite for {bad} particle(s) "
                "(outside the prior's support, or a likelihood of zero); lower the learning "
                "rate or check the model")
        with torch.no_grad():
            if done is None:
                phi = svgd_direction(param.detach(), grad, self.kernel, self.mode)
            squared = phi.pow(2).mean(0) @ self._site_means(phi)  # each site's mean square
        squared = squared.tolist()  # one transfer; finite means squares of finite values
        if not all(map(math.isfinite, squared)) and not all_finite(phi):  # (or an overflow)
            raise FloatingPointError("SVGD step: the update direction is non-finite")
        # Optimizers descend, SVGD ascends along phi.
        param.grad = phi.neg_()
        squared = dict(zip(self.potential.site_names, squared))
        self.optim([param])
        pyro.infer.util.zero_grads([param])
        return squared

    def _site_means(self, like: torch.Tensor) -> torch.Tensor:
        """``(D, sites)``: column ``s`` averages the coordinates of site ``s`` (one matmul
        gives every site's mean instead of a slice and a mean per site)."""
        weights = getattr(self, "_site_weights", None)
        if weights is None or weights.dtype != like.dtype or weights.device != like.device:
            sites = self.potential.sites
            weights = like.new_zeros(self.potential.dim, len(sites))
            for i, site in enumerate(sites):
                weights[site.columns, i] = 1.0 / site.size
            self._site_weights = weights
        return weights

    def get_named_particles(self, compact: bool = False) -> Dict[str, torch.Tensor]:
        """``{site: constrained particles}``, shaped as :class:`pyro.infer.SVGD` shapes them:
        ``(num_particles, 1, ..., 1, *site_shape)``, the site's plate (batch) dims padded with
        ones to ``max_plate_nesting`` (Pyro's particle plate sits left of every model plate),
        so code written for Pyro indexes the same axes. ``compact=True`` gives
        ``(num_particles, *site_shape)``, the layout of this package's own API
        (``potential.pack`` / ``unpack``)."""
        named = self.potential.unpack(pyro.param("svgd_particles").unconstrained().detach())
        if compact:
            return named
        out = {}
        for site in self.potential.sites:
            pad = self.max_plate_nesting - (len(site.shape) - site.event_dim)
            value = named[site.name]
            out[site.name] = value.reshape(value.shape[:1] + (1,) * max(pad, 0) + value.shape[1:])
        return out

    def transport(
        self,
        particles: torch.Tensor,
        *args,
        num_steps: int,
        step_size: float,
        create_graph: Optional[bool] = None,
        callback=None,
        **kwargs,
    ) -> torch.Tensor:
        """Differentiable SVGD transport with this object's model, kernel and mode.

        See :func:`pyro_bmaml.engine.svgd.transport`; ``particles`` is ``(M, D)`` or ``(T, M, D)``.
        """
        return transport(
            self.potential,
            self.kernel,
            particles,
            *args,
            num_steps=num_steps,
            step_size=step_size,
            mode=self.mode,
            create_graph=create_graph,
            callback=callback,
            **kwargs,
        )
