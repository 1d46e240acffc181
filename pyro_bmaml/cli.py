"""Command line: ``pyro-bmaml train`` and ``pyro-bmaml evaluate CHECKPOINT``.

The default ``train`` (sinusoid, BMAML, M = 10, K = 10, |T| = 100, a 1-40-40-40-1 network,
the paper's n = s = 1 and eps = 1e-3) finishes in a few minutes on 2 CPU cores and prints the
held-out test MSE and NLL.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import List, Optional

import pyro

from .checkpoint import load_checkpoint
from .meta import BMAML, EMAML, MAML
from .metrics import mean_and_se, regression_metrics
from .models import BayesianMLP
from .tasks import Sinusoid, TaskBatch

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


#: each method's defaults on sinusoid: the papers' adaptation step (BMAML's eps, the official
#: EMAML's alpha, Finn et al.'s alpha) and meta-objective; BMAML's noise precision takes a 3x
#: larger SVGD step (task-adaptive noise: results/calibration.md)
METHOD_DEFAULTS = {
    "bmaml": {"step_size": 1e-3, "objective": "chaser", "noise_step_size": 3e-3},
    "emaml": {"step_size": 1e-3, "objective": "mse"},
    "maml": {"step_size": 1e-2, "objective": "mse"},
}
OBJECTIVES = ("chaser", "bfa", "mse", "log_joint")


def resolve_config(config: dict) -> dict:
    """``config`` with the method's defaults filled in where a value is ``None`` or missing
    (``step_size``, ``objective``, ``noise_step_size``; ``calibration`` stays ``None`` for
    the learner's default)."""
    out = dict(config)
    for key, value in METHOD_DEFAULTS[out["method"]].items():
        if out.get(key) is None:
            out[key] = value
    out.setdefault("calibration", None)
    return out


def build_learner(config: dict):
    """The meta-learner a configuration describes (used by train, evaluate and the examples).

    Keys: ``method``, ``particles``, ``hidden``, ``inner_steps``, ``leader_steps`` and,
    optional (``None``: the method's default, :data:`METHOD_DEFAULTS`), ``step_size``,
    ``objective``, ``calibration``, ``noise_step_size`` (BMAML only).
    """
    config = resolve_config(config)
    model = BayesianMLP(hidden=tuple(config["hidden"]))
    common = dict(inner_steps=config["inner_steps"], step_size=config["step_size"], init="paper",
                  objective=config["objective"], calibration=config["calibration"])
    if config["method"] == "bmaml":
        return BMAML(model, num_particles=config["particles"], leader_steps=config["leader_steps"],
                     noise_step_size=config["noise_step_size"], **common)
    if config["method"] == "emaml":
        return EMAML(model, num_particles=config["particles"], **common)
    return MAML(model, **common)


def task_sources(config: dict, learner=None):
    """``(source, training_tasks, calibration_tasks)`` for a configuration: the sinusoid
    source (its ``evaluation_tasks`` are the held-out test tasks), the tasks meta-trained
    on, and the held-out share of the pool (``calibration_holdout``, a fraction) that only
    the learner's calibration term sees (``None`` when there is no pool, no such share or
    no calibration term)."""
    source = Sinusoid(config["variant"], config["num_tasks"], config["shots"], seed=config["seed"])
    fraction = config.get("calibration_holdout") or 0.0
    if (not fraction or config["num_tasks"] is None
            or getattr(learner, "calibration", "noise_offset") not in ("noise_offset", "initial_noise")):
        return source, source, None
    holdout = max(1, round(fraction * config["num_tasks"]))
    if config["num_tasks"] - holdout < config.get("meta_batch", 1):
        raise ValueError(
            f"--calibration-holdout {fraction} keeps {config['num_tasks'] - holdout} of "
            f"--num-tasks {config['num_tasks']} for training, fewer than --meta-batch "
            f"{config.get('meta_batch')}; lower it or use 0")
    training, calibration = source.split(holdout, seed=config["seed"])
    return source, training, calibration


def _report(metrics: dict, num_tasks: int) -> str:
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


def write_report(learner, tasks: TaskBatch, out: Path, history: Optional[dict] = None,
                 num_steps: Optional[int] = None) -> dict:
    """Adapt to held-out tasks and write metrics (JSON + markdown) and plots into ``out``."""
    from . import plots  # plotting stays out of the library's import path

    out.mkdir(parents=True, exist_ok=True)
    posterior = learner.adapt(tasks.x_support, tasks.y_support, num_steps=num_steps,
                              track_ksd=True)
    metrics = regression_metrics(posterior, tasks.x_query, tasks.y_query, crps=True)
    ksd = posterior.info["ksd"]
    table = {k: metrics[k] for k in ("mse", "mse_particles", "rmse", "nll", "crps")}
    table["ksd_squared_final"] = list(mean_and_se(ksd[-1]))
    table["coverage"] = {str(k): v for k, v in metrics["coverage"].items()}
    table["width"] = {str(k): v for k, v in metrics["width"].items()}
    table["reliability"] = {str(k): v for k, v in metrics["reliability"].items()}
    (out / "metrics.json").write_text(json.dumps(table, indent=2))
    lines = ["| metric | mean | s.e. |", "|---|---|---|"]
    for key in ("mse", "mse_particles", "rmse", "nll", "crps", "ksd_squared_final"):
        lines.append(f"| {key} | {table[key][0]:.4g} | {table[key][1]:.2g} |")
    for level, (mu, se) in metrics["coverage"].items():
        width = metrics["width"][level]
        lines.append(f"| coverage {level:.0%} (width {width[0]:.3g}) | {mu:.3f} | {se:.2g} |")
    (out / "metrics.md").write_text("\n".join(lines) + "\n")
    shown = min(4, tasks.num_tasks)
    plots.plot_predictive([posterior.task(i) for i in range(shown)], out / "predictive.png",
                          queries=[(tasks.x_query[i], tasks.y_query[i]) for i in range(shown)])
    plots.plot_ksd(ksd, out / "ksd.png")
    plots.plot_calibration(metrics["reliability"], out / "calibration.png", label=learner.method)
    if history is not None and history.get("loss"):
        plots.plot_training(history, out / "training.png")
    return metrics


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pyro-bmaml", description="Bayesian MAML on Pyro")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="meta-train on sinusoid regression and evaluate",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    t.add_argument("--method", choices=METHODS, default="bmaml")
    t.add_argument("--objective", choices=OBJECTIVES, default=None,
                   help="bmaml: chaser or bfa; emaml/maml: mse (as the papers) or log_joint; "
                        "None: chaser for bmaml, mse for the baselines")
    t.add_argument("--calibration", default=None,
                   choices=BMAML.calibrations,
                   help="how the noise level is meta-learned; None: noise_offset (none with "
                        "--objective bfa or log_joint)")
    t.add_argument("--calibration-holdout", type=float, default=0.1,
                   help="fraction of the |T| tasks held out of meta-training, on which the "
                        "noise offset is learned (0: learn it on the training batches)")
    t.add_argument("--particles", type=_positive(int), default=10, help="M")
    t.add_argument("--shots", type=_positive(int), default=10, help="K support (= query) points")
    t.add_argument("--num-tasks", type=_positive(int), default=100, help="|T| meta-training tasks")
    t.add_argument("--variant", choices=("bmaml", "maml"), default="bmaml")
    t.add_argument("--iterations", type=_positive(int), default=2000)
    t.add_argument("--meta-batch", type=_positive(int), default=10)
    t.add_argument("--hidden", type=_hidden, default=(40, 40, 40))
    t.add_argument("--step-size", type=_positive(float), default=None,
                   help="adaptation step; None: 1e-3 for bmaml and emaml, 1e-2 for maml")
    t.add_argument("--noise-step-size", type=_positive(float), default=None,
                   help="bmaml: SVGD step of the noise precision; None: 3e-3")
    t.add_argument("--inner-steps", type=_positive(int), default=1)
    t.add_argument("--leader-steps", type=_positive(int), default=1)
    t.add_argument("--lr", type=_positive(float), default=1e-3)
    t.add_argument("--schedule-iterations", type=_positive(int), default=100_000,
                   help="nominal budget the x0.98 decay is spread over (official code: 100k)")
    t.add_argument("--eval-tasks", type=_positive(int), default=100)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--out", type=Path, default=Path("runs/default"))
    t.add_argument("--no-progress", action="store_true")
    e = sub.add_parser("evaluate", help="evaluate a checkpoint on held-out sinusoid tasks",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    e.add_argument("checkpoint", type=Path)
    e.add_argument("--eval-tasks", type=_positive(int), default=100)
    e.add_argument("--steps", type=int, default=None, help="adaptation steps (default: trained n)")
    e.add_argument("--out", type=Path, default=None,
                   help="report folder (default: evaluation/ beside the checkpoint)")
    return p


def train(args) -> int:
    if args.method == "bmaml" and args.particles < 2:
        raise ValueError("--particles must be >= 2 for bmaml (use --method maml for one)")
    if args.meta_batch > args.num_tasks:
        raise ValueError(f"--meta-batch ({args.meta_batch}) exceeds --num-tasks ({args.num_tasks})")
    config = resolve_config({
        "method": args.method, "objective": args.objective, "particles": args.particles,
        "shots": args.shots, "num_tasks": args.num_tasks, "variant": args.variant,
        "hidden": list(args.hidden), "step_size": args.step_size, "inner_steps": args.inner_steps,
        "leader_steps": args.leader_steps, "seed": args.seed, "calibration": args.calibration,
        "noise_step_size": args.noise_step_size, "calibration_holdout": args.calibration_holdout,
        "meta_batch": args.meta_batch,
    })
    if not 0.0 <= args.calibration_holdout < 1.0:
        raise ValueError(f"--calibration-holdout must be in [0, 1), got {args.calibration_holdout}")
    pyro.set_rng_seed(args.seed)
    learner = build_learner(config)
    source, tasks, calibration_tasks = task_sources(config, learner)
    eval_tasks = source.evaluation_tasks(args.eval_tasks)
    args.out.mkdir(parents=True, exist_ok=True)
    history = learner.fit(
        tasks, args.iterations, meta_batch_size=args.meta_batch, lr=args.lr,
        schedule_iterations=args.schedule_iterations,
        eval_tasks=eval_tasks, eval_every=max(1, args.iterations // 10),
        checkpoint=str(args.out / "checkpoint.pt"), checkpoint_every=max(1, args.iterations // 10),
        seed=args.seed, progress=not args.no_progress, extra={"config": config},
        calibration_tasks=calibration_tasks,
    )
    metrics = write_report(learner, eval_tasks, args.out / "evaluation", history)
    print(_report(metrics, args.eval_tasks))
    print(f"checkpoint: {args.out / 'checkpoint.pt'}   report: {args.out / 'evaluation'}/")
    return 0


def evaluate_cmd(args) -> int:
    state = load_checkpoint(args.checkpoint)
    config = state.get("extra", {}).get("config")
    if config is None:
        raise ValueError(f"{args.checkpoint} was not written by `pyro-bmaml train` (no config)")
    learner = build_learner(config)
    learner.load_state_dict(state["learner"])
    if args.steps is not None and args.steps < 0:
        raise ValueError(f"--steps must be >= 0, got {args.steps}")
    tasks, _, _ = task_sources(config)
    out = args.out or args.checkpoint.parent / "evaluation"
    metrics = write_report(learner, tasks.evaluation_tasks(args.eval_tasks), out,
                           state.get("history"), num_steps=args.steps)
    print(f"{config['method']} after {state['iteration']} meta-iterations")
    print(_report(metrics, args.eval_tasks))
    print(f"report: {out}/ (metrics.md, metrics.json, predictive.png, ksd.png, calibration.png)")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    args = parser().parse_args(argv)
    try:
        return train(args) if args.command == "train" else evaluate_cmd(args)
    except (ValueError, TypeError, FileNotFoundError, FloatingPointError) as err:
        print(f"pyro-bmaml: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
