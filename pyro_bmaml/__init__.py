"""pyro_bmaml: Bayesian model-agnostic meta-learning (BMAML) on Pyro.

The data path, one module per concept::

    Pyro model -> potential.ModelPotential (flat particles, one row each)
               -> kernels (RBF / IMQ Stein kernels) -> svgd (SVGD step, transport)
"""

from .kernels import IMQSteinKernel, RBFSteinKernel, SteinKernel
from .potential import LatentSite, ModelPotential
from .svgd import SVGD, svgd_direction, transport

__version__ = "0.1.0"

__all__ = [
    "IMQSteinKernel",
    "LatentSite",
    "ModelPotential",
    "RBFSteinKernel",
    "SVGD",
    "SteinKernel",
    "svgd_direction",
    "transport",
]
