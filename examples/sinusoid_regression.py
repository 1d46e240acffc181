"""Side-by-side reproduction of the paper's sinusoid experiment: BMAML vs EMAML vs MAML.

Every method as its paper ran it: BMAML (chaser loss, SVGD eps = 1e-3, n = s = 1), EMAML
(the official code: inner step 1e-3 on the mean squared error, query-MSE meta-loss summed
over particles) and MAML (Finn et al.: inner step 0.01 on the MSE, query-MSE meta-loss),
all on the paper's 1-40-40-40-1 Bayesian MLP (BMAML's noise precision takes a 3x SVGD step,
``results/calibration.md``), Adam 1e-3 decayed x0.98 every 1% of the
*nominal* 100k-iteration budget (as the official code, whatever the run length), meta-batch
10, the same seeds and task pools. All methods get the same meta-learned noise offset
(``calibration="noise_offset"``), which does not change their MSE, so that NLL and coverage
are comparable. Held-out metrics on 100 noise-free evaluation tasks: MSE of the particle
mean (BMAML paper), mean per-particle MSE (what the official EMAML logs), mixture NLL per
query point, coverage of the 50% and 90% central intervals; learning curves every
``--eval-every`` iterations. Writes ``OUT.md``, ``OUT.json``, ``OUT.runs.jsonl``,
``OUT_curves.png`` (dotted: the nominal 0.9 coverage and the predict-zero MSE 4.25) and
``OUT_reliability.png``.

    python examples/sinusoid_regression.py --iterations 10000 --seeds 0 1 2 --update-results

By default the output goes to ``runs/sinusoid`` (a scratch folder); ``--update-results``
writes ``results/sinusoid`` instead.
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
from pyro_bmaml.evaluation.metrics import RELIABILITY_LEVELS
from pyro_bmaml.meta.training import evaluate

METRICS = ("mse", "mse_particles", "nll", "coverage_50", "coverage_90")


def scores(metrics: dict) -> dict:
    out = {k: metrics[k][0] for k in ("mse", "mse_particles", "nll")}
    out["coverage_50"] = metrics["coverage"][0.5][0]
    out["coverage_90"] = metrics["coverage"][0.9][0]
    return out


def run_one(job):
    torch.set_num_threads(1)
    method, m, k, num_tasks, seed, args = job
    config = resolve_config({"method": method, "particles": m, "hidden": [40, 40, 40],
                             "inner_steps": 1, "leader_steps": 1, "variant": "bmaml",
                             "num_tasks": num_tasks, "shots": k, "seed": seed, "meta_batch": 10,
                             "calibration_holdout": args["calibration_holdout"],
                             "calibration": args.get("calibration"),
                             "compile": args.get("compile") if method == "bmaml" else None})
    pyro.set_rng_seed(seed)
    learner = build_learner(config)
    source, tasks, calibration_tasks = task_sources(config, learner)
    eval_tasks = source.evaluation_tasks(args["eval_tasks"])
    row = {"method": method, "M": learner.num_particles, "K": k, "T": num_tasks, "seed": seed,
           "step_size": learner.step_size, "objective": learner.objective,
           "calibration": learner.calibration,
           "noise_step_size": getattr(learner, "noise_step_size", None),
           "calibration_holdout": args["calibration_holdout"] if calibration_tasks else 0.0,
           "noise_adaptation_scale": getattr(learner, "noise_adaptation_scale", False)}
    t0 = time.time()
    try:
        history = learner.fit(tasks, args["iterations"], meta_batch_size=10, seed=seed,
                              schedule_iterations=args["schedule_iterations"], progress=False,
                              eval_tasks=eval_tasks, eval_every=args["eval_every"],
                              calibration_tasks=calibration_tasks)
    except FloatingPointError as err:  # report a diverged run instead of losing the table
        return row | {"error": str(err), "seconds": time.time() - t0}
    # the paper's protocol: scored after the n steps meta-trained through
    metrics = evaluate(learner, eval_tasks, num_steps=learner.inner_steps, closed_form=True,
                       widths=False)
    row.update(scores(metrics))
    if "adapt_steps" in history:  # and after the count fit chose on the held-out tasks
        row["adapt_steps"] = learner.adapt_steps
        try:
            row["chosen"] = scores(metrics if learner.adapt_steps == learner.inner_steps else
                                   evaluate(learner, eval_tasks, closed_form=True, widths=False))
        except FloatingPointError as err:  # the count chosen on the selection tasks diverged
            row["chosen"] = {"error": str(err)}  # on these: keep the paper-protocol row
    row["reliability"] = [metrics["reliability"][lv][0] for lv in RELIABILITY_LEVELS]
    row["curve"] = [{"iteration": e["iteration"], "mse": e["mse"][0], "nll": e["nll"][0],
                     "mse_particles": e["mse_particles"][0],
                     "coverage_50": e["coverage"]["0.5"][0],
                     "coverage_90": e["coverage"]["0.9"][0]} for e in history["eval"]]
    row["seconds"] = time.time() - t0
    return row



def calibration_label(row) -> str:
    """How the run's noise calibration was learned: the offset (+ the adaptation scale,
    which only moves BMAML, whose SVGD step changes the noise), on the training batches or
    on a held-out share of the pool."""
    if row.get("calibration") == "none":
        return "none (chaser only)"
    if row.get("calibration") == "initial_noise":
        return "initial noise"
    label = "offset"
    if row.get("noise_adaptation_scale") and row["method"] == "bmaml":
        label += "+scale"
    holdout = row.get("calibration_holdout", 0.0)
    return label + (f", holdout {holdout:g}" if holdout else ", training tasks")


def summarize(rows):
    groups = {}
    for r in rows:
        key = (r["K"], r["T"], r["method"], r["M"], calibration_label(r))
        groups.setdefault(key, []).append(r)
    table = []
    for (k, t, method, m, label), rs in sorted(groups.items()):
        ok = [r for r in rs if "error" not in r]
        entry = {"K": k, "T": t, "method": method, "M": m, "calibration": label,
                 "seeds": len(rs), "diverged": len(rs) - len(ok)}
        for key in METRICS:
            entry[key] = mean_se([r[key] for r in ok]) if ok else [float("nan"), None]
        by_seed = sorted(ok, key=lambda r: r["seed"])
        chosen = [r for r in by_seed if "chosen" in r and "error" not in r["chosen"]]
        if chosen:
            # each seed's count in seed order, "-" for a run that chose none (older code),
            # with "!" where the chosen count diverged on the evaluation tasks
            entry["adapt_steps"] = [f"{r['adapt_steps']}!" if "error" in r.get("chosen", {})
                                    else r.get("adapt_steps", "-") for r in by_seed]
            entry["chosen_seeds"] = len(chosen)
            entry["chosen"] = {key: mean_se([r["chosen"][key] for r in chosen]) for key in METRICS}
        table.append(entry)
    return table



def write_outputs(out: Path, budget: dict, rows: list):
    from pyro_bmaml.evaluation import plots

    table = summarize(rows)
    save_json(out, budget, table, rows)
    se_note = seed_note(rows)
    lines = [f"Budget: {json.dumps(budget)}", "",
             f"Held-out metrics on {budget['eval_tasks']} noise-free evaluation tasks ({se_note}; "
             "each seed's value is a mean over the tasks). MSE = MSE of the particle-mean "
             "prediction (the BMAML paper's metric); per-particle MSE = mean over particles of "
             "each particle's MSE (the official EMAML code's log); NLL = mixture negative log "
             "likelihood per query point; coverage of the central 50% / 90% predictive "
             "intervals (nominal 0.50 / 0.90). Predicting 0 everywhere scores MSE 4.25. "
             "Calibration: the meta-learned noise offset (+scale: and the learned scale of "
             "the noise's SVGD change), learned on the training tasks' batches or on a held-out "
             "share of the |T| tasks kept out of meta-training. Scored after the n steps "
             "meta-trained through (the paper's protocol); where the runs chose another "
             "count for adaptation at test time (`fit`'s default, on the held-out share), "
             "the last columns score that count (each seed's count listed, '-' for a run "
             "made before the choice existed, '!' for a count that took a non-finite step on "
             "the evaluation tasks, and scored over the other seeds that chose).", "",
             "| K | \\|T\\| | method | M | step | calibration | MSE | per-particle MSE | NLL | "
             "cov. 50% | cov. 90% | diverged | chosen steps | MSE / NLL / cov. 90% there |",
             "|---" * 14 + "|"]
    steps = {(r["method"]): r["step_size"] for r in rows}
    for e in table:
        lines.append(
            f"| {e['K']} | {e['T']} | {e['method']} | {e['M']} | {steps[e['method']]:g} | "
            f"{e['calibration']} | "
            f"{fmt(e['mse'])} | {fmt(e['mse_particles'])} | {fmt(e['nll'])} | "
            f"{fmt(e['coverage_50'])} | {fmt(e['coverage_90'])} | {e['diverged']}/{e['seeds']} | "
            + (f"{'/'.join(map(str, e['adapt_steps']))} | {fmt(e['chosen']['mse'])} / "
               f"{fmt(e['chosen']['nll'])} / {fmt(e['chosen']['coverage_90'])}"
               + (f" ({e['chosen_seeds']} of {len(e['adapt_steps'])} seeds)"
                  if e["chosen_seeds"] < len(e["adapt_steps"]) else "") + " |"
               if "chosen" in e else "- | - |"))
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))

    cells = sorted({(r["K"], r["T"]) for r in rows})

    def variants(k, t):
        """``(label, runs)`` per method (and calibration holdout, when a cell has several)."""
        cell = [r for r in rows if (r["K"], r["T"]) == (k, t) and "error" not in r]
        keys = sorted({(r["method"], calibration_label(r)) for r in cell})
        several = {m for m, _ in keys if sum(1 for m2, _ in keys if m2 == m) > 1}
        for method, cal in keys:
            label = method.upper() + (f" ({cal})" if method in several else "")
            yield label, [r for r in cell if (r["method"], calibration_label(r)) == (method, cal)]

    curves = {}
    for key in ("mse", "coverage_90"):
        for k, t in cells:
            panel = {}
            for label, runs in variants(k, t):
                runs = [r for r in runs if r.get("curve")]
                if not runs:
                    continue
                its = [c["iteration"] for c in runs[0]["curve"]]
                stats = [mean_se([r["curve"][i][key] for r in runs]) for i in range(len(its))]
                panel[label] = (its, [s[0] for s in stats], [s[1] or 0.0 for s in stats])
            curves[f"{key}, K={k}, |T|={t}"] = panel
    references = {title: 0.9 if title.startswith("coverage") else 4.25 for title in curves}
    plots.plot_curve_panels(curves, out.parent / f"{out.name}_curves.png", "meta-iteration",
                            hlines=references)
    reliability = {}
    for k, t in cells:
        for label, runs in variants(k, t):
            runs = [r for r in runs if "reliability" in r]
            if runs:
                stats = [mean_se([r["reliability"][i] for r in runs])
                         for i in range(len(RELIABILITY_LEVELS))]
                reliability.setdefault(f"K={k}, |T|={t}", {})[label] = {
                    lv: (s[0], s[1] or 0.0) for lv, s in zip(RELIABILITY_LEVELS, stats)}
    plots.plot_reliability_panels(reliability, out.parent / f"{out.name}_reliability.png")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--iterations", type=int, default=1000, help="run length")
    p.add_argument("--schedule-iterations", type=int, default=100_000,
                   help="nominal budget of the x0.98 learning-rate decay (official code)")
    p.add_argument("--eval-every", type=int, default=None,
                   help="learning-curve spacing (default: iterations / 10)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--shots", type=int, nargs="+", default=[5, 10])
    p.add_argument("--num-tasks", type=int, nargs="+", default=[100, 1000])
    p.add_argument("--particles", type=int, default=10)
    p.add_argument("--calibration-holdout", type=float, default=0.1,
                   help="fraction of each pool held out of meta-training for the noise offset")
    p.add_argument("--calibration", default=None, choices=["noise_offset", "initial_noise", "none"],
                   help="BMAML/EMAML/MAML calibration term (default: each method's default)")
    p.add_argument("--eval-tasks", type=int, default=100)
    p.add_argument("--compile", action="store_true",
                   help="BMAML: take the SVGD steps as compiled code (BMAML(compile=True); "
                        "same results to rounding, faster after the first step's compile)")
    add_comparison_arguments(p, "sinusoid")
    args = p.parse_args()
    out = output_prefix(args, "sinusoid")
    settings = {"iterations": args.iterations, "schedule_iterations": args.schedule_iterations,
                "eval_every": args.eval_every or max(1, args.iterations // 10),
                "eval_tasks": args.eval_tasks, "calibration_holdout": args.calibration_holdout,
                "calibration": args.calibration, "compile": args.compile}
    budget = settings | {"meta_batch": 10, "lr": 1e-3, "network": "1-40-40-40-1",
                         "seeds": args.seeds, "M": args.particles}
    if args.from_runs:
        write_outputs(out, budget, read_runs(args.from_runs))
        return
    jobs = [(method, args.particles, k, t, s, settings) for k in args.shots
            for t in args.num_tasks for method in args.methods for s in args.seeds]
    cost = {"bmaml": 3, "emaml": 2, "maml": 1}
    # seed by seed, biggest jobs first (see run_jobs)
    jobs = sorted(jobs, key=lambda j: (j[4], -cost[j[0]]))
    rows = run_jobs(run_one, jobs, args.workers, out.parent / f"{out.name}.runs.jsonl")
    write_outputs(out, budget, rows)


if __name__ == "__main__":
    main()
