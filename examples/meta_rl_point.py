"""Meta-RL on 2-D point navigation: BMAML (SVPG chaser) vs EMAML vs MAML, same rollouts budget.

Each task is a goal in [-0.5, 0.5]^2; the point starts at the origin, moves by its clipped
action (|a| <= 0.1 per coordinate) and is rewarded minus its distance to the goal, for 100
steps. Every method adapts a Gaussian MLP policy (2-32-32-2, `GaussianMLPPolicy`) with one
step on `--episodes` rollouts per particle and task (BMAML: one SVPG step, its leader a
second step on as many fresh rollouts; EMAML / MAML: MAML-RL's policy-gradient step, 0.1 on
the surrogate averaged over steps, and their query loss on as many fresh rollouts of the
adapted policies: the same rollouts budget; linear feature baseline, normalized
advantages), M = 5
particles for BMAML and EMAML, meta-batch 10 goals, Adam 1e-3. The learning curve is the
average return per episode after adaptation on 20 held-out goals (mean +- s.e. over
seeds). Run:

    python examples/meta_rl_point.py --iterations 200 --seeds 0 1 2 [--update-results]

MAML-RL's settings (issue 20): `--init-std 1.0 --meta-batch 20 --episodes 20` (its policies'
action sd starts at 1; 20 goals x 20 episodes per meta-batch), `--schedule-iterations 100000`
(Adam's rate nearly constant, as the CLI), and `--meta-optimizer trpo`
for its trust-region meta-update (every method; slower per meta-iteration on a CPU).
MAML-RL's and the official BMAML code's environment, not the public port's:
`--action-scale 0.1 --goal-tolerance 0.01` (rllab's normalized actions, so that sd 1 is 0.1
in the environment's units, and episodes that end at the goal); the official BMAML chaser
runs used SVPG's alpha 0.1 with step 0.1 on the averaged surrogate, the drive of a step
1 / N on the summed one (`--bmaml-step 5e-4` at N = 20 x 100). `--temperature` weighs the
repulsion and the prior against the summed surrogate, where the official alpha amounts to
alpha N = 200; the record keeps 0.1, a far weaker repulsion.
The record of that configuration:

    python examples/meta_rl_point.py --iterations 400 --eval-every 50 --seeds 0 1 2 3 4 \
        --init-std 1.0 --meta-batch 20 --episodes 20 --schedule-iterations 100000 \
        --temperature 0.1 --bmaml-step 5e-4 --action-scale 0.1 --goal-tolerance 0.01 \
        --out results/meta_rl_mamlrl

(`--update-results` writes results/meta_rl.{md,json,png}; by default runs/meta_rl.*).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import pyro
import torch

from _runs import (add_comparison_arguments, fmt, mean_se, output_prefix, read_runs,
                   run_jobs, save_json, seed_note)
from pyro_bmaml.cli import build_learner, resolve_config, task_sources
from pyro_bmaml.meta.training import evaluate


def run_one(job):
    torch.set_num_threads(1)
    label, seed, args = job
    # "bmaml-bfa": BMAML with the post-update surrogate, the official code's BMAMLTRPO
    method, objective = ("bmaml", "bfa") if label == "bmaml-bfa" else (label, None)
    config = resolve_config({"task": "point-nav", "method": method, "objective": objective,
                             "particles": args["particles"], "inner_steps": 1,
                             "leader_steps": 1, "seed": seed, "episodes": args["episodes"],
                             "temperature": args["temperature"], "init_std": args["init_std"],
                             "action_scale": args.get("action_scale"),
                             "goal_tolerance": args.get("goal_tolerance"),
                             "step_size": args.get("bmaml_step") if label == "bmaml"
                             else args.get("baseline_step")})
    pyro.set_rng_seed(seed)
    learner = build_learner(config)
    source, tasks, _ = task_sources(config, learner)
    held_out = source.evaluation_tasks(args["eval_tasks"], seed=777)
    row = {"method": label, "seed": seed, "M": learner.num_particles,
           "step_size": learner.step_size}
    start = evaluate(learner, held_out)
    t0 = time.time()
    try:
        history = learner.fit(tasks, args["iterations"], meta_batch_size=args["meta_batch"],
                              schedule_iterations=args.get("schedule_iterations"),
                              seed=seed, progress=False, eval_tasks=held_out,
                              eval_every=args["eval_every"],
                              meta_optimizer=args["meta_optimizer"], max_kl=args["max_kl"])
    except FloatingPointError as err:
        return row | {"error": str(err), "seconds": time.time() - t0}
    final = evaluate(learner, source.evaluation_tasks(args["test_tasks"], seed=12345))
    row.update({"return": final["return"][0], "return_before": final["return_before"][0],
                "improvement": final["improvement"][0]})
    row["curve"] = [{"iteration": 0, "return": start["return"][0],
                     "return_before": start["return_before"][0]}] + [
        {"iteration": e["iteration"], "return": e["return"][0],
         "return_before": e["return_before"][0]} for e in history["eval"]]
    row["seconds"] = time.time() - t0
    return row


def write_outputs(out: Path, budget: dict, rows: list):
    from pyro_bmaml.evaluation import plots

    methods = sorted({r["method"] for r in rows})
    table = []
    for method in methods:
        ok = [r for r in rows if r["method"] == method and "error" not in r]
        entry = {"method": method, "M": ok[0]["M"] if ok else None,
                 "step_size": ok[0]["step_size"] if ok else None,
                 "seeds": len([r for r in rows if r["method"] == method]),
                 "diverged": len([r for r in rows if r["method"] == method and "error" in r])}
        for key in ("return", "return_before", "improvement"):
            entry[key] = mean_se([r[key] for r in ok]) if ok else [float("nan"), None]
        table.append(entry)
    save_json(out, budget, table, rows)
    scale, tolerance = budget.get("action_scale", 1.0), budget.get("goal_tolerance")
    env = ("MAML-RL's environment (rllab's normalized actions: the policy acts in [-1, 1], "
           f"the point moves by clip({scale:g} a, -0.1, 0.1)"
           + (f"; an episode ends within {tolerance:g} of the goal" if tolerance else "")
           + f"): the policies' initial sd {budget['init_std']} is "
           f"{budget['init_std'] * scale:g} in the environment's units"
           ) if scale != 1.0 or tolerance else (
           f"the public port's environment (actions clipped to 0.1, 100 steps whatever "
           f"happens): the un-meta-trained policies are random walks of sd {budget['init_std']}")
    lines = [f"Budget: {json.dumps(budget)}", "",
             f"2-D point navigation, {budget['test_tasks']} held-out goals ({seed_note(rows)}): "
             "average return per episode (100 steps, reward = minus the distance to the goal) "
             "of the particles' policies after one adaptation step on "
             f"{budget['episodes']} episodes per particle, and before it (the meta-learned "
             "initial policies themselves). Standing still scores -38.2 per episode, the "
             "optimal (deterministic) policy -0.5 (10,000 goals, exact rollouts); share of "
             "the gap: (return + 38.2) / 37.7. " + env + ".", "",
             "| method | M | step | return after adaptation | share of the gap | per seed | "
             "before adaptation | improvement | diverged |", "|---" * 9 + "|"]
    for e in table:
        seeds = sorted((r for r in rows if r["method"] == e["method"] and "error" not in r),
                       key=lambda r: r["seed"])
        per_seed = ", ".join(f"{r['return']:.1f}" for r in seeds)
        lines.append(f"| {e['method']} | {e['M']} | {e['step_size']:.3g} | {fmt(e['return'], 2)} | "
                     f"{(e['return'][0] + 38.2) / 37.7:.0%} | {per_seed} | "
                     f"{fmt(e['return_before'], 2)} | {fmt(e['improvement'], 2)} | "
                     f"{e['diverged']}/{e['seeds']} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    panels = {}
    for key, title in (("return", "return after adaptation (held-out goals)"),
                       ("return_before", "return before adaptation")):
        panel = {}
        for method in methods:
            runs = [r for r in rows if r["method"] == method and r.get("curve")]
            if not runs:
                continue
            its = [c["iteration"] for c in runs[0]["curve"]]
            stats = [mean_se([r["curve"][i][key] for r in runs]) for i in range(len(its))]
            panel[method.upper()] = (its, [s[0] for s in stats], [s[1] or 0.0 for s in stats])
        panels[title] = panel
    # the first point (un-meta-trained, about -400 after the baselines' step) squashes the
    # rest: the same curves from the first evaluation on
    panels["return after adaptation (from the first evaluation)"] = {
        label: (its[1:], mu[1:], se[1:])
        for label, (its, mu, se) in panels["return after adaptation (held-out goals)"].items()}
    plots.plot_curve_panels(panels, out.parent / f"{out.name}.png", "meta-iteration")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--iterations", type=int, default=100)
    p.add_argument("--eval-every", type=int, default=None, help="default: iterations / 10")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--particles", type=int, default=5)
    p.add_argument("--episodes", type=int, default=10)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--init-std", type=float, default=0.1,
                   help="the policies' initial action sd (MAML-RL's: 1.0)")
    optional = {  # float settings whose absence means the family's (or the port's) default
        "--bmaml-step": "the BMAML chaser's SVPG step on the summed surrogate (None: the "
                        "family's 0.1 / N; the official chaser's fast_lr 0.1 at alpha 0.1 is "
                        "1 / N); bmaml-bfa keeps 0.1 / N, the official BMAMLTRPO's at alpha 1",
        "--baseline-step": "MAML's and EMAML's policy-gradient step (None: 0.1, MAML-RL's paper "
                           "and the port; MAML-RL's own point-navigation script used 0.5)",
        "--action-scale": "the point moves by clip(s * action, -0.1, 0.1): 0.1 is MAML-RL's "
                          "normalized action space (None: 1, the PyTorch port's)",
        "--goal-tolerance": "end an episode within this distance of the goal (MAML-RL's 0.01; "
                            "None: never, as the port)",
    }
    for flag, text in optional.items():
        p.add_argument(flag, type=float, default=None, help=text)
    p.add_argument("--meta-batch", type=int, default=10, help="goals per meta-batch")
    p.add_argument("--schedule-iterations", type=int, default=None,
                   help="the nominal budget Adam's x0.98 decay is spread over (the CLI's and "
                        "the official code's: 100000, a nearly constant rate); None: the run's "
                        "own length, as the record (its rate falls to 0.13x by the end)")
    p.add_argument("--meta-optimizer", choices=("adam", "trpo"), default="adam")
    p.add_argument("--max-kl", type=float, default=0.01, help="trpo's trust region")
    p.add_argument("--eval-tasks", type=int, default=20, help="goals of the learning curve")
    p.add_argument("--test-tasks", type=int, default=40, help="goals of the final table")
    add_comparison_arguments(p, "meta_rl", extra_methods=("bmaml-bfa",))
    args = p.parse_args()
    out = output_prefix(args, "meta_rl")
    settings = {"iterations": args.iterations,
                "eval_every": args.eval_every or max(1, args.iterations // 10),
                "particles": args.particles, "episodes": args.episodes,
                "temperature": args.temperature, "eval_tasks": args.eval_tasks,
                "test_tasks": args.test_tasks, "init_std": args.init_std,
                "meta_batch": args.meta_batch, "meta_optimizer": args.meta_optimizer,
                "schedule_iterations": args.schedule_iterations,
                "max_kl": args.max_kl}
    for key in ("action_scale", "goal_tolerance", "bmaml_step", "baseline_step"):  # when given
        if getattr(args, key) is not None:
            settings[key] = getattr(args, key)
    budget = settings | {"lr": 1e-3, "horizon": 100, "seeds": args.seeds,
                         "policy": "2-32-32-2"}
    if args.from_runs:
        write_outputs(out, budget, read_runs(args.from_runs))
        return
    cost = {"bmaml": 3, "bmaml-bfa": 3, "emaml": 2, "maml": 1}
    jobs = sorted([(m, s, settings) for m in args.methods for s in args.seeds],
                  key=lambda j: (j[1], -cost[j[0]]))
    rows = run_jobs(run_one, jobs, args.workers, out.parent / f"{out.name}.runs.jsonl")
    write_outputs(out, budget, rows)


if __name__ == "__main__":
    main()
