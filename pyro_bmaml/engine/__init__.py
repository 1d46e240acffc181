"""The Stein engine: Pyro model -> potential over flat particles -> kernels -> SVGD.

``potential`` (a Pyro model's log density over ``(T, M, D)`` particles, vmapped; per-task
module parameters; per-particle arguments), ``capture`` (its recorded-graph fast path),
``simplify`` (exact algebraic rewrites of a recorded graph), ``kernels`` (differentiable
Stein kernels), ``svgd`` (the SVGD direction, differentiable ``transport``, the ``SVGD``
drop-in for ``pyro.infer.SVGD``), ``ksd`` (kernelized Stein discrepancy) and ``posterior``
(the particle posterior a task gets). Nothing here knows
about tasks or meta-learning.
"""

from .kernels import IMQSteinKernel, RBFSteinKernel, SteinKernel
from .posterior import ParticlePosterior
from .potential import LatentSite, ModelPotential, PerParticle
from .svgd import SVGD, svgd_direction, transport

__all__ = ["IMQSteinKernel", "LatentSite", "ModelPotential", "ParticlePosterior",
           "PerParticle", "RBFSteinKernel", "SVGD", "SteinKernel", "svgd_direction",
           "transport"]
