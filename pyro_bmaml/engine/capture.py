r"""Capture of the vectorized potential as a graph of tensor operations, replayed per call.

Evaluating a Pyro model under :func:`torch.func.vmap` costs Python time at every call: Pyro's
effect handlers run, distributions are built, and vmap dispatches each of a few hundred
small operators through its batching rules. For a fixed input signature (shapes, dtypes,
devices and the non-tensor arguments) that work produces the same sequence of tensor
operations every time, so it can be recorded once with
:func:`torch.fx.experimental.proxy_tensor.make_fx` (on fake tensors: no arithmetic) and
replayed as an :class:`torch.fx.GraphModule`, after the exact algebraic rewrites of
:mod:`pyro_bmaml.engine.simplify` (which remove most of the full-size work a Pyro model's
per-site densities produce). The replay is a plain sequence of ATen operators, so autograd
differentiates it as it would the traced call, to any order (SVGD needs the score, the
meta-gradient its derivative). :func:`torch.compile` of the replay alone would not do:
it has no double backward. :mod:`pyro_bmaml.engine.compiled` instead compiles a whole SVGD
step with the score taken inside it (:meth:`GraphCache.graph_for` and :func:`aten_graph`
hand it the recorded graph), so that the meta-gradient needs one backward. Where no second derivative is needed (an SVGD step outside
meta-learning), :meth:`GraphCache.value_and_grad` records the graph and its backward as one
graph of their own and replays both without autograd.

A model whose *control flow depends on tensor values* (``if x.sum() > 0``) cannot be
recorded this way: tracing it on fake tensors raises, and :class:`GraphCache` then falls
back to the traced call for that signature, with a one-line warning. Tensors the model
closes over are held by the graph as the objects themselves, so in-place updates (an
optimizer's step) are seen and gradients reach them; but Python state outside the arguments
(a global counter, a tensor *reassigned* to a new object, a ``pyro.param`` value) would be
frozen into the graph: models that read ``pyro.param`` are never recorded
(:class:`~pyro_bmaml.engine.potential.ModelPotential` checks), and ``capture=False`` turns the
recording off for a model that needs it.
"""

from __future__ import annotations

import contextlib
import warnings
from collections import OrderedDict
from typing import Any, Callable, Dict, Hashable, Optional, Tuple

import torch
from torch import fx
from torch.utils._pytree import tree_flatten

from .simplify import simplify

__all__ = ["GraphCache", "signature", "direct_calls", "operator_of", "aten_graph"]


def signature(*trees: Any) -> Hashable:
    """A hashable key of a call's inputs: the pytree structure, each tensor's shape, strides,
    dtype and device, and the value of every non-tensor leaf (frozen into the graph); ``None``
    when a non-tensor leaf is unhashable (such a call is not recorded)."""
    leaves, spec = tree_flatten(trees)
    parts = []
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor):
            # strides too: the recorded views (and the simplified graph's) hold for them
            parts.append(("T", tuple(leaf.shape), leaf.stride(), leaf.dtype, leaf.device.type,
                          leaf.device.index))
        else:
            try:
                hash(leaf)
            except TypeError:
                return None  # an unhashable argument: not capturable
            parts.append(("V", type(leaf).__name__, leaf))
    return (str(spec), tuple(parts))


@contextlib.contextmanager
def _no_sample_validation():
    """Skip :meth:`torch.distributions.Distribution._validate_sample` while recording.

    A distribution built with validation on (e.g. a ``PyroSample`` prior made when the
    module was) checks the support of each value with a data-dependent branch, which fake
    tensors cannot take. The values recorded are the particles mapped into each site's
    support by its bijection, so the check cannot fail, and the replay never runs it."""
    original = torch.distributions.Distribution._validate_sample
    torch.distributions.Distribution._validate_sample = lambda self, value: None
    try:
        yield
    finally:
        torch.distributions.Distribution._validate_sample = original


class GraphCache:
    """Recorded graphs of a function, one per input signature (least recently used first
    out past ``max_entries``).

    :param name: what the function computes, for the fallback warning.
    :param max_entries: how many signatures to keep.
    :param simplify: rewrite each recorded graph with the exact algebraic simplifications of
        :mod:`pyro_bmaml.engine.simplify` (fewer full-size operators, same values).
    """

    def __init__(self, name: str, max_entries: int = 16, simplify: bool = True):
        self.name = name
        #: rewrite each recorded graph with :func:`~pyro_bmaml.engine.simplify.simplify`
        self.simplify = simplify
        self.max_entries = max_entries
        self._graphs: "OrderedDict[Hashable, Optional[Callable]]" = OrderedDict()
        self.captures = 0  #: graphs recorded so far
        self.fallbacks = 0  #: signatures that could not be recorded

    def __call__(self, fn: Callable, *inputs):
        """``fn(*inputs)``, replayed from its recorded graph for this signature (recorded
        on first use), or called directly when recording it failed."""
        _, graph = self._recorded(fn, inputs)
        return fn(*inputs) if graph is None else graph(*inputs)

    def _recorded(self, fn: Callable, inputs: tuple):
        """``(key, graph)``: the inputs' signature and the graph of ``fn`` recorded under it
        (recorded if new); the graph is ``None`` when the signature or the recording fails."""
        key = signature(*inputs)
        return key, None if key is None else self._graph(key, lambda: self._record(fn, inputs))

    def value_and_grad(self, fn: Callable, *inputs) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
        """``(fn(*inputs), the gradient of fn(*inputs).sum() with respect to inputs[0])``
        from one recorded graph of both, replayed without autograd; ``None`` when ``fn``
        cannot be recorded for these inputs (the caller then differentiates the traced call).

        The graph is the recorded (and simplified) graph of ``fn`` followed by its backward,
        recorded once more by differentiating the first with :func:`torch.autograd.grad`:
        the backward then differentiates the rewritten operators, and the replay creates no
        autograd nodes. Neither output carries a graph (no second derivatives)."""
        key, forward = self._recorded(fn, inputs)
        if forward is None:
            return None

        def joint(first, *rest):
            with torch.enable_grad():
                first = first.detach().requires_grad_(True)
                value = forward(first, *rest)
                (grad,) = torch.autograd.grad(value.sum(), first)
            return value.detach(), grad

        graph = self._graph(("value_and_grad", key),
                            lambda: self._record(joint, inputs, inference=True))
        if graph is None:
            return None
        with torch.no_grad():
            return graph(*inputs)

    def graph_for(self, fn: Callable, *inputs) -> Optional[fx.GraphModule]:
        """The recorded graph of ``fn`` for these inputs' signature (recorded if new), as
        plain ATen operators (:func:`aten_graph`: what a compiler traces), or ``None`` where
        it cannot be recorded."""
        _, graph = self._recorded(fn, inputs)
        return None if graph is None else aten_graph(graph)

    def _graph(self, key: Hashable, record: Callable[[], Optional[Callable]]):
        """The graph cached under ``key`` (``None``: recording failed), recorded if new."""
        if key in self._graphs:
            self._graphs.move_to_end(key)
            return self._graphs[key]
        graph = self._graphs[key] = record()
        if len(self._graphs) > self.max_entries:
            self._graphs.popitem(last=False)
        return graph

    def _record(self, fn: Callable, inputs, inference: bool = False) -> Optional[Callable]:
        from torch.fx.experimental.proxy_tensor import make_fx

        try:
            # tensors the model closes over are held by the graph (the objects themselves)
            with _no_sample_validation():
                graph = make_fx(fn, tracing_mode="fake", _allow_non_fake_inputs=True)(*inputs)
        except Exception as err:  # data-dependent control flow, unsupported operators, ...
            self.fallbacks += 1
            text = str(err).strip()
            reason = text.splitlines()[0][:160] if text else ""
            warnings.warn(f"{self.name}: could not record the model as a tensor graph "
                          f"({type(err).__name__}: {reason}); using the traced path for "
                          "these inputs", stacklevel=6)
            return None
        if self.simplify:
            try:
                graph = simplify(graph, inference=inference)
            except Exception as err:  # a graph the rewrites do not understand: keep it as is
                warnings.warn(f"{self.name}: the recorded graph was not simplified "
                              f"({type(err).__name__}: {str(err).strip()[:160]})", stacklevel=6)
        self.captures += 1
        return direct_calls(graph)


class _DirectCall:
    """Base of the callables :func:`_direct` makes (one subclass per operator)."""

    operator: torch._ops.OpOverload


_DIRECT: "Dict[torch._ops.OpOverload, _DirectCall]" = {}


def _direct(op: torch._ops.OpOverload) -> _DirectCall:
    """A callable that runs ``op``'s kernel: an instance of a class whose ``__call__`` *is* the
    operator's C++ entry point, so a call costs no Python frame (``OpOverload.__call__`` is
    one), and whose ``__name__`` lets :mod:`torch.fx` bind it as one global of the generated
    code (``torch.ops.aten.mul.Tensor`` is four attribute lookups per call)."""
    call = _DIRECT.get(op)
    if call is None:
        name = str(op).replace(".", "_")
        kind = type(name, (_DirectCall,), {"__call__": staticmethod(op._op), "operator": op,
                                           "__module__": __name__,
                                           "__repr__": lambda self: f"direct({op})"})
        call = _DIRECT[op] = kind()
        call.__name__ = call.__qualname__ = name
    return call


def operator_of(node: fx.Node):
    """The ATen operator a node of a recorded graph calls (direct or not), else its target."""
    return node.target.operator if isinstance(node.target, _DirectCall) else node.target


def aten_graph(module: fx.GraphModule) -> fx.GraphModule:
    """A copy of a recorded graph whose nodes call the ATen operators themselves instead of
    :func:`direct_calls`' callables (which :func:`torch.compile` cannot trace into); made
    once per graph and kept on it. The tensors the graph holds are shared, not copied."""
    copy = getattr(module, "_aten_graph", None)
    if copy is None:
        graph = fx.Graph()
        graph._codegen = module.graph._codegen  # the pytree calling convention
        env: Dict[fx.Node, fx.Node] = {}
        for node in module.graph.nodes:
            new = graph.node_copy(node, lambda n: env[n])
            if new.op == "call_function":
                new.target = operator_of(node)
            env[node] = new
        copy = fx.GraphModule(module, graph)
        module._aten_graph = copy
    return copy


def direct_calls(module: fx.GraphModule) -> fx.GraphModule:
    """``module`` with its ATen operators called directly (:func:`_direct`): the same
    operators and arguments, about 0.7 us less per operator call (a fifth of the replay of a
    Bayesian MLP's log density and gradient, 240 operators of a few microseconds each)."""
    for node in module.graph.nodes:
        if node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload):
            node.target = _direct(node.target)
    module.recompile()
    return module
