"""The meta-training loop shared by all meta-learners, and held-out evaluation.

Adam on ``theta0`` with the paper's schedule (learning rate x0.98 every 1% of training),
meta-batches drawn from a task source with a dedicated generator (saved in checkpoints, so
a resumed run draws the same tasks and follows the same trajectory as an uninterrupted one).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Dict, Optional

import torch
from tqdm.auto import tqdm

from ._checks import check_int, check_positive_float
from .checkpoint import load_checkpoint, save_checkpoint
from .metrics import regression_metrics
from .tasks import TaskBatch

__all__ = ["fit", "evaluate"]


def evaluate(learner, tasks: TaskBatch, num_steps: Optional[int] = None,
             closed_form: bool = False) -> Dict[str, Any]:
    """Adapt to each task's support set, score on its query set (see :mod:`.metrics`):
    NLL, MSE, RMSE, and with ``closed_form`` (Normal likelihoods) CRPS, coverage, PIT."""
    tasks = tasks.validate()
    posterior = learner.adapt(tasks.x_support, tasks.y_support, num_steps=num_steps)
    return regression_metrics(posterior, tasks.x_query, tasks.y_query, closed_form=closed_form)


def fit(
    learner,
    tasks,
    num_iterations: int,
    meta_batch_size: int = 10,
    lr: float = 1e-3,
    lr_decay: float = 0.98,
    decay_every: Optional[int] = None,
    eval_tasks: Optional[TaskBatch] = None,
    eval_every: int = 0,
    checkpoint: Optional[str] = None,
    checkpoint_every: int = 0,
    resume: bool = True,
    seed: int = 0,
    progress: bool = True,
    extra: Optional[dict] = None,
    stop_after: Optional[int] = None,
) -> Dict[str, list]:
    """Meta-train ``learner`` for ``num_iterations`` meta-iterations.

    :param tasks: a task source (``sample(batch_size, generator) -> TaskBatch``).
    :param meta_batch_size: tasks per meta-iteration (paper: 10).
    :param lr, lr_decay, decay_every: Adam learning rate, multiplied by ``lr_decay`` every
        ``decay_every`` iterations (default: 1% of ``num_iterations``).
    :param eval_tasks, eval_every: held-out tasks scored every ``eval_every`` iterations
        (and at the end) when given.
    :param checkpoint, checkpoint_every: path of the checkpoint written every
        ``checkpoint_every`` iterations and at the end; with ``resume`` an existing one is
        loaded and training continues from it.
    :param seed: seed of the task-sampling generator.
    :param extra: extra entries stored in the checkpoint (e.g. the CLI's configuration).
    :param stop_after: stop (after checkpointing) once this iteration count is reached, as if
        interrupted; used to test resumption.
    :returns: history ``{"iteration": [...], "loss": [...], "lr": [...], "eval": [...]}``.
    :raises FloatingPointError: naming the meta-iteration whose loss was non-finite.
    """
    num_iterations = check_int("num_iterations", num_iterations, 1)
    meta_batch_size = check_int("meta_batch_size", meta_batch_size, 1)
    lr = check_positive_float("lr", lr)
    lr_decay = check_positive_float("lr_decay", lr_decay)
    decay_every = max(1, num_iterations // 100) if decay_every is None else check_int(
        "decay_every", decay_every, 1)
    eval_every = check_int("eval_every", eval_every, 0)
    checkpoint_every = check_int("checkpoint_every", checkpoint_every, 0)
    if not hasattr(tasks, "sample"):
        raise TypeError(f"tasks must be a task source with a sample() method, got {type(tasks).__name__}")

    optimizer = torch.optim.Adam(learner.parameters(), lr=lr)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=decay_every, gamma=lr_decay)
    generator = torch.Generator().manual_seed(seed)
    history: Dict[str, list] = {"iteration": [], "loss": [], "lr": [], "eval": []}
    start = 0
    path = Path(checkpoint) if checkpoint else None
    if path is not None and resume and path.is_file():
        state = load_checkpoint(path)
        learner.load_state_dict(state["learner"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        generator.set_state(state["generator"])
        history = state["history"]
        start = state["iteration"]

    def save(iteration):
        if path is not None:
            save_checkpoint({
                "learner": learner.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "generator": generator.get_state(),
                "history": history,
                "iteration": iteration,
                "describe": learner.describe(),
                "extra": dict(extra or {}),
            }, path)

    def run_eval(iteration):
        metrics = evaluate(learner, eval_tasks)
        history["eval"].append({"iteration": iteration, "mse": list(metrics["mse"]),
                                "nll": list(metrics["nll"])})
        return metrics

    end = num_iterations if stop_after is None else min(num_iterations, stop_after)
    bar = tqdm(range(start, end), total=num_iterations, initial=start, disable=not progress,
               desc=learner.method, dynamic_ncols=True)
    for iteration in bar:
        batch = tasks.sample(meta_batch_size, generator)
        optimizer.zero_grad()
        loss = learner.meta_loss(batch)
        if not math.isfinite(loss.item()):
            raise FloatingPointError(
                f"meta-iteration {iteration}: non-finite meta-loss ({loss.item()}); "
                "lower the step size or the learning rate"
            )
        loss.backward()
        optimizer.step()
        scheduler.step()
        history["iteration"].append(iteration + 1)
        history["loss"].append(loss.item())
        history["lr"].append(optimizer.param_groups[0]["lr"])
        done = iteration + 1
        if eval_tasks is not None and eval_every and done % eval_every == 0 and done < num_iterations:
            m = run_eval(done)
            bar.set_postfix(loss=f"{loss.item():.4g}", mse=f"{m['mse'][0]:.4g}")
        elif done % 10 == 0:
            bar.set_postfix(loss=f"{loss.item():.4g}")
        if checkpoint_every and done % checkpoint_every == 0:
            save(done)
    bar.close()
    done = end
    if done == num_iterations and eval_tasks is not None:
        run_eval(done)
    save(done)
    return history
