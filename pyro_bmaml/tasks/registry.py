"""The task-family registry: what ``pyro-bmaml train --task NAME`` looks up.

A *family entry* bundles what the command line needs to run a family end to end: its
settings from the parsed arguments, each method's defaults, the Pyro model, the task
sources and the report. Each entry lives with its family (``tasks/base.py`` for sinusoid,
``tasks/fewshot.py`` for classification, ``tasks/navigation.py`` for meta-RL,
``tasks/synthetic.py`` for the families suite); the CLI only parses arguments and asks
:func:`task_family`. Your own family plugs in the same way::

    # mypackage/family.py
    from pyro_bmaml.tasks.registry import TaskFamily, register_family

    class MyFamily(TaskFamily):
        name = "my-lines"
        def model(self, config): return my_model
        def sources(self, config, learner=None):
            source = MyTaskSource(seed=config["seed"])
            return source, source, None

    register_family(MyFamily())

and ``pyro-bmaml train --import mypackage.family --task my-lines`` (``--import`` imports
the module before the task is looked up, so its ``register_family`` call runs).

The built-in entries are registered by import path and imported on first use, so that a
family with optional dependencies (meta-RL needs gymnasium) costs nothing until asked for.
"""

from __future__ import annotations

import importlib
import re
from typing import List, Optional, Tuple, Union

__all__ = ["TaskFamily", "register_family", "task_family", "registered_families"]


class TaskFamily:
    """A family entry: the defaults below fit a regression family whose model has a noise
    site; override what differs. ``config`` is the run's configuration (a dict: the CLI's
    arguments, ``method``, ``particles``, ``seed``, ``shots``, and what :meth:`configure`
    adds).

    - ``name``: what ``--task`` says; ``pattern`` (optional): a regular expression for a
      family of names (``digits-5way-1shot``); ``eval_tasks``: held-out tasks by default;
      ``init``: the learners' ``init`` (``"prior"`` or ``"paper"``); ``inner_steps``: the
      adaptation steps (``None``: each learner's default).
    - :meth:`configure`: the family's settings from the parsed arguments (checked).
    - :meth:`method_defaults`: each method's adaptation step and objective.
    - :meth:`model`, :meth:`sources`: the Pyro model; ``(source, training, calibration)``
      task sources (``source.evaluation_tasks(n)`` are the held-out tasks).
    - :meth:`metrics`, :meth:`headline`, :meth:`summary`, :meth:`write`: the scores and the
      report (or :meth:`score`, for a family that scores learners itself).
    """

    name = "family"
    pattern: Optional[str] = None
    eval_tasks = 100
    init = "prior"
    #: adaptation steps by default (``None``: each learner's own default)
    inner_steps: Optional[int] = None

    def configure(self, task: str, args) -> dict:
        """The family's settings from the parsed CLI arguments (default: ``shots``, the
        support points, default 10)."""
        return {"shots": getattr(args, "shots", None) or 10}

    def method_defaults(self, method: str, config: dict) -> dict:
        """``{"step_size", "objective", ...}`` for ``method``: the papers' regression steps
        (BMAML 1e-3 on the log joint, EMAML 1e-3 and MAML 1e-2 on the mean squared error)."""
        return {"bmaml": {"step_size": 1e-3, "objective": "chaser"},
                "emaml": {"step_size": 1e-3, "objective": "auto"},
                "maml": {"step_size": 1e-2, "objective": "auto"}}[method]

    def hidden(self, config: dict) -> Optional[Tuple[int, ...]]:
        """Default hidden sizes of the family's network (``None``: the model has none)."""
        return None

    def model(self, config: dict):
        raise NotImplementedError

    def sources(self, config: dict, learner=None):
        raise NotImplementedError

    def metrics(self, posterior, x_query, y_query):
        from ..evaluation.metrics import regression_metrics

        return regression_metrics(posterior, x_query, y_query, widths=False)

    def headline(self, metrics: dict) -> str:
        parts = [f"{k} {metrics[k][0]:.4f}" for k in ("mse", "accuracy", "nll") if k in metrics]
        if "coverage" in metrics:
            parts.append(f"90% coverage {metrics['coverage'][0.9][0]:.3f}")
        return ", ".join(parts)

    def summary(self, metrics: dict, num_tasks: int) -> str:
        return f"test {self.headline(metrics)} ({num_tasks} held-out tasks)"

    def write(self, learner, posterior, tasks, metrics, out) -> tuple:
        """``(table, markdown rows)`` of the report (and the family's plots in ``out``)."""
        table, lines = {}, []
        for key, value in metrics.items():
            if isinstance(value, tuple) and len(value) == 2:
                table[key] = list(value)
                lines.append(f"| {key} | {value[0]:.4g} | {value[1]:.2g} |")
        if "coverage" in metrics:
            table["coverage"] = {str(k): list(v) for k, v in metrics["coverage"].items()}
            lines += [f"| coverage {k:.0%} | {v[0]:.3f} | {v[1]:.2g} |"
                      for k, v in metrics["coverage"].items()]
        return table, lines


_Entry = Union[TaskFamily, str]
#: (names, pattern, label, entry or "module:attribute"), in registration order
_REGISTRY: List[tuple] = []


def register_family(family: _Entry, names: Tuple[str, ...] = (), pattern: Optional[str] = None,
                    label: Optional[str] = None, replace: bool = False) -> None:
    """Register a family entry (a :class:`TaskFamily`, or ``"module:attribute"`` naming one,
    imported on first use) under its ``name`` (and ``pattern``) or the given ``names``;
    ``label`` says in words what a ``pattern`` accepts (for the error message and ``--help``).

    :raises ValueError: a name already registered, unless ``replace``.
    """
    if isinstance(family, str):
        if ":" not in family:
            raise ValueError(f"family must be a TaskFamily or 'module:attribute', got {family!r}")
        if not names and pattern is None:
            raise ValueError("a family registered by import path needs names= or pattern=")
    elif not isinstance(family, TaskFamily):
        raise TypeError(f"family must be a TaskFamily or 'module:attribute', got "
                        f"{type(family).__name__}")
    else:
        names = tuple(names) or (family.name,)
        pattern = pattern or family.pattern
    taken = [n for n in names if any(n in known for known, *_ in _REGISTRY)]
    if taken and not replace:
        raise ValueError(f"task family {taken} is registered already; pass replace=True")
    if taken:
        _REGISTRY[:] = [r for r in _REGISTRY if not set(r[0]) & set(taken)]
    _REGISTRY.append((tuple(names), pattern, label or pattern, family))


def _load(entry: _Entry) -> TaskFamily:
    if isinstance(entry, TaskFamily):
        return entry
    module, attribute = entry.split(":")
    return getattr(importlib.import_module(module), attribute)


def task_family(task: str) -> TaskFamily:
    """The family entry that ``task`` names (``--task``), or ``ValueError`` listing them."""
    if not isinstance(task, str):
        raise TypeError(f"task must be a str, got {type(task).__name__}")
    for index, (names, pattern, label, entry) in enumerate(_REGISTRY):
        if task in names or (pattern is not None and re.fullmatch(pattern, task)):
            family = _load(entry)
            _REGISTRY[index] = (names, pattern, label, family)  # imported once
            return family
    raise ValueError(f"unknown --task {task!r}: use one of {registered_families()} (or "
                     "--import a module that registers yours, see pyro_bmaml.tasks.registry)")


def registered_families() -> List[str]:
    """What ``--task`` accepts: each entry's names, and its pattern in words."""
    out = []
    for names, pattern, label, _ in _REGISTRY:
        out += list(names)
        if pattern is not None and not names:
            out.append(label)
    return out


# the built-in families, imported on first use
register_family("pyro_bmaml.tasks.base:SINUSOID_FAMILY", names=("sinusoid",))
register_family("pyro_bmaml.tasks.fewshot:CLASSIFICATION_FAMILY",
                pattern=r"digits-\d+way-\d+shot|folder:.+", label="digits-NwayKshot, folder:PATH")
register_family("pyro_bmaml.tasks.navigation:NAVIGATION_FAMILY", names=("point-nav",))
for _name in ("normal-gamma", "student-t", "subspace-classification", "logistic-glm",
              "hierarchical"):
    register_family(f"pyro_bmaml.tasks.synthetic:SUITE_{_name.upper().replace('-', '_')}",
                    names=(_name,))
