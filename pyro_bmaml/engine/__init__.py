"""The Stein engine: Pyro model -> potential over flat particles -> kernels -> SVGD.

``potential`` (a Pyro model's log density over ``(T, M, D)`` particles, vmapped; per-task
module parameters; per-particle arguments), ``capture`` (its recorded-graph fast path),
``simplify`` (exact algebraic rewrites of a recorded graph), ``compiled`` (an SVGD step
compiled with :func:`torch.compile`), ``kernels`` (differentiable
Stein kernels), ``svgd`` (the SVGD direction, differentiable ``transport``, the ``SVGD``
drop-in for ``pyro.infer.SVGD``), ``ksd`` (kernelized Stein discrepancy), ``posterior``
(the particle posterior a task gets) and ``empirical_bayes`` (a Gaussian prior fitted to
many tasks' marginal likelihood). Nothing here knows
about tasks or meta-learning.
"""

from .empirical_bayes import EmpiricalBayesFit, empirical_bayes_prior
from .kernels import IMQSteinKernel, RBFSteinKernel, SteinKernel
from .posterior import ParticlePosterior
from .potential import LatentSite, ModelPotential, PerParticle
from .svgd import SVGD, svgd_direction, transport

__all__ = ["EmpiricalBayesFit", "IMQSteinKernel", "LatentSite", "ModelPotential", "ParticlePosterior",
           "PerParticle", "RBFSteinKernel", "SVGD", "SteinKernel", "svgd_direction",
           "empirical_bayes_prior", "transport"]
