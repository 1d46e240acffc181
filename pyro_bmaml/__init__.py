"""pyro_bmaml: Bayesian model-agnostic meta-learning (BMAML) on Pyro.

The data path, one module per concept::

    Pyro model -> potential (flat particles, one row each) -> kernels (Stein kernels)
               -> svgd (SVGD step, differentiable transport) -> meta (chaser / BFA loss)
               -> training (Adam, checkpoints)

around it: posterior (particle predictive), ksd and metrics (diagnostics), diagnostics
(ArviZ), models and tasks (the paper's Bayesian MLP and sinusoid tasks; a Bayesian
classifier), fewshot (N-way K-shot episodes). Plotting
(``pyro_bmaml.plots``) and the CLI are imported only on demand.
"""

from .diagnostics import summary, to_inference_data
from .kernels import IMQSteinKernel, RBFSteinKernel, SteinKernel
from .ksd import ksd, ksd_trajectory, stein_kernel_matrix
from .meta import BMAML, EMAML, MAML, MetaLearner
from .fewshot import FewShotClassification
from .metrics import classification_metrics, regression_metrics
from .models import BayesianClassifier, BayesianMLP
from .posterior import ParticlePosterior
from .potential import LatentSite, ModelPotential
from .svgd import SVGD, svgd_direction, transport
from .tasks import Sinusoid, TaskBatch, TaskPool
from .training import evaluate, fit

__version__ = "0.1.0"

__all__ = [
    "BMAML", "BayesianClassifier", "BayesianMLP", "EMAML", "FewShotClassification",
    "TaskPool", "classification_metrics", "IMQSteinKernel", "LatentSite", "MAML", "MetaLearner",
    "ModelPotential", "ParticlePosterior", "RBFSteinKernel", "SVGD", "Sinusoid", "SteinKernel",
    "TaskBatch", "evaluate", "fit", "ksd", "ksd_trajectory", "regression_metrics",
    "stein_kernel_matrix", "summary", "svgd_direction", "to_inference_data", "transport",
]
