"""Time of one BMAML meta-step (meta-loss + backward) against baselines that live in this repo.

(a) The paper's sinusoid configuration (M = 10 particles, T = 10 tasks, K = 10, 1-40-40-40-1
    Bayesian MLP, D = 3403, chaser n = s = 1): BMAML (chaser only, the floor's math) with the
    recorded graph simplified (the default), replayed as recorded, and the traced path
    (``capture=False``), the default BMAML (with its noise calibration term),
    EMAML, MAML, a python loop over tasks and particles (the public ports' style), the
    SVGD steps compiled (``BMAML(compile=True)``, :mod:`pyro_bmaml.engine.compiled`; its
    compile time and the meta-steps that pay it back), and the
    hand-batched pure-torch floor (``floor.py``, same meta-gradient, checked). Ratios are
    divided by the floor, measured in this process, variants interleaved round by round.
(b) Scaling of the BMAML meta-step against tasks T, particles M, support size K and the
    dimension D (hidden width), time and ratio to the floor, eager and with the steps
    compiled (and each configuration's compile time), and peak memory (CUDA: the
    allocator's peak; CPU: the peak resident set of a fresh process running the config,
    minus that of one running the smallest config; and, eager and compiled alike, one
    meta-step's working memory: the peak during a second meta-step above the resident set
    before it, the first having recorded, and compiled, the graphs).
(c) 1 vs 2 processes on torch.distributed (gloo on the CPU, one thread each): time per
    meta-iteration of ``fit`` with the same total meta-batch of 10 tasks, against one process
    with 1 and with 2 threads.
(d) Where the time goes: ATen calls per meta-step (floor, traced path, fast path), and the
    potential alone against the floor's log density (second order), with a forward pass
    traced vs replayed.

Run: ``python benchmarks/meta_step.py [--quick] [--device cuda] [--update-results]``; the
numbers go to ``runs/benchmarks/`` (``results/`` with ``--update-results``) as JSON. No figure quoted from elsewhere enters a ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Optional
from pathlib import Path

import pyro
import torch
from _timing import median_time
from svgd_engine import loop_svgd_step

import floor
from pyro_bmaml.meta.learners import BMAML, EMAML, MAML
from pyro_bmaml.tasks.models import BayesianMLP
from pyro_bmaml.tasks.base import Sinusoid

HERE = Path(__file__).resolve().parent


def loop_meta_loss(learner, batch):
    """BMAML's chaser loss with python loops over tasks and particles (same math)."""
    losses = []
    for t in range(batch.num_tasks):
        chaser = loop_svgd_step(learner.potential, learner.kernel, learner.theta0,
                                batch.x_support[t], batch.y_support[t], learner.step_sizes)
        xa = torch.cat([batch.x_support[t], batch.x_query[t]])
        ya = torch.cat([batch.y_support[t], batch.y_query[t]])
        leader = loop_svgd_step(learner.potential, learner.kernel, chaser.detach().requires_grad_(),
                                xa, ya, learner.step_sizes).detach()
        losses.append(((chaser - leader).pow(2) * learner.distance_weights).sum())
    return torch.stack(losses).mean()


def make(hidden=(40, 40, 40), particles=10, tasks=10, shots=10, device="cpu", calibration="none",
         compile=False):
    pyro.set_rng_seed(0)
    # the paper's configuration, as recorded: one SVGD step of a fixed size, the chaser's
    # gradient reaching every coordinate (the official code)
    learner = BMAML(BayesianMLP(hidden=hidden), num_particles=particles, init="paper",
                    inner_steps=1, learn_step_size=False, chaser_trains_noise=True,
                    calibration=calibration, compile=compile).to(device)
    batch = Sinusoid(num_tasks=100, num_support=shots).sample(
        tasks, torch.Generator().manual_seed(0)).to(device=device)
    return learner, batch


def step_fn(learner, loss_fn, batch):
    def step():
        learner.zero_grad()
        loss_fn(batch).backward()
    return step


def interleaved(fns: dict, rounds: int, repeats: int, sync=None) -> dict:
    """Median seconds of each function, timed round by round in turn (so that a slow spell
    of the machine hits every variant alike)."""
    samples = {name: [] for name in fns}
    for fn in fns.values():
        fn()  # warm-up (records the graphs)
    for _ in range(rounds):
        for name, fn in fns.items():
            samples[name].append(median_time(fn, repeats, warmup=0, sync=sync))
    return {name: statistics.median(v) for name, v in samples.items()}


def paper_config(args, sync):
    learner, batch = make(device=args.device)
    floor.check_floor(learner, batch)
    default, _ = make(device=args.device, calibration=None)
    unsimplified, _ = make(device=args.device)  # the same learner, graphs replayed as recorded
    for cache in unsimplified.potential._graphs.values():
        cache.simplify = False
    compiled, _ = make(device=args.device, compile=True)
    start = time.perf_counter()
    step_fn(compiled, compiled.meta_loss, batch)()  # compiles the chaser's and the leader's step
    compile_s = time.perf_counter() - start
    pyro.set_rng_seed(0)
    emaml = EMAML(BayesianMLP(), init="paper").to(args.device)
    maml = MAML(BayesianMLP(), init="paper").to(args.device)

    def no_capture(step):
        def run():
            learner.potential.capture = False
            try:
                step()
            finally:
                learner.potential.capture = True
        return run

    fns = {
        "floor (hand-batched torch)": step_fn(learner, lambda b: floor.meta_loss(learner, b), batch),
        "BMAML chaser (fast path)": step_fn(learner, learner.meta_loss, batch),
        "BMAML chaser (compiled steps)": step_fn(compiled, compiled.meta_loss, batch),
        "BMAML chaser (recorded graph, not simplified)": step_fn(
            unsimplified, unsimplified.meta_loss, batch),
        "BMAML chaser (traced path)": no_capture(step_fn(learner, learner.meta_loss, batch)),
        "BMAML default (+ calibration term)": step_fn(default, default.meta_loss, batch),
        "EMAML": step_fn(emaml, emaml.meta_loss, batch),
        "MAML": step_fn(maml, maml.meta_loss, batch),
    }
    times = interleaved(fns, args.rounds, args.repeats, sync)
    times["BMAML python loop"] = median_time(
        step_fn(learner, lambda b: loop_meta_loss(learner, b), batch), max(3, args.repeats // 2),
        sync=sync)
    base = times["floor (hand-batched torch)"]
    rows = [{"variant": k, "ms": v * 1e3, "vs_floor": v / base} for k, v in times.items()]
    saved = times["BMAML chaser (fast path)"] - times["BMAML chaser (compiled steps)"]
    return {"D": learner.potential.dim, "rows": rows,
            "compile": {"first_step_s": compile_s,
                        "pays_off_after_steps": compile_s / saved if saved > 0 else None}}


def aten_calls(fn) -> int:
    """ATen operator calls of one run of ``fn`` (torch profiler, after a warm-up run)."""
    from torch.profiler import profile

    fn()
    with profile() as prof:
        fn()
    return sum(k.count for k in prof.key_averages() if k.key.startswith("aten::"))


def profile_potential(args, sync) -> dict:
    """(d) Where the time goes: ATen calls per meta-step (floor, traced, fast path), and the
    potential alone, ours vs the floor's hand-written log density: its log density, gradient
    and second-order backward, and a forward pass traced vs replayed."""
    learner, batch = make(device=args.device)
    pot = learner.potential
    theta = learner.theta0.detach().unsqueeze(0).expand(batch.num_tasks, -1, -1).clone()
    x, y = batch.x_support, batch.y_support

    def second_order(log_density):
        def run():
            p = theta.clone().requires_grad_(True)
            (grad,) = torch.autograd.grad(log_density(p).sum(), p, create_graph=True)
            grad.pow(2).sum().backward()
        return run

    def traced(fn):
        def run():
            pot.capture = False
            try:
                fn()
            finally:
                pot.capture = True
        return run

    ours = second_order(lambda p: pot.log_density(p, x, y))
    hand = second_order(lambda p: floor.log_joint(learner, p, x, y))
    step = step_fn(learner, learner.meta_loss, batch)
    out = {"aten_calls_meta_step": {
        "floor": aten_calls(step_fn(learner, lambda b: floor.meta_loss(learner, b), batch)),
        "traced path": aten_calls(traced(step)), "fast path": aten_calls(step)}}
    out["aten_calls_potential"] = {"ours": aten_calls(ours), "floor": aten_calls(hand)}
    times = interleaved({"ours": ours, "floor": hand,
                         "forward, replayed": lambda: pot.log_density(theta, x, y),
                         "forward, traced": traced(lambda: pot.log_density(theta, x, y))},
                        args.rounds, args.repeats, sync)
    out["potential_ms"] = {k: v * 1e3 for k, v in times.items()}
    return out


def one_config(spec: dict, device: str, repeats: int, sync, compiled: bool = True) -> dict:
    learner, batch = make(tuple(spec["hidden"]), spec["M"], spec["T"], spec["K"], device)
    fns = {"bmaml": step_fn(learner, learner.meta_loss, batch),
           "floor": step_fn(learner, lambda b: floor.meta_loss(learner, b), batch)}
    compile_s = None
    if compiled:
        fast, _ = make(tuple(spec["hidden"]), spec["M"], spec["T"], spec["K"], device,
                       compile=True)
        fns["compiled"] = step_fn(fast, fast.meta_loss, batch)
        start = time.perf_counter()
        fns["compiled"]()  # compiles the chaser's and the leader's step
        compile_s = time.perf_counter() - start
    times = interleaved(fns, rounds=2, repeats=repeats, sync=sync)
    out = {**spec, "D": learner.potential.dim, "bmaml_ms": times["bmaml"] * 1e3,
           "floor_ms": times["floor"] * 1e3, "vs_floor": times["bmaml"] / times["floor"]}
    if compiled:
        out.update(compiled_ms=times["compiled"] * 1e3,
                   compiled_vs_floor=times["compiled"] / times["floor"], compile_s=compile_s)
    if device.startswith("cuda"):
        for name, key in (("bmaml", "peak_mb"), ("compiled", "compiled_peak_mb")):
            if name in fns:
                torch.cuda.reset_peak_memory_stats()
                fns[name]()
                torch.cuda.synchronize()
                out[key] = torch.cuda.max_memory_allocated() / 2**20
    return out


def _fresh_process(spec: dict, body: str, compiled: bool = False,
                   check: bool = True) -> subprocess.CompletedProcess:
    """Run ``body`` in a fresh process that has built ``spec``'s learner ``l``, its batch
    ``b``, its meta-step ``step`` and ``kb(key)`` (a ``/proc/self/status`` entry in kB)."""
    code = (f"import sys, gc; sys.path.insert(0, {str(HERE)!r}); import meta_step, torch;"
            f"torch.set_num_threads(1); l, b = meta_step.make({tuple(spec['hidden'])!r}, "
            f"{spec['M']}, {spec['T']}, {spec['K']}, compile={compiled});"
            "step = meta_step.step_fn(l, l.meta_loss, b);"
            "kb = lambda key: int([x for x in open('/proc/self/status') "
            "if x.startswith(key)][0].split()[1]);" + body)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=check)


def peak_rss_mb(spec: dict) -> float:
    """Peak resident set (MB) of a fresh process that runs one meta-step of ``spec``."""
    # VmHWM: this address space's peak (ru_maxrss would carry the parent's over exec)
    done = _fresh_process(spec, "step(); print(kb('VmHWM'))")
    return int(done.stdout.split()[-1]) / 1024  # kB


def step_memory_mb(spec: dict, compiled: bool) -> Optional[float]:
    """Working memory (MB) of one meta-step of ``spec`` in a fresh process: the peak resident
    set during a second meta-step above the resident set just before it (the first records
    the graphs, and with ``compiled`` compiles them, whose code and caches stay resident and
    are not the step's); the peak is reset through ``/proc/self/clear_refs``."""
    done = _fresh_process(
        spec, "step(); l.zero_grad(); gc.collect(); open('/proc/self/clear_refs', 'w').write('5');"
        "before = kb('VmRSS'); step(); print(kb('VmHWM') - before)", compiled, check=False)
    if done.returncode != 0:  # e.g. a kernel without clear_refs: say so, time the rest
        print(f"  (no step memory for {spec}: {done.stderr.strip().splitlines()[-1]})")
        return None
    return int(done.stdout.split()[-1]) / 1024  # kB


def scaling(args, sync):
    base = {"T": 10, "M": 10, "K": 10, "hidden": [40, 40, 40]}
    grid = ([{**base, "T": t} for t in (1, 4, 16, 64)]
            + [{**base, "M": m} for m in (2, 8, 32, 128)]
            + [{**base, "K": k} for k in (5, 40, 160)]
            + [{**base, "hidden": [w] * 3} for w in (20, 80)])
    if args.quick:
        grid = grid[:2] + grid[4:6]
    compiled = not args.no_compiled
    rows = []
    smallest = None
    if args.device == "cpu" and not args.no_memory:
        smallest = peak_rss_mb({**base, "T": 1, "M": 2, "hidden": [20, 20, 20]})
    for spec in grid:
        row = one_config(spec, args.device, max(2, args.repeats // 2), sync, compiled)
        if smallest is not None:
            row["peak_mb"] = peak_rss_mb(spec) - smallest
            row["step_mb"] = step_memory_mb(spec, compiled=False)
            if compiled:
                row["compiled_step_mb"] = step_memory_mb(spec, compiled=True)
            row = {k: v for k, v in row.items() if v is not None}
        rows.append(row)
        print(f"  T={row['T']:>3} M={row['M']:>3} K={row['K']:>3} D={row['D']:>6}: "
              f"{row['bmaml_ms']:8.1f} ms ({row['vs_floor']:.2f}x floor)"
              + (f", peak {row['peak_mb']:.0f} MB" if "peak_mb" in row else "")
              + (f" (a step {row['step_mb']:.0f} MB)" if "step_mb" in row else "")
              + (f"; compiled {row['compiled_ms']:8.1f} ms ({row['compiled_vs_floor']:.2f}x "
                 f"floor, {row['compile_s']:.0f} s to compile)" if compiled else "")
              + (f", a step {row['compiled_step_mb']:.0f} MB" if "compiled_step_mb" in row else ""),
              flush=True)
    return rows


def _timed_fit(rank, world, folder, iterations, threads, result):
    torch.set_num_threads(threads)
    if world > 1:
        torch.distributed.init_process_group("gloo", init_method=f"file://{folder}/rdv",
                                             rank=rank, world_size=world)
    try:
        learner, _ = make()
        source = Sinusoid(num_tasks=100, num_support=10)
        learner.fit(source, 2, meta_batch_size=10, progress=False)  # warm-up
        t0 = time.perf_counter()
        learner.fit(source, iterations, meta_batch_size=10, progress=False)
        elapsed = (time.perf_counter() - t0) / iterations
        if rank == 0:
            Path(result).write_text(str(elapsed))
    finally:
        if world > 1:
            torch.distributed.destroy_process_group()


def processes(args):
    import torch.multiprocessing as mp

    iterations = 5 if args.quick else 20
    out = {}
    with tempfile.TemporaryDirectory() as folder:
        result = Path(folder) / "t"
        for label, world, threads in (("1 process, 1 thread", 1, 1),
                                      ("1 process, 2 threads", 1, 2),
                                      ("2 processes (gloo), 1 thread each", 2, 1)):
            if world == 1:
                ctx = mp.get_context("spawn")
                p = ctx.Process(target=_timed_fit, args=(0, 1, folder, iterations, threads, result))
                p.start()
                p.join()
            else:
                for attempt in range(2):  # gloo's teardown has aborted a rank once: retry
                    try:
                        mp.spawn(_timed_fit, args=(world, folder, iterations, threads, result),
                                 nprocs=world, join=True)
                        break
                    except mp.ProcessExitedException as err:
                        print(f"  ({label}: {err}; retrying)" if attempt == 0 else "", flush=True)
                        if attempt:
                            raise
                    finally:
                        for f in Path(folder).glob("rdv*"):
                            f.unlink()
            out[label] = float(result.read_text()) * 1e3
            for f in Path(folder).glob("rdv*"):
                f.unlink()
    return out


def record_scaling(record: dict, header: str, args, sync) -> None:
    """(b) into ``record``, with the header of the machine it ran on."""
    print("(b) scaling of the BMAML meta-step (others at T=10, M=10, K=10, 1-40-40-40-1)")
    record["scaling_header"] = header
    record["scaling"] = scaling(args, sync)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch threads (a and b)")
    p.add_argument("--no-memory", action="store_true", help="skip the CPU peak-memory runs")
    p.add_argument("--skip", nargs="*", default=[], choices=["scaling", "processes"])
    p.add_argument("--only-processes", action="store_true",
                   help="run (c) alone and add it to the existing JSON record")
    p.add_argument("--only-scaling", action="store_true",
                   help="run (b) alone and put it in the existing JSON record, with its own "
                        "header (the machine it ran on)")
    p.add_argument("--no-compiled", action="store_true",
                   help="(b) without the compiled steps' column (each configuration compiles "
                        "its steps, seconds to a minute)")
    p.add_argument("--update-results", action="store_true")
    args = p.parse_args()
    args.rounds, args.repeats = (2, 3) if args.quick else (5, 5)
    torch.set_num_threads(args.threads)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else None
    device_name = (torch.cuda.get_device_name() if args.device.startswith("cuda")
                   else platform.processor() or platform.machine())
    header = (f"torch {torch.__version__}, pyro {pyro.__version__}, device {args.device} "
              f"({device_name}), threads {torch.get_num_threads()}, cores {os.cpu_count()}")
    print(header)
    folder = Path("results" if args.update_results else "runs/benchmarks")
    folder.mkdir(parents=True, exist_ok=True)
    name = f"meta_step_{args.device.split(':')[0]}"
    if args.only_processes or args.only_scaling:
        record = json.loads((folder / f"{name}.json").read_text())
        if args.only_processes:
            record["processes"] = report_processes(args)
        if args.only_scaling:
            record_scaling(record, header, args, sync)
        (folder / f"{name}.json").write_text(json.dumps(record, indent=2))
        print(f"written: {folder / name}.json")
        return
    print("(a) one meta-step, paper sinusoid configuration", flush=True)
    paper = paper_config(args, sync)
    for row in paper["rows"]:
        print(f"  {row['variant']:>46}: {row['ms']:8.1f} ms  {row['vs_floor']:5.2f}x floor")
    c = paper["compile"]
    print(f"  compiling (first meta-step, both steps): {c['first_step_s']:.1f} s, paid back after "
          + (f"{c['pays_off_after_steps']:.0f} meta-steps" if c["pays_off_after_steps"] else "never"))
    record = {"header": header, "paper": paper}
    print("(d) where the time goes (one meta-step, and the potential alone: log density, "
          "gradient, second-order backward)", flush=True)
    record["profile"] = profile_potential(args, sync)
    for key, value in record["profile"].items():
        print(f"  {key}: " + ", ".join(f"{k} {v:.1f}" if isinstance(v, float) else f"{k} {v}"
                                       for k, v in value.items()))
    if "scaling" not in args.skip:
        record_scaling(record, header, args, sync)
    (folder / f"{name}.json").write_text(json.dumps(record, indent=2))
    if "processes" not in args.skip and args.device == "cpu":
        record["processes"] = report_processes(args)
        (folder / f"{name}.json").write_text(json.dumps(record, indent=2))
    print(f"written: {folder / name}.json")


def report_processes(args) -> dict:
    print("(c) fit, time per meta-iteration, total meta-batch 10", flush=True)
    times = processes(args)
    one = times["1 process, 1 thread"]
    for label, ms in times.items():
        print(f"  {label:>36}: {ms:8.1f} ms  ({one / ms:.2f}x the 1-process, 1-thread speed)")
    return times


if __name__ == "__main__":
    main()
