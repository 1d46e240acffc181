"""Time of one meta-step (meta-loss + backward) on the paper's sinusoid configuration.

BMAML (M = 10, chaser n = s = 1), EMAML (M = 10), MAML, 10 tasks, K = 10, 1-40-40-40-1, and a
python-loop version of the same BMAML math (loops over tasks and particles). Medians over
repeats, ratios measured in one process.  Run:
    python benchmarks/meta_step.py [--quick]
"""

from __future__ import annotations

import argparse

import pyro
import torch
from _timing import median_time
from svgd_engine import loop_svgd_step

from pyro_bmaml.meta import BMAML, EMAML, MAML
from pyro_bmaml.models import BayesianMLP
from pyro_bmaml.tasks import Sinusoid




def loop_meta_loss(learner, batch):
    losses = []
    for t in range(batch.num_tasks):
        chaser = loop_svgd_step(learner.potential, learner.kernel, learner.theta0,
                                batch.x_support[t], batch.y_support[t], learner.step_size)
        xa = torch.cat([batch.x_support[t], batch.x_query[t]])
        ya = torch.cat([batch.y_support[t], batch.y_query[t]])
        leader = loop_svgd_step(learner.potential, learner.kernel, chaser.detach().requires_grad_(),
                                xa, ya, learner.step_size).detach()
        # the network sites, as BMAML.meta_loss (its noise offset's term does not reach theta0)
        losses.append(((chaser - leader).pow(2) * learner.distance_weights).sum())
    return torch.stack(losses).mean()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    repeats = 5 if args.quick else 20
    pyro.set_rng_seed(0)
    model = BayesianMLP()
    batch = Sinusoid(num_tasks=100, num_support=10).sample(10, torch.Generator().manual_seed(0))
    learners = {"BMAML": BMAML(model, init="paper"), "EMAML": EMAML(model, init="paper"),
                "MAML": MAML(model, init="paper")}

    def step(learner, loss_fn):
        learner.zero_grad()
        loss_fn(batch).backward()

    bmaml = learners["BMAML"]
    step(bmaml, bmaml.meta_loss)
    g_vec = bmaml.theta0.grad.clone()
    step(bmaml, lambda b: loop_meta_loss(bmaml, b))
    assert torch.allclose(g_vec, bmaml.theta0.grad, rtol=1e-3, atol=1e-4), "loop disagrees"

    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}; M=10, T=10, K=10, "
          f"1-40-40-40-1 (D={bmaml.potential.dim}), n=s=1")
    times = {name: median_time(lambda l=l: step(l, l.meta_loss), repeats)
             for name, l in learners.items()}
    times["BMAML python loop"] = median_time(lambda: step(bmaml, lambda b: loop_meta_loss(bmaml, b)),
                                             max(3, repeats // 4))
    for name, t in times.items():
        print(f"{name:>18}: {t * 1e3:8.1f} ms per meta-step")
    print(f"BMAML vectorized vs python loop: {times['BMAML python loop'] / times['BMAML']:.1f}x")
    print("(quoted, not measured here: the official TensorFlow code was reported at about "
          "0.42 s per meta-step on a similar 2-core machine; no ratio is computed against it)")


if __name__ == "__main__":
    main()
