"""Ceilings of the families suite: what the best possible start, or the best possible
classifier of a given form, reaches on two families where BMAML falls short of the targets.

1. **Normal-Gamma: SVGD steps from the family's true prior.** The best a learned prior can
   give BMAML is a start drawn from the family's own prior. Ten draws of it (slope,
   intercept, log precision: the user's model's unconstrained coordinates) are adapted to
   each held-out task by ``n`` SVGD steps of the user's broad-prior model with a fixed step
   on the slope and intercept (the learner's 1e-3 on the noise), for several steps and step
   sizes; the table gives each ``n``'s best gap closed over the step sizes (mean over three
   sets of draws). If three steps from the true prior close little of the gap, no prior
   learned for three steps will: the adaptation, not the prior, is what limits it. A second
   table takes the same steps with the family's true prior in the SVGD target as well (the
   model a learned prior could at best stand for), to tell the start from the target.
2. **Subspace N-way: the classifier's form.** The broad-prior reference is exact inference
   in the *generative* model (Gaussian classes), whose class scores
   :math:`x^\\top P m_c - \\tfrac12 m_c^\\top P m_c` carry each class's norm term. A softmax
   regression adapted by a few gradient steps from weights that cannot favour a class
   (labels are permuted every episode) moves each class's weights along its support point
   and its bias by the prediction error alone: its scores take the form
   :math:`x^\\top A m_c` plus a small bias, without the norm term. The table gives the
   accuracy of both forms with the exact :math:`P, m_c` under the true and the broad prior.

Writes ``OUT.md`` and ``OUT.json``.

    python examples/families_ceilings.py --update-results
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pyro
import pyro.distributions as dist
import torch

from _runs import output_prefix
from pyro_bmaml import BMAML
from pyro_bmaml.tasks.synthetic import FAMILIES, gap_closed


def true_prior_draws(family, num: int, seed: int) -> torch.Tensor:
    """``num`` draws of the Normal-Gamma family's (slope, intercept, log precision)."""
    g = torch.Generator().manual_seed(seed)
    tau = torch._standard_gamma(torch.full((num,), family.a0), generator=g) / family.b0
    w = torch.tensor(family.m0) + torch.randn(num, 2, generator=g) / (
        tau[:, None] * family.lambda0.diagonal()).sqrt()
    return torch.cat([w, tau.log()[:, None]], 1)


def true_prior_model(family):
    """The Normal-Gamma family's generative model as a Pyro model with the user's sites
    (``a``, ``b``, ``tau``): the family's own prior in place of the user's broad one."""
    lam = family.lambda0.diagonal()
    m0 = family.m0

    def model(x, y=None):
        tau = pyro.sample("tau", dist.Gamma(family.a0, family.b0))
        a = pyro.sample("a", dist.Normal(m0[0], (tau * lam[0]).rsqrt()))
        b = pyro.sample("b", dist.Normal(m0[1], (tau * lam[1]).rsqrt()))
        mean = a * x[:, 0] + b
        with pyro.plate("data", x.shape[0]):
            pyro.sample("y", dist.Normal(mean, tau.rsqrt()), obs=y)
        return mean

    return model


def normal_gamma_ceiling(steps, step_sizes, seeds, particles, eval_tasks, target="broad"):
    family = FAMILIES["normal-gamma"]()
    model = family.model if target == "broad" else true_prior_model(family)
    tasks = family.evaluation_tasks(eval_tasks)
    refs = family.references(tasks)
    rows = []
    for n in steps:
        by_step = {}
        for s in step_sizes:
            gaps = []
            for seed in seeds:
                pyro.set_rng_seed(seed)
                draws = true_prior_draws(family, particles, seed)
                draws = torch.cat([draws[:, :2], draws[:, 2:].exp()], 1)  # tau constrained
                learner = BMAML(model, num_particles=particles,
                                init=dict(zip(("a", "b", "tau"), draws.T)),
                                noise_sites=["tau"],
                                example_args=family.example_args(), learn_step_size=False,
                                step_size=s, noise_step_size=1e-3, calibration="none")
                assert sorted(learner.potential.site_names) == ["a", "b", "tau"]
                try:
                    post = learner.adapt(tasks.x_support, tasks.y_support, num_steps=n)
                    nll = family.metrics(post, tasks.x_query, tasks.y_query)["nll"][0]
                    gaps.append(gap_closed(nll, refs["broad"], refs["true"]))
                except FloatingPointError:  # the step diverged
                    gaps.append(float("-inf"))
            by_step[s] = sum(gaps) / len(gaps)
        best = max(by_step, key=by_step.get)
        rows.append({"steps": n, "gap_by_step": by_step, "best_step": best,
                     "best_gap": by_step[best]})
    return {"refs": refs, "rows": rows}


def subspace_ceiling(eval_tasks):
    family = FAMILIES["subspace-classification"]()
    tasks = family.evaluation_tasks(eval_tasks)
    onehot = torch.nn.functional.one_hot(tasks.y_support, family.ways).double()
    sums = onehot.transpose(1, 2) @ tasks.x_support.double()  # (T, C, d)
    counts = onehot.sum(1)[..., None]
    xq = tasks.x_query.double()
    eye = torch.eye(family.dim, dtype=torch.float64)
    out = {}
    for prior in ("true", "broad"):
        sigma0 = family.prior_covariance(prior).double()
        # each class mean's posterior (K points of sd 1): precision Sigma0^-1 + K I
        cov = torch.linalg.inv(torch.linalg.inv(sigma0) + counts[..., None] * eye)  # (T, C, d, d)
        mean = (cov @ sums.unsqueeze(-1)).squeeze(-1)
        precision = torch.linalg.inv(cov + eye)
        linear = torch.einsum("tqd,tcde,tce->tqc", xq, precision, mean)
        norm = torch.einsum("tcd,tcde,tce->tc", mean, precision, mean)
        full = linear - 0.5 * norm[:, None]
        out[prior] = {
            "with_norm_term": float((full.argmax(-1) == tasks.y_query).double().mean()),
            "without_norm_term": float((linear.argmax(-1) == tasks.y_query).double().mean()),
        }
    return out


#: the Gaussian priors over the softmax regression's (w, b) of :func:`softmax_map_ceiling`:
#: (label, weight rows' covariance (from the family), the biases' sd)
SOFTMAX_PRIORS = (
    ("the user's: w, b ~ N(0, 1)", "identity", 1.0),
    ("isotropic, the class means' scale: w ~ N(0, tr(S0) / 16 I), b ~ N(0, 3^2)", "isotropic", 3.0),
    ("the class means' covariance: w ~ N(0, S0), b ~ N(0, 3^2)", "structured", 3.0),
)


def softmax_map_ceiling(eval_tasks, iterations: int = 200):
    """The user's softmax regression fitted by MAP to each task's support under three
    Gaussian priors over its weight rows (:data:`SOFTMAX_PRIORS`; ``S0`` the family's class
    -mean covariance), and its plug-in predictive on the query points: what inference in
    the user's own model reaches when the prior in its target, not only the start, carries
    the family's structure."""
    family = FAMILIES["subspace-classification"]()
    tasks = family.evaluation_tasks(eval_tasks)
    refs = family.references(tasks)
    sigma0 = family.prior_covariance("true").double()
    dim, ways = family.dim, family.ways
    xs, ys = tasks.x_support.double(), tasks.y_support
    xq, yq = tasks.x_query.double(), tasks.y_query
    rows = []
    for label, form, bias_sd in SOFTMAX_PRIORS:
        cov = {"identity": torch.eye(dim, dtype=torch.float64),
               "isotropic": sigma0.trace() / dim * torch.eye(dim, dtype=torch.float64),
               "structured": sigma0}[form]
        precision = torch.linalg.inv(cov)
        w = torch.zeros(len(ys), ways, dim, dtype=torch.float64, requires_grad=True)
        b = torch.zeros(len(ys), ways, dtype=torch.float64, requires_grad=True)
        opt = torch.optim.LBFGS([w, b], max_iter=iterations, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            logits = torch.einsum("tnd,tcd->tnc", xs, w) + b[:, None]
            log_lik = logits.log_softmax(-1).gather(-1, ys[..., None]).sum()
            log_prior = (-0.5 * torch.einsum("tcd,de,tce->", w, precision, w)
                         - 0.5 * b.pow(2).sum() / bias_sd ** 2)
            loss = -(log_lik + log_prior)
            loss.backward()
            return loss

        opt.step(closure)
        with torch.no_grad():
            log_probs = (torch.einsum("tnd,tcd->tnc", xq, w) + b[:, None]).log_softmax(-1)
            nll = float(-log_probs.gather(-1, yq[..., None]).mean())
            accuracy = float((log_probs.argmax(-1) == yq).double().mean())
        rows.append({"prior": label, "nll": nll, "accuracy": accuracy,
                     "gap_closed": gap_closed(nll, refs["broad"], refs["true"])})
    return {"refs": refs, "reference_accuracy": {p: family.reference_metrics(tasks, p)["accuracy"]
                                                 for p in ("true", "broad")}, "rows": rows}


def _ceiling_table(ng, step_sizes) -> list:
    lines = ["| steps | " + " | ".join(f"step {s:g}" for s in step_sizes) + " | best |",
             "|---|" + "---|" * (len(step_sizes) + 1)]
    for row in ng["rows"]:
        cells = [f"{row['gap_by_step'][s]:.2f}" for s in step_sizes]
        lines.append(f"| {row['steps']} | " + " | ".join(cells)
                     + f" | {row['best_gap']:.2f} (step {row['best_step']:g}) |")
    return lines


def markdown(result, args) -> str:
    ng, sub = result["normal_gamma"], result["subspace"]
    lines = [
        "# Families suite: ceilings", "",
        f"`python examples/families_ceilings.py{' --update-results' if args.update_results else ''}`"
        f" ({args.eval_tasks} held-out Normal-Gamma tasks, M = {args.particles} draws of the "
        f"family's true prior, mean over {len(args.draws)} sets of draws; "
        f"{args.subspace_tasks} held-out N-way tasks).", "",
        "## Normal-Gamma: SVGD steps from the family's true prior", "",
        f"References (NLL per point): Bayes-optimal {ng['refs']['true']:.3f}, broad prior "
        f"{ng['refs']['broad']:.3f}. Gap closed by the ten draws after n steps, per step size "
        "on the slope and intercept (-inf: a step diverged).", "",
        "Target: the user's model (its broad prior).", "",
        *_ceiling_table(ng, args.step_sizes),
    ]
    if "normal_gamma_true_target" in result:
        lines += ["", "Target: the family's own model (its true prior in place of the broad "
                  "one): the best a learned prior could stand for, from the same draws.", "",
                  *_ceiling_table(result["normal_gamma_true_target"], args.step_sizes)]
    lines += ["", "## Subspace N-way: accuracy of the two forms of classifier", "",
              "| prior | class scores with the norm term (generative, exact) | without it "
              "(the form a few gradient steps give a softmax regression) |",
              "|---|---|---|"]
    for prior in ("true", "broad"):
        lines.append(f"| {prior} | {sub[prior]['with_norm_term']:.3f} | "
                     f"{sub[prior]['without_norm_term']:.3f} |")
    if "softmax_map" in result:
        sm = result["softmax_map"]
        acc = sm["reference_accuracy"]
        lines += ["", "## Subspace N-way: the user's softmax regression under other priors", "",
                  f"MAP of the user's model on each task's support, plug-in predictive on its "
                  f"queries ({args.softmax_tasks} held-out tasks). References: Bayes-optimal NLL "
                  f"{sm['refs']['true']:.3f} (accuracy {acc['true']:.3f}), broad prior "
                  f"{sm['refs']['broad']:.3f} (accuracy {acc['broad']:.3f}). S0 is the "
                  "family's class-mean covariance (the subspace): only a prior that carries it "
                  "takes the user's model past the broad reference; a learned start adapted "
                  "under the user's N(0, 1) cannot.", "",
                  "| prior | NLL | gap closed | accuracy |", "|---|---|---|---|"]
        for row in sm["rows"]:
            lines.append(f"| {row['prior']} | {row['nll']:.3f} | {row['gap_closed']:.2f} | "
                         f"{row['accuracy']:.3f} |")
    return "\n".join(lines) + "\n"


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, nargs="+", default=[1, 3, 10, 30])
    p.add_argument("--step-sizes", type=float, nargs="+", default=[0.01, 0.02, 0.04, 0.08])
    p.add_argument("--draws", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--particles", type=int, default=10)
    p.add_argument("--eval-tasks", type=int, default=200)
    p.add_argument("--subspace-tasks", type=int, default=2000)
    p.add_argument("--softmax-tasks", type=int, default=500)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--update-results", action="store_true")
    args = p.parse_args()
    out = output_prefix(args, "families_ceilings")
    result = {"normal_gamma": normal_gamma_ceiling(args.steps, args.step_sizes, args.draws,
                                                   args.particles, args.eval_tasks),
              "normal_gamma_true_target": normal_gamma_ceiling(
                  args.steps, args.step_sizes, args.draws, args.particles, args.eval_tasks,
                  target="true"),
              "subspace": subspace_ceiling(args.subspace_tasks),
              "softmax_map": softmax_map_ceiling(args.softmax_tasks),
              "settings": {k: v for k, v in vars(args).items() if k not in ("out",)}}
    out.with_suffix(".json").write_text(json.dumps(result, indent=2, default=str))
    text = markdown(result, args)
    out.with_suffix(".md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
