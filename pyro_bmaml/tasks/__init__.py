"""Task families: the task protocol, task sources and their Pyro task models.

``base`` (``TaskBatch``: the batch protocol the meta-learners use; ``TaskPool``; sinusoid
regression), ``fewshot`` (N-way K-shot episodes: digits, image folders), ``navigation``
(meta-RL: 2-D point navigation and rollout batches; needs gymnasium, imported on use),
``synthetic`` (the families suite: five families with exact Bayes-optimal and broad-prior
references), ``models`` (the Bayesian MLP, the Bayesian classifier, the Gaussian MLP policy)
and ``registry`` (the task-family entries the CLI looks up). A new family is a task source,
a model and, for the command line, a :class:`~pyro_bmaml.tasks.registry.TaskFamily` entry
registered beside them; the meta layer does not change.
"""

from .base import Sinusoid, TaskBatch, TaskPool
from .models import BayesianClassifier, BayesianMLP, GaussianMLPPolicy
from .registry import TaskFamily, register_family

__all__ = ["BayesianClassifier", "BayesianMLP", "GaussianMLPPolicy", "Sinusoid", "TaskBatch",
           "TaskFamily", "TaskPool", "register_family"]
