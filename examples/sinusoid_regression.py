"""Side-by-side reproduction of the paper's sinusoid experiment: BMAML vs EMAML vs MAML.

Same seeds, budget, network (1-40-40-40-1), step size and task pools for every method.
Writes a markdown and a JSON table of the test MSE of the particle-mean prediction and the
mixture NLL (mean +- s.e. over seeds; each seed's value is a mean over the evaluation tasks).

    python examples/sinusoid_regression.py --iterations 1000 --seeds 0 1 2 --out results/sinusoid
"""

from __future__ import annotations

import argparse
import json
import math
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import pyro
import torch

from pyro_bmaml.cli import build_learner
from pyro_bmaml.tasks import Sinusoid
from pyro_bmaml.training import evaluate


def run_one(job):
    torch.set_num_threads(1)
    method, m, k, num_tasks, seed, iterations, eval_tasks = job
    config = {"method": method, "objective": "chaser", "particles": m, "hidden": [40, 40, 40],
              "step_size": 1e-3, "inner_steps": 1, "leader_steps": 1}
    pyro.set_rng_seed(seed)
    learner = build_learner(config)
    tasks = Sinusoid("bmaml", num_tasks, k, seed=seed)
    t0 = time.time()
    try:
        learner.fit(tasks, iterations, meta_batch_size=10, seed=seed, progress=False)
    except FloatingPointError as err:  # report a diverged run instead of losing the table
        return {"method": method, "M": m if method != "maml" else 1, "K": k, "T": num_tasks,
                "seed": seed, "mse": float("nan"), "nll": float("nan"), "error": str(err),
                "seconds": time.time() - t0}
    metrics = evaluate(learner, tasks.evaluation_tasks(eval_tasks))
    return {"method": method, "M": m if method != "maml" else 1, "K": k, "T": num_tasks,
            "seed": seed, "mse": metrics["mse"][0], "nll": metrics["nll"][0],
            "seconds": time.time() - t0}


def summarize(rows):
    groups = {}
    for r in rows:
        groups.setdefault((r["K"], r["T"], r["method"], r["M"]), []).append(r)
    table = []
    for (k, t, method, m), rs in sorted(groups.items()):
        entry = {"K": k, "T": t, "method": method, "M": m, "seeds": len(rs)}
        entry["diverged"] = sum("error" in r for r in rs)
        for key in ("mse", "nll"):
            vals = torch.tensor([r[key] for r in rs if "error" not in r], dtype=torch.float64)
            se = vals.std().item() / math.sqrt(len(vals)) if len(vals) > 1 else float("nan")
            entry[key] = [vals.mean().item(), se]
        table.append(entry)
    return table


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--iterations", type=int, default=1000)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--shots", type=int, nargs="+", default=[5, 10])
    p.add_argument("--num-tasks", type=int, nargs="+", default=[100, 1000])
    p.add_argument("--particles", type=int, nargs="+", default=[10])
    p.add_argument("--eval-tasks", type=int, default=100)
    p.add_argument("--methods", nargs="+", default=["bmaml", "emaml", "maml"],
                   choices=["bmaml", "emaml", "maml"])
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--from-runs", type=Path, nargs="+", default=None,
                   help="build the table from logged runs (*.runs.jsonl) instead of training")
    p.add_argument("--out", type=Path, default=Path("results/sinusoid"))
    args = p.parse_args()
    jobs = [(method, m, k, t, s, args.iterations, args.eval_tasks)
            for k in args.shots for t in args.num_tasks for m in args.particles
            for method in args.methods for s in args.seeds]
    jobs = list(dict.fromkeys(j if j[0] != "maml" else ("maml", 1) + j[2:] for j in jobs))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if args.from_runs:
        rows = [json.loads(line) for f in args.from_runs for line in f.read_text().splitlines()]
        write_tables(args, rows)
        return
    log = args.out.with_suffix(".runs.jsonl")
    rows = []
    with ProcessPoolExecutor(args.workers) as pool, log.open("w") as f:
        # biggest jobs first; each finished run is logged at once, so partial results survive
        futures = [pool.submit(run_one, j) for j in sorted(jobs, key=lambda j: -j[1])]
        for fut in as_completed(futures):
            row = fut.result()
            rows.append(row)
            f.write(json.dumps(row) + "\n")
            f.flush()
            print(json.dumps(row), flush=True)
    write_tables(args, rows)


def write_tables(args, rows):
    table = summarize(rows)
    budget = {"iterations": args.iterations, "meta_batch": 10, "lr": 1e-3, "step_size": 1e-3,
              "network": "1-40-40-40-1", "seeds": sorted({r["seed"] for r in rows}),
              "eval_tasks": args.eval_tasks}
    args.out.with_suffix(".json").write_text(json.dumps({"budget": budget, "table": table,
                                                         "runs": rows}, indent=2))
    lines = [f"Budget: {json.dumps(budget)}", "",
             "| K | T | method | M | test MSE (mean +- s.e. over seeds) | mixture NLL | diverged |",
             "|---|---|---|---|---|---|---|"]
    for e in table:
        lines.append(f"| {e['K']} | {e['T']} | {e['method']} | {e['M']} | "
                     f"{e['mse'][0]:.3f} +- {e['mse'][1]:.3f} | {e['nll'][0]:.3f} +- {e['nll'][1]:.3f} "
                     f"| {e['diverged']}/{e['seeds']} |")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
