"""Active learning on sinusoid tasks (the BMAML paper's experiment, Section 5.1).

Start from K labelled points per task; add one point at a time from a pool of candidates,
re-adapting from the meta-learned prior after each addition. The next point is the
candidate where the particles' predictions disagree most (the variance of the particle
means: the epistemic part of the predictive variance), or a random candidate (control).
BMAML and EMAML are meta-trained with the same budget, seed and network; the MSE of the
particle-mean prediction on a fixed noise-free grid is recorded after every addition
(mean +- s.e. over tasks). Everything is vectorized over tasks.

    python examples/active_learning.py --iterations 3000 --update-results

The adaptation step size is scaled by K / N for N labelled points (the likelihood gradient
grows with N); the table also gives the fixed-step variant. Both methods are the library's
defaults: calibrated BMAML (meta-learned noise offset) and the paper's EMAML (inner step
1e-3 on the MSE). Output goes to ``runs/`` unless ``--update-results`` is given.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import pyro
import torch

from pyro_bmaml.cli import build_learner
from pyro_bmaml.evaluation.metrics import mean_and_se
from pyro_bmaml.evaluation.plots import plot_curves
from pyro_bmaml.tasks.base import Sinusoid


def sinusoid_family(num_tasks, seed):
    g = torch.Generator().manual_seed(seed)
    amp = 0.1 + 4.9 * torch.rand(num_tasks, 1, generator=g)
    phase = 2 * math.pi * torch.rand(num_tasks, 1, generator=g)
    freq = 0.5 + 1.5 * torch.rand(num_tasks, 1, generator=g)
    return lambda x: amp * torch.sin(freq * x - phase)


def active_learning(learner, f, pool_x, grid_x, k, num_added, strategy, generator,
                    scale_step=False):
    """MSE and mixture NLL per point on the grid after 0..num_added additions: two tensors
    ``(num_added + 1, T)``.

    With ``scale_step`` the adaptation step size is multiplied by K / N for N labelled
    points when the inner objective is a log joint (BMAML): the likelihood's gradient grows
    with N, so a step size meta-trained for K points overshoots as points are added; the
    scaling keeps the likelihood term's step constant. EMAML's inner mean squared error does
    not grow with N, so its step is left alone.
    """
    t, p = pool_x.shape
    chosen = torch.zeros(t, p, dtype=torch.bool)
    first = torch.stack([torch.randperm(p, generator=generator)[:k] for _ in range(t)])
    chosen.scatter_(1, first, True)
    order = first
    mses, nlls = [], []
    grid_y = f(grid_x)
    for step in range(num_added + 1):
        xs = torch.gather(pool_x, 1, order)
        # only a log-joint inner objective grows with N (EMAML's mean squared error does not)
        sums = getattr(learner, "objective", None) in ("chaser", "bfa", "log_joint")
        eps = learner.step_size * (k / xs.size(1) if scale_step and sums else 1.0)
        post = learner.adapt(xs[..., None], f(pool_x).gather(1, order), step_size=eps)
        with torch.no_grad():
            mses.append((post.predict(grid_x[..., None])["mean"] - grid_y).pow(2).mean(-1))
            nlls.append(-post.log_predictive_density(grid_x[..., None], grid_y).mean(-1))
            if step == num_added:
                break
            if strategy == "variance":
                score = post.predict(pool_x[..., None])["particle_means"].var(1)  # (T, P)
            else:
                score = torch.rand(t, p, generator=generator)
            score = score.masked_fill(chosen, -float("inf"))
            nxt = score.argmax(1, keepdim=True)
        chosen.scatter_(1, nxt, True)
        order = torch.cat([order, nxt], 1)
    return torch.stack(mses), torch.stack(nlls)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--iterations", type=int, default=1500, help="meta-training iterations")
    p.add_argument("--shots", type=int, default=5, help="K: initial labelled points")
    p.add_argument("--num-tasks", type=int, default=1000, help="|T| meta-training tasks")
    p.add_argument("--added", type=int, default=10, help="points added one at a time")
    p.add_argument("--eval-tasks", type=int, default=100)
    p.add_argument("--particles", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None,
                   help="output prefix (default: runs/active_learning, or "
                        "results/active_learning with --update-results)")
    p.add_argument("--update-results", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args()
    args.out = args.out or Path("results/active_learning" if args.update_results
                                else "runs/active_learning")

    pool_x = -5 + 10 * torch.rand(args.eval_tasks, 100, generator=torch.Generator().manual_seed(7))
    grid_x = torch.linspace(-5, 5, 100).expand(args.eval_tasks, 100)
    f = sinusoid_family(args.eval_tasks, seed=12345)
    curves = {"scaled": {}, "fixed": {}, "nll": {}}
    table, steps = {}, {}
    for method in ("bmaml", "emaml"):
        config = {"method": method, "particles": args.particles, "hidden": [40, 40, 40],
                  "inner_steps": 1, "leader_steps": 1}
        pyro.set_rng_seed(args.seed)
        learner = build_learner(config)
        tasks = Sinusoid("bmaml", args.num_tasks, args.shots, seed=args.seed)
        learner.fit(tasks, args.iterations, seed=args.seed, schedule_iterations=100_000,
                    progress=not args.no_progress)
        steps[method] = learner.adapt_steps  # the count fit chose; every adaptation below uses it
        for scaling in ("scaled", "fixed"):
            for strategy in ("variance", "random"):
                mse, nll = active_learning(
                    learner, f, pool_x, grid_x, args.shots, args.added, strategy,
                    torch.Generator().manual_seed(args.seed + 1), scale_step=scaling == "scaled")
                label = f"{method.upper()} + {strategy}"
                stats = [mean_and_se(row) for row in mse]
                nll_stats = [mean_and_se(row) for row in nll]
                counts = list(range(args.shots, args.shots + args.added + 1))
                curves[scaling][label] = (counts, [s[0] for s in stats], [s[1] for s in stats])
                if scaling == "scaled":
                    curves["nll"][label] = (counts, [s[0] for s in nll_stats],
                                            [s[1] for s in nll_stats])
                table[f"{label} ({scaling} step)"] = {"labelled": counts, "mse": stats,
                                                      "nll": nll_stats}
                print(label, scaling, " ".join(f"{m:.3f}" for m, _ in stats), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    budget = vars(args) | {"out": str(args.out)}
    args.out.with_suffix(".json").write_text(json.dumps(
        {"budget": budget, "adapt_steps": steps, "table": table}, indent=2))
    lines = [f"Budget: {json.dumps(budget)}", "",
             "Adaptation steps (the count `fit` chose on held-out tasks, used for every "
             "adaptation): " + ", ".join(f"{m.upper()} {n}" for m, n in steps.items())]
    for scaling, title in (("scaled", "grid MSE, BMAML's step size x K / N"),
                           ("fixed", "grid MSE, fixed step size"),
                           ("nll", "grid mixture NLL per point, BMAML's step size x K / N")):
        suffix = {"scaled": "", "fixed": "_fixed_step", "nll": "_nll"}[scaling]
        plot_curves(curves[scaling], args.out.parent / f"{args.out.name}{suffix}.png",
                    "labelled points per task", f"mean +- s.e. ({title})",
                    log_y=scaling != "nll")
        cs = curves[scaling]
        counts = cs[next(iter(cs))][0]
        lines += ["", f"{title[0].upper()}{title[1:]}:", "",
                  "| labelled | " + " | ".join(cs) + " |", "|---" * (len(cs) + 1) + "|"]
        for i, n in enumerate(counts):
            cells = [f"{cs[c][1][i]:.3f} +- {cs[c][2][i]:.3f}" for c in cs]
            lines.append(f"| {n} | " + " | ".join(cells) + " |")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
