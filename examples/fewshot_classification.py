"""Few-shot classification, side by side: BMAML vs EMAML vs MAML on 5-way 1-shot and 5-shot.

The paper's second benchmark is miniImageNet 5-way 1-shot with a conv4 network; it cannot be
downloaded here, so this runs the same protocol on scikit-learn's bundled 8x8 digits with
the Omniglot rotation trick (40 classes; 24 / 8 / 8 train / val / test classes, split by
digit: test episodes ask about digits never seen in any rotation). Every method has the
same network (``BayesianClassifier``: an MLP 64-64-64-5 by default, every weight a latent
site), the same meta-batch (10 episodes), Adam 1e-3, the same iterations, seeds and
episodes; BMAML and EMAML have M particles (default 5), MAML one. Adaptation steps are the
CLI's classification defaults (picked on the validation classes, see
``pyro_bmaml.cli.ClassificationFamily``): BMAML one SVGD step of 0.5 / K on the log joint (summed over the points),
EMAML 0.4 and MAML 1.0 on the mean cross-entropy (one step each). Scores on 600 test
episodes (15 query images per class): accuracy (95% CI), mixture NLL, Brier, top-label ECE
and MCE (15 bins, pooled over episodes), and predictive entropy on right and wrong answers;
learning curves on 200 validation episodes. Writes ``OUT.md``, ``OUT.json``,
``OUT.runs.jsonl``, ``OUT_curves.png`` and ``OUT_reliability.png``.

    python examples/fewshot_classification.py --iterations 2000 --seeds 0 1 2 --update-results

By default the output goes to ``runs/fewshot`` (a scratch folder).
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
from pyro_bmaml.evaluation.metrics import classification_metrics
from pyro_bmaml.meta.training import evaluate

METRICS = ("accuracy", "nll", "brier", "ece", "mce", "entropy_correct", "entropy_wrong")


def run_one(job):
    torch.set_num_threads(1)
    method, shots, seed, args = job
    config = resolve_config({
        "task": f"digits-5way-{shots}shot", "method": method, "particles": args["particles"],
        "ways": 5, "shots": shots, "query": 15, "network": args["network"],
        "shared": args["shared"], "shared_step_size": args.get("shared_step_size"),
        "hidden": args["hidden"], "inner_steps": 1,
        "leader_steps": 1, "seed": seed,
        "learn_step_size": True if method == "bmaml" and args.get("bmaml_learn_step_size") else None,
        "calibration": args.get("bmaml_calibration") if method == "bmaml" else None,
        "objective": args.get("bmaml_objective") if method == "bmaml" else None,
        "learn_predictive_temperature": True if args.get("learn_predictive_temperature") else None})
    pyro.set_rng_seed(seed)
    learner = build_learner(config)
    source, tasks, _ = task_sources(config, learner)
    val = source.evaluation_tasks(args["val_episodes"], seed=777, split="val")
    test = source.evaluation_tasks(args["test_episodes"], seed=12345, split="test")
    row = {"method": method, "K": shots, "seed": seed, "M": learner.num_particles,
           "step_size": learner.step_size, "objective": learner.objective, "calibration": learner.calibration,
           "shared": args["shared"], "shared_step_size": learner.shared_step_size}
    t0 = time.time()
    try:
        history = learner.fit(tasks, args["iterations"], meta_batch_size=10, seed=seed,
                              schedule_iterations=args["schedule_iterations"], progress=False,
                              eval_tasks=val, eval_every=args["eval_every"])
    except FloatingPointError as err:
        return row | {"error": str(err), "seconds": time.time() - t0}
    # the paper's protocol: scored after the n steps meta-trained through
    metrics = evaluate(learner, test, num_steps=learner.inner_steps, metrics=classification_metrics)
    if "adapt_steps" in history:  # and after the count fit chose (training classes' episodes)
        chosen = (metrics if learner.adapt_steps == learner.inner_steps
                  else evaluate(learner, test, metrics=classification_metrics))
        row["adapt_steps"] = learner.adapt_steps
        row["selected_on"] = "val"  # the source's validation classes (fit, since stop 34)
        row["chosen"] = {k: chosen[k][0] for k in ("accuracy", "nll", "ece")}
    if learner.learned_step_sizes():
        row["learned_steps"] = learner.learned_step_sizes()
    if learner.log_predictive_temperature.numel():
        row["predictive_temperature"] = learner.predictive_temperature
    row.update({k: metrics[k][0] for k in METRICS})
    row["accuracy_ci95"] = metrics["accuracy_ci95"]
    row["reliability"] = {k: v.tolist() for k, v in metrics["reliability"].items()}
    row["curve"] = [{"iteration": e["iteration"], **{k: e[k][0] for k in ("accuracy", "nll", "ece")}}
                    for e in history["eval"]]
    row["seconds"] = time.time() - t0
    return row




def body_label(row) -> str:
    """How the network's hidden layers are treated in a run (see the table's caption)."""
    if row.get("shared", "none") == "none":
        return "latent"
    alpha = row.get("shared_step_size")
    return "shared" + (f", adapted alpha={alpha:g}" if alpha else ", not adapted")


def write_outputs(out: Path, budget: dict, rows: list):
    from pyro_bmaml.evaluation import plots

    groups = {}
    for r in rows:
        groups.setdefault((r["K"], body_label(r), r["method"]), []).append(r)
    table = []
    for (k, body, method), rs in sorted(groups.items()):
        ok = [r for r in rs if "error" not in r]
        learned = any(r.get("learned_steps") for r in rs)
        entry = {"K": k, "method": method, "body": body, "M": rs[0]["M"],
                 "step_size": rs[0]["step_size"], "learned": learned, "seeds": len(rs),
                 "diverged": len(rs) - len(ok)}
        for key in METRICS + ("accuracy_ci95",):
            entry[key] = mean_se([r[key] for r in ok]) if ok else [float("nan"), None]
        table.append(entry)
    save_json(out, budget, table, rows)
    se_note = seed_note(rows)
    lines = [f"Budget: {json.dumps(budget)}", "",
             f"Digits 5-way, {budget['test_episodes']} test episodes of unseen classes per "
             f"seed ({se_note}). Accuracy of the particle mixture; CI95 = each seed's 95% "
             "interval half-width over episodes (mean over seeds); NLL = mixture negative log "
             "likelihood per query point; Brier per point; ECE / MCE top-label, 15 bins, pooled "
             "over the episodes; H right / wrong = mean predictive entropy (nats) on correctly "
             "/ wrongly classified points. Chance accuracy is 0.2 (NLL 1.609). Body: the "
             "hidden layers are latent (particles over every weight), or shared by the "
             "particles and meta-learned (particles over the head only, the paper's "
             "miniImageNet setup), and then adapted per task by a gradient step of size alpha "
             "or not." + (" Every learner meta-learns its predictive temperature, refitted by "
                          "fit's step-count selection for the count it chose: the n-step "
                          "columns use that count's temperature too."
                          if budget.get("learn_predictive_temperature") else ""), "",
             "| K | body | method | M | step | accuracy | CI95 | NLL | Brier | ECE | MCE | "
             "H right | H wrong | diverged |", "|---" * 14 + "|"]
    for e in table:
        lines.append(
            f"| {e['K']} | {e['body']} | {e['method']} | {e['M']} | "
            f"{'learned from ' if e.get('learned') else ''}{e['step_size']:g} | "
            f"{fmt(e['accuracy'])} | "
            f"{e['accuracy_ci95'][0]:.3f} | {fmt(e['nll'])} | {fmt(e['brier'])} | "
            f"{fmt(e['ece'])} | {fmt(e['mce'])} | {fmt(e['entropy_correct'])} | "
            f"{fmt(e['entropy_wrong'])} | {e['diverged']}/{e['seeds']} |")
    lines += ["", "BMAML minus each baseline, paired by seed (the same class split, episodes and "
              "network per seed): mean +- s.e. over the seeds both ran, and the seeds on which "
              "BMAML is better (higher accuracy, lower NLL and ECE).", "",
              "| K | body | vs | seeds | accuracy | NLL | ECE |", "|---" * 7 + "|"]
    for k, body in sorted({(r["K"], body_label(r)) for r in rows}):
        for other in ("emaml", "maml"):
            cells, count = [], 0
            for key, sign in (("accuracy", 1), ("nll", -1), ("ece", -1)):
                diffs = []
                for seed in sorted({r["seed"] for r in rows}):
                    pick = {r["method"]: r for r in rows if "error" not in r and r["K"] == k
                            and body_label(r) == body and r["seed"] == seed}
                    if "bmaml" in pick and other in pick:
                        diffs.append(pick["bmaml"][key] - pick[other][key])
                if not diffs:
                    break
                better = sum(1 for d in diffs if sign * d > 0)
                cells.append(f"{fmt(mean_se(diffs))} ({better}/{len(diffs)})")
                count = len(diffs)
            if cells:
                lines.append(f"| {k} | {body} | {other} | {count} | " + " | ".join(cells) + " |")
    chosen = [e for e in table if any("chosen" in r for r in groups[(e["K"], e["body"], e["method"])])]
    if chosen:
        where = ("1,000 episodes of the validation classes" if all(
            r.get("selected_on") == "val" for r in rows if "chosen" in r)
            else "1,000 fresh episodes of the training classes")
        lines += ["", "At the adaptation step count `fit` chose after training (the query NLL of "
                  f"{where}; each seed's count listed), "
                  "instead of the n steps meta-trained through:", "",
                  "| K | body | method | chosen steps | accuracy | NLL | ECE |", "|---" * 7 + "|"]
        for e in chosen:
            runs = sorted((r for r in groups[(e["K"], e["body"], e["method"])] if "chosen" in r),
                          key=lambda r: r["seed"])
            cells = [fmt(mean_se([r["chosen"][key] for r in runs])) for key in ("accuracy", "nll", "ece")]
            lines.append(f"| {e['K']} | {e['body']} | {e['method']} | "
                         f"{'/'.join(str(r['adapt_steps']) for r in runs)} | " + " | ".join(cells) + " |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))

    bodies = sorted({body_label(r) for r in rows})
    variants = [((body, method), method.upper() + (f" ({body})" if len(bodies) > 1 else ""))
                for body in bodies for method in sorted({r["method"] for r in rows})]
    curves, panels = {}, {}
    for key in ("accuracy", "ece"):
        for k in sorted({r["K"] for r in rows}):
            panel = {}
            for variant, label in variants:
                runs = [r for r in rows if (r["K"], body_label(r), r["method"]) == (k, *variant)
                        and r.get("curve")]
                if not runs:
                    continue
                its = [c["iteration"] for c in runs[0]["curve"]]
                stats = [mean_se([r["curve"][i][key] for r in runs]) for i in range(len(its))]
                panel[label] = (its, [s[0] for s in stats], [s[1] or 0.0 for s in stats])
            curves[f"{key} (validation), 5-way {k}-shot"] = panel
    plots.plot_curve_panels(curves, out.parent / f"{out.name}_curves.png", "meta-iteration")
    for k in sorted({r["K"] for r in rows}):
        for variant, label in variants:
            runs = [r for r in rows if (r["K"], body_label(r), r["method"]) == (k, *variant)
                    and "reliability" in r]
            if runs:  # pool the seeds' bins: counts add, accuracies and confidences weigh by count
                count = torch.tensor([r["reliability"]["count"] for r in runs], dtype=torch.float64)
                pooled = {"count": count.sum(0)}
                for name in ("confidence", "accuracy"):
                    v = torch.tensor([r["reliability"][name] for r in runs], dtype=torch.float64)
                    pooled[name] = (v.nan_to_num() * count).sum(0) / count.sum(0)
                panels.setdefault(f"5-way {k}-shot (test, seeds pooled)", {})[label] = pooled
    plots.plot_confidence_panels(panels, out.parent / f"{out.name}_reliability.png")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--iterations", type=int, default=500)
    p.add_argument("--schedule-iterations", type=int, default=100_000,
                   help="nominal budget of the x0.98 learning-rate decay")
    p.add_argument("--eval-every", type=int, default=None, help="default: iterations / 8")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--shots", type=int, nargs="+", default=[1, 5])
    p.add_argument("--particles", type=int, default=5)
    p.add_argument("--network", choices=("mlp", "conv4"), default="mlp")
    p.add_argument("--shared", choices=("none", "features"), default="none")
    p.add_argument("--shared-step-size", type=float, default=None,
                   help="with --shared features: adapt the shared body per task with this step")
    p.add_argument("--hidden", type=int, nargs="+", default=None)
    p.add_argument("--test-episodes", type=int, default=600)
    p.add_argument("--val-episodes", type=int, default=200)
    p.add_argument("--bmaml-learn-step-size", action="store_true",
                   help="BMAML's per-site steps meta-learned (the library's default; the "
                        "digits configuration's step is fixed) from its fixed step")
    p.add_argument("--bmaml-calibration", choices=("none", "mixture"), default=None,
                   help="BMAML's calibration term (default: the digits configuration's, none; "
                        "'mixture': the query mixture NLL per point, the library's default "
                        "for a classifier)")
    p.add_argument("--bmaml-objective", choices=("chaser", "bfa"), default=None,
                   help="BMAML's meta-loss (default: the digits configuration's, the chaser; "
                        "'bfa': the query mixture NLL of the adapted particles)")
    p.add_argument("--learn-predictive-temperature", action="store_true",
                   help="every learner meta-learns the temperature of its predictive "
                        "(learn_predictive_temperature=True; default: off, as the records "
                        "were run)")
    add_comparison_arguments(p, "fewshot")
    args = p.parse_args()
    out = output_prefix(args, "fewshot")
    settings = {"iterations": args.iterations, "schedule_iterations": args.schedule_iterations,
                "eval_every": args.eval_every or max(1, args.iterations // 8),
                "particles": args.particles, "network": args.network, "shared": args.shared,
                "shared_step_size": args.shared_step_size, "hidden": args.hidden,
                "test_episodes": args.test_episodes,
                "val_episodes": args.val_episodes,
                "bmaml_learn_step_size": args.bmaml_learn_step_size,
                "bmaml_calibration": args.bmaml_calibration,
                "bmaml_objective": args.bmaml_objective}
    if args.learn_predictive_temperature:  # (absent when off: older records regenerate alike)
        settings["learn_predictive_temperature"] = True
    # how the body is treated is per run (the table's "body" column), not in the budget
    budget = {k: v for k, v in settings.items() if k not in ("shared", "shared_step_size")}
    budget |= {"meta_batch": 10, "lr": 1e-3, "seeds": args.seeds, "task": "digits"}
    if args.from_runs:
        write_outputs(out, budget, read_runs(args.from_runs))
        return
    cost = {"bmaml": 3, "emaml": 2, "maml": 1}
    jobs = sorted([(m, k, s, settings) for k in args.shots for m in args.methods for s in args.seeds],
                  key=lambda j: (j[2], -cost[j[0]], -j[1]))
    rows = run_jobs(run_one, jobs, args.workers, out.parent / f"{out.name}.runs.jsonl")
    write_outputs(out, budget, rows)


if __name__ == "__main__":
    main()
