r"""The SVGD step compiled: the recorded log density, its gradient and the kernel's
direction as one :func:`torch.compile` d function.

:mod:`~pyro_bmaml.engine.capture` replays a model's log density as a few hundred ATen
operators per call; eager PyTorch then pays its per-operator overhead on each of them, and
again on each operator of the gradient and of the meta-gradient's backward. For one
signature of the inputs, this module compiles the whole direction of the step

.. math::

    x \leftarrow x + \epsilon\, \phi(x), \qquad
    \phi(x_i) = \tfrac1M \textstyle\sum_j k(x_j, x_i)\, \nabla \log p(x_j)
        + \alpha\, \nabla_{x_j} k(x_j, x_i),

with the score taken by :func:`torch.func.grad` over the recorded graph *inside* the
compiled function (Inductor, CPU C++ or GPU Triton code). The first derivative is then part
of the compiled forward graph, and the meta-gradient through the step is the one backward
AOTAutograd derives from it, compiled too; it equals the replayed graph's to rounding
(``tests/test_compiled.py``). A second backward through a compiled step is not supported
(``torch.compile`` has no double backward): the trust-region meta-update's Fisher-vector
products keep the replayed path.

Two parts are arranged for the compiler. Pyro's per-dimension bandwidth is a median per
coordinate, a selection Inductor can only lower as a sort of every row: where it carries no
gradient (the default) it is computed eagerly and passed in (:func:`outside_bandwidth`).
The per-coordinate ("univariate") direction is written as one sum over all ordered pairs of
particles (:meth:`~pyro_bmaml.engine.kernels.SteinKernel.coordinatewise_direction`), which
Inductor fuses into one loop that stores no ``(M, M, D)`` tensor (twice the kernel
evaluations of the eager form, which gathers and scatters over the unordered pairs, but no
memory traffic beyond the particles).

Where compiling fails (no C++ compiler, an operator Inductor does not lower, a kernel
Dynamo cannot trace) the step falls back to the replayed path with one warning per
signature, exactly (the same operators, eagerly). Compiled functions are cached per recorded
graph, that is per input signature (shapes, dtypes, strides, devices), kernel, mode and
temperature, each with a code object of its own, so that Dynamo's limit of compiled entries
per code object (``torch._dynamo.config.recompile_limit``) never sends a later signature to
its uncompiled fallback; compiling one takes seconds to tens of seconds (reported by
:func:`compile_seconds`), paid back after some hundreds of steps (``benchmarks/``).
"""

from __future__ import annotations

import itertools
import time
import types
import warnings
import weakref
from typing import Dict, Hashable, Optional, Tuple

import torch

from .kernels import SteinKernel
from .potential import ModelPotential

__all__ = ["compiled_svgd_direction", "compile_seconds", "outside_bandwidth"]

#: per recorded graph: {(kernel, mode, temperature): compiled direction or None (failed)}
_DIRECTIONS: "weakref.WeakKeyDictionary[torch.fx.GraphModule, Dict[Hashable, object]]" = \
    weakref.WeakKeyDictionary()
_SECONDS = {"compile": 0.0}
_SERIAL = itertools.count()


def compile_seconds() -> float:
    """Seconds spent so far in this process on the first call of each compiled step (tracing
    and code generation)."""
    return _SECONDS["compile"]


def _direction(x, grad, kernel, mode, temperature, bandwidth):
    from .svgd import svgd_direction  # svgd imports this module

    return svgd_direction(x, grad, kernel, mode, temperature, bandwidth)


def _own_code(fn):
    """``fn`` with a code object of its own. Dynamo keeps the code it compiled per code
    object, at most ``torch._dynamo.config.recompile_limit`` (8) entries; every compiled
    step is built from the same nested function, so without its own copy of the code the
    ninth signature in a process (a grid of shapes, evaluation batches, several learners)
    would run uncompiled, through Dynamo's fallback, slower than the replayed graph."""
    name = f"{fn.__name__}_{next(_SERIAL)}"
    code = fn.__code__.replace(co_name=name, co_qualname=name)
    return types.FunctionType(code, fn.__globals__, name, fn.__defaults__, fn.__closure__)


def _make_direction(graph, kernel: SteinKernel, mode: str, temperature: float):
    def direction(x, inputs, bandwidth):
        def total(p):
            log_p = graph(p, *inputs)
            return log_p.sum(), log_p

        grad, log_p = torch.func.grad(total, has_aux=True)(x)
        return _direction(x, grad, kernel, mode, temperature, bandwidth), log_p

    return torch.compile(_own_code(direction), dynamic=False, fullgraph=False)


def outside_bandwidth(kernel: SteinKernel, x: torch.Tensor, mode: str) -> Optional[torch.Tensor]:
    """The kernel's per-dimension bandwidth for ``x`` (Pyro's rule), computed eagerly, where
    it carries no gradient (``detach_bandwidth=True``, the default): a median is a
    selection, which compiled code can only do by sorting every row (``torch.sort`` over the
    D rows of pairs took 3 ms at D = 1,763 and M = 10 on a CPU core, against 0.3 ms for
    numpy's sort here), so it is taken out of the compiled function and passed in. ``None``
    otherwise: a scalar median sorts one short row per task inside, and a bandwidth that
    carries a gradient stays in the graph."""
    per_dimension = mode == "univariate"
    if kernel.resolved_rule(per_dimension) != "pyro" or not kernel.detach_bandwidth:
        return None
    with torch.no_grad():
        return kernel.bandwidth(x.detach(), per_dimension=per_dimension)


def compiled_svgd_direction(potential: ModelPotential, kernel: SteinKernel, x: torch.Tensor,
                            args: tuple, kwargs: dict, mode: str,
                            temperature: float = 1.0
                            ) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    """The SVGD direction at ``x`` ``(M, D)`` or ``(T, M, D)`` as compiled code: ``(phi, log
    density at x)``, differentiable once in ``x`` and the model's module parameters; ``None``
    where the model is not recorded or compiling failed (the caller takes the replayed
    path). The step ``x + step_size * phi`` is left to the caller, so that a step size is
    not compiled in."""
    # one layout for every step (theta0 expanded over tasks has a zero stride; the steps
    # after it are dense): one recorded graph, one compilation
    x = x.contiguous()
    recorded = potential.recorded_log_density(x, *args, **kwargs)
    if recorded is None:
        return None
    graph, inputs = recorded
    cache = _DIRECTIONS.setdefault(graph, {})
    key = (id(kernel), mode, float(temperature))
    fn = cache.get(key, False)
    first = fn is False
    if first:
        fn = cache[key] = _make_direction(graph, kernel, mode, temperature)
    if fn is None:
        return None
    bandwidth = outside_bandwidth(kernel, x, mode)
    start = time.perf_counter()
    try:
        out = fn(x, inputs, bandwidth)
    except Exception as err:  # no C++ compiler, an operator not lowered, ...
        cache[key] = None
        text = str(err).strip()
        warnings.warn(f"compiled SVGD step: compiling failed ({type(err).__name__}: "
                      f"{text.splitlines()[0][:160] if text else ''}); using the replayed "
                      f"graph for these inputs", stacklevel=3)
        return None
    if first:
        _SECONDS["compile"] += time.perf_counter() - start
    return out
