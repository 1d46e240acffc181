"""pyro_bmaml: Bayesian model-agnostic meta-learning (BMAML) on Pyro.

The data path, one module per concept::

    Pyro model -> potential (flat particles, one row each) -> kernels (Stein kernels)
               -> svgd (SVGD step, differentiable transport) -> meta (chaser / BFA loss)
               -> training (Adam, checkpoints)

around it: posterior (particle predictive), ksd and metrics (diagnostics), diagnostics
(ArviZ), models and tasks (the paper's Bayesian MLP and sinusoid tasks; a Bayesian
classifier; a Gaussian policy), fewshot (N-way K-shot episodes), navigation (meta-RL rollouts;
needs gymnasium, imported on first use), capture (the potential's recorded graphs) and
distributed (torch.distributed meta-training). Plotting (``pyro_bmaml.plots``) and the CLI
are imported only on demand.
"""

from .diagnostics import summary, to_inference_data
from .kernels import IMQSteinKernel, RBFSteinKernel, SteinKernel
from .ksd import ksd, ksd_trajectory, stein_kernel_matrix
from .meta import BMAML, EMAML, MAML, MetaLearner
from .fewshot import FewShotClassification
from .metrics import classification_metrics, regression_metrics
from .models import BayesianClassifier, BayesianMLP, GaussianMLPPolicy
from .posterior import ParticlePosterior
from .potential import LatentSite, ModelPotential, PerParticle
from .svgd import SVGD, svgd_direction, transport
from .tasks import Sinusoid, TaskBatch, TaskPool
from .training import evaluate, fit

__version__ = "0.1.0"

__all__ = [
    "BMAML", "BayesianClassifier", "BayesianMLP", "EMAML", "FewShotClassification",
    "GaussianMLPPolicy", "NavigationTasks", "PerParticle",
    "TaskPool", "classification_metrics", "IMQSteinKernel", "LatentSite", "MAML", "MetaLearner",
    "ModelPotential", "ParticlePosterior", "RBFSteinKernel", "SVGD", "Sinusoid", "SteinKernel",
    "TaskBatch", "evaluate", "fit", "ksd", "ksd_trajectory", "regression_metrics",
    "stein_kernel_matrix", "summary", "svgd_direction", "to_inference_data", "transport",
]


def __getattr__(name):
    # the meta-RL task source needs gymnasium (pip install .[rl]): imported on first use
    if name == "NavigationTasks":
        from .navigation import NavigationTasks

        return NavigationTasks
    raise AttributeError(f"module 'pyro_bmaml' has no attribute {name!r}")
