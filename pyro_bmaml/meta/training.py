"""The meta-training loop shared by all meta-learners, and held-out evaluation.

Adam on ``theta0`` with the paper's schedule (learning rate x0.98 every 1% of the nominal
budget: the official code decays over its 100k-iteration budget even when a run is shorter,
so ``schedule_iterations`` is separate from the run length ``num_iterations``),
meta-batches drawn from a task source with a dedicated generator (saved in checkpoints, so
a resumed run draws the same tasks and follows the same trajectory as an uninterrupted one).

A SIGINT (Ctrl-C) or SIGTERM (a cluster's pre-emption) during :func:`fit` does not cut a
meta-step short: the step in progress finishes, the checkpoint is written, and
:class:`TrainingInterrupted` is raised; a second signal acts as it would without ``fit``.
Under :mod:`torch.distributed` the ranks agree on the step to stop after (the request rides on
the all-reduce every step already makes), so they stop together.
"""

from __future__ import annotations

import math
import signal
import threading
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, Optional

import torch
from tqdm.auto import tqdm

from . import distributed
from .._checks import check_bool, check_choice, check_int, check_positive_float, value_checks
from .checkpoint import load_checkpoint, save_checkpoint
from .trpo import TrustRegion
from ..evaluation.metrics import regression_metrics
from ..tasks.base import TaskBatch

__all__ = ["fit", "evaluate", "check_config", "config_differences", "TrainingInterrupted"]


def evaluate(learner, tasks: TaskBatch, num_steps: Optional[int] = None,
             closed_form: bool = False, metrics: Optional[Callable] = None,
             **kwargs) -> Dict[str, Any]:
    """Adapt to each task's support set, score on its query set.

    :param metrics: the task family's scores, ``metrics(posterior, x_query, y_query,
        **kwargs)`` (e.g. :func:`~pyro_bmaml.evaluation.metrics.classification_metrics`, or a task
        source's ``metrics``). Default: :func:`~pyro_bmaml.evaluation.metrics.regression_metrics`
        (NLL, MSE of the particle mean and per particle, RMSE, and with ``closed_form``
        (Normal likelihoods) coverage, reliability and PIT; ``kwargs`` such as ``crps=True``
        go to it).
    """
    checked = getattr(learner, "check_tasks", None)
    tasks = (checked(tasks) if checked is not None else tasks.validate()).to(device=_device(learner))
    if hasattr(tasks, "evaluate"):  # a family that scores learners itself (meta-RL returns)
        return tasks.evaluate(learner, num_steps=num_steps, metrics=metrics)
    posterior = learner.adapt(tasks.x_support, tasks.y_support, num_steps=num_steps)
    if metrics is not None:
        return metrics(posterior, tasks.x_query, tasks.y_query, **kwargs)
    return regression_metrics(posterior, tasks.x_query, tasks.y_query, closed_form=closed_form,
                              **kwargs)


class TrainingInterrupted(KeyboardInterrupt):
    """Raised by :func:`fit` when a SIGINT or SIGTERM arrived during training: the meta-step
    in progress was finished and, when ``fit`` was given a ``checkpoint`` path, saved there,
    so calling ``fit`` again with the same arguments resumes the uninterrupted trajectory.

    A :class:`KeyboardInterrupt`, so code that handles Ctrl-C keeps working.

    :ivar signum: the signal received.
    :ivar iteration: the meta-iterations done (and saved).
    :ivar checkpoint: the checkpoint path, or ``None``.
    :ivar history: the history so far (what ``fit`` would have returned).
    """

    def __init__(self, signum: int, iteration: int, num_iterations: int,
                 checkpoint: Optional[Path], history: dict):
        self.signum = int(signum)
        self.iteration = iteration
        self.checkpoint = checkpoint
        self.history = history
        name = signal.Signals(self.signum).name
        saved = (f"; saved to {checkpoint}: call fit again with the same arguments to resume"
                 if checkpoint is not None else "; no checkpoint path was given, so nothing "
                 "was saved (pass checkpoint=... to make a run resumable)")
        super().__init__(f"{name} received: stopped after meta-iteration {iteration} of "
                         f"{num_iterations}{saved}")

    @property
    def exit_code(self) -> int:
        """The shell's convention for a process ended by the signal: 128 + its number."""
        return 128 + self.signum


class _StopRequest:
    """While active, SIGINT and SIGTERM only record that a stop was asked for (the training
    loop stops after its current meta-step); the first one restores the previous handlers,
    so a second signal interrupts as usual. A no-op outside the main thread, where Python
    cannot install handlers."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, enabled: bool = True):
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.signum = 0
        self._previous: dict = {}

    def _handle(self, signum, frame) -> None:
        self.signum = signum
        self._restore()

    def _restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}

    def __enter__(self) -> "_StopRequest":
        if self.enabled:
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        self._restore()


def _select_steps(learner, source, seed: int, device, num_tasks: int = 1000):
    """``learner.select_adapt_steps`` on up to ``num_tasks`` tasks of ``source``: its
    ``validation_tasks(num_tasks, seed)`` where it has them (tasks held out of
    meta-training, e.g. the validation classes of
    :class:`~pyro_bmaml.tasks.fewshot.FewShotClassification`), else draws of its ``sample``
    (with a generator of its own, so that the training's task stream is untouched);
    ``None`` where it does not apply (a learner without it or without inner steps, a
    policy, a source whose batches are not :class:`TaskBatch` with query sets)."""
    if (not hasattr(learner, "select_adapt_steps") or learner.inner_steps == 0
            or learner._is_policy()):
        return None
    held_out = getattr(source, "validation_tasks", None)
    size = None if callable(held_out) else getattr(source, "num_tasks", None)
    asked = min(num_tasks, size) if size else num_tasks
    remedy = "its validation_tasks" if callable(held_out) else "a finite pool: a num_tasks attribute"
    try:
        batch = (held_out(asked, seed + 1) if callable(held_out)
                 else source.sample(asked, torch.Generator().manual_seed(seed + 1)))
    except ValueError as err:  # e.g. a finite pool behind a wrapper that hides num_tasks
        warnings.warn(f"the adaptation's step count was not chosen: the task source could "
                      f"not give {asked} held-out tasks ({err}); adapt_steps stays "
                      f"inner_steps. Pass select_steps=False, or a source that can give them "
                      f"({remedy})", stacklevel=3)
        return None
    if not isinstance(batch, TaskBatch) or batch.num_tasks < 2:
        return None
    return learner.select_adapt_steps(batch.to(device=device))


def _device(learner) -> torch.device:
    """Where the learner's parameters live (tasks are moved there)."""
    return next(learner.parameters()).device


def _scalars(metrics: dict) -> Dict[str, list]:
    """The ``(mean, se)`` entries of a metrics dict, as lists (for the history)."""
    return {k: [float(v[0]), float(v[1])] for k, v in metrics.items()
            if isinstance(v, tuple) and len(v) == 2 and all(isinstance(a, float) for a in v)}


def config_differences(saved, current, prefix="") -> list:
    """``"key: saved (saved) != current (now)"`` for every leaf where two (nested)
    configuration dicts differ."""
    if isinstance(saved, dict) and isinstance(current, dict):
        out = []
        for key in sorted(set(saved) | set(current), key=str):
            out += config_differences(saved.get(key, "<absent>"), current.get(key, "<absent>"),
                                f"{prefix}{key}.")
        return out
    return [] if saved == current else [f"{prefix[:-1]}: {saved!r} (saved) != {current!r} (now)"]


def check_config(state: dict, config: dict, path, keys=None) -> None:
    """Raise ``ValueError`` if the configuration a checkpoint recorded differs from
    ``config`` (restricted to ``keys``), naming every difference."""
    saved = state.get("config")
    if saved is None:
        raise ValueError(f"{path} records no configuration (written by an older version?): "
                         "it cannot be checked, so it is not resumed; start a new run")
    if keys is not None:
        saved = {k: saved.get(k) for k in keys}
        config = {k: config.get(k) for k in keys}
    diffs = config_differences(saved, config)
    if diffs:
        raise ValueError(f"the checkpoint {path} was written with another configuration: "
                         + "; ".join(diffs[:8]) + ("; ..." if len(diffs) > 8 else "")
                         + ". Resume with the same settings, or start a new run elsewhere")


def fit(
    learner,
    tasks,
    num_iterations: int,
    meta_batch_size: int = 10,
    lr: float = 1e-3,
    lr_decay: float = 0.98,
    decay_every: Optional[int] = None,
    schedule_iterations: Optional[int] = None,
    eval_tasks: Optional[TaskBatch] = None,
    eval_every: int = 0,
    checkpoint: Optional[str] = None,
    checkpoint_every: int = 0,
    resume: bool = True,
    seed: int = 0,
    progress: bool = True,
    extra: Optional[dict] = None,
    stop_after: Optional[int] = None,
    calibration_tasks=None,
    metrics: Optional[Callable] = None,
    handle_signals: bool = True,
    meta_optimizer: str = "adam",
    max_kl: float = 1e-2,
    select_steps: bool = True,
) -> Dict[str, list]:
    """Meta-train ``learner`` for ``num_iterations`` meta-iterations.

    :param tasks: a task source (``sample(batch_size, generator) -> TaskBatch``).
    :param meta_batch_size: tasks per meta-iteration (paper: 10).
    :param lr, lr_decay, decay_every: Adam learning rate, multiplied by ``lr_decay`` every
        ``decay_every`` iterations (default: 1% of ``schedule_iterations``).
    :param schedule_iterations: the nominal budget the decay is spread over (default:
        ``num_iterations``; the official BMAML code uses 100,000 whatever the run length, so
        that a 1,000-iteration run still trains at ~0.98e-3).
    :param eval_tasks, eval_every: held-out tasks scored every ``eval_every`` iterations
        (and at the end) when given.
    :param checkpoint, checkpoint_every: path of the checkpoint written every
        ``checkpoint_every`` iterations and at the end; with ``resume`` an existing one is
        loaded and training continues from it (the same trajectory as an uninterrupted run).
        The checkpoint records the learner's full configuration and these arguments
        (``num_iterations`` aside: a run can be extended when ``schedule_iterations`` is
        given, since by default the decay is spread over ``num_iterations``); resuming with
        others is a ``ValueError`` naming the differences.
    :param seed: seed of the task-sampling generator.
    :param extra: extra entries stored in the checkpoint (e.g. the CLI's configuration).
    :param calibration_tasks: a task source of held-out tasks for the learner's calibration
        term (the noise offset), e.g. the second pool of
        :meth:`~pyro_bmaml.tasks.base.TaskPool.split`; each iteration draws ``meta_batch_size``
        of them (at most the pool's size). Default: the term uses the training batch.
    :param metrics: the held-out scores (see :func:`evaluate`); default: the task source's
        ``metrics`` if it has one, else regression's.
    :param stop_after: stop (after checkpointing) once this iteration count is reached, as if
        interrupted; used to test resumption.
    :param handle_signals: stop gracefully on SIGINT / SIGTERM (see the module's docstring
        and :class:`TrainingInterrupted`); only in the main thread.
    :param meta_optimizer: ``"adam"`` (default; ``lr`` and its decay) or ``"trpo"``:
        MAML-RL's trust-region meta-update (:class:`~pyro_bmaml.meta.trpo.TrustRegion` on
        the learner's ``trust_region_objective``: policies, every method; one process;
        ``lr`` unused), each step within mean KL ``max_kl`` of the adapted policies.
    :param select_steps: at the end of training, choose the adaptation's step count at test
        time (:meth:`~pyro_bmaml.meta.learners.MetaLearner.select_adapt_steps`: the query
        NLL of up to 1,000 tasks of ``calibration_tasks`` when given, else of the source's
        ``validation_tasks(num_tasks, seed)`` when it has that method (tasks held out of
        meta-training: the validation classes of a few-shot source), else of ``tasks``,
        fresh draws of a generator of its own; a finite pool without held-out tasks is
        scored on its training tasks) and keep it in the learner (``learner.adapt_steps``, saved in
        the checkpoint; ``history["adapt_steps"]``). ``False``: adapt with ``inner_steps``.
        Not for policies (their query sets are rollouts, scored by returns).
    Tasks are moved to the learner's device (``learner.to("cuda")`` trains on the GPU).
    In a :mod:`torch.distributed` process group (see :mod:`pyro_bmaml.meta.distributed`) each
    rank adapts its share of every meta-batch (``meta_batch_size`` must be a multiple of the
    number of processes), the meta-gradients are averaged over the ranks, and rank 0 alone
    evaluates, shows progress and writes the checkpoint; the parameters follow the
    single-process trajectory with the same total meta-batch.

    :returns: history ``{"iteration", "loss", "lr", "terms", "eval"}``: per iteration the
        total meta-loss, the learning rate and the learner's ``loss_terms``; per evaluation
        every ``(mean, se)`` score of the metrics (regression: MSEs, NLL, and coverage); in a
        process group the loss is the whole meta-batch's, the terms rank-local.
    :raises FloatingPointError: naming the meta-iteration whose adaptation, meta-loss,
        meta-gradient or update was non-finite and the likely cause (the adaptation step size
        or the meta learning rate); nothing non-finite is stepped or saved.
    :raises TrainingInterrupted: after a SIGINT / SIGTERM, once the meta-step in progress is
        done and saved.
    :raises ~pyro_bmaml.meta.checkpoint.CheckpointWriteError: when a checkpoint cannot be
        written (full disk, read-only folder); the previous one is left intact.
    """
    num_iterations = check_int("num_iterations", num_iterations, 1)
    meta_batch_size = check_int("meta_batch_size", meta_batch_size, 1)
    lr = check_positive_float("lr", lr)
    lr_decay = check_positive_float("lr_decay", lr_decay)
    schedule_iterations = num_iterations if schedule_iterations is None else check_int(
        "schedule_iterations", schedule_iterations, 1)
    decay_every = max(1, schedule_iterations // 100) if decay_every is None else check_int(
        "decay_every", decay_every, 1)
    eval_every = check_int("eval_every", eval_every, 0)
    checkpoint_every = check_int("checkpoint_every", checkpoint_every, 0)
    select_steps = check_bool("select_steps", select_steps)
    for name, source in (("tasks", tasks), ("calibration_tasks", calibration_tasks)):
        if source is not None and not hasattr(source, "sample"):
            raise TypeError(f"{name} must be a task source with a sample() method, "
                            f"got {type(source).__name__}")
    if calibration_tasks is not None and not getattr(learner, "has_calibration_term", False):
        raise ValueError("calibration_tasks needs a learner with a calibration term "
                         f"(calibration='noise_offset' or 'initial_noise'), got "
                         f"{getattr(learner, 'calibration', None)!r}")
    calibration_batch_size = min(meta_batch_size, getattr(calibration_tasks, "num_tasks", None)
                                 or meta_batch_size)
    check_choice("meta_optimizer", meta_optimizer, ("adam", "trpo"))
    region = None
    if meta_optimizer == "trpo":
        if not hasattr(learner, "trust_region_objective"):
            raise ValueError(f"meta_optimizer='trpo' needs a learner with a trust-region "
                             f"objective (BMAML, EMAML, MAML on a policy), got "
                             f"{type(learner).__name__}")
        if calibration_tasks is not None or getattr(learner, "has_calibration_term", False):
            raise ValueError("meta_optimizer='trpo' takes no calibration term (a policy has "
                             "no noise to calibrate): calibration='none'")
        if distributed.is_distributed():
            raise ValueError("meta_optimizer='trpo' runs in one process (its conjugate "
                             "gradient is not reduced across ranks); use adam under torchrun")
        region = TrustRegion([learner.theta0], max_kl=max_kl)

    groups = learner.optimizer_groups(lr) if hasattr(learner, "optimizer_groups") else learner.parameters()
    optimizer = torch.optim.Adam(groups, lr=lr)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=decay_every, gamma=lr_decay)
    generator = torch.Generator().manual_seed(seed)
    history: Dict[str, list] = {"iteration": [], "loss": [], "lr": [], "eval": [], "terms": []}
    start = 0
    path = Path(checkpoint) if checkpoint else None
    config = {
        "learner": learner.config() if hasattr(learner, "config") else learner.describe(),
        "meta_batch_size": meta_batch_size, "lr": lr, "lr_decay": lr_decay,
        "decay_every": decay_every, "schedule_iterations": schedule_iterations, "seed": seed,
        "calibration_tasks": calibration_tasks is not None,
    }
    if region is not None:  # (absent for adam: earlier checkpoints stay resumable)
        config.update(meta_optimizer=meta_optimizer, max_kl=region.max_kl)
    if path is not None and resume and path.is_file():
        state = load_checkpoint(path)
        if state["iteration"] > num_iterations:
            raise ValueError(
                f"the checkpoint {path} is at meta-iteration {state['iteration']}, beyond "
                f"num_iterations={num_iterations}; ask for at least {state['iteration']}")
        check_config(state, config, path)
        learner.load_state_dict(state["learner"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        generator.set_state(state["generator"])
        history = state["history"]
        start = state["iteration"]

    rank, world = distributed.rank_and_size()
    distributed.broadcast_parameters(learner)  # every rank starts from rank 0's state
    device = _device(learner)

    def save(iteration):
        if path is not None and rank == 0:
            save_checkpoint({
                "learner": learner.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "generator": generator.get_state(),
                "history": history,
                "iteration": iteration,
                "describe": learner.describe(),
                "config": config,
                "extra": dict(extra or {}),
            }, path)

    metrics = metrics if metrics is not None else getattr(tasks, "metrics", None)

    def run_eval(iteration):
        if metrics is not None:
            scores = evaluate(learner, eval_tasks, metrics=metrics)
        else:
            try:
                scores = evaluate(learner, eval_tasks, closed_form=True, widths=False)
            except ValueError:  # a likelihood other than Normal: no coverage
                scores = evaluate(learner, eval_tasks)
        entry = {"iteration": iteration}
        entry.update(_scalars(scores))
        if "coverage" in scores:
            entry["coverage"] = {str(k): list(v) for k, v in scores["coverage"].items()}
        history["eval"].append(entry)
        return entry

    end = num_iterations if stop_after is None else min(num_iterations, stop_after)
    bar = tqdm(range(start, end), total=num_iterations, initial=start,
               disable=not progress or rank != 0, desc=learner.method, dynamic_ncols=True)
    if rank != 0:  # rank 0 alone evaluates (and checkpoints, in save)
        eval_tasks = None
    params = [p for group in optimizer.param_groups for p in group["params"]]

    def diverged(iteration: int, what: str, cause: str) -> FloatingPointError:
        kept = (f"; the checkpoint {path} still holds the last good state"
                if path is not None and path.is_file() else "")
        return FloatingPointError(f"meta-iteration {iteration}: {what}; likely cause: {cause}{kept}")

    step_hint = f"the adaptation step size (step_size={getattr(learner, 'step_size', '?')})"
    lr_hint = f"the meta learning rate (lr={lr})"

    def adam_step(iteration, batch, held_out, stop):
        """Adam on the meta-loss's gradient (averaged over the ranks); records the step in
        the history and returns ``(loss, whether any rank was asked to stop)``."""
        optimizer.zero_grad()
        args = (batch,) if held_out is None else (batch, held_out)
        # No value checks inside the step (each is a host sync on a GPU): the loss and
        # the gradient are checked once below, and a non-finite step is re-run with the
        # checks on to say where it diverged.
        with value_checks(False):
            loss = learner.meta_loss(*args)
            loss.backward()
        # the whole batch's loss, and whether any rank was asked to stop, in one
        # collective (the ranks then stop after the same meta-step)
        asked = loss.new_tensor(float(stop.signum != 0))
        total, asked = distributed.all_reduce_mean(
            torch.stack([loss.detach().reshape(()), asked])).unbind()
        distributed.average_gradients(params)  # the whole batch's meta-gradient
        terms = dict(getattr(learner, "loss_terms", {}))
        grads = [p.grad for p in params if p.grad is not None]
        finite = (torch.stack([torch.isfinite(g).all() for g in grads]).all() if grads
                  else total.new_ones(()))
        values = torch.stack([total, finite.to(total.dtype), asked]
                             + [v.detach().reshape(()).to(total) for v in terms.values()]
                             ).tolist()
        total, grads_finite, asked = values[0], bool(values[1]), values[2] > 0
        if not math.isfinite(total):
            try:  # the same step with the value checks on names the diverging step
                with torch.no_grad():
                    learner.meta_loss(*args)
            except FloatingPointError as err:
                raise diverged(iteration, str(err), step_hint) from err
            raise diverged(iteration, f"non-finite meta-loss ({total})",
                           f"{step_hint} or {lr_hint}")
        # checked before the optimizer moves anything, so no bad state is stepped or saved
        if not grads_finite:
            raise diverged(iteration, "non-finite meta-gradient", f"{lr_hint} or {step_hint}")
        optimizer.step()
        if not bool(torch.stack([torch.isfinite(p).all() for p in params]).all()):
            raise diverged(iteration, "the meta-update made the initial particles non-finite",
                           lr_hint)
        scheduler.step()
        history["iteration"].append(iteration + 1)
        history["loss"].append(total)
        history["lr"].append(optimizer.param_groups[0]["lr"])
        history.setdefault("terms", []).append(dict(zip(terms, values[3:])))
        return total, asked

    def trust_region_step(iteration, batch, stop):
        """MAML-RL's trust-region meta-update in place of Adam's (one process)."""
        stepped = region.step(*learner.trust_region_objective(batch))
        if not bool(torch.isfinite(learner.theta0).all()):
            raise diverged(iteration, "the trust-region step made the initial particles "
                           "non-finite", f"the trust region (max_kl={region.max_kl})")
        history["iteration"].append(iteration + 1)
        history["loss"].append(stepped["loss_after"])
        history["lr"].append(0.0)
        history["terms"].append({"surrogate_before": stepped["loss_before"],
                                 "kl": stepped["kl"], "step_fraction": stepped["step_fraction"]})
        return stepped["loss_after"], stop.signum != 0

    with _StopRequest(handle_signals) as stop:
        for iteration in bar:
            # every rank draws the same batch (same generator) and keeps its shard of tasks
            batch = distributed.shard(tasks.sample(meta_batch_size, generator)).to(device=device)
            held_out = (None if calibration_tasks is None else distributed.shard(
                calibration_tasks.sample(calibration_batch_size, generator),
                "the calibration batch size").to(device=device))
            if region is not None:
                total, asked = trust_region_step(iteration, batch, stop)
            else:
                total, asked = adam_step(iteration, batch, held_out, stop)
            done = iteration + 1
            if asked:  # a signal: this step is done; save it and stop
                bar.close()
                save(done)
                raise TrainingInterrupted(stop.signum or signal.SIGTERM, done, num_iterations,
                                          path, history)
            if (eval_tasks is not None and eval_every and done % eval_every == 0
                    and done < num_iterations):
                entry = run_eval(done)
                headline = next((k for k in ("mse", "accuracy", "return") if k in entry), None)
                shown = {headline: f"{entry[headline][0]:.4g}"} if headline else {}
                bar.set_postfix(loss=f"{total:.4g}", **shown)
            elif done % 10 == 0:
                bar.set_postfix(loss=f"{total:.4g}")
            if checkpoint_every and done % checkpoint_every == 0:
                save(done)
        bar.close()
        done = end
        if done == num_iterations and eval_tasks is not None:
            run_eval(done)
        if done == num_iterations and select_steps:
            chosen = _select_steps(learner, tasks if calibration_tasks is None else calibration_tasks,
                                   seed, device)
            if chosen is not None:
                history["adapt_steps"] = chosen
        save(done)
        if stop.signum:  # a signal during the last evaluation: the run is complete and saved
            raise TrainingInterrupted(stop.signum, done, num_iterations, path, history)
    return history

