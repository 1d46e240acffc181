"""On a CUDA machine: the engine and a BMAML meta-step give the same numbers as on the CPU,
and how long a meta-step takes there.  Run: python benchmarks/gpu_check.py"""


import pyro
import torch
from _timing import median_time

from pyro_bmaml.meta.learners import BMAML
from pyro_bmaml.tasks.models import BayesianMLP
from pyro_bmaml.tasks.base import Sinusoid




def main():
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check")
        return
    torch.set_default_dtype(torch.float64)
    pyro.set_rng_seed(0)
    model = BayesianMLP()
    batch = Sinusoid(num_tasks=100, num_support=10).sample(10, torch.Generator().manual_seed(0))
    batch = batch.to(torch.float64)
    results = {}
    for device in ("cpu", "cuda"):
        pyro.set_rng_seed(0)
        learner = BMAML(model, init="paper", inner_steps=1, learn_step_size=False,
                        chaser_trains_noise=True).to(device)
        b = batch.to(device)
        learner.zero_grad()
        loss = learner.meta_loss(b)
        loss.backward()
        results[device] = (loss.item(), learner.theta0.grad.cpu())
        sync = torch.cuda.synchronize if device == "cuda" else None

        def step():
            learner.zero_grad()
            learner.meta_loss(b).backward()

        print(f"{device}: float64 meta-step {median_time(step, 20, sync=sync) * 1e3:.1f} ms")
    (l_cpu, g_cpu), (l_gpu, g_gpu) = results["cpu"], results["cuda"]
    print(f"meta-loss cpu {l_cpu:.10g} cuda {l_gpu:.10g}")
    print("meta-gradient max |cpu - cuda| / max |cpu|:",
          ((g_cpu - g_gpu).abs().max() / g_cpu.abs().max()).item())
    assert abs(l_cpu - l_gpu) <= 1e-8 * abs(l_cpu) and torch.allclose(g_cpu, g_gpu, rtol=1e-6, atol=1e-9)
    print("CPU and CUDA agree")


if __name__ == "__main__":
    main()
