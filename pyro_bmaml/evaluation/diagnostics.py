r"""ArviZ encoding of particle posteriors. Every ArviZ call of the package lives here.

:func:`to_inference_data` turns a :class:`~pyro_bmaml.engine.posterior.ParticlePosterior` (one task
or a batch) into an :class:`arviz.InferenceData`:

=============================== ===========================================================
group                           content, dims after ``(chain, draw)``
=============================== ===========================================================
``posterior``                   every latent site: ``(task, *site_dims)``; ``chain`` has size
                                1, ``draw`` has size M and a ``particle`` coordinate
``prior``                       the meta-learned initial particles (the learned prior, when
                                the posterior came from a meta-learner): ``(*site_dims)``
``observed_data``               support targets, named as the model's data site (e.g.
                                ``y``): ``(task, support, *y dims)``
``constant_data``               support inputs ``x``: ``(task, support, feature)`` (or
                                ``x_dim_0, ...`` for images and other shapes)
``log_likelihood``              ``y``: per particle and support point, ``(task, support)``
``posterior_predictive``        ``y``: one draw per particle at the support inputs
``predictions``                 ``y``: one draw per particle at the query inputs,
                                ``(task, query)`` (when query inputs are given), and
                                ``mean``: each particle's predictive mean there (the
                                model's return value: class probabilities for a
                                classifier, ``(task, query, mean_dim_0)``)
``predictions_constant_data``   query inputs ``x``: ``(task, query, feature)``
=============================== ===========================================================

Attributes: inference method, number of particles, kernel and bandwidth rule, number of
steps, step size (whatever the posterior's ``info`` holds).

**What not to read off it.** The particles are M deterministic points of one transport,
not Markov chains: R-hat needs several chains (with one it is NaN), ESS would depend only on
the order the particles are stored in, and PSIS-LOO's Pareto k-hat is unreliable at S = 10
draws. :func:`summary` therefore asks ArviZ for ``kind="stats"`` only. Use the kernelized
Stein discrepancy (:mod:`pyro_bmaml.engine.ksd`) and held-out predictive scores
(:mod:`pyro_bmaml.evaluation.metrics`) instead.

**ArviZ 1.x.** ArviZ >= 1.0 replaces ``InferenceData`` with ``xarray.DataTree``. The groups
above are built as ``xarray.Dataset`` s (:func:`inference_data_groups`) and only
:func:`to_inference_data` wraps them: on 1.x, wrapping them as
``xarray.DataTree.from_dict(groups)`` is the one change needed.
"""

from __future__ import annotations

from typing import Dict, Optional

import numpy as np
import torch

from ..engine.posterior import ParticlePosterior

__all__ = ["inference_data_groups", "to_inference_data", "summary"]


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()


def _site_arrays(potential, flat: torch.Tensor, with_task: bool):
    """Named site values as numpy ``(1, M, [task,] *site_dims)`` with plate singletons
    squeezed, and their dim names."""
    arrays, dims = {}, {}
    named = potential.unpack(flat)  # (T, M, *shape) or (M, *shape)
    for site in potential.sites:
        value = named[site.name]
        lead = value.dim() - len(site.shape)
        batch_ndim = len(site.shape) - site.event_dim
        keep = [i for i, n in enumerate(site.shape) if i >= batch_ndim or n != 1]
        value = value.reshape(value.shape[:lead] + tuple(site.shape[i] for i in keep))
        if with_task:  # (T, M, ...) -> (M, T, ...)
            value = value.transpose(0, 1)
        arrays[site.name] = _np(value)[None]
        dims[site.name] = (["task"] if with_task else []) + [
            f"{site.name}_dim_{j}" for j in range(len(keep))
        ]
    return arrays, dims


def _draw_coords(ds, num_particles):
    return ds.assign_coords(particle=("draw", np.arange(num_particles)))


def inference_data_groups(
    posterior: ParticlePosterior,
    x_query: Optional[torch.Tensor] = None,
    y_query: Optional[torch.Tensor] = None,
) -> Dict[str, "object"]:
    """The groups of :func:`to_inference_data` as ``{name: xarray.Dataset}``."""
    import xarray as xr

    batched = posterior.batched
    post = posterior if batched else _as_batch(posterior)
    potential, m = post.potential, post.num_particles
    groups: Dict[str, xr.Dataset] = {}

    def dataset(arrays, dims):
        return xr.Dataset({k: (["chain", "draw"] + dims[k], v) for k, v in arrays.items()})

    arrays, dims = _site_arrays(potential, post.particles, with_task=True)
    groups["posterior"] = dataset(arrays, dims)
    init = posterior.info.get("initial_particles")
    if init is not None:
        arrays, dims = _site_arrays(potential, init, with_task=False)
        groups["prior"] = dataset(arrays, dims)

    obs = potential.observation_site or "y"  # the data site's own name, e.g. "y" or "obs"

    def trailing(name, t, lead):
        """Dim names of a data tensor's dims after its ``lead`` ones (``feature`` for one
        input dim, as before; ``{name}_dim_{i}`` otherwise, e.g. an image's C, H, W)."""
        extra = t.dim() - lead
        if name == "x" and extra == 1:
            return ["feature"]
        return [f"{name}_dim_{i}" for i in range(extra)]

    def per_draw(t, points):  # (T, M, N, ...) -> (1, M, T, N, ...) numpy, and its dims
        return (_np(t.transpose(0, 1))[None],
                ["chain", "draw", "task", points] + trailing(obs, t, 3))

    if post.x_support is not None:
        x, y = post.x_support, post.y_support
        groups["observed_data"] = xr.Dataset({obs: (["task", "support"] + trailing(obs, y, 2),
                                                    _np(y))})
        groups["constant_data"] = xr.Dataset({"x": (["task", "support"] + trailing("x", x, 2),
                                                    _np(x))})
        with torch.no_grad():
            log_lik = potential.log_likelihood(post.particles, x, y)  # (T, M, K)
            draws = post.predict(x, num_samples=1)["samples"]  # (T, M, K, ...)
        dim = ["chain", "draw", "task", "support"]
        groups["log_likelihood"] = xr.Dataset({obs: (dim, _np(log_lik.transpose(0, 1))[None])})
        values, dims = per_draw(draws, "support")
        groups["posterior_predictive"] = xr.Dataset({obs: (dims, values)})
    if x_query is not None:
        xq = x_query if batched else x_query[None]
        with torch.no_grad():
            prediction = post.predict(xq, num_samples=1)
        values, dims = per_draw(prediction["samples"], "query")
        data = {obs: (dims, values)}
        mean = prediction["particle_means"]  # (T, M, Q, ...): class probabilities, or f(x)
        data["mean"] = (["chain", "draw", "task", "query"]
                        + [f"mean_dim_{i}" for i in range(mean.dim() - 3)],
                        _np(mean.transpose(0, 1))[None])
        groups["predictions"] = xr.Dataset(data)
        const = {"x": (["task", "query"] + trailing("x", xq, 2), _np(xq))}
        if y_query is not None:
            yq = y_query if batched else y_query[None]
            const[obs] = (["task", "query"] + trailing(obs, yq, 2), _np(yq))
        groups["predictions_constant_data"] = xr.Dataset(const)

    # netCDF attributes: strings and numbers only (bools and tensors are left out)
    attrs = {k: v for k, v in posterior.info.items()
             if isinstance(v, (str, int, float)) and not isinstance(v, bool)}
    attrs.setdefault("inference_method", "svgd")
    attrs["num_particles"] = m
    for name, ds in groups.items():
        if "draw" in ds.dims:
            ds = _draw_coords(ds, m)
        groups[name] = ds.assign_attrs(attrs)
    return groups


def _as_batch(posterior: ParticlePosterior) -> ParticlePosterior:
    sup = posterior.x_support
    return ParticlePosterior(
        posterior.potential, posterior.particles[None],
        None if sup is None else sup[None],
        None if sup is None else posterior.y_support[None],
        info=posterior.info,
    )


def to_inference_data(
    posterior: ParticlePosterior,
    x_query: Optional[torch.Tensor] = None,
    y_query: Optional[torch.Tensor] = None,
):
    """ArviZ :class:`~arviz.InferenceData` of a particle posterior (see the module doc).

    :param x_query, y_query: optional query inputs (``(Q, in)`` or ``(T, Q, in)``) and
        targets, encoded in ``predictions`` / ``predictions_constant_data``.
    """
    import arviz as az

    return az.InferenceData(**inference_data_groups(posterior, x_query, y_query))


def summary(idata, **kwargs):
    """``az.summary(..., kind="stats")``: means, sds and HDIs, without R-hat / ESS / MCSE
    (meaningless for SVGD particles, see the module doc)."""
    import arviz as az

    kwargs.setdefault("kind", "stats")
    if kwargs["kind"] != "stats":
        raise ValueError(
            "only kind='stats' is meaningful for SVGD particles (R-hat, ESS and MCSE assume "
            f"Markov chains); got kind={kwargs['kind']!r}"
        )
    return az.summary(idata, **kwargs)
