r"""Task sources: families of few-shot tasks, batched with a leading task dim.

The protocol is small: a task source has ``sample(batch_size, generator) -> TaskBatch`` (a
meta-training batch) and ``evaluation_tasks(num_tasks, seed) -> TaskBatch``. A
:class:`TaskBatch` holds support and query sets with a leading task dim ``T``:
``x_support (T, K, *input_shape)``, ``y_support (T, K, *target_shape)``, and the same for
the query set. A source may also define ``metrics(posterior, x_query, y_query)`` (its
family's held-out scores, used by :func:`~pyro_bmaml.meta.training.fit`; regression's by
default).
Any object with these two methods plugs into :meth:`~pyro_bmaml.meta.learners.MetaLearner.fit`.

What the meta-learners ask of a batch is one method, :meth:`TaskBatch.adaptation_data`:
the model's arguments for a phase (``"support"``, ``"leader"``, ``"query"``) given the
particles. Supervised batches return their fixed tensors; a family whose data depend on the
particles (meta-RL, :class:`~pyro_bmaml.tasks.navigation.NavigationBatch`: rollouts of each
policy particle) returns fresh ones and sets ``resample_each_step``, and may score learners
itself with an ``evaluate(learner, num_steps, metrics)`` method. So a new family is a task
source, a model and a CLI entry; the meta layer does not change.
:class:`TaskPool` turns a fixed set of tasks (a :class:`TaskBatch` built from your own
tensors) into such a source, and splits off held-out tasks (e.g. for the calibration
offset, ``fit(calibration_tasks=...)``).

:class:`Sinusoid` is the benchmark of MAML (Finn et al., 2017) and BMAML (Yoon et al., 2018):
:math:`y = A \sin(w x - b)`, with a *finite* meta-training pool of tasks whose points are
drawn once from a seed, as the official BMAML code does.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch

from .._checks import check_choice, check_has_data, check_int

__all__ = ["TaskBatch", "TaskPool", "Sinusoid"]


class TaskBatch(NamedTuple):
    """Support and query sets of ``T`` tasks (leading dim ``T`` everywhere).

    Any task family fits: inputs ``x (T, N, *input_shape)`` (features ``(T, K, in)``,
    images ``(T, K, C, H, W)``), targets ``y (T, N, *target_shape)`` (floats ``(T, K)`` or
    ``(T, K, out)``, integer class labels ``(T, K)``). The support set has ``K`` points per
    task and the query set ``Q``; inputs and targets of the two sets share their shapes
    beyond ``N``.
    """

    x_support: torch.Tensor  # (T, K, *input_shape)
    y_support: torch.Tensor  # (T, K, *target_shape)
    x_query: torch.Tensor  # (T, Q, *input_shape)
    y_query: torch.Tensor  # (T, Q, *target_shape)

    @property
    def num_tasks(self) -> int:
        return self.x_support.size(0)

    def to(self, *args, **kwargs) -> "TaskBatch":
        """Move or cast (floating tensors only for a dtype: integer labels keep theirs)."""
        dtype = kwargs.pop("dtype", None)
        rest = []
        for a in args:
            if isinstance(a, torch.dtype):
                dtype = a
            else:
                rest.append(a)

        def move(t):
            t = t.to(*rest, **kwargs)
            return t.to(dtype) if dtype is not None and t.is_floating_point() else t

        return TaskBatch(*(move(t) for t in self))

    #: the adaptation data do not depend on the particles (see :meth:`adaptation_data`)
    resample_each_step = False

    def adaptation_data(self, phase: str, particles: Optional[torch.Tensor] = None) -> tuple:
        """The model's arguments for a phase of meta-learning, each with a leading task dim:
        ``"support"`` (adaptation: ``(x_support, y_support)``), ``"leader"`` (BMAML's leader:
        support and query together) and ``"query"`` (held-out scoring).

        This is the one thing the meta-learners ask of a batch of tasks. A task family
        whose data depend on the particles (meta-RL: rollouts of each policy particle) gives
        its own batch class with this method and ``resample_each_step = True``."""
        if phase == "support":
            return self.x_support, self.y_support
        if phase == "query":
            return self.x_query, self.y_query
        if phase == "leader":
            return (torch.cat([self.x_support, self.x_query], 1),
                    torch.cat([self.y_support, self.y_query], 1))
        raise ValueError(f"phase must be 'support', 'leader' or 'query', got {phase!r}")

    def __getitem__(self, index):
        if isinstance(index, int):  # NamedTuple field access stays positional
            return tuple.__getitem__(self, index)
        return TaskBatch(*(t[index] for t in self))

    def validate(self) -> "TaskBatch":
        """Check shapes, dtypes and finiteness; raise ``ValueError``/``TypeError`` naming the
        field: inputs floating, targets floating or integer, every tensor with the leading
        task dim ``T`` and a points dim, x and y of a set with the same number of points."""
        names = self._fields
        for name, t in zip(names, self):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
            check_has_data(name, t)
            if name.startswith("x") and not t.is_floating_point():
                raise TypeError(f"{name} must be a floating tensor, got dtype {t.dtype}")
            if t.dtype == torch.bool or t.is_complex():
                raise TypeError(f"{name} must be a floating or integer tensor, got {t.dtype}")
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise ValueError(f"{name} contains non-finite values (NaN or inf)")
        T = self.x_support.size(0) if self.x_support.dim() else 0
        for name, t in zip(names, self):
            if t.dim() < 2 or t.size(0) != T:
                raise ValueError(
                    f"{name} must have a leading task dim {T} and a points dim, "
                    f"got {tuple(t.shape)}")
        if self.x_support.size(1) == 0:
            raise ValueError(f"x_support has no points (K = 0, shape "
                             f"{tuple(self.x_support.shape)}); give at least one example")
        if self.x_query.size(1) == 0:
            raise ValueError(f"x_query has no points (shape {tuple(self.x_query.shape)}); a "
                             "task needs query points to be scored on")
        for which in ("support", "query"):
            x, y = getattr(self, f"x_{which}"), getattr(self, f"y_{which}")
            if y.shape[:2] != x.shape[:2]:
                raise ValueError(
                    f"y_{which} must have shape ({T}, {x.size(1)}, ...) like x_{which} "
                    f"{tuple(x.shape)}, got {tuple(y.shape)}")
        for kind in ("x", "y"):
            s, q = getattr(self, f"{kind}_support"), getattr(self, f"{kind}_query")
            if s.shape[2:] != q.shape[2:] or s.dtype != q.dtype:
                raise ValueError(
                    f"{kind}_support {tuple(s.shape)} ({s.dtype}) and {kind}_query "
                    f"{tuple(q.shape)} ({q.dtype}) must share their shape beyond the points "
                    "dim and their dtype")
        return self


class TaskPool:
    """A finite pool of ``T`` tasks as a task source: :meth:`sample` draws distinct tasks.

    :param tasks: the pool, a :class:`TaskBatch` (validated).
    """

    def __init__(self, tasks: TaskBatch):
        if not isinstance(tasks, TaskBatch):
            raise TypeError(f"tasks must be a TaskBatch, got {type(tasks).__name__}")
        self.tasks = tasks.validate()

    @property
    def num_tasks(self) -> int:
        return self.tasks.num_tasks

    def sample(self, batch_size: int, generator: torch.Generator) -> TaskBatch:
        """``batch_size`` distinct tasks of the pool, drawn with ``generator``."""
        batch_size = check_int("batch_size", batch_size, 1)
        if batch_size > self.num_tasks:
            raise ValueError(
                f"batch_size ({batch_size}) exceeds the pool of num_tasks={self.num_tasks} tasks"
            )
        index = torch.randperm(self.num_tasks, generator=generator)[:batch_size]
        return self.tasks[index]

    def split(self, num_holdout: int, seed: int = 0) -> "tuple[TaskPool, TaskPool]":
        """``(rest, holdout)``: ``num_holdout`` tasks drawn at random (fixed by ``seed``)
        and the others, as two disjoint pools."""
        num_holdout = check_int("num_holdout", num_holdout, 1)
        if num_holdout >= self.num_tasks:
            raise ValueError(
                f"num_holdout ({num_holdout}) must be smaller than the pool's "
                f"num_tasks={self.num_tasks}")
        order = torch.randperm(self.num_tasks, generator=torch.Generator().manual_seed(seed))
        return TaskPool(self.tasks[order[num_holdout:]]), TaskPool(self.tasks[order[:num_holdout]])


class Sinusoid:
    r"""Sinusoid regression tasks :math:`y = A \sin(w x - b)`.

    :param variant: ``"bmaml"`` (official BMAML ranges: A in [0.1, 5], b in [0, 2 pi],
        w in [0.5, 2]) or ``"maml"`` (w = 1, b in [0, pi]). x ~ U[-5, 5] in both.
    :param num_tasks: size of the finite meta-training pool, |T| (``None``: a fresh task
        every draw).
    :param num_support: K, support points per task.
    :param num_query: query points per task (the paper uses K).
    :param noise: relative noise sd: training targets get N(0, (noise * A)^2); evaluation
        targets are noise-free.
    :param seed: seed of the pool.
    """

    def __init__(
        self,
        variant: str = "bmaml",
        num_tasks: Optional[int] = 100,
        num_support: int = 10,
        num_query: Optional[int] = None,
        noise: float = 0.01,
        seed: int = 0,
    ):
        self.variant = check_choice("variant", variant, ("bmaml", "maml"))
        self.num_tasks = None if num_tasks is None else check_int("num_tasks", num_tasks, 1)
        self.num_support = check_int("num_support", num_support, 1)
        self.num_query = self.num_support if num_query is None else check_int("num_query", num_query, 1)
        if not (isinstance(noise, (int, float)) and noise >= 0 and math.isfinite(noise)):
            raise ValueError(f"noise must be a finite number >= 0, got {noise!r}")
        self.noise = float(noise)
        self.seed = int(seed)
        self._pool = None
        if self.num_tasks is not None:
            g = torch.Generator().manual_seed(self.seed)
            self._pool = TaskPool(self._draw(self.num_tasks, g, noisy=True))

    def _draw(self, num_tasks: int, g: torch.Generator, noisy: bool) -> TaskBatch:
        def u(lo, hi, *shape):
            return lo + (hi - lo) * torch.rand(*shape, generator=g)

        amp = u(0.1, 5.0, num_tasks, 1)
        if self.variant == "bmaml":
            phase, freq = u(0.0, 2 * math.pi, num_tasks, 1), u(0.5, 2.0, num_tasks, 1)
        else:
            phase, freq = u(0.0, math.pi, num_tasks, 1), torch.ones(num_tasks, 1)
        n = self.num_support + self.num_query
        x = u(-5.0, 5.0, num_tasks, n)
        y = amp * torch.sin(freq * x - phase)
        if noisy and self.noise > 0:
            y = y + self.noise * amp * torch.randn(num_tasks, n, generator=g)
        k = self.num_support
        return TaskBatch(x[:, :k, None], y[:, :k], x[:, k:, None], y[:, k:])

    def sample(self, batch_size: int, generator: torch.Generator) -> TaskBatch:
        """A meta-training batch of ``batch_size`` tasks (distinct tasks of the pool)."""
        batch_size = check_int("batch_size", batch_size, 1)
        if self._pool is None:
            return self._draw(batch_size, generator, noisy=True)
        return self._pool.sample(batch_size, generator)

    def split(self, num_holdout: int, seed: int = 0) -> "tuple[TaskPool, TaskPool]":
        """The finite pool split into ``(training, holdout)`` pools (see
        :meth:`TaskPool.split`); the holdout's tasks are never meta-trained on."""
        if self._pool is None:
            raise ValueError("split needs a finite pool (num_tasks=None draws fresh tasks)")
        return self._pool.split(num_holdout, seed)

    def evaluation_tasks(self, num_tasks: int = 100, seed: int = 12345) -> TaskBatch:
        """Held-out tasks with noise-free targets (fixed by ``seed``)."""
        num_tasks = check_int("num_tasks", num_tasks, 1)
        return self._draw(num_tasks, torch.Generator().manual_seed(seed), noisy=False)


from .registry import TaskFamily  # noqa: E402  (the CLI's entry for this module's family)


class SinusoidFamily(TaskFamily):
    """``--task sinusoid``: the paper's first benchmark with the Bayesian MLP (the CLI's
    family entry, see :mod:`pyro_bmaml.tasks.registry`)."""

    name = "sinusoid"
    eval_tasks = 100
    init = "paper"
    inner_steps = 1  # the paper's n

    def configure(self, task, args) -> dict:
        num_tasks, meta_batch = args.num_tasks, args.meta_batch
        if meta_batch > num_tasks:
            raise ValueError(f"--meta-batch ({meta_batch}) exceeds --num-tasks ({num_tasks})")
        if not 0.0 <= args.calibration_holdout < 1.0:
            raise ValueError(f"--calibration-holdout must be in [0, 1), got {args.calibration_holdout}")
        return {"shots": args.shots or 10, "num_tasks": num_tasks, "variant": args.variant,
                "calibration_holdout": args.calibration_holdout}

    def method_defaults(self, method: str, config: dict) -> dict:
        """The papers' adaptation steps (BMAML's eps, the official EMAML's alpha, Finn et
        al.'s alpha) and meta-objectives; BMAML's noise precision takes a 3x larger SVGD
        step (task-adaptive noise: ``results/calibration.md``). BMAML keeps the paper's
        fixed step and the official code's chaser gradient on the noise precision
        (``learn_step_size=False``, ``chaser_trains_noise=True``): with the library's
        defaults the held-out MSE at 2,000 iterations was 3.00 instead of 1.98 (the
        chaser-trained steps shrink here; README, *Defaults for your own model*)."""
        return {"bmaml": {"step_size": 1e-3, "objective": "chaser", "noise_step_size": 3e-3,
                          "learn_step_size": False, "chaser_trains_noise": True},
                "emaml": {"step_size": 1e-3, "objective": "mse"},
                "maml": {"step_size": 1e-2, "objective": "mse"}}[method]

    def hidden(self, config):
        return (40, 40, 40)

    def model(self, config):
        from .models import BayesianMLP

        return BayesianMLP(hidden=tuple(config["hidden"]))

    def sources(self, config: dict, learner=None):
        """``(source, training_tasks, calibration_tasks)``: the pool, the tasks meta-trained
        on, and the held-out share of the pool (``calibration_holdout``, a fraction) that only
        the learner's calibration term sees (``None`` when there is no such share)."""
        source = Sinusoid(config["variant"], config["num_tasks"], config["shots"],
                          seed=config["seed"])
        fraction = config.get("calibration_holdout") or 0.0
        if (not fraction or config["num_tasks"] is None
                or (learner is not None and not learner.has_calibration_term)):
            return source, source, None
        holdout = max(1, round(fraction * config["num_tasks"]))
        if config["num_tasks"] - holdout < config.get("meta_batch", 1):
            raise ValueError(
                f"--calibration-holdout {fraction} keeps {config['num_tasks'] - holdout} of "
                f"--num-tasks {config['num_tasks']} for training, fewer than --meta-batch "
                f"{config.get('meta_batch')}; lower it or use 0")
        training, calibration = source.split(holdout, seed=config["seed"])
        return source, training, calibration

    def metrics(self, posterior, x_query, y_query):
        from ..evaluation.metrics import regression_metrics

        return regression_metrics(posterior, x_query, y_query, crps=True)

    def headline(self, metrics: dict) -> str:
        return (f"MSE {metrics['mse'][0]:.4f}, NLL {metrics['nll'][0]:.4f}, 90% coverage "
                f"{metrics['coverage'][0.9][0]:.3f}")

    def summary(self, metrics: dict, num_tasks: int) -> str:
        mse, nll = metrics["mse"], metrics["nll"]
        c50, c90 = metrics["coverage"][0.5], metrics["coverage"][0.9]
        lines = [
            f"test MSE {mse[0]:.4f} +- {mse[1]:.4f} (particle mean; predicting 0 scores 4.25)   "
            f"test NLL {nll[0]:.4f} +- {nll[1]:.4f} (mixture, per query point)",
            f"coverage of the central 50% / 90% intervals: {c50[0]:.3f} / {c90[0]:.3f} "
            f"(nominal 0.50 / 0.90)   ({num_tasks} evaluation tasks, mean +- s.e.)",
        ]
        if abs(c90[0] - 0.9) > 0.1:
            lines.append("note: the 90% intervals are " + (
                "too narrow (overconfident)" if c90[0] < 0.9 else "too wide (underconfident)")
                + "; see calibration.png")
        return "\n".join(lines)

    def write(self, learner, posterior, tasks, metrics, out):
        from ..evaluation import plots

        table = {k: metrics[k] for k in ("mse", "mse_particles", "rmse", "nll", "crps")}
        table["coverage"] = {str(k): v for k, v in metrics["coverage"].items()}
        table["width"] = {str(k): v for k, v in metrics["width"].items()}
        table["reliability"] = {str(k): v for k, v in metrics["reliability"].items()}
        lines = [f"| {key} | {table[key][0]:.4g} | {table[key][1]:.2g} |"
                 for key in ("mse", "mse_particles", "rmse", "nll", "crps")]
        for level, (mu, se) in metrics["coverage"].items():
            width = metrics["width"][level]
            lines.append(f"| coverage {level:.0%} (width {width[0]:.3g}) | {mu:.3f} | {se:.2g} |")
        shown = min(4, tasks.num_tasks)
        plots.plot_predictive([posterior.task(i) for i in range(shown)], out / "predictive.png",
                              queries=[(tasks.x_query[i], tasks.y_query[i]) for i in range(shown)])
        plots.plot_calibration(metrics["reliability"], out / "calibration.png", label=learner.method)
        return table, lines


SINUSOID_FAMILY = SinusoidFamily()
