"""pyro_bmaml: Bayesian model-agnostic meta-learning (BMAML) on Pyro.

The data path, one module per concept::

    Pyro model -> potential (flat particles, one row each) -> kernels (Stein kernels)
               -> svgd (SVGD step, differentiable transport) -> meta (chaser / BFA loss)
               -> training (Adam, checkpoints)

around it: posterior (particle predictive), ksd and metrics (diagnostics), diagnostics
(ArviZ), models and tasks (the paper's Bayesian MLP and sinusoid tasks). Plotting
(``pyro_bmaml.plots``) and the CLI are imported only on demand.
"""

from .diagnostics import summary, to_inference_data
from .kernels import IMQSteinKernel, RBFSteinKernel, SteinKernel
from .ksd import ksd, ksd_trajectory, stein_kernel_matrix
from .meta import BMAML, EMAML, MAML, MetaLearner
from .metrics import regression_metrics
from .models import BayesianMLP
from .posterior import ParticlePosterior
from .potential import LatentSite, ModelPotential
from .svgd import SVGD, svgd_direction, transport
from .tasks import Sinusoid, TaskBatch
from .training import evaluate, fit

__version__ = "0.1.0"

__all__ = [
    "BMAML", "BayesianMLP", "EMAML", "IMQSteinKernel", "LatentSite", "MAML", "MetaLearner",
    "ModelPotential", "ParticlePosterior", "RBFSteinKernel", "SVGD", "Sinusoid", "SteinKernel",
    "TaskBatch", "evaluate", "fit", "ksd", "ksd_trajectory", "regression_metrics",
    "stein_kernel_matrix", "summary", "svgd_direction", "to_inference_data", "transport",
]
