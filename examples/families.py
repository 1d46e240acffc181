"""The families suite: every learner's defaults on five task families with exact references.

For each family of :mod:`pyro_bmaml.tasks.synthetic` (its Pyro model written as a user would,
broad priors), each learner built with its defaults and nothing else (``BMAML(model,
num_particles=10, example_args=...)``, the same with ``objective="bfa"``, ``EMAML(model,
num_particles=10, ...)``, ``MAML(model, ...)``), each Adam learning rate and seed:
meta-train ``--iterations`` on fresh tasks (meta-batch 10), then adapt to the held-out tasks
and score: mixture NLL per query point and the share of the gap between the broad-prior
reference and the Bayes-optimal one that it closes, MSE (regression) or accuracy, 50% / 90%
coverage (regression), ECE (classification), the learned noise sd, whether the run stopped
on a non-finite step, and the same scores of the learner *before* meta-training (its
initial particles adapted alike). On the regression families, NUTS under the exported
learned prior (``model_with_learned_prior(tasks=...)``, the empirical-Bayes Gaussian fitted to
500 of the family's tasks; the aggregate posterior and theta0's mixture beside it) of BMAML's
first seed is scored too. The
baselines keep their regression defaults (the papers' steps on the mean squared error); on
the N-way classification family they take their papers' classification steps (EMAML 0.4,
MAML 1.0 on the mean cross-entropy, the digits family's), since their regression steps do
not move a softmax classifier off chance.
Writes ``OUT.md``, ``OUT.json`` and ``OUT.runs.jsonl``.

    python examples/families.py --iterations 1000 --seeds 0 1 2 --update-results
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import pyro
import torch

from _runs import fmt, mean_se, output_prefix, read_runs, run_jobs, save_json
from pyro_bmaml import BMAML, EMAML, MAML
from pyro_bmaml.tasks.synthetic import FAMILIES, gap_closed

METHODS = ("bmaml", "bmaml-bfa", "emaml", "maml")
#: BMAML's settings the command line may give (recorded in the budget when given)
BMAML_OPTIONS = ("inner_steps", "step_size_objective", "calibration")


def build(method, family, seed, step_size_objective=None, inner_steps=None, calibration=None,
          temperature=False, learn_prior=None):
    """The learner with its defaults; BMAML's ``inner_steps`` and (chaser)
    ``step_size_objective`` and ``calibration`` as given, where given; ``temperature``: every
    learner meta-learns its predictive temperature (``learn_predictive_temperature``, on
    the classification families only); ``learn_prior``: BMAML (chaser and BFA) adapts under
    a meta-learned Gaussian prior of that form (the baselines' MSE / NLL steps have no
    prior to learn)."""
    pyro.set_rng_seed(seed)
    common = dict(example_args=family.example_args())
    if temperature and family.kind != "regression":
        common["learn_predictive_temperature"] = True
    steps = {} if inner_steps is None else {"inner_steps": inner_steps}
    if learn_prior is not None and method.startswith("bmaml"):
        steps["learn_prior"] = learn_prior
    if method == "bmaml":
        given = {k: v for k, v in (("step_size_objective", step_size_objective),
                                   ("calibration", calibration)) if v is not None}
        return BMAML(family.model, num_particles=10, **common, **given, **steps)
    if method == "bmaml-bfa":
        return BMAML(family.model, num_particles=10, objective="bfa", **common, **steps)
    # the baselines' classification steps are their papers' (the digits family's: EMAML
    # 0.4 and MAML 1.0 on the mean cross-entropy); their regression defaults are the papers'
    classify = {"step_size": 0.4 if method == "emaml" else 1.0} if family.kind == "classification" else {}
    if method == "emaml":
        return EMAML(family.model, num_particles=10, **common, **classify)
    return MAML(family.model, **common, **classify)


def scores(family, learner, tasks, refs):
    posterior = learner.adapt(tasks.x_support, tasks.y_support)
    m = family.metrics(posterior, tasks.x_query, tasks.y_query)
    out = {"nll": m["nll"][0], "gap_closed": gap_closed(m["nll"][0], refs["broad"], refs["true"])}
    if "mse" in m:
        out["mse"] = m["mse"][0]
    if "accuracy" in m:
        out["accuracy"] = m["accuracy"][0]
    if "coverage" in m:
        out["coverage_50"] = m["coverage"][0.5][0]
        out["coverage_90"] = m["coverage"][0.9][0]
    if "ece" in m:
        out["ece"] = m["ece"][0]
    sd = family.noise_sd(posterior)
    if sd is not None:
        out["noise_sd"] = sd
    return out


def nuts_scores(family, learner, tasks, num_tasks, samples, seed, form="empirical_bayes",
                prior_tasks=500):
    """Mean per-point NLL of NUTS under the exported learned prior on ``num_tasks`` tasks:
    ``form`` ``"empirical_bayes"`` (the default export: the Gaussian fitted to ``prior_tasks`` of the
    family's tasks, training draws, not the held-out ones), ``"kde"`` (the aggregate
    posterior over those tasks) or ``"theta0"`` (theta0's own mixture). With K = 3 points a
    task says little about its noise level: fitted to 200 tasks, the fitted spread of the
    log-precision, and with it the exact predictive under the fit, moved by up to 0.25 of
    the gap between fits with other importance draws (Normal-Gamma); ``prior_tasks``
    defaults to 500."""
    from pyro.infer import MCMC, NUTS

    if form in ("theta0", "learned"):  # theta0's mixture, or the prior learn_prior learned
        model = learner.model_with_learned_prior(form="kde" if form == "theta0" else form)
    else:
        prior_tasks = family.sample(prior_tasks, torch.Generator().manual_seed(seed + 1000))
        model = learner.model_with_learned_prior(tasks=prior_tasks, form=form)
    nll = []
    for t in range(num_tasks):
        pyro.set_rng_seed(seed + t)
        mcmc = MCMC(NUTS(model), num_samples=samples, warmup_steps=samples,
                    disable_progbar=True)
        mcmc.run(tasks.x_support[t], tasks.y_support[t])
        theta = mcmc.get_samples()["theta"]  # (S, D), unconstrained
        log_lik = learner.potential.log_likelihood(theta, tasks.x_query[t], tasks.y_query[t])
        nll.append(-(torch.logsumexp(log_lik, 0) - torch.log(torch.tensor(float(len(theta))))).mean())
    return float(torch.stack(nll).mean())


def run_one(job):
    torch.set_num_threads(1)
    name, method, lr, seed, args = job
    family = FAMILIES[name]()
    tasks = family.evaluation_tasks(args["eval_tasks"])
    refs = family.references(tasks)
    options = (method, family, seed, args.get("step_size_objective"), args.get("inner_steps"),
               args.get("calibration"), args.get("learn_predictive_temperature", False),
               args.get("learn_prior"))
    learner = build(*options)
    start = time.time()
    stopped = None
    try:
        learner.fit(family, args["iterations"], lr=lr, seed=seed, progress=False,
                    select_steps=not args.get("no_select_steps", False))
    except FloatingPointError as err:
        stopped = str(err).split(":")[0]  # "meta-iteration N"
    seconds = time.time() - start
    start_learner = build(*options)  # the same initial particles, adapted alike
    start_learner.adapt_steps = learner.adapt_steps
    row = {"family": name, "method": method, "lr": lr, "seed": seed, "stopped": stopped,
           "seconds": seconds, "refs": refs, "adapt_steps": learner.adapt_steps,
           "before": scores(family, start_learner, tasks, refs),
           "after": scores(family, learner, tasks, refs), "describe": learner.describe()}
    nuts = (args["nuts_tasks"] and method == "bmaml" and seed == args["seeds"][0]
            and lr == args["nuts_lr"] and family.kind == "regression" and stopped is None)
    if nuts and learner.learned_prior is not None:  # NUTS under the learned prior itself
        row["nuts_learned_nll"] = nuts_scores(family, learner, tasks, args["nuts_tasks"],
                                              args["nuts_samples"], seed, form="learned")
    elif nuts:
        row["nuts_nll"] = nuts_scores(family, learner, tasks, args["nuts_tasks"],
                                      args["nuts_samples"], seed, prior_tasks=args["prior_tasks"])
        row["nuts_kde_nll"] = nuts_scores(family, learner, tasks, args["nuts_tasks"],
                                          args["nuts_samples"], seed, form="kde",
                                          prior_tasks=args["prior_tasks"])
        row["nuts_theta0_nll"] = nuts_scores(family, learner, tasks, args["nuts_tasks"],
                                             args["nuts_samples"], seed, form="theta0")
    if nuts:
        sub = tasks[: args["nuts_tasks"]]
        row["nuts_refs"] = family.references(sub)
        row["nuts_adapted_nll"] = -float(learner.adapt(sub.x_support, sub.y_support)
                                         .log_predictive_density(sub.x_query, sub.y_query).mean())
    return row


def summarize(rows):
    table = []
    for name in FAMILIES:
        for method in METHODS:
            for lr in sorted({r["lr"] for r in rows}):
                group = [r for r in rows if (r["family"], r["method"], r["lr"]) == (name, method, lr)]
                if not group:
                    continue
                entry = {"family": name, "method": method, "lr": lr, "seeds": len(group),
                         "stopped": sum(r["stopped"] is not None for r in group),
                         "refs": group[0]["refs"]}
                for key in group[0]["after"]:
                    entry[key] = mean_se([r["after"][key] for r in group])
                    entry[f"{key}_before"] = mean_se([r["before"][key] for r in group])
                main = "mse" if "mse" in group[0]["after"] else "accuracy"
                better = [(r["after"]["nll"] < r["before"]["nll"])
                          and ((r["after"][main] < r["before"][main]) if main == "mse"
                               else (r["after"][main] > r["before"][main])) for r in group]
                entry["beats_start"] = sum(better)
                entry["adapt_steps"] = [r.get("adapt_steps") for r in sorted(group, key=lambda r: r["seed"])]
                nuts = [r for r in group if "nuts_nll" in r]
                if nuts:
                    n = nuts[0]
                    entry["nuts"] = {"nll": n["nuts_nll"], "adapted_nll": n["nuts_adapted_nll"],
                                     "theta0_nll": n.get("nuts_theta0_nll"),
                                     "kde_nll": n.get("nuts_kde_nll"),
                                     "refs": n["nuts_refs"],
                                     "gap_closed": gap_closed(n["nuts_nll"], n["nuts_refs"]["broad"],
                                                              n["nuts_refs"]["true"])}
                learned = [r for r in group if "nuts_learned_nll" in r]
                if learned:
                    n = learned[0]
                    entry["nuts_learned"] = {
                        "nll": n["nuts_learned_nll"], "adapted_nll": n["nuts_adapted_nll"],
                        "refs": n["nuts_refs"],
                        "gap_closed": gap_closed(n["nuts_learned_nll"], n["nuts_refs"]["broad"],
                                                 n["nuts_refs"]["true"])}
                table.append(entry)
    return table


def command_options(table, budget) -> str:
    """The command line's options that made ``table`` (those left at their defaults omitted)."""
    words = [f"--iterations {budget['iterations']}",
             "--seeds " + " ".join(map(str, budget["seeds"]))]
    families = [f for f in FAMILIES if any(e["family"] == f for e in table)]
    if families != list(FAMILIES):
        words.append("--families " + " ".join(families))
    methods = [m for m in METHODS if any(e["method"] == m for e in table)]
    if methods != list(METHODS):
        words.append("--methods " + " ".join(methods))
    if sorted(budget["lrs"]) != [1e-3, 1e-2, 5e-2]:
        words.append("--lrs " + " ".join(f"{lr:g}" for lr in budget["lrs"]))
    if not budget["nuts_tasks"]:
        words.append("--nuts-tasks 0")
    for key in BMAML_OPTIONS:
        if key in budget:
            words.append(f"--{key.replace('_', '-')} {budget[key]}")
    if budget.get("no_select_steps"):
        words.append("--no-select-steps")
    if budget.get("learn_predictive_temperature"):
        words.append("--learn-predictive-temperature")
    if budget.get("learn_prior"):
        words.append(f"--learn-prior {budget['learn_prior']}")
    return " ".join(words)


def markdown(table, budget, out=Path("results/families")):
    given = [f"{k}={budget[k]!r}" for k in BMAML_OPTIONS if k in budget]
    settings = f" (BMAML given {', '.join(given)})" if given else ""
    if budget.get("learn_predictive_temperature"):
        settings += (" plus a meta-learned predictive temperature on the classification "
                     "families (learn_predictive_temperature=True)")
    if budget.get("learn_prior"):
        settings += (f"; BMAML adapts under a meta-learned {budget['learn_prior']} Gaussian "
                     f"prior (learn_prior={budget['learn_prior']!r})")
    lines = [
        "# Families suite: defaults on five task families with exact references",
        "",
        f"`python examples/families.py {command_options(table, budget)} "
        f"{'--update-results' if Path(out) == Path('results/families') else f'--out {out}'}` "
        f"({budget['iterations']} meta-iterations on fresh tasks, meta-batch 10, Adam at each "
        f"lr with the x0.98 decay over the run, M = 10 (MAML 1), every learner with its "
        f"defaults{settings}, the baselines with their papers' classification steps on the "
        f"N-way family; {budget['eval_tasks']} held-out tasks; mean +- s.e. over seeds).",
        "",
        "Gap closed: (NLL of the broad-prior reference - NLL) / (broad - Bayes-optimal), per "
        "query point; 1 is Bayes-optimal, 0 is exact inference under a prior that knows "
        "nothing of the family. 'Stopped': runs that ended on a non-finite step. 'Steps': "
        "each seed's adaptation step count at test time (`fit` chooses it on held-out tasks "
        "of the source, `select_adapt_steps`; the training's own count "
        f"{'throughout' if budget.get('no_select_steps') else 'where none was chosen'}). 'Beats "
        "start': seeds whose NLL and MSE (accuracy) are both better than the same initial "
        "particles adapted alike (the same step count) before meta-training.",
        "",
    ]
    for name in FAMILIES:
        rows = [e for e in table if e["family"] == name]
        if not rows:
            continue
        refs = rows[0]["refs"]
        regression = "mse" in rows[0]
        main = "mse" if regression else "accuracy"
        lines += [f"## {name}", "",
                  f"References (NLL per point): Bayes-optimal {refs['true']:.3f}, broad prior "
                  f"{refs['broad']:.3f}.", ""]
        head = ["method", "lr", "stopped", "steps", "NLL", "gap closed", main, f"{main} before"]
        extra = (["cov 50%", "cov 90%"] if "coverage_90" in rows[0] else []) + (
            ["ECE"] if "ece" in rows[0] else []) + (["noise sd"] if "noise_sd" in rows[0] else [])
        head += extra + ["beats start"]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for e in rows:
            steps = "/".join("?" if n is None else str(n) for n in e.get("adapt_steps", [None]))
            cells = [e["method"], f"{e['lr']:g}", f"{e['stopped']}/{e['seeds']}", steps, fmt(e["nll"]),
                     fmt(e["gap_closed"], 2), fmt(e[main]), fmt(e[f"{main}_before"])]
            for key in ("coverage_50", "coverage_90", "ece", "noise_sd"):
                if key in e:
                    cells.append(fmt(e[key]))
            cells.append(f"{e['beats_start']}/{e['seeds']}")
            lines.append("| " + " | ".join(cells) + " |")
        nuts = [e for e in rows if "nuts" in e]
        for e in nuts:
            n = e["nuts"]
            def other(key, what):
                if n.get(key) is None:
                    return ""
                return (f"; under {what} instead {n[key]:.3f} (gap closed "
                        f"{gap_closed(n[key], n['refs']['broad'], n['refs']['true']):.2f})")

            theta0 = (other("kde_nll", "the aggregate posterior (the adapted particles pooled)")
                      + other("theta0_nll", "theta0's own mixture"))
            lines += ["", f"NUTS under BMAML's exported prior, the empirical-Bayes Gaussian "
                      f"fitted to {budget.get('prior_tasks', 200)} of the family's tasks (lr {e['lr']:g}, first seed, "
                      f"{budget['nuts_tasks']} held-out tasks, {budget['nuts_samples']} "
                      f"draws after as many warmup steps): NLL {n['nll']:.3f} (gap closed "
                      f"{n['gap_closed']:.2f}; Bayes-optimal / broad on those tasks "
                      f"{n['refs']['true']:.3f} / {n['refs']['broad']:.3f}){theta0}; BMAML's own "
                      f"adapted particles there {n['adapted_nll']:.3f}."]
        for e in [e for e in rows if "nuts_learned" in e]:
            n = e["nuts_learned"]
            lines += ["", f"NUTS under BMAML's learned prior (learn_prior, its Gaussian as "
                      f"learned: no fit to tasks; lr {e['lr']:g}, first seed, "
                      f"{budget['nuts_tasks']} held-out tasks, {budget['nuts_samples']} draws "
                      f"after as many warmup steps): NLL {n['nll']:.3f} (gap closed "
                      f"{n['gap_closed']:.2f}; Bayes-optimal / broad on those tasks "
                      f"{n['refs']['true']:.3f} / {n['refs']['broad']:.3f}); BMAML's own "
                      f"adapted particles there {n['adapted_nll']:.3f}."]
        lines.append("")
    return "\n".join(lines) + "\n"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--lrs", nargs="+", type=float, default=[1e-3, 1e-2, 5e-2])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--iterations", type=int, default=1000)
    p.add_argument("--eval-tasks", type=int, default=200)
    p.add_argument("--nuts-tasks", type=int, default=40)
    p.add_argument("--nuts-samples", type=int, default=200)
    p.add_argument("--prior-tasks", type=int, default=500,
                   help="tasks the exported prior is fitted to")
    p.add_argument("--nuts-lr", type=float, default=5e-2)
    p.add_argument("--step-size-objective", choices=("chaser", "query_nll"), default=None,
                   help="what trains BMAML's (chaser) learned steps (default: the learner's)")
    p.add_argument("--inner-steps", type=int, default=None,
                   help="BMAML's (chaser and BFA) SVGD steps (default: the learner's)")
    p.add_argument("--calibration", choices=("noise_offset", "mixture", "none"), default=None,
                   help="BMAML's (chaser) calibration term (default: the learner's)")
    p.add_argument("--no-select-steps", action="store_true",
                   help="every learner adapts with its training's step count (fit(..., "
                        "select_steps=False)) instead of the count fit chooses on held-out tasks")
    p.add_argument("--learn-predictive-temperature", action="store_true",
                   help="every learner meta-learns its predictive temperature on the "
                        "classification families (learn_predictive_temperature=True)")
    p.add_argument("--learn-prior", choices=("diagonal", "full"), default=None,
                   help="BMAML (chaser and BFA) adapts under a meta-learned Gaussian prior "
                        "(learn_prior=...) instead of the model's")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--from-runs", type=Path, nargs="+", default=None)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--update-results", action="store_true")
    args = p.parse_args()
    out = output_prefix(args, "families")
    budget = {"iterations": args.iterations, "seeds": args.seeds, "lrs": args.lrs,
              "eval_tasks": args.eval_tasks, "nuts_tasks": args.nuts_tasks,
              "nuts_samples": args.nuts_samples, "prior_tasks": args.prior_tasks,
              "meta_batch": 10, "particles": 10}
    for key in BMAML_OPTIONS:
        if getattr(args, key) is not None:
            budget[key] = getattr(args, key)
    if args.no_select_steps:
        budget["no_select_steps"] = True
    if args.learn_predictive_temperature:
        budget["learn_predictive_temperature"] = True
    if args.learn_prior:
        budget["learn_prior"] = args.learn_prior
    if args.from_runs:
        rows = read_runs(args.from_runs)
    else:
        shared = {k: v for k, v in vars(args).items() if not isinstance(v, Path)}
        jobs = [(f, m, lr, s, shared) for s in args.seeds for f in args.families
                for m in args.methods for lr in args.lrs]
        rows = run_jobs(run_one, jobs, args.workers, out.with_suffix(".runs.jsonl"))
    table = summarize(rows)
    save_json(out, budget, table, rows)
    out.with_suffix(".md").write_text(markdown(table, budget, out))
    print(out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
