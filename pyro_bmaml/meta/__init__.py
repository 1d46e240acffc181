"""Meta-learning: the learners and their training.

``learners`` (``BMAML`` with the chaser or BFA loss, ``EMAML``, ``MAML``; noise calibration;
shared-parameter adaptation), ``training`` (``fit``: Adam on the official schedule,
non-finite guards, checkpoints, exact resume; ``evaluate``), ``checkpoint`` (atomic,
``weights_only`` checkpoints), ``trpo`` (trust-region meta-updates, MAML-RL's) and
``distributed`` (data-parallel meta-training on torch.distributed).
"""

from .learners import BMAML, EMAML, MAML, MetaLearner
from .training import evaluate, fit

__all__ = ["BMAML", "EMAML", "MAML", "MetaLearner", "evaluate", "fit"]
