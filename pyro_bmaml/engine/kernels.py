r"""Differentiable, batched Stein kernels.

Both kernels are radial in a scaled distance,

.. math::

    k(x, y) = f(r), \qquad r = \sum_d \frac{(x_d - y_d)^2}{h_d},

with :math:`f(r) = e^{-r}` (RBF) or :math:`f(r) = (\alpha + r)^\beta` (IMQ). The bandwidth
:math:`h` is either one scalar or one value per dimension:

- ``"median"`` (the paper's rule, Liu & Wang 2016): one scalar,
  :math:`h = \mathrm{med}_{i<j} \lVert x_i - x_j \rVert^2 / \log M`;
- ``"pyro"`` (:class:`pyro.infer.RBFSteinKernel`'s rule): per dimension,
  :math:`h_d = \mathrm{med}_{i<j} (x_{id} - x_{jd})^2 / \log(M + 1)`;
- ``"auto"`` (default): the rule that suits the SVGD mode. Per dimension for the
  ``"univariate"`` (per-coordinate) kernel, like Pyro; one scalar for the ``"multivariate"``
  kernel, because a product of per-dimension kernels gives a typical pair a value near
  :math:`(M + 1)^{-D}`: repulsion vanishes as D grows and the particles collapse;
- a positive float: a fixed bandwidth.

``bandwidth_factor`` multiplies the median (as in Pyro). With ``detach_bandwidth=True`` (the
default, as in the paper's code) no gradient flows through :math:`h`; the kernel and its
gradient stay in the autograd graph either way, so SVGD steps are differentiable to second
order. Identical particles (a zero median) fall back to the mean pairwise distance, then to
1, instead of dividing by zero.

All methods accept particles of shape ``(..., M, D)``: any leading batch dims (tasks).

References: Liu & Wang, "Stein Variational Gradient Descent", NeurIPS 2016; Gorham & Mackey,
"Measuring Sample Quality with Kernels", ICML 2017 (IMQ); Yoon et al., "Bayesian
Model-Agnostic Meta-Learning", NeurIPS 2018.
"""

from __future__ import annotations

import math
import numbers
from abc import abstractmethod
from typing import Optional, Tuple, Union

import numpy as np
import pyro.infer
import pyro.infer.svgd
import torch

from .._checks import check_bool, check_positive_float

__all__ = ["SteinKernel", "RBFSteinKernel", "IMQSteinKernel", "as_differentiable_kernel"]

_RULES = ("auto", "median", "pyro")


def _kth_smallest(values: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k``-th smallest value (0-based) of each row (last dim), differentiable as
    :func:`torch.kthvalue` when ``values`` requires grad.

    On the CPU and outside autograd it is selected with numpy, several times faster than
    :func:`torch.median` / :func:`torch.kthvalue` on the rows of a per-dimension bandwidth:
    short rows are sorted (numpy's vectorized sort), long ones partitioned (introselect).
    At D = 1,763: 0.14 ms sorted vs 0.19 ms partitioned vs 1 ms in torch for M = 10
    (45 pairs); 28 ms sorted vs 20 ms partitioned for M = 100 (4,950 pairs). The value is
    the same element either way. Rows holding NaN are the caller's to mask.
    """
    if (values.device.type != "cpu" or values.requires_grad or values.numel() == 0
            or values.dtype not in (torch.float32, torch.float64)):
        return values.kthvalue(k + 1, -1).values
    rows = values.detach().contiguous().numpy()
    if rows.shape[-1] <= _SORT_UP_TO:
        picked = np.sort(rows, axis=-1)[..., k]
    else:
        picked = np.partition(rows, k, axis=-1)[..., k]
    return torch.from_numpy(picked.copy())


#: rows up to this length are sorted rather than partitioned (see :func:`_kth_smallest`)
_SORT_UP_TO = 1024


def _pairs(num_particles: int, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(first, second)``: the indices ``i < j`` of the ``P = M (M - 1) / 2`` pairs of
    particles, in :func:`torch.triu_indices` order."""
    first, second = torch.triu_indices(num_particles, num_particles, 1, device=device)
    return first, second


def _pair_differences(x: torch.Tensor) -> torch.Tensor:
    """``(..., P, D)``: ``x_j - x_i`` over the pairs ``i < j`` of the ``(..., M, D)``
    particles ``x``, one row per pair (whole rows gathered: fast, O(M^2 D))."""
    first, second = _pairs(x.size(-2), x.device)
    return x.index_select(-2, second) - x.index_select(-2, first)


#: from this many particles on, :func:`_coordinate_pair_squares` writes the pairs row by row
_ROWWISE_FROM = 32


def _coordinate_pair_squares(x: torch.Tensor) -> torch.Tensor:
    """``(..., D, P)``: ``(x_jd - x_id)^2`` over the pairs ``i < j`` of the ``(..., M, D)``
    particles, one contiguous row per coordinate (the layout a per-row median reads).

    Outside autograd and for many particles the rows are written in place, particle by
    particle, into one buffer: a gather of whole particles, its square and a transposed copy
    would pass over the ``M^2 D / 2`` values four times (at M = 100, D = 1,763: 61 ms against
    225 ms on one CPU core). The values are the same either way."""
    m = x.size(-2)
    if m < _ROWWISE_FROM or (torch.is_grad_enabled() and x.requires_grad):
        return _pair_differences(x).square().transpose(-1, -2).contiguous()
    xt = x.detach().transpose(-1, -2).contiguous()  # (..., D, M)
    out = xt.new_empty(xt.shape[:-1] + (m * (m - 1) // 2,))
    start = 0
    for i in range(m - 1):  # the pairs (i, j > i), in triu_indices order
        stop = start + m - 1 - i
        torch.sub(xt[..., i + 1:], xt[..., i:i + 1], out=out[..., start:stop])
        start = stop
    return out.square_()


def _upper_pairs(matrix: torch.Tensor) -> torch.Tensor:
    """``(..., P)``: the entries ``i < j`` of ``(..., M, M)`` matrices."""
    first, second = _pairs(matrix.size(-1), matrix.device)
    return matrix[..., first, second]


def _sq_dists(x: torch.Tensor) -> torch.Tensor:
    """Squared pairwise distances ``(..., M, M)`` of ``(..., M, D)``, O(M^2 + MD) memory.

    Rows are centred first: the Gram expansion then loses no precision to a common offset,
    and identical particles give exactly zero.
    """
    xc = x - x.mean(-2, keepdim=True)
    norms = xc.pow(2).sum(-1)
    sq = (norms.unsqueeze(-1) + norms.unsqueeze(-2) - 2.0 * xc @ xc.transpose(-1, -2)).clamp_min(0)
    return sq - torch.diag_embed(torch.diagonal(sq, dim1=-2, dim2=-1))


class SteinKernel(pyro.infer.svgd.SteinKernel):
    """Base class of the differentiable kernels: subclasses give the radial profile.

    :param bandwidth: ``"auto"``, ``"median"``, ``"pyro"`` or a fixed positive float (see the
        module docstring).
    :param bandwidth_factor: optional positive factor multiplying the median (Pyro's knob).
    :param detach_bandwidth: stop the gradient through the bandwidth (default, as the paper).
    """

    #: the largest intermediate tensor (elements) the univariate direction builds, per chunk
    #: of coordinates (set on an instance to change it)
    max_elements: int = 2 ** 24

    def __init__(
        self,
        bandwidth: Union[str, float] = "auto",
        bandwidth_factor: Optional[float] = None,
        detach_bandwidth: bool = True,
    ):
        if isinstance(bandwidth, str):
            if bandwidth not in _RULES:
                raise ValueError(
                    f"bandwidth must be one of {_RULES} or a positive float, got {bandwidth!r}"
                )
        elif isinstance(bandwidth, numbers.Real) and not isinstance(bandwidth, bool):
            bandwidth = check_positive_float("bandwidth", bandwidth)
        else:
            raise TypeError(
                f"bandwidth must be one of {_RULES} or a positive float, "
                f"got {type(bandwidth).__name__}"
            )
        self.bandwidth_rule = bandwidth
        self.bandwidth_factor = bandwidth_factor
        self.detach_bandwidth = check_bool("detach_bandwidth", detach_bandwidth)

    @property
    def bandwidth_factor(self) -> Optional[float]:
        return self._bandwidth_factor

    @bandwidth_factor.setter
    def bandwidth_factor(self, value: Optional[float]) -> None:
        if value is not None:
            value = check_positive_float("bandwidth_factor", value)
        self._bandwidth_factor = value

    @abstractmethod
    def _log_profile(self, r: torch.Tensor) -> Tuple[torch.Tensor, Union[torch.Tensor, float]]:
        """``(log f(r), d log f / dr)`` for the radial profile ``f`` (the second may be a
        python float when it is constant)."""
        raise NotImplementedError

    def _profile_derivatives(self, r: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(f(r), f'(r), f''(r))``, used by the kernelized Stein discrepancy."""
        raise NotImplementedError(f"{type(self).__name__} does not give second derivatives")

    def _profile_at_zero(self) -> float:
        """``f(0)``: the kernel of a particle with itself."""
        return math.exp(float(self._log_profile(torch.zeros((), dtype=torch.float64))[0]))

    def _kernel_from_sq(self, sq: torch.Tensor, h: torch.Tensor):
        """``(f(r), f'(r) / f(r))`` at ``r = sq / h``; the second may be a number."""
        log_k, dlog_k = self._log_profile(sq / h)
        return log_k.exp(), dlog_k

    def describe(self) -> str:
        """A short description, e.g. for logs and ArviZ attributes."""
        return f"{type(self).__name__}(bandwidth={self.bandwidth_rule!r})"

    # ------------------------------------------------------------------ bandwidth
    def resolved_rule(self, per_dimension: bool) -> Union[str, float]:
        """The bandwidth rule in force: ``"median"``, ``"pyro"`` or a fixed float (``"auto"``
        resolved for the per-coordinate kernel when ``per_dimension``, else for the
        multivariate one)."""
        if self.bandwidth_rule == "auto":
            return "pyro" if per_dimension else "median"
        return self.bandwidth_rule

    def _bandwidth_from_pairs(self, pairs: torch.Tensor, num_particles: int,
                              rule: Union[str, float]) -> torch.Tensor:
        """Bandwidth from squared distances over the pairs of particles, ``(..., K, P)``:
        one row per coordinate (the per-dimension rule, ``K = D``) or one row (``K = 1``)
        of squared Euclidean distances. Returns ``(..., K)``."""
        factor = 1.0 if self.bandwidth_factor is None else self.bandwidth_factor
        if not isinstance(rule, str):
            return pairs.new_full(pairs.shape[:-2] + (1,), factor * rule)
        if num_particles < 2:
            raise ValueError(
                f"the {rule!r} bandwidth needs at least 2 particles, got M = {num_particles}"
            )
        if self.detach_bandwidth:
            pairs = pairs.detach()
        denom = math.log(num_particles + 1) if rule == "pyro" else math.log(num_particles)
        median = _kth_smallest(pairs, (pairs.size(-1) - 1) // 2)  # the lower median, as torch's
        mean = pairs.mean(-1)
        # Zero median (mostly identical particles): fall back to the mean, then to 1.
        median = torch.where(median > 0, median, mean)
        median = torch.where(median > 0, median, 1.0)
        median = torch.where(torch.isnan(mean), mean, median)  # NaN in, NaN out
        return factor * median / denom

    def bandwidth(self, particles: torch.Tensor, per_dimension: bool = False) -> torch.Tensor:
        """The bandwidth for ``(..., M, D)`` particles: ``(..., 1)`` or ``(..., D)``.

        :param per_dimension: resolve ``"auto"`` as the per-coordinate (univariate) kernel
            does; otherwise as the multivariate kernel does.
        """
        rule = self.resolved_rule(per_dimension)
        if not isinstance(rule, str):  # fixed: no distances needed
            factor = 1.0 if self.bandwidth_factor is None else self.bandwidth_factor
            return particles.new_full(particles.shape[:-2] + (1,), factor * rule)
        if rule == "pyro":
            pairs = _coordinate_pair_squares(
                particles.detach() if self.detach_bandwidth else particles)
        else:
            pairs = _upper_pairs(_sq_dists(particles)).unsqueeze(-2)
        return self._bandwidth_from_pairs(pairs, particles.size(-2), rule)

    def _given_bandwidth(self, bandwidth: torch.Tensor, particles: torch.Tensor,
                         per_dimension: bool) -> torch.Tensor:
        """Check a bandwidth passed in (as :meth:`bandwidth` gives it for these particles)."""
        if not isinstance(bandwidth, torch.Tensor):
            raise TypeError(f"bandwidth must be a tensor (as SteinKernel.bandwidth returns), "
                            f"got {type(bandwidth).__name__}")
        last = (1, particles.size(-1)) if per_dimension else (1,)
        if (bandwidth.shape[:-1] != particles.shape[:-2] or bandwidth.dim() == 0
                or bandwidth.size(-1) not in last):
            lead = tuple(particles.shape[:-2])
            expected = " or ".join(str(lead + (n,)) for n in dict.fromkeys(last))
            raise ValueError(
                f"bandwidth has shape {tuple(bandwidth.shape)}, expected {expected} for "
                f"particles {tuple(particles.shape)} (as SteinKernel.bandwidth returns)")
        return bandwidth

    # ------------------------------------------------------------------ kernels
    def log_kernel_and_grad(self, particles: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Per-coordinate kernels in :class:`pyro.infer.SVGD`'s convention, differentiable.

        :param particles: ``(..., N, D)``.
        :returns: ``(log_kernel, kernel_grad)``, each ``(..., N, N, D)``: entry
            ``[n, m, d]`` is :math:`\\log k_d(x_n, x_m)` and its derivative with respect to
            :math:`x_{n,d}` (the sign convention :class:`pyro.infer.SVGD` expects).
        """
        delta = particles.unsqueeze(-3) - particles.unsqueeze(-2)  # [n, m] = x_m - x_n
        sq = delta.pow(2)
        h = self.bandwidth(particles, per_dimension=True).unsqueeze(-2).unsqueeze(-2)
        log_k, dlog_k = self._log_profile(sq / h)
        return log_k, dlog_k * (-2.0 * delta / h)

    def coordinatewise_direction_terms(
        self, particles: torch.Tensor, grad_log_p: torch.Tensor,
        bandwidth: Optional[torch.Tensor] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        r"""Attraction and repulsion of the per-coordinate ("univariate") SVGD direction.

        Same math as :meth:`log_kernel_and_grad` followed by the sums over ``m``, computed
        over the ``P = M (M - 1) / 2`` pairs of particles rather than all ``M^2`` ordered
        ones: the kernel is symmetric and its gradient antisymmetric, so each pair's kernel
        is evaluated once and given to both ends, and the diagonal contributes
        :math:`f(0)\, g_n` and no repulsion. The work is over chunks of coordinates so that
        no intermediate exceeds :attr:`max_elements` elements (the ``M^2 D`` tensor at
        D = 10,403 and M = 100 would take 2 GB); a single coordinate's ``(..., P)`` beyond
        it is refused with the size it needs.

        :param bandwidth: optional ``(..., D)`` or ``(..., 1)`` bandwidth, as
            :meth:`bandwidth` gives it with ``per_dimension=True`` (e.g. computed once
            outside a compiled function); by default computed here.
        :returns: ``(A, R)``, each ``(..., M, D)``, with
            :math:`A_{nd} = \sum_m k_d(x_n, x_m) g_{md}` and
            :math:`R_{nd} = \sum_m \partial_{x_{md}} k_d(x_m, x_n)`.
        """
        rule = self.resolved_rule(per_dimension=True)
        if bandwidth is not None:
            bandwidth = self._given_bandwidth(bandwidth, particles, per_dimension=True)
        m, d = particles.shape[-2:]
        first, second = _pairs(m, particles.device)
        batch = math.prod(particles.shape[:-2])
        per_column = batch * first.numel()  # elements of one coordinate's (..., P) terms
        if per_column > self.max_elements:
            raise ValueError(
                f"the univariate SVGD direction needs (..., P) = {per_column:,} elements per "
                f"coordinate ({per_column * particles.element_size() / 2**20:.2f} MiB; P = "
                f"{first.numel():,} pairs of particles), beyond max_elements="
                f"{self.max_elements:,}; use mode='multivariate' or fewer particles")
        chunk = max(1, self.max_elements // max(per_column, 1))
        columns = [slice(i, min(i + chunk, d)) for i in range(0, d, chunk)]
        # (..., P, C): x_j - x_i for each pair (i, j), i < j
        deltas = [_pair_differences(particles[..., c]) for c in columns]
        shared = bandwidth  # given, or one for all chunks; None: per coordinate, per chunk
        if shared is None and rule != "pyro":  # from the full squared distances
            shared = self._bandwidth_from_pairs(
                sum(delta.square().sum(-1) for delta in deltas).unsqueeze(-2), m, rule)
        diagonal = self._profile_at_zero()  # k(x_n, x_n) = f(0)
        attraction, repulsion = [], []
        for c, delta in zip(columns, deltas):
            sq = delta.square()
            if shared is None:
                h = self._bandwidth_from_pairs(sq.transpose(-1, -2), m, rule)
            else:
                h = shared[..., c] if shared.size(-1) > 1 else shared
            h = h.unsqueeze(-2)  # (..., 1, C | 1)
            kernel, dlog = self._kernel_from_sq(sq, h)
            # each pair (i, j) gives k_ij g_j to i and k_ij g_i to j; the diagonal f(0) g_n
            score = grad_log_p[..., c]
            own = score if diagonal == 1.0 else diagonal * score
            own = own.index_add(-2, first, kernel * score.index_select(-2, second))
            attraction.append(own.index_add(-2, second, kernel * score.index_select(-2, first)))
            # f'(r) 2 (x_m - x_n) / h, with f' = f * dlog: w = f' (x_j - x_i) to i, -w to j
            scale = 2.0 / h
            if isinstance(dlog, numbers.Real):  # f'/f constant (RBF): in the small factor
                weighted, scale = kernel * delta, dlog * scale
            else:
                weighted = kernel * dlog * delta
            pushed = torch.zeros_like(score).index_add(-2, first, weighted)
            repulsion.append(pushed.index_add(-2, second, weighted, alpha=-1) * scale)
        if len(columns) == 1:
            return attraction[0], repulsion[0]
        return torch.cat(attraction, -1), torch.cat(repulsion, -1)

    def coordinatewise_direction(
        self, particles: torch.Tensor, grad_log_p: torch.Tensor, temperature: float = 1.0,
        bandwidth: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        r"""``A + temperature * R`` of :meth:`coordinatewise_direction_terms`: the
        per-coordinate SVGD direction times ``M``.

        Under :func:`torch.compile` it is written as one sum over all ``M^2`` ordered pairs,
        :math:`\sum_m k_d(x_n, x_m) \big(g_{md} + \alpha f'/f\, 2 (x_{md} - x_{nd}) / h_d\big)`
        (the diagonal's zero distance gives :math:`f(0) g_n` and no repulsion by itself), which
        Inductor compiles into one loop that builds no ``(..., M, M, D)`` tensor; eagerly, the
        pairwise form of :meth:`coordinatewise_direction_terms`, which evaluates the kernel of
        each unordered pair once (half as many evaluations).

        Where a gradient is taken through it and the ``(..., M, M, D)`` terms exceed
        :attr:`max_elements` (their backward may keep them), the compiled form is the
        pairwise one too, in chunks of coordinates.

        :param bandwidth: as in :meth:`coordinatewise_direction_terms`.
        :returns: ``(..., M, D)``.
        """
        if not (torch.compiler.is_compiling()
                and self._fused_direction_fits(particles, grad_log_p)):
            attraction, repulsion = self.coordinatewise_direction_terms(
                particles, grad_log_p, bandwidth)
            return attraction + temperature * repulsion
        if bandwidth is None:
            bandwidth = self.bandwidth(particles, per_dimension=True)
        else:
            bandwidth = self._given_bandwidth(bandwidth, particles, per_dimension=True)
        h = bandwidth.unsqueeze(-2).unsqueeze(-2)  # (..., 1, 1, D | 1)
        delta = particles.unsqueeze(-3) - particles.unsqueeze(-2)  # [n, m] = x_m - x_n
        kernel, dlog = self._kernel_from_sq(delta.square(), h)
        push = grad_log_p.unsqueeze(-3) + (temperature * 2.0) * dlog * delta / h
        return (kernel * push).sum(-2)

    def _fused_direction_fits(self, particles: torch.Tensor, grad_log_p: torch.Tensor) -> bool:
        """Whether the fused sum may be used: no gradient is taken through it, or its
        ``(..., M, M, D)`` terms, which the backward may keep, are within :attr:`max_elements`."""
        m, d = particles.shape[-2:]
        differentiated = torch.is_grad_enabled() and (particles.requires_grad
                                                      or grad_log_p.requires_grad)
        return not differentiated or math.prod(particles.shape[:-2]) * m * m * d \
            <= self.max_elements

    def kernel_and_repulsion(self, particles: torch.Tensor,
                             bandwidth: Optional[torch.Tensor] = None,
                             ) -> Tuple[torch.Tensor, torch.Tensor]:
        """The multivariate kernel matrix and SVGD's repulsive term, in O(M^2 + MD) memory.

        :param particles: ``(..., M, D)``.
        :param bandwidth: optional ``(..., 1)`` (or ``(..., D)`` under the per-dimension
            rule), as :meth:`bandwidth` gives it; by default computed here.
        :returns: ``K`` of shape ``(..., M, M)`` with ``K[n, m] = k(x_n, x_m)``, and ``R`` of
            shape ``(..., M, D)`` with :math:`R_n = \\sum_m \\nabla_{x_m} k(x_m, x_n)`.
        """
        xc = particles - particles.mean(-2, keepdim=True)
        rule = self.resolved_rule(per_dimension=False)
        m = particles.size(-2)
        h = bandwidth
        if h is not None:
            h = self._given_bandwidth(h, particles, per_dimension=True)
        if rule == "pyro" or (h is not None and h.size(-1) > 1):
            if h is None:
                h = self.bandwidth(particles, per_dimension=False)
            r = _sq_dists(xc / h.sqrt().unsqueeze(-2))
        else:
            sq = _sq_dists(xc)
            if h is None:
                h = self._bandwidth_from_pairs(_upper_pairs(sq).unsqueeze(-2), m, rule)
            r = sq / h.unsqueeze(-1)
        log_k, dlog_k = self._log_profile(r)
        kernel = log_k.exp()
        dk = kernel * dlog_k  # f'(r), symmetric
        # sum_m f'(r_nm) dr_nm/dx_m = sum_m f'(r_nm) 2 (x_m - x_n) / h
        repulsion = 2.0 * (dk @ xc - xc * dk.sum(-1, keepdim=True)) / h.unsqueeze(-2)
        return kernel, repulsion


class RBFSteinKernel(SteinKernel, pyro.infer.RBFSteinKernel):
    r"""RBF kernel :math:`k(x, y) = \exp(-r)`; a differentiable, batched
    :class:`pyro.infer.RBFSteinKernel` (still accepted by :class:`pyro.infer.SVGD`).

    See :class:`SteinKernel` for the bandwidth arguments.
    """

    def _log_profile(self, r):
        return -r, -1.0  # d log f / dr is constant: a scalar saves a (M, M, D) tensor

    def _kernel_from_sq(self, sq, h):
        return torch.exp(sq * (-1.0 / h)), -1.0  # one full-size operator before the exp

    def _profile_at_zero(self):
        return 1.0

    def _profile_derivatives(self, r):
        f = torch.exp(-r)
        return f, -f, f


class IMQSteinKernel(SteinKernel, pyro.infer.IMQSteinKernel):
    r"""Inverse multi-quadric kernel :math:`k(x, y) = (\alpha + r)^\beta`; a differentiable,
    batched :class:`pyro.infer.IMQSteinKernel`.

    :param alpha: positive offset (default 0.5, as Pyro).
    :param beta: negative exponent (default -0.5, as Pyro).

    See :class:`SteinKernel` for the bandwidth arguments.
    """

    def __init__(
        self,
        alpha: float = 0.5,
        beta: float = -0.5,
        bandwidth: Union[str, float] = "auto",
        bandwidth_factor: Optional[float] = None,
        detach_bandwidth: bool = True,
    ):
        self.alpha = check_positive_float("alpha", alpha)
        if isinstance(beta, bool) or not isinstance(beta, numbers.Real):
            raise TypeError(f"beta must be a real number, got {type(beta).__name__}")
        if not -float("inf") < beta < 0.0:
            raise ValueError(f"beta must be a finite negative number, got {beta}")
        self.beta = float(beta)
        super().__init__(bandwidth, bandwidth_factor, detach_bandwidth)

    def _log_profile(self, r):
        base = self.alpha + r
        return self.beta * base.log(), self.beta / base

    def _profile_at_zero(self):
        return self.alpha ** self.beta

    def _profile_derivatives(self, r):
        base = self.alpha + r
        f = base.pow(self.beta)
        df = self.beta * f / base
        return f, df, (self.beta - 1.0) * df / base

    def describe(self) -> str:
        return (
            f"IMQSteinKernel(alpha={self.alpha}, beta={self.beta}, "
            f"bandwidth={self.bandwidth_rule!r})"
        )


def as_differentiable_kernel(kernel) -> SteinKernel:
    """Return ``kernel`` as one of this package's kernels.

    Pyro's stock kernels are converted with their settings and Pyro's per-dimension
    bandwidth rule, so a :class:`pyro.infer.SVGD` user's kernel means the same thing.
    """
    if isinstance(kernel, SteinKernel):
        return kernel
    if isinstance(kernel, pyro.infer.IMQSteinKernel):
        return IMQSteinKernel(kernel.alpha, kernel.beta, "pyro", kernel.bandwidth_factor)
    if isinstance(kernel, pyro.infer.RBFSteinKernel):
        return RBFSteinKernel("pyro", kernel.bandwidth_factor)
    raise TypeError(
        "kernel must be a pyro_bmaml.RBFSteinKernel / IMQSteinKernel (or Pyro's stock RBF/IMQ "
        f"kernels, which are converted), got {type(kernel).__name__}; custom kernels subclass "
        "pyro_bmaml.SteinKernel and implement _log_profile"
    )
