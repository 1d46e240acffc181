"""Accuracy of the drop-in SVGD class against pyro.infer.SVGD, over many seeds.

Pyro's own test case (tests/infer/test_svgd.py::test_mean_variance): LogNormal(-1, 0.7),
univariate mode, Pyro's RBF kernel with its bandwidth factor annealed from 1 to 5 over 301
steps, M = 200, Adam 0.05, float64. Both classes run the same script on the same seeds
(each draws its own initial particles from the prior); the script prints the absolute
errors of the particles' mean and variance, summarized over seeds.

    python benchmarks/pyro_drop_in.py --seeds 40
"""

from __future__ import annotations

import argparse

import pyro
import pyro.distributions as dist
import pyro.optim as optim
import torch

import pyro_bmaml as pb


def run(svgd_cls, seed: int, latent) -> tuple:
    def model():
        pyro.sample("z", latent)

    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    kernel = pyro.infer.RBFSteinKernel()
    svgd = svgd_cls(model, kernel, optim.Adam({"lr": 0.05}), 200, 0, mode="univariate")
    svgd.step()
    pyro.param("svgd_particles").unconstrained().data *= 1.3  # Pyro's scramble
    pyro.param("svgd_particles").unconstrained().data += 0.7
    for step in range(301):
        kernel.bandwidth_factor = 1.0 + (step / 301) * 4.0
        svgd.step()
    z = svgd.get_named_particles()["z"].reshape(-1)
    return abs(z.mean().item() - latent.mean.item()), abs(z.var().item() - latent.variance.item())


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=40)
    args = p.parse_args()
    torch.set_default_dtype(torch.float64)
    latent = dist.LogNormal(-1.0, 0.7)
    print(f"LogNormal(-1, 0.7), univariate, annealed bandwidth, M = 200, seeds 0..{args.seeds - 1}"
          " (Pyro's test tolerances: mean 0.01, variance 0.02)")
    for name, cls in (("pyro.infer.SVGD", pyro.infer.SVGD), ("pyro_bmaml.SVGD", pb.SVGD)):
        err = torch.tensor([run(cls, s, latent) for s in range(args.seeds)])
        print(f"{name:16s} mean error: mean {err[:, 0].mean():.4f} max {err[:, 0].max():.4f} | "
              f"variance error: mean {err[:, 1].mean():.4f} median {err[:, 1].median():.4f} "
              f"max {err[:, 1].max():.4f}, share over 0.02: {(err[:, 1] > 0.02).double().mean():.2f}")


if __name__ == "__main__":
    main()
