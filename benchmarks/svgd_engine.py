"""Benchmark of the SVGD engine on a 1-40-40-1 Bayesian MLP (Gamma precision priors).

(a) ``pyro_bmaml.SVGD.step`` vs ``pyro.infer.SVGD.step`` (same model, kernel rule, optimizer),
    for N in {10, 100} data points and M in {10, 100} particles, the variants interleaved
    round by round; plus ours with the default ("auto") bandwidth, which in multivariate
    mode is the paper's scalar rule (other math), and ours with the direction compiled
    (``SVGD(..., compile=True)``, compiled once per configuration, outside the timing: the
    per-dimension bandwidth computed eagerly and passed in, the univariate direction one
    fused sum over the ordered pairs);
(a') where one step's time goes at N = M = 10 (univariate): the potential, the direction, the
    rest, and Pyro's kernel alone;
(b) ``transport`` of 5 steps (step size 1e-2 / N) + backward to the initial particles for
    T = 10 tasks, vs a python loop over tasks and particles doing the same math.

Ratios are measured in one process, medians over repeats.  Run:
    python benchmarks/svgd_engine.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import pyro
import pyro.distributions as dist
import torch
from _timing import median_time, run_times
from pyro.optim import Adam

import pyro_bmaml as pb
from pyro_bmaml.tasks.models import BayesianMLP




class StockCompatibleMLP(BayesianMLP):
    """The same Bayesian MLP and density, with the data as an event dim instead of a plate:
    pyro.infer.SVGD needs models that broadcast over its particle plate (dim -1 here)."""

    def __call__(self, x, y=None):
        weights, gam = self.sample_prior_sites(x)
        mean = self.forward(weights, x)
        pyro.sample("y", dist.Normal(mean, gam.rsqrt()[..., None]).to_event(1), obs=y)
        return mean


def step_benchmark(model, x, y, num_particles, rounds, repeats, mode):
    """Median seconds of one step for each variant, the variants interleaved round by round
    (each round builds the object afresh from the same seed: Pyro's class and ours share the
    param store name ``svgd_particles``), so a slow spell of the machine hits each alike."""
    variants = {
        # the stock rule, so both do the same math
        "pyro.infer.SVGD": (pyro.infer.SVGD, "pyro", True),
        "pyro_bmaml.SVGD": (pb.SVGD, "pyro", True),
        # the same class without the recorded-graph fast path
        "pyro_bmaml.SVGD (traced path)": (pb.SVGD, "pyro", False),
        # not the same math in multivariate mode: "auto" is the paper's scalar rule there
        "scalar rule": (pb.SVGD, "auto", True),
        # the direction compiled (one object for every round: it compiles once, in the
        # first round's warm-up)
        "pyro_bmaml.SVGD (compiled)": (pb.SVGD, "pyro", "compile"),
    }
    times = {name: [] for name in variants}
    compiled = None
    for r in range(rounds):
        for name, (cls, rule, capture) in variants.items():
            pyro.clear_param_store()
            pyro.set_rng_seed(r)
            if capture == "compile" and compiled is not None:
                svgd = compiled
            else:
                svgd = cls(model, pb.RBFSteinKernel(bandwidth=rule), Adam({"lr": 1e-3}),
                           num_particles, 0, mode=mode,
                           **({"compile": True} if capture == "compile" else {}))
                compiled = svgd if capture == "compile" else compiled
            if not capture:
                svgd.potential.capture = False
            # warm-up: the param store, the recorded graphs
            times[name] += run_times(lambda: svgd.step(x, y), repeats, warmup=2)
    return {name: statistics.median(values) for name, values in times.items()}


def step_parts(model, x, y, num_particles, repeats, mode="univariate"):
    """Where one step's time goes: ours split into the potential (log density and its
    gradient), the SVGD direction and the rest; Pyro's kernel alone beside its step."""
    from pyro_bmaml.engine.svgd import svgd_direction

    pyro.clear_param_store()
    kernel = pb.RBFSteinKernel(bandwidth="pyro")
    svgd = pb.SVGD(model, kernel, Adam({"lr": 1e-3}), num_particles, 0, mode=mode)
    svgd.step(x, y)
    particles = pyro.param("svgd_particles").unconstrained().detach()
    _, grad = svgd.potential.log_density_and_grad(particles, x, y)

    def direction():
        with torch.no_grad():
            svgd_direction(particles, grad, kernel, mode)

    stock = pyro.infer.RBFSteinKernel()
    parts = {"ours: step": median_time(lambda: svgd.step(x, y), repeats, warmup=2),
             "ours: log density and gradient": median_time(
                 lambda: svgd.potential.log_density_and_grad(particles, x, y), repeats, warmup=2),
             "ours: SVGD direction (kernel)": median_time(direction, repeats, warmup=2),
             "pyro: kernel (log_kernel_and_grad)": median_time(
                 lambda: stock.log_kernel_and_grad(particles), repeats, warmup=2)}
    parts["ours: the rest (checks, optimizer, param store)"] = (
        parts["ours: step"] - parts["ours: log density and gradient"]
        - parts["ours: SVGD direction (kernel)"])
    return parts


def loop_svgd_step(potential, kernel, theta, x, y, step_size):
    """One multivariate SVGD step of one task, python loop over particles (same math)."""
    grads = []
    for i in range(theta.size(0)):
        lp = potential._log_joint_one(theta[i], (x, y), {})
        grads.append(torch.autograd.grad(lp, theta, create_graph=torch.is_grad_enabled())[0][i])
    grad = torch.stack(grads)
    kmat, rep = kernel.kernel_and_repulsion(theta)
    rows = [(kmat[i] @ grad + rep[i]) / theta.size(0) for i in range(theta.size(0))]
    return theta + step_size * torch.stack(rows)


def loop_transport(potential, kernel, init, xs, ys, num_steps, step_size):
    """Same math as transport, but python loops over tasks and particles."""
    outs = []
    for t in range(init.size(0)):
        theta = init[t]
        for _ in range(num_steps):
            theta = loop_svgd_step(potential, kernel, theta, xs[t], ys[t], step_size)
        outs.append(theta)
    return torch.stack(outs)


def transport_benchmark(model, potential, xs, ys, num_particles, repeats):
    kernel = pb.RBFSteinKernel()
    # 1e-3 at N = 10 (the paper's); scaled with N, as the log density's gradient is: at
    # N = 100 a step of 1e-3 moves some weights by tens in one step and the float32
    # meta-gradient through 5 such steps overflows
    step = 1e-2 / xs.size(-1)
    potential.setup(xs[0], ys[0])
    init = torch.stack([potential.pack(model.paper_init(num_particles)) for _ in xs])

    def vectorized():
        theta0 = init.clone().requires_grad_()
        out = pb.transport(potential, kernel, theta0, xs, ys, num_steps=5, step_size=step)
        out.pow(2).sum().backward()
        return theta0.grad

    def looped():
        theta0 = init.clone().requires_grad_()
        out = loop_transport(potential, kernel, theta0, xs, ys, 5, step)
        out.pow(2).sum().backward()
        return theta0.grad

    g_vec, g_loop = vectorized(), looped()
    rel = ((g_vec - g_loop).norm() / g_loop.norm()).item()  # float32: compare as vectors
    assert rel < 1e-4, f"loop and vectorized disagree (relative error {rel:.2e})"
    return {
        "vectorized": median_time(vectorized, repeats),
        "python loop": median_time(looped, max(1, repeats // 3), warmup=0),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument("--update-results", action="store_true",
                        help="write results/svgd_engine.json (default runs/benchmarks/)")
    args = parser.parse_args()
    record = {"step": [], "transport": []}
    if args.threads:
        torch.set_num_threads(args.threads)
    repeats = 5 if args.quick else 20
    pyro.set_rng_seed(0)
    model = StockCompatibleMLP(hidden=(40, 40))
    print(f"torch {torch.__version__}, pyro {pyro.__version__}, threads {torch.get_num_threads()}")
    print("(a) one SVGD step (Adam), median seconds")
    print(f"{'mode':>12} {'N':>4} {'M':>4} {'pyro.infer.SVGD':>16} {'pyro_bmaml.SVGD':>16} "
          f"{'speed-up':>9} {'(ours, default auto rule)':>26} {'(traced path)':>14} "
          f"{'(compiled)':>11} {'speed-up':>9}")
    for mode in ("univariate", "multivariate"):
        for n in (10, 100):
            x = torch.linspace(-5, 5, n)
            y = torch.sin(x)
            for m in (10, 100):
                t = step_benchmark(model, x, y, m, rounds=repeats,
                                   repeats=10 if m == 10 else 2, mode=mode)
                ratio = t["pyro.infer.SVGD"] / t["pyro_bmaml.SVGD"]
                compiled_ratio = t["pyro.infer.SVGD"] / t["pyro_bmaml.SVGD (compiled)"]
                record["step"].append({"mode": mode, "N": n, "M": m, **t, "speedup": ratio,
                                       "speedup_compiled": compiled_ratio})
                print(f"{mode:>12} {n:>4} {m:>4} {t['pyro.infer.SVGD']:>16.5f} "
                      f"{t['pyro_bmaml.SVGD']:>16.5f} {ratio:>8.1f}x {t['scalar rule']:>26.5f} "
                      f"{t['pyro_bmaml.SVGD (traced path)']:>14.5f} "
                      f"{t['pyro_bmaml.SVGD (compiled)']:>11.5f} {compiled_ratio:>8.1f}x")
    ratios = [row["speedup_compiled"] for row in record["step"]]
    print(f"compiled step at least 6x Pyro's (issue 21's target) in "
          f"{sum(r >= 6 for r in ratios)} of {len(ratios)} configurations; "
          f"smallest {min(ratios):.1f}x, largest {max(ratios):.1f}x")
    x = torch.linspace(-5, 5, 10)
    parts = step_parts(model, x, torch.sin(x), 10, 4 * repeats)
    record["step_parts"] = parts
    print("(a') where one univariate step goes, N = 10, M = 10, median milliseconds")
    for name, seconds in parts.items():
        print(f"  {name:>48}: {seconds * 1e3:7.3f}")
    print("(b) transport, 5 steps + backward, T = 10 tasks, median seconds")
    print(f"{'N':>4} {'M':>4} {'python loop':>12} {'vectorized':>11} {'speed-up':>9}")
    potential = pb.ModelPotential(model)
    for n in (10, 100):
        pyro.set_rng_seed(n)  # the same data and initial particles whatever ran before
        xs = torch.rand(10, n) * 10 - 5
        ys = torch.sin(xs)
        for m in (10, 100):
            t = transport_benchmark(model, potential, xs, ys, m, max(3, repeats // 4))
            ratio = t["python loop"] / t["vectorized"]
            record["transport"].append({"N": n, "M": m, **t, "speedup": ratio})
            print(f"{n:>4} {m:>4} {t['python loop']:>12.4f} {t['vectorized']:>11.4f} {ratio:>8.1f}x")
    folder = Path("results" if args.update_results else "runs/benchmarks")
    folder.mkdir(parents=True, exist_ok=True)
    record["header"] = f"torch {torch.__version__}, pyro {pyro.__version__}, threads {torch.get_num_threads()}"
    (folder / "svgd_engine.json").write_text(json.dumps(record, indent=2))
    print(f"written: {folder / 'svgd_engine.json'}")


if __name__ == "__main__":
    main()
