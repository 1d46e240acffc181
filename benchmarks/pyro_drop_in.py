"""Drop-in accuracy: Pyro's own SVGD accuracy tests, run on pyro.infer.SVGD and on
pyro_bmaml.SVGD over many seeds, failures counted at the tests' own tolerances.

The cases are those of Pyro's ``tests/infer/test_svgd.py`` (re-stated here, not copied):

- ``mean_variance``: four latent distributions (a 2-D standard Normal, LogNormal(-1, 0.7) as a
  1-vector and as a scalar, Beta(0.3, 0.7)), M = 200 particles, Adam 0.05, the initial
  particles scrambled (x 1.3 + 0.7 in unconstrained space) after one step, then 301 steps with
  the kernel's bandwidth factor annealed from 1 to 5; the particles' mean must be within 0.01
  of the exact one and their variance within 0.02 (univariate) or 0.05 (multivariate);
- ``conjugate``: a Gamma-Poisson model with three rates and five observations, 451 steps,
  the first rate's posterior mean within 0.02 and variance within 0.02 / 0.05;

each with Pyro's stock RBF and IMQ kernels (passed to both classes as they are; pyro_bmaml
converts them, keeping Pyro's per-coordinate bandwidth rule) in both modes. float32, as
Pyro's tests.

Both classes start from the same initial particles (drawn from the prior once per seed and
written to the param store), so they differ only in the order of floating-point operations.
These tests' dynamics are chaotic at that scale: a third column runs Pyro's own class from the
same particles moved by one unit in the last place, and its failure count differs from the
unmoved run's by about as much as the two classes' do. The failure counts are to be read
against that spread.

    python benchmarks/pyro_drop_in.py --seeds 20            # the full matrix (~25 min)
    python benchmarks/pyro_drop_in.py --seeds 20 --only univariate-RBF
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

import pyro
import pyro.distributions as dist
import torch
from pyro.optim import Adam

import pyro_bmaml as pb

LATENTS = {
    "Normal2": lambda: dist.Normal(torch.zeros(2), torch.ones(2)).to_event(1),
    "LogNormal[1]": lambda: dist.LogNormal(torch.tensor([-1.0]), torch.tensor([0.7])).to_event(1),
    "LogNormal": lambda: dist.LogNormal(torch.tensor(-1.0), torch.tensor(0.7)),
    "Beta[1]": lambda: dist.Beta(torch.tensor([0.3]), torch.tensor([0.7])).to_event(1),
}
KERNELS = {"RBF": pyro.infer.RBFSteinKernel, "IMQ": pyro.infer.IMQSteinKernel}
#: (class, initial particles moved by one ulp)
CLASSES = {"pyro.infer.SVGD": (pyro.infer.SVGD, False),
           "pyro.infer.SVGD +1ulp": (pyro.infer.SVGD, True),
           "pyro_bmaml.SVGD": (pb.SVGD, False)}


def _errors(value, expected):
    return float((value.detach() - expected).abs().max())


def _initial_particles(svgd_cls, latent, seed, nudge):
    """Write the same prior draws, in unconstrained space, as either class's particles
    (Pyro's class keeps them flat, pyro_bmaml's one row per particle)."""
    generator_state = torch.get_rng_state()
    torch.manual_seed(10_000 + seed)
    unconstrained = torch.distributions.biject_to(latent.support).inv(latent.sample((200,)))
    torch.set_rng_state(generator_state)
    unconstrained = unconstrained.reshape(200, -1)
    if nudge:
        unconstrained = torch.nextafter(unconstrained, torch.tensor(float("inf")))
    if svgd_cls is pyro.infer.SVGD:
        unconstrained = unconstrained.reshape(-1)
    pyro.param("svgd_particles", unconstrained.clone())


def mean_variance(svgd_cls, kernel_cls, mode, latent, seed, nudge=False):
    """Pyro's test_mean_variance: returns (mean error, variance error)."""
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    _initial_particles(svgd_cls, latent, seed, nudge)

    def model():
        pyro.sample("z", latent)

    kernel = kernel_cls()
    svgd = svgd_cls(model, kernel, Adam({"lr": 0.05}), 200, 0, mode=mode)
    svgd.step()
    pyro.param("svgd_particles").unconstrained().data *= 1.3
    pyro.param("svgd_particles").unconstrained().data += 0.7
    steps = 301
    for step in range(steps):
        kernel.bandwidth_factor = 1.0 + (step / steps) * 4.0
        svgd.step()
    z = svgd.get_named_particles()["z"]
    return _errors(z.mean(0), latent.mean), _errors(z.var(0), latent.variance)


def conjugate(svgd_cls, kernel_cls, mode, seed, nudge=False):
    """Pyro's test_conjugate (Gamma-Poisson): returns (mean error, variance error)."""
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    data = torch.tensor([1.0, 2.0, 3.0, 3.0, 5.0]).unsqueeze(-1).expand(5, 3)
    alpha0, beta0 = torch.tensor([1.0, 1.8, 2.3]), torch.tensor([2.3, 1.5, 1.2])
    _initial_particles(svgd_cls, dist.Gamma(alpha0, beta0).to_event(1), seed, nudge)

    def model():
        with pyro.plate("rates", 3):
            rate = pyro.sample("latent", dist.Gamma(alpha0, beta0))
            with pyro.plate("data", 5):
                pyro.sample("obs", dist.Poisson(rate), obs=data)

    kernel = kernel_cls()
    svgd = svgd_cls(model, kernel, Adam({"lr": 0.05}), 200, 2, mode=mode)
    steps = 451
    for step in range(steps):
        kernel.bandwidth_factor = 1.0 + (step / steps) * 4.0
        svgd.step()
    rate = svgd.get_named_particles()["latent"]
    posterior = dist.Gamma(alpha0 + data.sum(0), beta0 + 5)
    return (_errors(rate.mean(0)[0], posterior.mean),
            _errors(rate.var(0)[0], posterior.variance))


def cases():
    for kernel in KERNELS:
        for mode in ("univariate", "multivariate"):
            for latent in LATENTS:
                yield f"{mode}-{kernel}", f"mean_variance[{latent}]", kernel, mode, latent
            yield f"{mode}-{kernel}", "conjugate", kernel, mode, None


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=20)
    p.add_argument("--only", default=None, help="one group, e.g. univariate-RBF")
    args = p.parse_args()
    torch.set_default_dtype(torch.float32)
    failures = defaultdict(lambda: defaultdict(int))
    worst = defaultdict(lambda: defaultdict(float))
    runs = 0
    start = time.perf_counter()
    for group, name, kernel, mode, latent in cases():
        if args.only and group != args.only:
            continue
        var_tol = 0.05 if mode == "multivariate" else 0.02
        mean_tol = 0.02 if latent is None else 0.01
        for cls_name, (cls, nudge) in CLASSES.items():
            for seed in range(args.seeds):
                if latent is None:
                    mean_err, var_err = conjugate(cls, KERNELS[kernel], mode, seed, nudge)
                else:
                    mean_err, var_err = mean_variance(cls, KERNELS[kernel], mode,
                                                      LATENTS[latent](), seed, nudge)
                failed = mean_err > mean_tol or var_err > var_tol
                failures[(group, name)][cls_name] += failed
                worst[(group, name)][cls_name] = max(worst[(group, name)][cls_name],
                                                     var_err / var_tol, mean_err / mean_tol)
        runs += args.seeds
    print(f"Pyro's SVGD accuracy tests, seeds 0..{args.seeds - 1}, float32 "
          f"({time.perf_counter() - start:.0f} s): failures (worst error / tolerance)")
    print(f"{'case':40s} " + " ".join(f"{c:>24s}" for c in CLASSES))
    totals = defaultdict(int)
    for (group, name), counts in failures.items():
        cells = []
        for c in CLASSES:
            totals[c] += counts[c]
            cells.append(f"{counts[c]:>3d}/{args.seeds} ({worst[(group, name)][c]:5.2f})")
        print(f"{group + ' ' + name:40s} " + " ".join(f"{cell:>24s}" for cell in cells))
    print(f"{'total':40s} " + " ".join(f"{totals[c]:>21d}/{runs}" for c in CLASSES))


if __name__ == "__main__":
    main()
