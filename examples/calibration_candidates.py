"""Side-by-side comparison of the ways to meta-learn BMAML's noise level (calibration).

Sinusoid (official ranges), |T| = 100, M = 10, the paper's network and step (1-40-40-40-1,
eps = 1e-3, n = s = 1), Adam 1e-3 with the official schedule (decay over a nominal 100k),
meta-batch 10; the same seed, task pool and initial particles for every candidate.
Held-out metrics on 100 noise-free evaluation tasks (see ``sinusoid_regression.py``):
MSE of the particle mean, mixture NLL per query point, coverage of the central 50% / 90%
predictive intervals and the 90% interval's width. The faithful EMAML and MAML baselines run
alongside for the NLL target.

    python examples/calibration_candidates.py --iterations 2000 --shots 10 5 --update-results

Output: ``runs/calibration.{md,json,runs.jsonl}`` (``results/`` with ``--update-results``).
"""

from __future__ import annotations

import argparse
import json
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import pyro
import torch

from pyro_bmaml import BMAML, EMAML, MAML, BayesianMLP, Sinusoid
from pyro_bmaml.meta.training import evaluate

#: name -> (class, keyword arguments, what it is)
CANDIDATES = {
    "none": (BMAML, {"calibration": "none"},
             "official code: noise out of the chaser distance, nothing calibrates it"),
    "noise_offset": (BMAML, {},
                     "meta-learned offset of the adapted noise, query NLL (library default)"),
    "noise_offset+noise_step": (BMAML, {"noise_step_size": 3e-3},
                                "the offset, and a 3x SVGD step on the noise precision "
                                "(task-adaptive noise; the CLI's sinusoid default)"),
    "noise_offset, frozen initial noise": (
        BMAML, {"chaser_trains_noise": False},
        "the offset; the chaser loss does not reach theta0's noise coordinates"),
    "noise_offset+noise_step, frozen initial noise": (
        BMAML, {"chaser_trains_noise": False, "noise_step_size": 3e-3}, "both of the above"),
    "noise_offset per particle": (BMAML, {"offset_per_particle": True},
                                  "one meta-learned offset per particle"),
    "initial_noise": (BMAML, {"calibration": "initial_noise"},
                      "query NLL on theta0's noise coordinates, first order"),
    "distance": (BMAML, {"calibration": "distance", "calibration_weight": 1.0},
                 "noise in the chaser distance, weight 1"),
    "mixture": (BMAML, {"calibration": "mixture", "calibration_weight": 0.01},
                "chaser + 0.01 x BFA (query NLL), full gradient"),
    "emaml": (EMAML, {}, "faithful EMAML (inner step 1e-3 on the MSE) + noise offset"),
    "maml": (MAML, {}, "faithful MAML (Finn's 0.01 on the MSE) + noise offset"),
}


def run_one(job):
    torch.set_num_threads(1)
    name, k, iterations, seed = job
    cls, kwargs, _ = CANDIDATES[name]
    pyro.set_rng_seed(seed)
    learner = cls(BayesianMLP(), init="paper", **kwargs)
    tasks = Sinusoid("bmaml", 100, k, seed=seed)
    row = {"name": name, "K": k, "seed": seed, "iterations": iterations}
    t0 = time.time()
    try:
        learner.fit(tasks, iterations, schedule_iterations=100_000, seed=seed, progress=False)
    except FloatingPointError as err:
        return row | {"error": str(err)}
    m = evaluate(learner, tasks.evaluation_tasks(100), closed_form=True)
    return row | {"mse": m["mse"][0], "mse_particles": m["mse_particles"][0], "nll": m["nll"][0],
                  "c50": m["coverage"][0.5][0], "c90": m["coverage"][0.9][0],
                  "w90": m["width"][0.9][0], "seconds": time.time() - t0}


def write(out: Path, rows: list, iterations: int):
    rows = sorted(rows, key=lambda r: (-r["K"], list(CANDIDATES).index(r["name"]), r["seed"]))
    out.with_suffix(".json").write_text(json.dumps(rows, indent=2))
    lines = [f"Sinusoid, |T| = 100, M = 10, {iterations} meta-iterations (lr schedule over a "
             "nominal 100k), seed(s) " + ", ".join(sorted({str(r['seed']) for r in rows})) +
             "; held-out: 100 noise-free tasks. Targets: coverage 50% in [0.43, 0.57], 90% in "
             "[0.85, 0.95], NLL below EMAML's, MSE within 5% of 'none'.", "",
             "| K | candidate | MSE | NLL | cov. 50% | cov. 90% | width 90% | what it is |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        what = CANDIDATES[r["name"]][2]
        if "error" in r:
            lines.append(f"| {r['K']} | {r['name']} | diverged: {r['error']} | | | | | {what} |")
            continue
        lines.append(f"| {r['K']} | {r['name']} | {r['mse']:.3f} | {r['nll']:.3f} | "
                     f"{r['c50']:.3f} | {r['c90']:.3f} | {r['w90']:.2f} | {what} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--iterations", type=int, default=2000)
    p.add_argument("--shots", type=int, nargs="+", default=[10, 5])
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--candidates", nargs="+", default=list(CANDIDATES), choices=list(CANDIDATES))
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--from-runs", type=Path, default=None,
                   help="write the table from a logged *.runs.jsonl instead of training")
    p.add_argument("--update-results", action="store_true")
    args = p.parse_args()
    out = Path("results/calibration" if args.update_results else "runs/calibration")
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.from_runs:
        write(out, [json.loads(l) for l in args.from_runs.read_text().splitlines()], args.iterations)
        return
    jobs = [(n, k, args.iterations, s) for k in args.shots for n in args.candidates
            for s in args.seeds]
    rows = []
    with ProcessPoolExecutor(args.workers) as pool, \
            (out.parent / f"{out.name}.runs.jsonl").open("w") as log:
        for fut in as_completed([pool.submit(run_one, j) for j in jobs]):
            rows.append(fut.result())
            log.write(json.dumps(rows[-1]) + "\n")
            log.flush()
            print(json.dumps(rows[-1]), flush=True)
    write(out, rows, args.iterations)


if __name__ == "__main__":
    main()
