r"""Pyro model -> joint log density over flat, unconstrained particles.

A particle is one row of a ``(M, D)`` tensor: the concatenation of every continuous latent
site of the model, each mapped to unconstrained space with
:func:`torch.distributions.biject_to` of its support. The potential is

.. math::

    \log \tilde p(u \mid \text{data}) = \log p\big(T(u), \text{data}\big)
        + \log \left|\det \frac{\partial T(u)}{\partial u}\right|

with :math:`T` the site-wise bijection, so densities of constrained sites (e.g. a Gamma
precision sampled in log space) are correct in the space the particles move in.

The user's model is plain Pyro: it is written for *one* set of latent values and never has
to broadcast over a particle dimension. :class:`ModelPotential` vectorizes it with
:func:`torch.func.vmap` over particles (and over tasks, whose data arrive with a leading
task dimension). Pyro's validation is switched off *inside* the vectorized call only:
its NaN and support checks are data-dependent control flow that ``vmap`` cannot trace.
"""

from __future__ import annotations

import copy
import inspect
import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.poutine.util import site_is_subsample
from torch.distributions import biject_to
from torch.distributions.transforms import Transform
from torch.utils._pytree import (keystr, tree_flatten, tree_flatten_with_path, tree_leaves,
                                 tree_map, tree_unflatten)

from .._checks import check_int, check_particles, describe_arguments
from .capture import GraphCache

__all__ = ["LatentSite", "ModelPotential", "PerParticle"]


@dataclass(frozen=True)
class LatentSite:
    """One continuous latent site of a Pyro model and its slice of a flat particle.

    :ivar name: the Pyro site name.
    :ivar shape: shape of the constrained value for one particle (plate dims included).
    :ivar unconstrained_shape: shape after ``transform.inv`` (differs for e.g. simplexes).
    :ivar transform: ``biject_to(support)``, unconstrained -> constrained.
    :ivar offset: first column of the site in a flat particle.
    :ivar size: number of columns (numel of ``unconstrained_shape``).
    :ivar event_dim: trailing dims of ``shape`` that are the distribution's event dims (the
        others are batch/plate dims).
    """

    name: str
    shape: torch.Size
    unconstrained_shape: torch.Size
    transform: Transform
    offset: int
    size: int
    event_dim: int = 0

    @property
    def columns(self) -> slice:
        return slice(self.offset, self.offset + self.size)


def _finite_support(fn) -> Optional[torch.Tensor]:
    """``(S,)`` the values one observation of distribution ``fn`` can take, when they are
    finitely many and one per point (``event_shape == ()``, e.g. ``Categorical``,
    ``Bernoulli``); else ``None``."""
    if fn is None or not getattr(fn, "has_enumerate_support", False) or tuple(fn.event_shape):
        return None
    try:
        return fn.enumerate_support(expand=False).reshape(-1).detach()
    except NotImplementedError:
        return None


def _is_tensor(x: Any) -> bool:
    return isinstance(x, torch.Tensor)


class PerParticle:
    """A model argument with its own value for each particle: shape ``(M, ...)``, or
    ``(T, M, ...)`` in a task-batched call. The model sees one particle's slice, as it sees
    one task's data. Meta-RL needs it: each policy particle is scored on its own rollouts
    (:mod:`pyro_bmaml.tasks.navigation`).

    :param tensor: the values, with the particle dim first (after the task dim).
    """

    def __init__(self, tensor: torch.Tensor):
        if not isinstance(tensor, torch.Tensor) or tensor.dim() < 1:
            raise TypeError(f"PerParticle takes a tensor with a particle dim, got "
                            f"{type(tensor).__name__ if not isinstance(tensor, torch.Tensor) else tuple(tensor.shape)}")
        self.tensor = tensor

    def __repr__(self) -> str:
        return f"PerParticle(shape={tuple(self.tensor.shape)})"


def _is_per_particle(x: Any) -> bool:
    return isinstance(x, PerParticle)


def split_per_particle(args: tuple, kwargs: dict):
    """``(args, kwargs, dims)``: the arguments with :class:`PerParticle` values unwrapped,
    and the matching tree of vmap dims over particles (0 for those, ``None`` otherwise)."""
    leaves, spec = tree_flatten((args, kwargs), is_leaf=_is_per_particle)
    marked = [_is_per_particle(a) for a in leaves]
    if not any(marked):  # the usual case: one flatten, nothing to unwrap
        return args, kwargs, tree_unflatten([None] * len(leaves), spec)
    plain = tree_unflatten([a.tensor if m else a for a, m in zip(leaves, marked)], spec)
    return plain[0], plain[1], tree_unflatten([0 if m else None for m in marked], spec)


def check_task_batched(num_tasks: int, args: tuple, kwargs: dict) -> None:
    """Every tensor argument of a task-batched call must have leading dim ``num_tasks``."""
    for i, leaf in enumerate(tree_leaves((args, kwargs))):
        if _is_tensor(leaf) and (leaf.dim() == 0 or leaf.size(0) != num_tasks):
            # the paths are built only to name the bad argument
            path, _ = tree_flatten_with_path((args, kwargs))[0][i]
            head = "args" if path[0].idx == 0 else "kwargs"
            raise ValueError(
                f"with particles of shape (T={num_tasks}, M, D) every tensor argument of the "
                f"model must have a leading task dim of size {num_tasks}; "
                f"{head}{keystr(path[1:])} has shape {tuple(leaf.shape)}"
            )


class _FillUnobserved(poutine.messenger.Messenger):
    """Unobserved sample sites take zeros of their shape and dtype instead of a draw: the
    data sites of a model called without data, whose draws :meth:`ModelPotential.model_output`
    discards (no randomness under vmap: a Categorical over per-particle logits cannot be
    drawn there with "same" randomness, an unbatched Normal not with "different")."""

    def _pyro_sample(self, msg):
        if msg["is_observed"] or msg["value"] is not None or site_is_subsample(msg):
            return
        fn = msg["fn"]
        shape = fn.batch_shape + fn.event_shape
        dtype = torch.long if fn.support.is_discrete else None
        probe = next((v for v in fn.__dict__.values() if isinstance(v, torch.Tensor)), None)
        msg["value"] = (probe.new_zeros(shape, dtype=dtype) if probe is not None
                        else torch.zeros(shape, dtype=dtype))
        msg["done"] = True


class ModelPotential:
    """The joint log density of a Pyro model, evaluated on flat unconstrained particles.

    :param model: a Pyro model (a function or a :class:`~pyro.nn.PyroModule`) whose latent
        sites are all continuous. It is called with one task's data and one set of latent
        values; it need not be vectorized.

    The latent sites are discovered by tracing the model once (:meth:`setup`, called
    lazily on first use with the first task's arguments). Shapes:

    - ``particles``: ``(M, D)`` with unbatched model arguments, or ``(T, M, D)`` where every
      tensor argument has a leading task dim ``T``;
    - :meth:`log_density` returns ``(M,)`` or ``(T, M)``.
    """

    def __init__(self, model: Callable, capture: bool = True):
        if not callable(model):
            raise TypeError(f"model must be callable (a Pyro model), got {type(model).__name__}")
        self.model = model
        #: record the vectorized log density / likelihood once per input signature and
        #: replay it (:mod:`pyro_bmaml.engine.capture`); off for models that read ``pyro.param``
        self.capture = bool(capture)
        self._graphs = {"log_density": GraphCache("log density"),
                        "log_likelihood": GraphCache("log likelihood")}
        self.sites: Optional[List[LatentSite]] = None
        #: name of the model's (first) data site, found at setup; None if it has none
        self.observation_site: Optional[str] = None
        #: whether that site's likelihood is over discrete values (e.g. class labels)
        self.observation_discrete = False
        #: the values one observation can take, ``(S,)``, when they are finitely many and
        #: the same for every point (a ``Categorical`` or ``Bernoulli`` likelihood), else
        #: ``None`` (see :meth:`support_log_likelihood`)
        self.observation_support: Optional[torch.Tensor] = None
        self._x_point_dims: Optional[int] = None
        #: the module parameters this view runs the model with (:meth:`with_parameters`)
        self.parameters: Optional[Dict[str, torch.Tensor]] = None
        self._active: Optional[Dict[str, torch.Tensor]] = None  # inside a vectorized call
        #: the log prior this view uses in place of the model's own (:meth:`with_prior`)
        self.prior: Optional[Callable[[torch.Tensor], torch.Tensor]] = None

    # ------------------------------------------------------------------ module parameters
    def with_parameters(self, parameters: Optional[Dict[str, torch.Tensor]]) -> "ModelPotential":
        """A view of this potential whose model runs with ``parameters`` in place of the
        module's own (:func:`torch.func.functional_call`): e.g. a shared feature extractor
        adapted to each task in the inner loop. Each value has the parameter's shape, or a
        leading task dim ``T`` (one value per task of a ``(T, M, D)`` call). The view shares
        the sites; ``None`` gives back a view with the module's own parameters."""
        if parameters is not None:
            if not isinstance(self.model, torch.nn.Module):
                raise TypeError("with_parameters needs a model that is a torch.nn.Module, got "
                                f"{type(self.model).__name__}")
            own = dict(self.model.named_parameters())
            for name, value in parameters.items():
                if name not in own:
                    raise ValueError(f"parameters: the model has no parameter {name!r} "
                                     f"(it has {sorted(own)})")
                shape = tuple(own[name].shape)
                if not (isinstance(value, torch.Tensor)
                        and shape in (tuple(value.shape), tuple(value.shape[1:]))):
                    raise ValueError(
                        f"parameters[{name!r}] must have shape {shape} or (T, *{shape}), got "
                        f"{tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__}")
        view = copy.copy(self)
        view.parameters = None if parameters is None else dict(parameters)
        return view

    def with_prior(self, log_prior: Optional[Callable[[torch.Tensor], torch.Tensor]]
                   ) -> "ModelPotential":
        r"""A view of this potential whose :meth:`log_density` has ``log_prior`` in place
        of the model's priors: :math:`\sum_n \log p(y_n \mid \theta) + \log q(\theta)`,
        the observed sites' log likelihood (:meth:`log_likelihood`) plus ``log_prior(theta)``,
        a density over the flat *unconstrained* vector (so no Jacobian is added), mapping
        ``(..., D)`` to ``(...)`` differentiably (e.g. a meta-learned
        :class:`~pyro_bmaml.engine.learned_prior.GaussianPrior`'s ``log_prob``). The view's
        log density is not recorded (the replayed and compiled fast paths read the model's
        own prior), so it is evaluated with autograd. ``None`` gives the model's priors back."""
        if log_prior is not None and not callable(log_prior):
            raise TypeError(f"log_prior must be callable (particles -> log density) or None, "
                            f"got {type(log_prior).__name__}")
        view = copy.copy(self)
        view.prior = log_prior
        return view

    def _per_task_parameters(self) -> bool:
        own = dict(self.model.named_parameters())
        return any(v.dim() > own[k].dim() for k, v in self.parameters.items())

    def task_view(self, index: int) -> "ModelPotential":
        """The view of task ``index`` of a task-batched call (its own parameters)."""
        if self.parameters is None or not self._per_task_parameters():
            return self
        return self.with_parameters({k: v[index] for k, v in self.parameters.items()})

    def call_model(self, *args, **kwargs):
        """Run the model (with this view's parameters, see :meth:`with_parameters`)."""
        params = self._active if self._active is not None else self.parameters
        if params is None:
            return self.model(*args, **kwargs)
        return torch.func.functional_call(self.model, params, args, kwargs)

    # ------------------------------------------------------------------ site discovery
    @property
    def is_setup(self) -> bool:
        return self.sites is not None

    @property
    def dim(self) -> int:
        """D, the number of unconstrained coordinates of one particle."""
        sites = self._require_sites()
        return sites[-1].offset + sites[-1].size

    @property
    def site_names(self) -> List[str]:
        return [s.name for s in self._require_sites()]

    def setup(self, *args, **kwargs) -> "ModelPotential":
        """Trace the model once with one task's arguments and record its latent sites."""
        try:
            signature = inspect.signature(self.model)
        except (TypeError, ValueError):  # a callable without an inspectable signature
            signature = None
        if signature is not None:
            try:
                signature.bind(*args, **kwargs)
            except TypeError as err:
                raise TypeError(f"the model cannot be called with these arguments ({err}); "
                                f"its signature is {signature}") from None
        with torch.no_grad():
            try:
                trace = poutine.trace(self.model).get_trace(*args, **kwargs)
            except Exception as err:  # the model cannot run on these arguments: say which
                kind = TypeError if isinstance(err, TypeError) else ValueError
                raise kind(
                    f"the model raised {type(err).__name__} when traced with its arguments "
                    f"{describe_arguments(args, kwargs)}: {str(err).splitlines()[0][:300]}"
                ) from err
        sites, offset = [], 0
        self.observation_site = next(
            (name for name, site in trace.nodes.items()
             if site["type"] == "sample" and site["is_observed"] and not site_is_subsample(site)
             and not site["infer"].get("_deterministic")), None)
        self.observation_discrete = self.observation_site is not None and bool(
            trace.nodes[self.observation_site]["fn"].support.is_discrete)
        self.observation_support = _finite_support(
            trace.nodes[self.observation_site]["fn"] if self.observation_site else None)
        self._check_observed_shapes(trace)
        # input dims per data point (the example's x less the observations' point dims)
        self._x_point_dims = (args[0].dim() - trace.nodes[self.observation_site]["value"].dim()
                              if self.observation_support is not None and args
                              and isinstance(args[0], torch.Tensor) else None)
        returned = trace.nodes["_RETURN"]["value"]
        #: the shape of the model's return value at setup (``None``: not a tensor), and of
        #: its first observed site's value (``None``: no observed site)
        self.returned_shape = tuple(returned.shape) if isinstance(returned, torch.Tensor) else None
        observed = None if self.observation_site is None else trace.nodes[self.observation_site]
        #: whether the first observed site is a ``pyro.factor`` (a weighted log-likelihood of
        #: data with no target, e.g. a policy's advantage-weighted actions)
        self.observation_factor = observed is not None and isinstance(observed["fn"], dist.Unit)
        self.observation_shape = (None if observed is None or self.observation_factor
                                  else tuple(observed["value"].shape))  # (a factor has no data)
        #: a model that reads pyro.param values is never recorded (they change between calls)
        self.reads_params = any(site["type"] == "param" for site in trace.nodes.values())
        for name, site in trace.nodes.items():
            if site["type"] != "sample" or site["is_observed"] or site_is_subsample(site):
                continue
            fn = site["fn"]
            support = fn.support
            if support.is_discrete or site["infer"].get("enumerate"):
                raise ValueError(
                    f"model has a discrete latent site '{name}' ({type(fn).__name__}); SVGD "
                    "needs continuous latent sites: marginalize it out or observe it"
                )
            transform = biject_to(support)
            value = site["value"].detach()
            unconstrained = transform.inv(value)
            size = unconstrained.numel()
            sites.append(LatentSite(name, value.shape, unconstrained.shape, transform, offset,
                                    size, len(fn.event_shape)))
            offset += size
        if not sites:
            raise ValueError(
                "model has no latent sample site (every pyro.sample is observed); "
                "there is nothing for SVGD to infer"
            )
        self.sites = sites
        return self

    def check_returned_mean(self) -> None:
        """Check the task-model convention that the model returns its predictive mean, one
        entry (or row) per observed point: the returned tensor's leading dims must be the
        observed site's shape, as set up. A model returning a scalar (``return a`` instead of
        ``return a * x[:, 0] + b``) would otherwise meta-train and predict a mean of shape
        ``()``. Models that return no tensor, or were set up without observations, pass.

        :raises ValueError: naming both shapes.
        """
        self._require_sites()
        returned, observed = self.returned_shape, self.observation_shape
        if returned is None or observed is None:
            return
        if returned[:len(observed)] != observed:
            raise ValueError(
                f"the model returns a tensor of shape {returned}, but its observed site "
                f"'{self.observation_site}' has shape {observed}: a task model returns its "
                f"predictive mean with one entry per observed point (leading dims {observed}; "
                "e.g. `return a * x[:, 0] + b`, not `return a`), which predict() and the "
                "metrics read")

    @staticmethod
    def _check_observed_shapes(trace) -> None:
        """Every observed site's pointwise log-likelihood must have one term per point of
        its plates: a likelihood whose batch shape broadcasts against the plate (a mean of
        shape ``(N, 1)`` against ``y`` of shape ``(N,)`` gives ``N x N`` terms) is an error."""
        for name, site in trace.nodes.items():
            if (site["type"] != "sample" or not site["is_observed"] or site_is_subsample(site)
                    or site["infer"].get("_deterministic")):
                continue
            plates = [f for f in site["cond_indep_stack"] if f.vectorized and f.size is not None]
            expected = math.prod(f.size for f in plates)
            value = site["value"]
            try:
                with torch.no_grad():
                    log_prob = site["fn"].log_prob(value)
            except (RuntimeError, IndexError, ValueError) as err:
                raise ValueError(
                    f"observed site '{name}': its {type(site['fn']).__name__} likelihood cannot "
                    f"be evaluated at the data (shape {tuple(value.shape)}, {value.dtype}): "
                    f"{str(err).splitlines()[0][:200]}") from err
            if log_prob.numel() != expected:
                sizes = ", ".join(f"{f.name}={f.size}" for f in plates) or "none"
                raise ValueError(
                    f"observed site '{name}': its log-likelihood has shape "
                    f"{tuple(log_prob.shape)} ({log_prob.numel()} terms) but its plates ({sizes}) "
                    f"hold {expected} points: the likelihood's batch shape "
                    f"{tuple(site['fn'].batch_shape)} broadcasts against the data "
                    f"{tuple(site['value'].shape)}. Likely cause: a mean computed from x of shape "
                    "(N, in), e.g. (N, 1), against y of shape (N,): use x[:, 0] or "
                    ".squeeze(-1), or declare extra dims with .to_event()")
            fn_shape = tuple(site["fn"].shape())
            value_shape = tuple(site["value"].shape)
            if value_shape != fn_shape and not isinstance(site["fn"], dist.Unit):
                raise ValueError(
                    f"observed site '{name}': the data have shape {value_shape} but the "
                    f"likelihood has shape {fn_shape} (its plates and event dims): the data "
                    "would be broadcast, one value standing for several points. Pass one "
                    f"observation per point, shape {fn_shape}")

    def setup_from(self, particles: torch.Tensor, args: tuple, kwargs: dict) -> None:
        """Set up lazily from a (possibly task-batched) call."""
        if self.sites is None:
            batched = _is_tensor(particles) and particles.dim() == 3
            # one particle's slice of per-particle arguments (task 0's in a batched call)
            args, kwargs = tree_map(
                lambda a: (a.tensor[0, 0] if batched else a.tensor[0]) if _is_per_particle(a)
                else (a[0] if batched and _is_tensor(a) else a),
                (args, kwargs), is_leaf=_is_per_particle)
            self.setup(*args, **kwargs)

    def _require_sites(self) -> List[LatentSite]:
        if self.sites is None:
            raise RuntimeError(
                "the potential has not seen the model's arguments yet: call "
                "setup(*model_args) (or evaluate it once) first"
            )
        return self.sites

    # ------------------------------------------------------------------ flat <-> named
    def unpack(self, flat: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Flat unconstrained ``(..., D)`` -> ``{site: constrained (..., *site_shape)}``."""
        sites = self._require_sites()
        if not _is_tensor(flat) or flat.dim() < 1 or flat.size(-1) != self.dim:
            got = tuple(flat.shape) if _is_tensor(flat) else type(flat).__name__
            raise ValueError(f"flat must have shape (..., {self.dim}), got {got}")
        batch = flat.shape[:-1]
        return {
            s.name: s.transform(flat[..., s.columns].reshape(batch + s.unconstrained_shape))
            for s in sites
        }

    def pack(self, named: Dict[str, torch.Tensor]) -> torch.Tensor:
        """``{site: constrained (..., *site_shape)}`` -> flat unconstrained ``(..., D)``."""
        sites = self._require_sites()
        if not isinstance(named, dict):
            raise TypeError(f"named must be a dict of site values, got {type(named).__name__}")
        missing = [s.name for s in sites if s.name not in named]
        extra = sorted(set(named) - {s.name for s in sites})
        if missing or extra:
            raise ValueError(
                f"named must hold exactly the latent sites {self.site_names}; "
                f"missing {missing}, unexpected {extra}"
            )
        pieces, batch = [], None
        for s in sites:
            value = torch.as_tensor(named[s.name])
            n = len(s.shape)
            if tuple(value.shape[value.dim() - n :]) != tuple(s.shape) or value.dim() < n:
                raise ValueError(
                    f"named['{s.name}'] must have shape (..., {', '.join(map(str, s.shape))}), "
                    f"got {tuple(value.shape)}"
                )
            value_batch = value.shape[: value.dim() - n]
            if batch is None:
                batch = value_batch
            elif value_batch != batch:
                raise ValueError(
                    f"named['{s.name}'] has batch shape {tuple(value_batch)}, other sites "
                    f"have {tuple(batch)}"
                )
            pieces.append(s.transform.inv(value).reshape(value_batch + (s.size,)))
        return torch.cat(pieces, dim=-1)

    def sample_prior(self, num_particles: int, *args, **kwargs) -> torch.Tensor:
        """Draw ``num_particles`` flat particles ``(M, D)`` from the model's prior.

        The model is run once per particle with one task's arguments (this is set-up, not a
        hot path, and it keeps user models free of particle broadcasting).
        """
        num_particles = check_int("num_particles", num_particles, 1)
        if self.sites is None:
            self.setup(*args, **kwargs)
        rows = []
        with torch.no_grad():
            for _ in range(num_particles):
                trace = poutine.trace(self.model).get_trace(*args, **kwargs)
                rows.append(self.pack({s.name: trace.nodes[s.name]["value"] for s in self.sites}))
        return torch.stack(rows).detach()

    def noise_sites(self, *args, **kwargs) -> Optional[List[str]]:
        """Latent sites that set the observation noise: the likelihood depends on them, the
        model's return value (its predictive mean, by the task-model convention) does not.

        Found by differentiating both at two particles drawn from the prior, and at the same
        two shrunk toward the origin of the unconstrained space (x 0.1, x 0.01), with one
        task's arguments: a site is a noise site when the mean's derivative in it is zero at
        all six and the likelihood's is not at one. The shrunk copies matter for outputs that
        saturate: under a broad prior (``BayesianClassifier(prior_scale=10)``) the draws' logits
        are so large that the class probabilities are exactly one-hot in floating point, their
        derivative is exactly zero in every weight, and all but the first layer were taken
        for noise sites. For :class:`~pyro_bmaml.tasks.models.BayesianMLP` this is
        ``noise_precision`` (``weight_precision`` enters neither directly). Returns ``None``
        for a model that returns no tensor, since the mean cannot be told apart from the
        noise there.
        """
        draws = self.sample_prior(2, *args, **kwargs)
        particles = torch.cat([draws, 0.1 * draws, 0.01 * draws]).requires_grad_(True)
        try:
            mean = self.model_output(particles, *args, **kwargs)
        except ValueError:  # the model returns no predictive mean
            return None
        if not mean.requires_grad:  # a mean that depends on no latent site
            return []
        # a random projection of the mean, not its sum: class probabilities sum to one, so
        # the gradient of their sum vanishes although they depend on every site
        g = torch.Generator(device=mean.device).manual_seed(0)
        weights = torch.rand(mean.shape, generator=g, device=mean.device, dtype=mean.dtype) + 0.5
        (d_mean,) = torch.autograd.grad((mean * weights).sum(), particles, allow_unused=True)
        (d_lik,) = torch.autograd.grad(self.log_likelihood(particles, *args, **kwargs).sum(),
                                       particles, allow_unused=True)
        d_mean = torch.zeros_like(particles) if d_mean is None else d_mean
        d_lik = torch.zeros_like(particles) if d_lik is None else d_lik
        return [s.name for s in self._require_sites()
                if bool((d_mean[:, s.columns] == 0).all()) and bool((d_lik[:, s.columns] != 0).any())]

    def columns_of(self, names) -> torch.Tensor:
        """A boolean ``(D,)`` mask of the columns of the named latent sites."""
        sites = self._require_sites()
        unknown = sorted(set(names) - {s.name for s in sites})
        if unknown:
            raise ValueError(f"unknown latent sites {unknown}; the model has {self.site_names}")
        mask = torch.zeros(self.dim, dtype=torch.bool)
        for s in sites:
            if s.name in names:
                mask[s.columns] = True
        return mask

    # ------------------------------------------------------------------ log density
    def _conditioned_trace(self, flat: torch.Tensor, args: tuple, kwargs: dict,
                           draw_free: bool = False):
        """Run the model on one particle ``(D,)``: ``(trace, log |Jacobian|)``. With
        ``draw_free``, unobserved data sites take zeros instead of a random draw (for
        :meth:`model_output`, whose value does not depend on them)."""
        values, log_jac = {}, 0.0
        for s in self.sites:
            u = flat[s.columns].reshape(s.unconstrained_shape)
            x = s.transform(u)
            values[s.name] = x
            log_jac = log_jac + s.transform.log_abs_det_jacobian(u, x).sum()
        model = poutine.condition(self.call_model, data=values)
        if draw_free:
            model = _FillUnobserved()(model)
        trace = poutine.trace(model).get_trace(*args, **kwargs)
        return trace, log_jac

    def _log_joint_one(self, flat: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
        """Log joint of one particle ``(D,)`` and one task's data: a scalar."""
        trace, log_jac = self._conditioned_trace(flat, args, kwargs)
        # Plates' subsample sites add a constant 0 that lives on the CPU: leave them out.
        return trace.log_prob_sum(lambda name, site: not site_is_subsample(site)) + log_jac

    def _log_likelihood_one(self, flat, args, kwargs) -> torch.Tensor:
        trace, _ = self._conditioned_trace(flat, args, kwargs)
        latent = self._site_set

        def is_data(name, site):
            return (site["is_observed"] and name not in latent and not site_is_subsample(site)
                    and not site["infer"].get("_deterministic"))

        trace.compute_log_prob(site_filter=is_data)  # pointwise terms of the data sites only
        total = None
        for name, site in trace.nodes.items():
            if site["type"] == "sample" and is_data(name, site):
                total = site["log_prob"] if total is None else total + site["log_prob"]
        if total is None:
            raise ValueError("model has no observed site: pass the observations (e.g. y)")
        return total

    def _return_one(self, flat, args, kwargs) -> torch.Tensor:
        trace, _ = self._conditioned_trace(flat, args, kwargs, draw_free=True)
        value = trace.nodes["_RETURN"]["value"]
        if not isinstance(value, torch.Tensor):
            raise ValueError(
                "the model must return its predictive mean as a tensor (the convention of "
                f"pyro_bmaml task models), got {type(value).__name__}"
            )
        return value

    def _observation_site(self, trace):
        """The data site found at setup (observed then; sampled now if called without y)."""
        name = self.observation_site
        if name is None or name not in trace.nodes:
            raise ValueError("model has no observed site (set the potential up with data)")
        return name, trace.nodes[name]

    def _moments_one(self, flat, args, kwargs):
        trace, _ = self._conditioned_trace(flat, args, kwargs)
        name, site = self._observation_site(trace)
        fn = site["fn"]
        while hasattr(fn, "base_dist"):  # Independent / expanded wrappers
            fn = fn.base_dist
        if not isinstance(fn, torch.distributions.Normal):
            raise ValueError(
                f"observed site '{name}' has a {type(fn).__name__} likelihood; the closed-form "
                "predictive metrics need a Normal likelihood"
            )
        shape = site["value"].shape
        return fn.loc.expand(shape), fn.scale.expand(shape)

    @property
    def _site_set(self):
        return {s.name for s in self.sites}

    def _vectorized(self, fn: Callable, particles: torch.Tensor, args: tuple, kwargs: dict,
                    randomness: str = "error", graph: Optional[str] = None,
                    with_grad: bool = False, graph_only: bool = False):
        """Apply ``fn(flat (D,), args, kwargs)`` to ``(M, D)`` or ``(T, M, D)`` particles;
        ``graph`` names the recorded-graph cache to replay it from (see ``capture``).
        ``with_grad=True`` returns ``(values, gradient of their sum)`` replayed from one
        recorded graph (:meth:`GraphCache.value_and_grad`), or ``None`` where no graph is
        recorded for this call. ``graph_only=True`` returns ``(graph, inputs)`` instead, with
        ``graph(particles, *inputs)`` the replay as ATen operators, or ``None``."""
        self.setup_from(particles, args, kwargs)
        check_particles(particles, self.dim)
        params = self.parameters or {}
        per_task = bool(params) and self._per_task_parameters()
        if per_task and (particles.dim() != 3 or any(
                v.size(0) != particles.size(0) for v in params.values())):
            raise ValueError(
                f"per-task parameters (leading dim {next(iter(params.values())).size(0)}) need "
                f"particles (T, M, D) with the same T, got {tuple(particles.shape)}")

        def one(flat, args, kwargs, active):
            self._active = active or None
            try:
                return fn(flat, args, kwargs)
            finally:
                self._active = None

        args, kwargs, (arg_dims, kwarg_dims) = split_per_particle(args, kwargs)
        lead = particles.dim() - 2  # the task dim, if any, comes before the particle dim
        dim_leaves = tree_leaves((arg_dims, kwarg_dims), is_leaf=lambda d: d is None)
        per_particle = any(d is not None for d in dim_leaves)
        for leaf, dim in zip(tree_leaves((args, kwargs), is_leaf=lambda a: a is None)
                             if per_particle else (), dim_leaves):
            if dim == 0 and (leaf.dim() <= lead or leaf.size(lead) != particles.size(-2)):
                raise ValueError(
                    f"a PerParticle argument must have {particles.size(-2)} particles at dim "
                    f"{lead} (particles {tuple(particles.shape)}), got {tuple(leaf.shape)}")
        if particles.dim() == 3:
            check_task_batched(particles.size(0), args, kwargs)

        def vfn(*inputs):  # built when called: a replayed graph never needs it
            fn = torch.func.vmap(one, in_dims=(0, arg_dims, kwarg_dims, None),
                                 randomness=randomness)
            if particles.dim() == 3:
                in_dims = tree_map(lambda a: 0 if _is_tensor(a) else None, (args, kwargs))
                fn = torch.func.vmap(fn, in_dims=(0,) + in_dims + (0 if per_task else None,),
                                     randomness=randomness)
            return fn(*inputs)

        cache = self._graphs.get(graph)
        # Validation off inside only: its checks branch on tensor values, which vmap forbids.
        with pyro.validation_enabled(False):
            if cache is None or not self.capture or self.reads_params:
                return None if with_grad or graph_only else vfn(particles, args, kwargs, params)
            if isinstance(self.model, torch.nn.Module):  # recorded as inputs, not constants
                module = dict(self.model.named_parameters())
                module.update(self.model.named_buffers())
                if per_task:  # one value per task for every entry: expand the module's own
                    module = {k: v.expand(particles.size(0), *v.shape) for k, v in module.items()}
                params = {**module, **params}
            layout = tuple(d is not None for d in dim_leaves)  # part of the key
            if graph_only:
                recorded = cache.graph_for(lambda p, a, k, m, _layout: vfn(p, a, k, m),
                                           particles, args, kwargs, params, layout)
                return None if recorded is None else (recorded, (args, kwargs, params, layout))
            call = cache.value_and_grad if with_grad else cache
            return call(lambda p, a, k, m, _layout: vfn(p, a, k, m),
                        particles, args, kwargs, params, layout)

    def log_density(self, particles: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """Joint log density (unconstrained space) of ``(M, D)`` or ``(T, M, D)`` particles.

        :returns: ``(M,)`` or ``(T, M)``.
        """
        if self.prior is not None:  # a view with another prior (with_prior)
            return (self.log_likelihood(particles, *args, **kwargs).sum(-1)
                    + self.prior(particles))
        return self._vectorized(self._log_joint_one, particles, args, kwargs,
                                graph="log_density")

    def recorded_log_density(self, particles: torch.Tensor, *args, **kwargs):
        """``(graph, inputs)``: the log density's recorded (and simplified) graph for this
        call's signature as plain ATen operators, ``graph(particles, *inputs)`` equal to
        :meth:`log_density` (``inputs`` holds the arguments and the module's parameters, so
        that the graph can be reused, and differentiated, for other values of the same
        shapes); ``None`` where the model is not recorded (``capture=False``, ``pyro.param``,
        data-dependent control flow) and in a view with another prior (:meth:`with_prior`).
        What :mod:`pyro_bmaml.engine.compiled` compiles."""
        if self.prior is not None:
            return None
        return self._vectorized(self._log_joint_one, particles, args, kwargs,
                                graph="log_density", graph_only=True)

    def log_likelihood(self, particles: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """Pointwise log likelihood of the observed sites, per particle.

        Observations must sit in a plate over data points (the usual Pyro idiom), so that
        each observed site's ``log_prob`` has shape ``(N,)``.

        :returns: ``(M, N)`` or ``(T, M, N)``.
        """
        return self._vectorized(self._log_likelihood_one, particles, args, kwargs,
                                graph="log_likelihood")

    def support_log_likelihood(self, particles: torch.Tensor, x, *args, **kwargs) -> torch.Tensor:
        """Pointwise log likelihood of every value an observation can take
        (:attr:`observation_support`), per particle: the model called with ``y`` set to
        each value at every point, ``x`` and any further arguments as given.

        :returns: ``(M, N, S)`` or ``(T, M, N, S)``.
        :raises ValueError: if the model's observations have no finite support (e.g. a
            Normal or Poisson likelihood).
        """
        support = self.observation_support
        if support is None:
            raise ValueError("support_log_likelihood needs a likelihood over finitely many "
                             "values (Categorical or Bernoulli); the model's observed site "
                             f"{self.observation_site!r} has none")
        if self._x_point_dims is None:
            raise ValueError("support_log_likelihood needs the model's inputs x as its first "
                             "argument (a tensor, as at setup)")
        lead = x.shape[: x.dim() - self._x_point_dims]
        values = support.to(x.device)
        return torch.stack([self.log_likelihood(particles, x, values[s].expand(lead), *args,
                                                **kwargs) for s in range(values.numel())], -1)

    def normal_likelihood_params(self, particles, *args, **kwargs):
        """``(loc, scale)`` of a Normal observation site per particle and data point.

        :returns: two tensors ``(M, N)`` or ``(T, M, N)``.
        :raises ValueError: if the observed site's likelihood is not Normal.
        """
        return self._vectorized(self._moments_one, particles, args, kwargs, randomness="same")

    def model_output(self, particles: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """The model's return value (by convention the predictive mean) per particle.

        Unobserved data sites (``y=None``) are sampled along the way and discarded.

        :returns: ``(M, *out)`` or ``(T, M, *out)``.
        """
        return self._vectorized(self._return_one, particles, args, kwargs, randomness="same")

    def log_density_and_grad(
        self, particles: torch.Tensor, *args, create_graph: bool = False, **kwargs
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Log density and its gradient with respect to each particle.

        :param create_graph: keep the graph of the gradient, so that functions of it can be
            differentiated with respect to ``particles`` again (needed to backpropagate
            through SVGD steps).
        :returns: ``(log_p, grad)`` with shapes ``(..., M)`` and ``(..., M, D)``.
        """
        # both from one recorded graph, without autograd, where the model can be recorded
        # (a model known not to be is not set up twice per call to find that out)
        if (not create_graph and self.capture and self.prior is None
                and not (self.is_setup and self.reads_params)):
            both = self._vectorized(self._log_joint_one, particles.detach(), args, kwargs,
                                    graph="log_density", with_grad=True)
            if both is not None:
                return both
        with torch.enable_grad():
            x = particles
            if not (create_graph and particles.requires_grad):
                x = particles.detach().requires_grad_(True)
            log_p = self.log_density(x, *args, **kwargs)
            # Each row's density depends on that row only, so d(sum)/dx is the per-row grad.
            (grad,) = torch.autograd.grad(log_p.sum(), x, create_graph=create_graph)
        if not create_graph:
            log_p = log_p.detach()
        return log_p, grad
