r"""Exact algebraic simplification of a recorded potential graph.

A Pyro model's log density, recorded as ATen operators (:mod:`pyro_bmaml.engine.capture`),
does far more full-size elementwise work than the arithmetic needs. A prior
``Normal(0, s).to_event(2)`` on a ``(40, 40)`` weight with one scale ``s`` per particle
evaluates, element by element,

.. math::

    -\frac{(w - 0)^2}{2 s^2} - \log s - \tfrac12 \log 2\pi

with ``s`` broadcast to the weight's shape *before* it is squared and logged, and only then
sums: about nine full-size operators, each with its own backward and double backward. The
hand-written density computes :math:`-\frac{1}{2 s^2}\sum w^2 - n \log s - \frac n2 \log
2\pi`: one. :func:`simplify` rewrites the graph with identities of real arithmetic, so values
agree to rounding and autograd differentiates the result to any order:

1. **Zeros, ones and constants**: ``a + 0``, ``a - 0``, ``a * 1``, ``a / 1`` and ``a ** 1``
   become ``a`` (when the result has ``a``'s shape and dtype); a sum of zeros is zero (e.g.
   the zero log-Jacobian of an identity transform). A tensor filled with a constant known
   when recording (a backward starts from ``ones`` and negates and scales them) becomes that
   number in the operator using it, and a constant numerator ``c / x`` becomes
   ``reciprocal(x) * c``; a copy of a constant the graph holds (``lift_fresh_copy``) is not
   made.
2. **Broadcast sinking**: an elementwise ``f(expand(a), expand(b))`` becomes
   ``expand(f(a, b))``: the operator runs on the small tensors.
3. **Sums pushed into linear operators**: :math:`\sum (a \pm b) = \sum a \pm \sum b` (an
   operand broadcast along a summed dimension contributes its own sum times the number of
   copies), :math:`\sum -a = -\sum a`, :math:`\sum a c = c \sum a` and :math:`\sum a / c =
   \sum a / c` for ``c`` constant along the summed dimensions, the sum of an ``expand`` is a
   multiple of its source's, a sum over a reshape that only flattens summed trailing
   dimensions is a sum over the dimensions before it, and a sum over size-1 dimensions is a
   squeeze. A sum is pushed only into an operator it alone uses, so no work is duplicated.
4. **Views**: a chain of reshapes (view, unsqueeze, squeeze) becomes one view of its base, or
   the base itself when the shapes agree (checked against the recorded strides), and an
   expand to the shape its input already has is dropped.
5. **Duplicates**: an operator applied again to the same inputs (a scale squared and logged
   once per site it scales) reuses the first result; random operators are never merged.
6. **Slices**: disjoint slices of one tensor along one dim (the sites of a flat particle)
   become one ``split_with_sizes``, whose backward concatenates their gradients once (each
   slice's backward writes into a zero tensor of the full size, and autograd adds them).
7. **Constant factors**: consecutive ones merge (``-(2 (-x))`` is ``2 x``; a product of 1
   disappears), and one on a product with a broadcast operand moves to that operand's
   source: a square's backward ``expand(s) * (2 * w)`` becomes ``expand(2 s) * w``, one
   full-size operator instead of two.
8. **Outer products**: a matrix product over an inner dim of size 1 (a one-input layer, the
   backward of a one-output layer) is an elementwise product of the operands, broadcast.
9. **Fused additions** (last): ``c + A @ B`` and ``c + a * b``, the product used only there,
   become ``baddbmm(c, A, B)`` and ``addcmul(c, a, b)`` (a layer's bias, a prior's gradient
   added to the data's).

A graph that will only be replayed without autograd (``inference=True``: a log density
recorded together with its gradient) also loses its ``detach`` operators.

Only floating-point operators whose operands share the result's dtype are rewritten (no change
of precision), and a graph with in-place operators is left as it is. Summation order
changes, so float32 results move by rounding (~1e-6 relative). On the paper's Bayesian MLP
one full-size operator per weight matrix remains, the square, as in a hand-written density
(``tests/test_simplify.py``); a BMAML meta-step then takes 1.17x a hand-batched torch one,
against 2.48x for the graph as recorded (``benchmarks/meta_step.py``).
"""

from __future__ import annotations

import math
import operator
from typing import Iterable, Optional, Union

import torch
from torch import fx

__all__ = ["simplify"]

aten = torch.ops.aten

_UNARY = {aten.neg.default, aten.log.default, aten.exp.default, aten.rsqrt.default,
          aten.sqrt.default, aten.reciprocal.default, aten.lgamma.default,
          aten.digamma.default, aten.log1p.default, aten.expm1.default, aten.sigmoid.default,
          aten.tanh.default, aten.relu.default, aten.abs.default, aten.square.default,
          aten.pow.Tensor_Scalar}
_BINARY = {aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.div.Tensor,
           aten.pow.Tensor_Tensor, aten.xlogy.Tensor}
_ELEMENTWISE = _UNARY | _BINARY
#: operators that only rearrange (or copy) their first argument's values
_VIEWS = {aten.view.default, aten._unsafe_view.default, aten.reshape.default,
          aten.expand.default, aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.dims,
          aten.squeeze.default, aten.clone.default, aten.permute.default,
          aten.transpose.int, aten.t.default, aten.select.int, aten.slice.Tensor,
          aten.alias.default}
_FLATTENS = {aten.view.default, aten._unsafe_view.default, aten.reshape.default}
#: operators that only change the shape, in row-major order (chains collapse into one view)
_RESHAPES = _FLATTENS | {aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.dims,
                         aten.squeeze.default}

Operand = Union[fx.Node, float, int]


def _val(node: Operand) -> Optional[torch.Tensor]:
    value = node.meta.get("val") if isinstance(node, fx.Node) else None
    return value if isinstance(value, torch.Tensor) else None


def _shape(node: fx.Node) -> tuple:
    return tuple(_val(node).shape)


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _constant(node: Operand) -> Optional[float]:
    """The value of an operand that is a tensor filled with one constant known when the graph
    was recorded (zeros, ones, a full, a scalar made a tensor, views and sums of zeros)."""
    if _is_number(node):
        return float(node)
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return None
    target, args = node.target, node.args
    if target in (aten.zeros.default, aten.new_zeros.default, aten.zeros_like.default):
        return 0.0
    if target in (aten.ones.default, aten.new_ones.default, aten.ones_like.default):
        return 1.0
    if target in (aten.full.default, aten.full_like.default) and _is_number(args[1]):
        return float(args[1])
    if target is aten.new_full.default and _is_number(args[2]):
        return float(args[2])
    if target is aten._to_copy.default and _is_number(args[0]):
        return float(args[0])
    if target in _VIEWS:
        return _constant(args[0])
    if target in (aten.sum.dim_IntList, aten.sum.default) and _constant(args[0]) == 0.0:
        return 0.0
    if target is aten.neg.default:
        value = _constant(args[0])
        return None if value is None else -value
    if target in _ARITHMETIC:  # of two constants (e.g. the ones a backward starts from)
        a, b = _constant(args[0]), _constant(args[1])
        if a is None or b is None:
            return None
        alpha = node.kwargs.get("alpha", 1)
        if target in (aten.add.Tensor, aten.sub.Tensor):
            return a + alpha * b if target is aten.add.Tensor else a - alpha * b
        if target in (aten.mul.Tensor, aten.mul.Scalar):
            return a * b
        return a / b if b != 0.0 else None
    return None


#: binary arithmetic whose result is a constant when both operands are
_ARITHMETIC = {aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.mul.Scalar,
               aten.div.Tensor, aten.div.Scalar}


def _same_kind(node: fx.Node, *operands: Operand) -> bool:
    """Floating result, and every tensor operand of the result's dtype."""
    value = _val(node)
    if value is None or not value.is_floating_point():
        return False
    for op in operands:
        if isinstance(op, fx.Node) and (_val(op) is None or _val(op).dtype != value.dtype):
            return False
    return True


def _hashable(x):
    if isinstance(x, (list, tuple)):
        return (type(x).__name__,) + tuple(_hashable(v) for v in x)
    if isinstance(x, dict):
        return ("dict",) + tuple(sorted((k, _hashable(v)) for k, v in x.items()))
    if isinstance(x, (torch.dtype, torch.device, torch.layout, torch.memory_format)):
        return str(x)
    return x  # nodes, numbers, strings, None (anything unhashable raises TypeError)


def _meta(x):
    """A meta tensor standing in for a node's value (a list of them for a split)."""
    if not isinstance(x, fx.Node):
        return x
    value = x.meta.get("val")
    if isinstance(value, (list, tuple)):
        return [torch.empty_strided(v.shape, v.stride(), dtype=v.dtype, device="meta")
                for v in value]
    # with the recorded strides: the meta kernels then give new nodes their real layouts
    return torch.empty_strided(value.shape, value.stride(), dtype=value.dtype, device="meta")


class _Rewriter:
    def __init__(self, graph: fx.Graph):
        self.graph = graph
        self.before: Optional[fx.Node] = None  # where new nodes go

    def new(self, target, args, kwargs=None) -> fx.Node:
        kwargs = kwargs or {}
        with self.graph.inserting_before(self.before):
            node = self.graph.call_function(target, tuple(args), kwargs)
        meta_args = [_meta(a) for a in args]
        node.meta["val"] = target(*meta_args, **kwargs)
        return node

    def replace(self, node: fx.Node, new: fx.Node) -> None:
        node.replace_all_uses_with(new)
        self.graph.erase_node(node)

    # ---------------------------------------------------------------- rule 6
    def split_slices(self) -> None:
        """Disjoint slices of one tensor along one dim become one ``split_with_sizes``: its
        backward concatenates the pieces' gradients once, where each slice's backward
        writes its gradient into a zero tensor of the full size and autograd adds them."""
        groups: dict = {}
        for node in self.graph.nodes:
            if node.op == "call_function" and node.target is aten.slice.Tensor \
                    and not node.kwargs and _val(node) is not None \
                    and _val(node.args[0]) is not None:
                args = list(node.args) + [0, None, None, 1][len(node.args) - 1:]
                source, dim, start, end, step = args[:5]
                ndim = _val(source).dim()
                if step != 1 or not -ndim <= dim < ndim:
                    continue
                dim %= ndim
                size = _val(source).shape[dim]
                start = 0 if start is None else max(0, min(start + size if start < 0 else start, size))
                end = size if end is None else max(0, min(end + size if end < 0 else end, size))
                groups.setdefault((source, dim), []).append((start, end, node))
        for (source, dim), pieces in groups.items():
            if len(pieces) < 2:
                continue
            pieces.sort(key=lambda p: (p[0], p[1]))
            if any(a[1] > b[0] for a, b in zip(pieces, pieces[1:])) or any(
                    start >= end for start, end, _ in pieces) or len(
                    {(start, end) for start, end, _ in pieces}) != len(pieces):
                continue  # overlapping, empty or repeated slices: leave them
            bounds, index, position = [], {}, 0
            for start, end, node in pieces:
                if start > position:
                    bounds.append(start - position)
                index[node] = len(bounds)
                bounds.append(end - start)
                position = end
            size = _val(source).shape[dim]
            if position < size:
                bounds.append(size - position)
            self.before = next(n for n in self.graph.nodes if n in index)  # the first slice
            split = self.new(aten.split_with_sizes.default, (source, bounds, dim))
            for start, end, node in pieces:
                self.before = node
                self.replace(node, self.new(operator.getitem, (split, index[node])))

    # ---------------------------------------------------------------- rule 5
    def merge_duplicate(self, node: fx.Node, seen: dict) -> bool:
        """The same operator on the same inputs again: use the first result."""
        target = node.target
        if not isinstance(target, torch._ops.OpOverload) \
                or torch.Tag.nondeterministic_seeded in target.tags:
            return False
        try:
            key = (target, _hashable(node.args), _hashable(node.kwargs))
            hash(key)
        except TypeError:
            return False
        first = seen.setdefault(key, node)
        if first is node:
            return False
        self.replace(node, first)
        return True

    # ---------------------------------------------------------------- rule 4
    def collapse_views(self, node: fx.Node) -> bool:
        """A chain of reshapes becomes one view of its base (none if the shape is the
        base's); an expand to the shape it already has is dropped."""
        out = _val(node)
        if node.target is aten.expand.default:
            base = node.args[0]
            if _val(base) is not None and _val(base).shape == out.shape:
                self.replace(node, base)
                return True
            return False
        if node.target not in _RESHAPES:
            return False
        base, links = node.args[0], 1
        while isinstance(base, fx.Node) and base.target in _RESHAPES:
            base, links = base.args[0], links + 1
        value = _val(base)
        if value is None or value.dtype != out.dtype:
            return False
        if value.shape == out.shape:
            self.replace(node, base)
            return True
        if links < 2:
            return False
        try:  # the view must exist on the base's strides
            torch.empty_strided(value.shape, value.stride(), dtype=value.dtype,
                                device="meta").view(out.shape)
        except RuntimeError:
            return False
        self.before = node
        self.replace(node, self.new(aten.view.default, (base, list(out.shape))))
        return True

    # ---------------------------------------------------------------- rule 1
    def drop_identity(self, node: fx.Node) -> bool:
        target = node.target
        if target is aten.lift_fresh_copy.default:  # a copy of a constant the graph holds
            if not any(user.op == "output" for user in node.users):  # (none writes to it)
                self.replace(node, node.args[0])
                return True
            return False
        if target in (aten.pow.Tensor_Scalar, aten.mul.Scalar, aten.div.Scalar) \
                and _constant(node.args[1]) == 1.0:  # x ** 1 (a square's backward), x * 1
            return self.keep(node, node.args[0])
        if target not in (aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.div.Tensor):
            return False
        if self.constant_to_number(node):
            target = node.target
        a, b = node.args[:2]
        keep = None
        if target in (aten.add.Tensor, aten.sub.Tensor):
            if _constant(b) == 0.0:
                keep = a
            elif target is aten.add.Tensor and _constant(a) == 0.0 \
                    and node.kwargs.get("alpha", 1) == 1:
                keep = b
        elif target is aten.mul.Tensor:
            keep = a if _constant(b) == 1.0 else (b if _constant(a) == 1.0 else None)
        elif _constant(b) == 1.0:
            keep = a
        return self.keep(node, keep)

    def keep(self, node: fx.Node, keep: Operand) -> bool:
        """Replace ``node`` by its operand ``keep`` if that has the same shape and dtype."""
        if not isinstance(keep, fx.Node) or _val(keep) is None or _val(node) is None:
            return False
        if _val(keep).shape != _val(node).shape or _val(keep).dtype != _val(node).dtype:
            return False
        self.replace(node, keep)
        return True

    def constant_to_number(self, node: fx.Node) -> bool:
        """An operand that is a tensor filled with a known constant (e.g. ``-ones`` in a
        backward) becomes that number, when the other operand alone has the result's shape
        and dtype: ``x * neg(ones)`` is ``x * -1.0`` (then rule 1 can drop a unit factor)."""
        a, b = node.args[:2]
        if node.target is aten.div.Tensor and isinstance(a, fx.Node) \
                and _constant(a) is not None and isinstance(b, fx.Node) \
                and _val(b) is not None and _val(node) is not None \
                and _same_kind(node, b) and _val(b).shape == _val(node).shape:
            value = _constant(a)  # c / x = (1 / x) * c
            self.before = node
            node.target, node.args = aten.mul.Tensor, (
                self.new(aten.reciprocal.default, (b,)), value)
            return True
        if node.target in (aten.add.Tensor, aten.mul.Tensor) and node.kwargs.get("alpha", 1) == 1 \
                and isinstance(a, fx.Node) and _constant(a) is not None:
            a, b = b, a  # the constant first: it commutes to the second place
        value = _constant(b)
        if not isinstance(b, fx.Node) or value is None or not isinstance(a, fx.Node) \
                or _val(a) is None or _val(node) is None or not _same_kind(node, a) \
                or _val(a).shape != _val(node).shape:
            return False
        node.args = (a, value) + tuple(node.args[2:])
        return True

    # ---------------------------------------------------------------- rule 7
    def hoist_factor(self, node: fx.Node) -> bool:
        """Constant factors: consecutive ones merge (``-(2 * (-x))`` is ``2 * x``, and a
        product of 1 disappears), and one on a product with a broadcast operand moves to
        that operand's small source: ``expand(s) * (c * x)`` and ``-(expand(s) * x)``
        become ``expand(c * s) * x`` and ``expand(-s) * x`` (one full-size operator, not
        two)."""
        outer = self.factor_of(node)
        inner = node.args[0] if outer is not None else None
        if isinstance(inner, fx.Node) and len(inner.users) == 1 \
                and self.factor_of(inner) is not None and _same_kind(node, inner.args[0]):
            factor = outer * self.factor_of(inner)
            if factor == 1.0 and self.keep(node, inner.args[0]):
                return True
            if _val(inner.args[0]) is None or _val(inner.args[0]).shape != _val(node).shape:
                return False
            self.before = node
            self.replace(node, self.new(aten.mul.Tensor, (inner.args[0], factor)))
            return True
        if node.target is aten.mul.Tensor and all(isinstance(a, fx.Node) for a in node.args):
            for broadcast, scaled in (node.args, node.args[::-1]):
                factor = self.factor_of(scaled)
                if factor is not None and broadcast.target is aten.expand.default \
                        and len(scaled.users) == 1:
                    source, x = broadcast.args[0], scaled.args[0]
                    break
            else:
                return False
        elif node.target in (aten.neg.default, aten.mul.Scalar, aten.mul.Tensor):
            factor, product = self.factor_of(node), node.args[0]
            if factor is None or not isinstance(product, fx.Node) \
                    or product.target is not aten.mul.Tensor or len(product.users) != 1:
                return False
            broadcast, x = product.args[:2]
            if not (isinstance(broadcast, fx.Node) and broadcast.target is aten.expand.default):
                broadcast, x = x, broadcast
            if not (isinstance(broadcast, fx.Node) and broadcast.target is aten.expand.default):
                return False
            source = broadcast.args[0]
        else:
            return False
        if not (isinstance(x, fx.Node) and _val(x) is not None and _val(source) is not None
                and _val(x).shape == _val(node).shape and _same_kind(node, x, source)
                and _val(source).numel() < _val(node).numel()):
            return False
        self.before = node
        small = self.new(aten.mul.Tensor, (source, factor))
        wide = self.new(aten.expand.default, (small, list(broadcast.args[1])))
        self.replace(node, self.new(aten.mul.Tensor, (wide, x)))
        return True

    # ---------------------------------------------------------------- rule 8
    def outer_product(self, node: fx.Node) -> bool:
        """A matrix product over an inner dim of size 1 is an elementwise product of its
        operands, broadcast: ``(B, N, 1) @ (B, 1, P)`` (a network's one-input layer, or the
        backward of its one-output layer) is ``(B, N, 1) * (B, 1, P)``."""
        if node.target not in (aten.bmm.default, aten.mm.default):
            return False
        a, b = node.args[:2]
        if _val(a) is None or _val(b) is None or _val(a).shape[-1] != 1 \
                or not _same_kind(node, a, b):
            return False
        self.before = node
        self.replace(node, self.new(aten.mul.Tensor, (a, b)))
        return True

    # ---------------------------------------------------------------- rule 9
    def fuse_add(self, node: fx.Node) -> bool:
        """``c + A @ B`` and ``c + a * b`` (a product used only there) become one operator,
        ``baddbmm(c, A, B)`` and ``addcmul(c, a, b)``: a bias added to a layer's output, a
        prior's gradient added to the data's, without a full-size pass of their own."""
        if node.target is not aten.add.Tensor or node.kwargs.get("alpha", 1) != 1:
            return False
        for product, other in (node.args, node.args[::-1]):
            if not (isinstance(product, fx.Node) and isinstance(other, fx.Node)
                    and len(product.users) == 1 and _val(other) is not None
                    and _same_kind(node, other)):
                continue
            if product.target is aten.bmm.default and _same_kind(node, *product.args) \
                    and _val(product).shape == _val(node).shape:
                fused = (aten.baddbmm.default, (other,) + tuple(product.args))
            elif product.target is aten.mul.Tensor and all(
                    isinstance(a, fx.Node) for a in product.args) \
                    and _same_kind(node, *product.args):
                fused = (aten.addcmul.default, (other,) + tuple(product.args))
            else:
                continue
            # the fused operator takes its layout from its operands (addcmul from ``c``,
            # which may be a transpose): keep the sum's strides, on which later views rely
            target, args = fused
            if target(*[_meta(a) for a in args]).stride() != _val(node).stride():
                continue
            self.before = node  # (addcmul broadcasts all three, as the sum did)
            self.replace(node, self.new(*fused))
            return True
        return False

    @staticmethod
    def factor_of(node: fx.Node) -> Optional[float]:
        """``c`` when ``node`` is ``c * x`` for a number ``c`` (``-x`` included)."""
        if node.target is aten.neg.default:
            return -1.0
        if node.target in (aten.mul.Scalar, aten.mul.Tensor) and _is_number(node.args[1]):
            return float(node.args[1])
        return None

    # ---------------------------------------------------------------- rule 2
    def sink_expand(self, node: fx.Node) -> bool:
        if node.target not in _ELEMENTWISE or not _same_kind(node, *node.args):
            return False
        tensors = [a for a in node.args if isinstance(a, fx.Node)]
        if not any(a.target is aten.expand.default for a in tensors):
            return False
        sources = [a.args[0] if isinstance(a, fx.Node) and a.target is aten.expand.default
                   else a for a in node.args]
        small = torch.broadcast_shapes(*[_shape(s) for s in sources if isinstance(s, fx.Node)])
        out = _shape(node)
        if math.prod(small) >= math.prod(out):
            return False
        self.before = node
        reduced = self.new(node.target, sources, dict(node.kwargs))
        self.replace(node, self.new(aten.expand.default, (reduced, list(out))))
        return True

    # ---------------------------------------------------------------- rule 3
    def push_sum(self, node: fx.Node) -> bool:
        if node.target is aten.sum.dim_IntList:
            x, dims = node.args[0], node.args[1]
            keepdim = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
        elif node.target is aten.sum.default:
            x, dims, keepdim = node.args[0], None, False
        else:
            return False
        if node.kwargs.get("dtype") is not None or not _same_kind(node, x):
            return False
        shape = _shape(x)
        if not shape:
            return False
        dims = set(range(len(shape))) if not dims else {d % len(shape) for d in dims}
        self.before = node
        total = self.sum_of(x, dims, improve_only=True)
        if total is None:
            return False
        kept = [1 if d in dims else s for d, s in enumerate(shape)]
        total = self.fit(total, kept)
        if not keepdim:
            total = self.new(aten.squeeze.dims, (total, sorted(dims)))
        if _shape(total) != _shape(node):  # cannot happen; keep the original if it does
            return False
        self.replace(node, total)
        return True

    def fit(self, node: Operand, shape) -> fx.Node:
        if not isinstance(node, fx.Node):  # a number: a full tensor of the shape is not needed
            raise AssertionError("a sum of tensors reduced to a number")
        if list(_shape(node)) != list(shape):
            node = self.new(aten.expand.default, (node, list(shape)))
        return node

    def sum_of(self, x: fx.Node, dims: Iterable[int], improve_only: bool = False):
        """A node equal to ``x.sum(dims, keepdim=True)`` up to broadcasting (its shape
        broadcasts to that); with ``improve_only``, ``None`` when no rule applies."""
        shape = _shape(x)
        dims = {d for d in dims if shape[d] != 1}
        if not dims:
            return x
        rewritten = self.rewrite_sum(x, shape, dims) if len(x.users) == 1 else None
        if rewritten is not None or improve_only:
            return rewritten
        return self.new(aten.sum.dim_IntList, (x, sorted(dims), True))

    def rewrite_sum(self, x: fx.Node, shape, dims):
        target, args = x.target, x.args
        if x.op != "call_function" or not _same_kind(x, *args):
            return None
        if target in (aten.add.Tensor, aten.sub.Tensor):
            alpha = x.kwargs.get("alpha", 1)
            sign = alpha if target is aten.add.Tensor else -alpha
            return self.combine(self.operand_sum(args[0], shape, dims),
                                self.operand_sum(args[1], shape, dims), sign)
        if target is aten.neg.default:
            return self.new(aten.neg.default, (self.sum_of(args[0], dims),))
        if target in (aten.mul.Tensor, aten.div.Tensor):
            a, b = args
            if isinstance(a, fx.Node) and self.constant_along(b, shape, dims):
                return self.new(target, (self.operand_sum(a, shape, dims), self.source(b)))
            if target is aten.mul.Tensor and isinstance(b, fx.Node) \
                    and self.constant_along(a, shape, dims):
                return self.new(target, (self.operand_sum(b, shape, dims), self.source(a)))
            return None
        if target is aten.expand.default:
            return self.operand_sum(args[0], shape, dims)
        if target in _FLATTENS:
            return self.flattened_sum(x, shape, dims)
        return None

    def flattened_sum(self, x: fx.Node, shape, dims):
        """Sum over a reshape that keeps a prefix of dims and flattens the rest, all summed."""
        y = x.args[0]
        inner = _shape(y)
        k = 0
        while k < min(len(inner), len(shape)) and inner[k] == shape[k]:
            k += 1
        if any(d not in dims and shape[d] != 1 for d in range(k, len(shape))):
            return None
        inner_dims = {d for d in dims if d < k} | set(range(k, len(inner)))
        total = self.fit(self.sum_of(y, inner_dims),
                         [1 if d in inner_dims else s for d, s in enumerate(inner)])
        return self.new(aten.view.default,
                        (total, [1 if d in dims or d >= k else s for d, s in enumerate(shape)]))

    @staticmethod
    def source(x: Operand) -> Operand:
        return x.args[0] if isinstance(x, fx.Node) and x.target is aten.expand.default else x

    def constant_along(self, x: Operand, shape, dims) -> bool:
        """Whether ``x`` (broadcast to ``shape``) does not vary along ``dims``."""
        if not isinstance(x, fx.Node):
            return _is_number(x)
        own = _shape(self.source(x))
        offset = len(shape) - len(own)
        return all(d < offset or own[d - offset] == 1 for d in dims)

    def operand_sum(self, a: Operand, shape, dims) -> Operand:
        """``a`` broadcast to ``shape`` and summed over ``dims`` (keepdim, up to broadcast)."""
        if not isinstance(a, fx.Node):
            return a * math.prod(shape[d] for d in dims)
        own = _shape(a)
        offset = len(shape) - len(own)
        mine = {d - offset for d in dims if d >= offset and own[d - offset] == shape[d]}
        copies = math.prod(shape[d] for d in dims if d < offset or own[d - offset] != shape[d])
        total = self.sum_of(a, mine)
        return total if copies == 1 else self.new(aten.mul.Tensor, (total, copies))

    def combine(self, a: Operand, b: Operand, sign) -> Operand:
        """``a + sign * b``."""
        if isinstance(a, fx.Node) and isinstance(b, fx.Node):
            kwargs = {} if sign == 1 else {"alpha": sign}
            return self.new(aten.add.Tensor, (a, b), kwargs)
        if isinstance(a, fx.Node):
            return self.new(aten.add.Tensor, (a, sign * b))
        scaled = b if sign == 1 else self.new(aten.mul.Tensor, (b, sign))
        return self.new(aten.add.Tensor, (scaled, a))


def simplify(module: fx.GraphModule, inference: bool = False) -> fx.GraphModule:
    """The rewrites above applied to a graph recorded by ``make_fx`` (its nodes carry their
    values' shapes in ``node.meta["val"]``): a new module sharing ``module``'s attributes
    (the tensors the graph holds); ``module`` itself is left unchanged.

    :param inference: the graph will only be replayed without autograd (e.g. a log density
        recorded with its gradient): its ``detach`` operators, identities on values, are
        dropped too."""
    graph = fx.Graph()  # a copy of the nodes; the tensors and the pytree codegen are shared
    output, old_output = graph.graph_copy(module.graph, {}, return_output_node=True)
    graph._codegen = module.graph._codegen
    graph.output(output, type_expr=getattr(old_output, "type", None))
    module = fx.GraphModule(module, graph)
    if any(isinstance(n.target, torch._ops.OpOverload) and n.target._schema.is_mutable
           for n in graph.nodes if n.op == "call_function"):
        return module  # in-place operators: rewriting what they write to could change them
    rewriter = _Rewriter(graph)

    def operators(with_value: bool = True):  # the live operator nodes, in order
        for node in list(graph.nodes):
            if node.op == "call_function" and not node._erased and (
                    not with_value or _val(node) is not None):
                yield node

    graph.eliminate_dead_code()
    if inference:
        for node in operators(with_value=False):
            if node.target is aten.detach.default:
                rewriter.replace(node, node.args[0])
    for _ in range(4):  # again over the operators the rules made, until none applies
        graph.eliminate_dead_code()
        changed = False
        for node in operators():
            changed |= bool(rewriter.drop_identity(node) or rewriter.hoist_factor(node)
                            or rewriter.outer_product(node) or rewriter.sink_expand(node))
        if not changed:
            break
    graph.eliminate_dead_code()
    for node in operators():
        if rewriter.push_sum(node):
            graph.eliminate_dead_code()
    for node in operators():
        rewriter.collapse_views(node)
    graph.eliminate_dead_code()
    rewriter.split_slices()
    seen: dict = {}
    for node in operators(with_value=False):
        rewriter.merge_duplicate(node, seen)
    graph.eliminate_dead_code()
    for node in operators():  # last: the other rules read the unfused operators
        rewriter.fuse_add(node)
    graph.eliminate_dead_code()
    graph.lint()
    module.recompile()
    return module
