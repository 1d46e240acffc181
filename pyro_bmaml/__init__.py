"""pyro_bmaml: Bayesian model-agnostic meta-learning (BMAML) on Pyro.

The data path, one subpackage per stage and one module per concept in it::

    tasks.models (Pyro task models)
      -> engine: potential (flat particles, one row each; capture: its recorded graph,
                 simplified)
                 -> kernels -> svgd (SVGD step, differentiable transport) -> posterior
                 (and empirical_bayes: a Gaussian prior fitted to many tasks' evidence)
      -> meta: learners (chaser / BFA loss, EMAML, MAML) -> training (Adam, checkpoints,
               distributed)
      -> evaluation: metrics, diagnostics (ArviZ), plots

and ``tasks`` (the batch protocol, sinusoid, few-shot episodes, meta-RL navigation) feeding
the meta-learners. ``pyro_bmaml.evaluation.plots`` and the CLI are imported only on demand,
as is ``pyro_bmaml.tasks.navigation`` (gymnasium).
"""

from .evaluation.diagnostics import summary, to_inference_data
from .engine.empirical_bayes import EmpiricalBayesFit, empirical_bayes_prior
from .engine.kernels import IMQSteinKernel, RBFSteinKernel, SteinKernel
from .engine.ksd import ksd, ksd_trajectory, stein_kernel_matrix
from .meta.learners import BMAML, EMAML, MAML, MetaLearner
from .tasks.fewshot import FewShotClassification
from .evaluation.metrics import classification_metrics, regression_metrics
from .tasks.models import BayesianClassifier, BayesianMLP, GaussianMLPPolicy
from .engine.posterior import ParticlePosterior
from .engine.potential import LatentSite, ModelPotential, PerParticle
from .engine.svgd import SVGD, svgd_direction, transport
from .tasks.base import Sinusoid, TaskBatch, TaskPool
from .meta.training import evaluate, fit

__version__ = "0.1.0"

__all__ = [
    "BMAML", "BayesianClassifier", "BayesianMLP", "EMAML", "EmpiricalBayesFit",
    "FewShotClassification", "empirical_bayes_prior",
    "GaussianMLPPolicy", "PerParticle",
    "TaskPool", "classification_metrics", "IMQSteinKernel", "LatentSite", "MAML", "MetaLearner",
    "ModelPotential", "ParticlePosterior", "RBFSteinKernel", "SVGD", "Sinusoid", "SteinKernel",
    "TaskBatch", "evaluate", "fit", "ksd", "ksd_trajectory", "regression_metrics",
    "stein_kernel_matrix", "summary", "svgd_direction", "to_inference_data", "transport",
]


def __getattr__(name):
    # the meta-RL task source needs gymnasium (pip install .[rl]): imported on first use
    # (and not in __all__, so that `from pyro_bmaml import *` works without it)
    if name == "NavigationTasks":
        from .tasks.navigation import NavigationTasks

        return NavigationTasks
    raise AttributeError(f"module 'pyro_bmaml' has no attribute {name!r}")
