"""Helpers shared by the reproduction scripts: mean and s.e. over seeds, table cells, and a
process pool that logs each finished run at once (one JSON line per run)."""

from __future__ import annotations

import argparse
import json
import math
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import torch


def mean_se(values):
    """``[mean, s.e.]`` over seeds (s.e. ``None`` for one seed: tables print no +-)."""
    vals = torch.tensor(values, dtype=torch.float64)
    se = vals.std().item() / math.sqrt(len(vals)) if len(vals) > 1 else None
    return [vals.mean().item(), se]


def fmt(pair, digits=3):
    mean, se = pair
    return f"{mean:.{digits}f}" if se is None else f"{mean:.{digits}f} +- {se:.{digits}f}"


def read_runs(paths):
    """The rows of logged runs (``*.runs.jsonl``)."""
    return [json.loads(line) for f in paths for line in Path(f).read_text().splitlines()]


def run_jobs(run_one, jobs, workers: int, log: Path) -> list:
    """Run ``run_one(job)`` for every job in ``workers`` processes, in the order given (put
    whole seeds first: a run cut short then leaves whole seeds of every method), writing each
    finished row to ``log`` at once; returns the rows."""
    rows = []
    with ProcessPoolExecutor(workers) as pool, log.open("w") as f:
        for fut in as_completed([pool.submit(run_one, j) for j in jobs]):
            row = fut.result()
            rows.append(row)
            f.write(json.dumps(row) + "\n")
            f.flush()
            print(json.dumps({k: v for k, v in row.items() if k not in ("curve", "reliability")}),
                  flush=True)
    return rows


def save_json(out: Path, budget: dict, table: list, rows: list) -> None:
    """``OUT.json``: the budget, the summary table and every run."""
    out.with_suffix(".json").write_text(json.dumps({"budget": budget, "table": table,
                                                    "runs": rows}, indent=2))


def seed_note(rows) -> str:
    """How the table's +- reads: over seeds, or none for one seed."""
    return ("mean +- s.e. over seeds" if len({r["seed"] for r in rows}) > 1
            else "one seed: no s.e.")


def add_comparison_arguments(parser: argparse.ArgumentParser, name: str,
                             extra_methods: tuple = ()) -> None:
    """The options every method-comparison script shares: ``--methods`` (BMAML, EMAML, MAML
    by default; ``extra_methods`` the script also knows), ``--workers``, ``--from-runs``
    (rebuild the outputs from logged runs), ``--out`` and ``--update-results`` (see
    :func:`output_prefix`)."""
    parser.add_argument("--methods", nargs="+", default=["bmaml", "emaml", "maml"],
                        choices=["bmaml", "emaml", "maml", *extra_methods])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--from-runs", type=Path, nargs="+", default=None,
                        help="build the tables and figures from logged runs (*.runs.jsonl)")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"output prefix (default: runs/{name}, or results/{name} with "
                             "--update-results)")
    parser.add_argument("--update-results", action="store_true",
                        help="write into results/ (the committed results)")


def output_prefix(args, name: str) -> Path:
    """``--out``, else ``results/NAME`` with ``--update-results``, else ``runs/NAME`` (a
    scratch folder); its folder is created."""
    out = args.out or Path(f"results/{name}" if args.update_results else f"runs/{name}")
    out.parent.mkdir(parents=True, exist_ok=True)
    return out
