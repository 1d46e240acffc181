"""Task families: the task protocol, task sources and their Pyro task models.

``base`` (``TaskBatch``: the batch protocol the meta-learners use; ``TaskPool``; sinusoid
regression), ``fewshot`` (N-way K-shot episodes: digits, image folders), ``navigation``
(meta-RL: 2-D point navigation and rollout batches; needs gymnasium, imported on use) and
``models`` (the Bayesian MLP, the Bayesian classifier, the Gaussian MLP policy). A new family
is a task source and a model here, and an entry in the CLI's registry.
"""

from .base import Sinusoid, TaskBatch, TaskPool
from .models import BayesianClassifier, BayesianMLP, GaussianMLPPolicy

__all__ = ["BayesianClassifier", "BayesianMLP", "GaussianMLPPolicy", "Sinusoid", "TaskBatch",
           "TaskPool"]
