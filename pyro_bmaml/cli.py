"""Command line: ``pyro-bmaml train`` and ``pyro-bmaml evaluate CHECKPOINT``.

The default ``train`` (sinusoid, BMAML, M = 10, K = 10, |T| = 100, a 1-40-40-40-1 network,
the paper's n = s = 1 and eps = 1e-3) finishes in a few minutes on 2 CPU cores and prints the
held-out test MSE, NLL and coverage. ``--task`` names a family of the registry
(:mod:`pyro_bmaml.tasks.registry`): ``sinusoid``, ``digits-5way-1shot`` (any
``digits-NwayKshot``), ``folder:PATH`` (an image folder, with ``--ways``/``--shots``),
``point-nav``, the families suite (``normal-gamma``, ``student-t``,
``subspace-classification``, ``logistic-glm``, ``hierarchical``), or your own, registered by
a module that ``--import`` names. This module only parses arguments: each family's settings,
defaults, model and report live with the family.

Exit status: 0 done; 2 a usage or input error, a non-finite step, a checkpoint that cannot be
written, or a lost process under torchrun (one line on stderr each); 128 + the signal's
number (130 Ctrl-C, 143 SIGTERM) when a signal stopped training after a saved meta-step
(``--resume`` continues it).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shlex
import shutil
import signal
import sys
from pathlib import Path
from typing import List, Optional

import pyro
import torch

from .meta import distributed
from .meta.checkpoint import CheckpointWriteError, load_checkpoint
from .meta.learners import BMAML, EMAML, MAML
from .evaluation.metrics import mean_and_se
from .meta.training import TrainingInterrupted, config_differences, evaluate
from .tasks.base import TaskBatch
from .tasks.registry import task_family

METHODS = ("bmaml", "emaml", "maml")


def _hidden(text: str):
    try:
        sizes = tuple(int(s) for s in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated ints like 40,40,40, got {text!r}") from None
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"hidden sizes must be >= 1, got {text!r}")
    return sizes


def _positive(kind):
    def parse(text):
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value
    return parse


OBJECTIVES = ("chaser", "bfa", "mse", "nll", "log_joint")


def _check_device(device: str) -> None:
    """``--device``: a device torch can make, and CUDA only where this torch has it (else
    one clear error instead of torch's assertion deep inside ``.to``)."""
    try:
        parsed = torch.device(device)
    except RuntimeError as err:
        raise ValueError(f"--device {device!r} is not a device: {err}") from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: this torch build has no usable CUDA "
                         f"(torch {torch.__version__}, torch.cuda.is_available() is False); "
                         "use --device cpu")
    if parsed.type == "cuda" and parsed.index is not None \
            and parsed.index >= torch.cuda.device_count():
        raise ValueError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s)")


def _import_modules(modules) -> None:
    """Import the ``--import`` modules (their ``register_family`` calls run)."""
    for name in modules or ():
        try:
            importlib.import_module(name)
        except ImportError as err:
            raise ValueError(f"--import {name}: {err}") from None


def resolve_config(config: dict) -> dict:
    """``config`` with the defaults filled in where a value is ``None`` or missing: the
    task (``sinusoid``), the method's defaults for the task family (``step_size``,
    ``objective``, ``noise_step_size``, and ``calibration`` where the family fixes it),
    the family's hidden sizes; ``calibration`` otherwise stays ``None`` for the learner's
    default."""
    out = dict(config)
    out.setdefault("task", "sinusoid")
    _import_modules(out.get("imports"))
    family = task_family(out["task"])
    for key, value in family.method_defaults(out["method"], out).items():
        if out.get(key) is None:
            out[key] = value
    if out.get("inner_steps") is None:
        out["inner_steps"] = family.inner_steps
    if out.get("hidden") is None and family.hidden(out) is not None:
        out["hidden"] = list(family.hidden(out))
    out.setdefault("calibration", None)
    return out


def build_learner(config: dict):
    """The meta-learner a configuration describes (used by train, evaluate and the examples).

    Keys: ``method``, ``particles``, ``inner_steps``, ``leader_steps``, the task's keys
    (``task`` and, for sinusoid, nothing else; for classification ``ways``, ``shots``,
    ``network``, ``shared``, ``shared_step_size``, ...) and, optional (``None``: the
    family's default for the method), ``hidden``, ``step_size``, ``objective``, ``calibration``,
    ``learn_step_size``, ``learn_predictive_temperature``, ``learn_prior``,
    ``noise_step_size`` (BMAML only).
    """
    config = resolve_config(config)
    family = task_family(config["task"])
    model = family.model(config)
    common = dict(inner_steps=config.get("inner_steps"), step_size=config["step_size"],
                  init=family.init, objective=config["objective"],
                  calibration=config["calibration"],
                  shared_step_size=config.get("shared_step_size"))
    if family.init == "prior":  # the model's sites from one of the family's tasks
        source = family.sources(config)[0]
        example = source.evaluation_tasks(1, seed=0)
        common["example_args"] = (example.x_support[0], example.y_support[0])
    for key in ("learn_step_size", "learn_predictive_temperature", "learn_prior"):
        if config.get(key) is not None:
            common[key] = config[key]
    if common["inner_steps"] is None:  # the learner's own default
        del common["inner_steps"]
    if config["method"] == "bmaml":
        extra = {k: config[k] for k in ("chaser_trains_noise", "step_size_objective", "compile")
                 if config.get(k) is not None}
        return BMAML(model, num_particles=config["particles"], leader_steps=config["leader_steps"],
                     noise_step_size=config.get("noise_step_size"), **common, **extra)
    if config["method"] == "emaml":
        return EMAML(model, num_particles=config["particles"], **common)
    return MAML(model, **common)


def task_sources(config: dict, learner=None):
    """``(source, training_tasks, calibration_tasks)`` for a configuration: the task source
    (its ``evaluation_tasks`` are the held-out test tasks), the tasks meta-trained on, and,
    for sinusoid, the held-out share of the pool (``calibration_holdout``, a fraction) that
    only the learner's calibration term sees (``None`` when there is no pool, no such share
    or no calibration term)."""
    config = resolve_config(config)
    return task_family(config["task"]).sources(config, learner)


def load_learner(path, device="cpu") -> "tuple":
    """``(learner, checkpoint)`` from a ``pyro-bmaml train`` checkpoint: the learner is
    rebuilt from the configuration the checkpoint records, moved to ``device`` and its
    learned state loaded (``learner.adapt(...)`` is ready to use)."""
    state = load_checkpoint(path)
    config = state.get("extra", {}).get("config")
    if config is None:
        raise ValueError(f"{path} was not written by `pyro-bmaml train` (no config); build "
                         "the learner yourself and call learner.load_checkpoint(path)")
    learner = build_learner(config).to(device)
    learner.load_state_dict(state["learner"])  # copied onto the learner's device
    return learner, state


def write_report(learner, tasks: TaskBatch, out: Path, history: Optional[dict] = None,
                 num_steps: Optional[int] = None, family=None) -> dict:
    """Adapt to held-out tasks and write metrics (JSON + markdown) and plots into ``out``:
    the family's scores and plots, the KSD per step (families with a posterior over data),
    the training curves."""
    from .evaluation import plots  # plotting stays out of the library's import path

    family = family or task_family("sinusoid")
    out.mkdir(parents=True, exist_ok=True)
    tasks = tasks.to(device=next(learner.parameters()).device)
    ksd = None
    if hasattr(family, "score"):  # a family that scores learners itself (meta-RL returns)
        metrics, table, lines = family.score(learner, tasks, num_steps)
    else:
        posterior = learner.adapt(tasks.x_support, tasks.y_support, num_steps=num_steps,
                                  track_ksd=True)
        metrics = family.metrics(posterior, tasks.x_query, tasks.y_query)
        ksd = posterior.info["ksd"]
        table, lines = family.write(learner, posterior, tasks, metrics, out)
        table["ksd_squared_final"] = list(mean_and_se(ksd[-1]))
        lines.append(f"| ksd_squared_final | {table['ksd_squared_final'][0]:.4g} | "
                     f"{table['ksd_squared_final'][1]:.2g} |")
    (out / "metrics.json").write_text(json.dumps(table, indent=2))
    (out / "metrics.md").write_text("\n".join(["| metric | mean | s.e. |", "|---|---|---|"]
                                               + lines) + "\n")
    if ksd is not None:
        plots.plot_ksd(ksd, out / "ksd.png")
    if history is not None and history.get("loss"):
        plots.plot_training(history, out / "training.png")
    return metrics


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pyro-bmaml", description="Bayesian MAML on Pyro")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="meta-train on a task family and evaluate",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    t.add_argument("--task", default="sinusoid",
                   help="a registered task family: sinusoid, digits-NwayKshot (e.g. "
                        "digits-5way-1shot: scikit-learn's 8x8 digits, 4 rotations per digit "
                        "as classes), folder:PATH (one folder of images per class; --ways, "
                        "--shots), point-nav (meta-RL, 2-D navigation; --episodes), the "
                        "families suite (normal-gamma, student-t, subspace-classification, "
                        "logistic-glm, hierarchical) or one an --import module registers")
    t.add_argument("--import", dest="imports", action="append", default=None, metavar="MODULE",
                   help="import MODULE first (repeatable): a module that registers your own "
                        "task family with pyro_bmaml.tasks.registry.register_family")
    t.add_argument("--method", choices=METHODS, default="bmaml")
    t.add_argument("--objective", choices=OBJECTIVES, default=None,
                   help="bmaml: chaser or bfa; emaml/maml: mse (regression, as the papers), "
                        "nll (classification: cross-entropy) or log_joint; None: the family's")
    t.add_argument("--calibration", default=None,
                   choices=BMAML.calibrations,
                   help="how the noise level is meta-learned; None: noise_offset (none with "
                        "--objective log_joint, or a model without a noise site)")
    t.add_argument("--calibration-holdout", type=float, default=0.1,
                   help="sinusoid: fraction of the |T| tasks held out of meta-training, on "
                        "which the noise offset is learned (0: the training batches)")
    t.add_argument("--particles", type=_positive(int), default=10, help="M")
    t.add_argument("--shots", type=_positive(int), default=None,
                   help="K support points (sinusoid: also the query points; default 10) or "
                        "images per class (classification; default from the task name, or 1)")
    t.add_argument("--ways", type=_positive(int), default=5,
                   help="classification with folder:PATH: classes per episode")
    t.add_argument("--query", type=_positive(int), default=15,
                   help="classification: query images per class")
    t.add_argument("--network", choices=("mlp", "conv4"), default="mlp",
                   help="classification: the classifier's network")
    t.add_argument("--shared", choices=("none", "features"), default="none",
                   help="classification: 'features' shares the body among particles "
                        "(particles over the head only)")
    t.add_argument("--shared-step-size", type=_positive(float), default=None,
                   help="classification with --shared features: also adapt the shared body to "
                        "each task in the inner loop with this gradient step (default: not "
                        "adapted, only meta-learned)")
    t.add_argument("--image-size", type=_hidden, default=(28, 28),
                   help="folder:PATH: images are resized to H,W")
    t.add_argument("--channels", type=int, choices=(1, 3), default=1,
                   help="folder:PATH: 1 (grayscale) or 3 (RGB)")
    t.add_argument("--episodes", type=_positive(int), default=10,
                   help="point-nav: episodes per particle and task for adaptation (and as "
                        "many for the leader's step, or the baselines' query loss)")
    t.add_argument("--init-std", type=_positive(float), default=None,
                   help="point-nav: the policies' initial action sd (the prior mean of their "
                        "log-std); None: 0.1, as the meta-RL record; MAML-RL's is 1.0")
    t.add_argument("--action-scale", type=_positive(float), default=None,
                   help="point-nav: the point moves by clip(s * action, -0.1, 0.1); 0.1 is "
                        "MAML-RL's normalized action space (default 1: the PyTorch port's)")
    t.add_argument("--goal-tolerance", type=_positive(float), default=None,
                   help="point-nav: end an episode within this distance of the goal in both "
                        "coordinates (MAML-RL's 0.01; default: never, as the port)")
    t.add_argument("--temperature", type=float, default=1.0,
                   help="point-nav: SVPG's temperature (the prior's weight and the repulsion's)")
    t.add_argument("--num-tasks", type=_positive(int), default=100,
                   help="sinusoid: |T| meta-training tasks")
    t.add_argument("--variant", choices=("bmaml", "maml"), default="bmaml",
                   help="sinusoid: the official BMAML ranges or Finn et al.'s")
    t.add_argument("--iterations", type=_positive(int), default=2000)
    t.add_argument("--meta-batch", type=_positive(int), default=10)
    t.add_argument("--hidden", type=_hidden, default=None,
                   help="hidden sizes; None: 40,40,40 (sinusoid), 64,64 (mlp classifier), "
                        "32 (conv4 filters)")
    t.add_argument("--step-size", type=_positive(float), default=None,
                   help="adaptation step; None: the family's default for the method "
                        "(sinusoid: 1e-3 bmaml and emaml, 1e-2 maml)")
    t.add_argument("--noise-step-size", type=_positive(float), default=None,
                   help="bmaml: SVGD step of the noise precision; None: 3e-3 on sinusoid")
    t.add_argument("--inner-steps", type=_positive(int), default=None,
                   help="adaptation steps n; None: the family's (1, the paper's, on sinusoid, "
                        "classification and point-nav), else the learner's (BMAML 3)")
    t.add_argument("--learn-step-size", action=argparse.BooleanOptionalAction, default=None,
                   help="meta-learn the adaptation step per site (Meta-SGD style); None: the "
                        "family's choice (off on sinusoid, digits and point-nav, as their "
                        "records were run), else the learner's (bmaml: on)")
    t.add_argument("--learn-predictive-temperature", action=argparse.BooleanOptionalAction,
                   default=None,
                   help="a classifier: meta-learn the temperature of the adapted particles' "
                        "predictive (temperature scaling across tasks); None: off")
    t.add_argument("--learn-prior", choices=("diagonal", "full"), default=None,
                   help="adapt under a meta-learned Gaussian prior over the flat parameters "
                        "instead of the model's own (learn_prior; bmaml, or an --objective "
                        "log_joint baseline); None: the model's")
    t.add_argument("--step-size-objective", choices=("chaser", "query_nll"), default=None,
                   help="bmaml with learned steps: what trains them (default: the learner's, "
                        "the query NLL; the chaser distance on a policy)")
    t.add_argument("--chaser-trains-noise", action=argparse.BooleanOptionalAction, default=None,
                   help="bmaml: let the chaser's meta-gradient reach the initial noise "
                        "coordinates, as the official code (unstable at large --lr); None: the "
                        "family's choice (on for sinusoid), else off")
    t.add_argument("--compile", action="store_true", default=None,
                   help="bmaml: take the SVGD steps as compiled code (torch.compile; the "
                        "first step of each input shape compiles, tens of seconds; falls back "
                        "to the replayed graph with a warning where compiling fails)")
    t.add_argument("--meta-optimizer", choices=("adam", "trpo"), default=None,
                   help="the meta-update: adam (--lr) or trpo (MAML-RL's trust region, "
                        "--max-kl; every method on point-nav, one process); None: adam")
    t.add_argument("--max-kl", type=_positive(float), default=None,
                   help="trpo: the trust region's mean KL (MAML-RL's 0.01 when not given)")
    t.add_argument("--leader-steps", type=_positive(int), default=1)
    t.add_argument("--lr", type=_positive(float), default=1e-3)
    t.add_argument("--schedule-iterations", type=_positive(int), default=100_000,
                   help="nominal budget the x0.98 decay is spread over (official code: 100k)")
    t.add_argument("--eval-tasks", type=_positive(int), default=None,
                   help="held-out tasks; None: 100 (sinusoid), 600 episodes (classification)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--out", type=Path, default=Path("runs/default"))
    t.add_argument("--checkpoint-every", type=_positive(int), default=None,
                   help="meta-iterations between checkpoints; None: a tenth of --iterations "
                        "(a run stopped by a signal saves its last step in any case)")
    t.add_argument("--resume", action="store_true",
                   help="continue the run whose checkpoint is in --out (same settings)")
    t.add_argument("--overwrite", action="store_true",
                   help="replace the run in --out (its checkpoint and report)")
    t.add_argument("--no-progress", action="store_true")
    t.add_argument("--device", default="cpu",
                   help="cpu, cuda or cuda:N (under torchrun: cuda takes cuda:LOCAL_RANK)")
    t.add_argument("--timeout", type=_positive(float), default=600.0,
                   help="under torchrun: seconds a process waits in a collective for the "
                        "others before it stops with an error (a hung or lost process); rank "
                        "0's evaluations happen while the others wait, so keep it above one")
    e = sub.add_parser("evaluate", help="evaluate a checkpoint on its family's held-out tasks",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    e.add_argument("checkpoint", type=Path)
    e.add_argument("--eval-tasks", type=_positive(int), default=None,
                   help="held-out tasks; None: the family's default")
    e.add_argument("--steps", type=int, default=None, help="adaptation steps (default: trained n)")
    e.add_argument("--out", type=Path, default=None,
                   help="report folder (default: evaluation/ beside the checkpoint, which "
                        "holds the training report: give --out or --overwrite)")
    e.add_argument("--overwrite", action="store_true",
                   help="replace an existing report in the report folder")
    e.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    return p


def _check_writable(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise ValueError(f"--out {folder} is not writable: {err.strerror or err}") from None


def _prepare_out(out: Path, resume: bool, overwrite: bool) -> Path:
    """The checkpoint path in ``out``, after checking the folder is writable and not
    holding another run (unless ``resume`` or ``overwrite``)."""
    if resume and overwrite:
        raise ValueError("--resume and --overwrite exclude each other")
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a folder")
    checkpoint = out / "checkpoint.pt"
    if checkpoint.exists() and not (resume or overwrite):
        raise ValueError(f"--out {out} already holds a run ({checkpoint}); pass --resume to "
                         "continue it, --overwrite to replace it, or another --out")
    if resume and not checkpoint.exists():
        raise ValueError(f"--resume: no checkpoint in {out} to continue")
    _check_writable(out)
    if overwrite:
        checkpoint.unlink(missing_ok=True)
        shutil.rmtree(out / "evaluation", ignore_errors=True)
    return checkpoint


def train(args) -> int:
    _import_modules(args.imports)
    family = task_family(args.task)
    if args.method == "bmaml" and args.particles < 2:
        raise ValueError("--particles must be >= 2 for bmaml (use --method maml for one)")
    config = {
        "task": args.task, "method": args.method, "objective": args.objective,
        "particles": args.particles, "hidden": None if args.hidden is None else list(args.hidden),
        "step_size": args.step_size, "inner_steps": args.inner_steps,
        "leader_steps": args.leader_steps, "seed": args.seed, "calibration": args.calibration,
        "noise_step_size": args.noise_step_size, "meta_batch": args.meta_batch,
    }
    for flag, value in (("--chaser-trains-noise", args.chaser_trains_noise),
                        ("--step-size-objective", args.step_size_objective),
                        ("--compile", args.compile)):
        if value is not None and args.method != "bmaml":
            raise ValueError(f"{flag} is a bmaml option")
    if args.max_kl is not None and args.meta_optimizer != "trpo":
        raise ValueError("--max-kl is a --meta-optimizer trpo option")
    config.update({key: getattr(args, key) for key in
                   ("learn_step_size", "learn_predictive_temperature", "learn_prior",
                    "chaser_trains_noise", "step_size_objective", "meta_optimizer", "max_kl",
                    "compile")
                   if getattr(args, key) is not None})
    if args.imports:
        config["imports"] = list(args.imports)
    config.update(family.configure(args.task, args))
    config = resolve_config(config)
    eval_count = args.eval_tasks or family.eval_tasks
    # under torchrun: join the process group; rank 0 alone prepares --out and reports
    _check_device(args.device)
    multi = distributed.init_from_environment(args.device, timeout=args.timeout)
    rank, world = distributed.rank_and_size()
    device = args.device
    if multi and device == "cuda":
        device = f"cuda:{os.environ.get('LOCAL_RANK', rank)}"
    if multi and args.meta_batch % world:
        raise ValueError(f"--meta-batch ({args.meta_batch}) must be a multiple of the number "
                         f"of processes ({world})")
    checkpoint = args.out / "checkpoint.pt"
    if rank == 0:
        _prepare_out(args.out, args.resume, args.overwrite)
    if multi:
        torch.distributed.barrier()
    if args.resume and checkpoint.is_file():
        saved = resolve_config(load_checkpoint(checkpoint).get("extra", {}).get("config") or {})
        diffs = config_differences(saved, config)
        if diffs:
            raise ValueError(f"--resume: {checkpoint} was trained with other settings: "
                             + "; ".join(diffs[:6]) + ". Use the same arguments, or --overwrite")
    pyro.set_rng_seed(args.seed)
    learner = build_learner(config).to(device)
    source, tasks, calibration_tasks = task_sources(config, learner)
    eval_tasks = source.evaluation_tasks(eval_count)
    try:
        history = learner.fit(
            tasks, args.iterations, meta_batch_size=args.meta_batch, lr=args.lr,
            schedule_iterations=args.schedule_iterations,
            eval_tasks=eval_tasks, eval_every=max(1, args.iterations // 10),
            checkpoint=str(checkpoint),
            checkpoint_every=args.checkpoint_every or max(1, args.iterations // 10),
            seed=args.seed, progress=not args.no_progress, extra={"config": config},
            calibration_tasks=calibration_tasks,
            **{key: config[key] for key in ("meta_optimizer", "max_kl") if key in config},
        )
    except TrainingInterrupted as stop:
        if multi:  # every rank stopped after the same step; rank 0 saved it
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()
        if rank == 0:
            print(f"pyro-bmaml: {signal.Signals(stop.signum).name}: stopped after meta-iteration "
                  f"{stop.iteration} of {args.iterations}; checkpoint: {checkpoint}\n"
                  f"resume with: {_resume_command(args.argv)}", file=sys.stderr)
        return stop.exit_code
    except RuntimeError as err:
        if multi and _is_collective_failure(err):
            raise ValueError(
                f"rank {rank} of {world}: a process of the group was lost or did not answer "
                f"within --timeout {args.timeout:g} s ({str(err).splitlines()[0][:160]}); "
                f"the last checkpoint is {checkpoint}: resume with the same command and "
                "--resume, on this or another number of processes") from None
        raise
    if multi:
        # every rank leaves the group together: rank 0 evaluates and checkpoints after the
        # last step, and a rank that tore its group down and exited meanwhile was seen to
        # abort at exit ("terminate called without an active exception") about 1 run in 4
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
        if rank != 0:
            return 0
        print(f"meta-trained on {world} processes ({args.meta_batch // world} tasks each per "
              "meta-batch)")
    metrics = write_report(learner, eval_tasks, args.out / "evaluation", history, family=family)
    print(family.summary(metrics, eval_count))
    if "adapt_steps" in history:
        print(f"adaptation steps at test time: {learner.adapt_steps} (chosen on held-out "
              f"tasks' query NLL; meta-trained through {learner.inner_steps})")
    if not args.resume:
        # the reference a meta-learned prior has to beat: the same initial particles (the
        # same seed), adapted with the same step count
        pyro.set_rng_seed(args.seed)
        start = build_learner(config).to(device)
        start.adapt_steps = learner.adapt_steps
        before = evaluate(start, eval_tasks, metrics=family.metrics)
        print("before meta-training (the initial particles, adapted alike): "
              + family.headline(before))
    print(f"checkpoint: {args.out / 'checkpoint.pt'}   report: {args.out / 'evaluation'}/")
    return 0


def _resume_command(argv: List[str]) -> str:
    """The command that continues a run: the same arguments, ``--resume`` for
    ``--overwrite`` (under torchrun the launcher's own arguments come first, as before)."""
    kept = [a for a in argv if a not in ("--overwrite", "--resume")]
    launcher = "pyro-bmaml" if "WORLD_SIZE" not in os.environ else "torchrun ... -m pyro_bmaml"
    return f"{launcher} {shlex.join(kept)} --resume"


def _is_collective_failure(err: RuntimeError) -> bool:
    """Whether a ``RuntimeError`` came from a torch.distributed collective whose peer died
    or timed out (gloo and NCCL word these differently)."""
    text = str(err).lower()
    return any(key in text for key in ("connection closed", "connection reset", "timed out",
                                       "timeout", "broken pipe", "gloo", "nccl",
                                       "peer", "socket"))


def evaluate_cmd(args) -> int:
    _check_device(args.device)
    learner, state = load_learner(args.checkpoint, device=args.device)
    config = resolve_config(state["extra"]["config"])
    family = task_family(config["task"])
    if args.steps is not None and args.steps < 0:
        raise ValueError(f"--steps must be >= 0, got {args.steps}")
    source, _, _ = task_sources(config)
    out = args.out or args.checkpoint.parent / "evaluation"
    if (out / "metrics.json").exists() and not args.overwrite:
        raise ValueError(f"{out} already holds a report (the training report by default); "
                         "pass --out for another folder or --overwrite to replace it")
    _check_writable(out)
    eval_count = args.eval_tasks or family.eval_tasks
    metrics = write_report(learner, source.evaluation_tasks(eval_count), out,
                           state.get("history"), num_steps=args.steps, family=family)
    print(f"{config['method']} after {state['iteration']} meta-iterations")
    print(family.summary(metrics, eval_count))
    print(f"report: {out}/ (metrics.md, metrics.json and the family's plots)")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser().parse_args(argv)
    args.argv = argv
    try:
        return train(args) if args.command == "train" else evaluate_cmd(args)
    except (ValueError, TypeError, FileNotFoundError, FloatingPointError,
            CheckpointWriteError) as err:
        print(f"pyro-bmaml: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
