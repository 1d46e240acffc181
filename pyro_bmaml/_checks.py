"""Argument checks shared by the public API.

Every check raises ``TypeError`` (wrong type) or ``ValueError`` (wrong value or shape)
with a message that names the argument, what it received and what was expected.
"""

from __future__ import annotations

import contextlib
import numbers
import threading
from typing import Any, Iterable, Optional

import torch
from torch.utils._pytree import keystr, tree_flatten_with_path, tree_leaves


_STATE = threading.local()


def value_checks_enabled() -> bool:
    """Whether the checks that read tensor values (NaN/inf in data, particles and log
    densities, identical particles) run; each costs a device-to-host sync on a GPU."""
    return getattr(_STATE, "enabled", True)


@contextlib.contextmanager
def value_checks(enabled: bool):
    """Turn the value checks on or off within the block (this thread). ``fit`` turns them
    off for its meta-steps, checks the meta-loss and meta-gradient once per step (one sync),
    and re-runs a non-finite step with the checks on to say where it diverged."""
    previous = value_checks_enabled()
    _STATE.enabled = bool(enabled)
    try:
        yield
    finally:
        _STATE.enabled = previous


def all_finite(tensor: torch.Tensor) -> bool:
    """Whether every value is finite, in one pass over the tensor when they are: a sum is
    finite only if no value is NaN or infinite (an infinity or NaN makes it non-finite),
    so only a non-finite sum (which may be an overflow of finite values) needs the
    elementwise check."""
    total = tensor.detach().sum()
    return bool(torch.isfinite(total)) or bool(torch.isfinite(tensor).all())


def check_has_data(name: str, tensor: torch.Tensor) -> None:
    """Refuse a ``meta`` tensor (a shape and dtype without values), which no computation
    here can read."""
    if tensor.device.type == "meta":
        raise ValueError(f"{name} is a meta tensor (shape {tuple(tensor.shape)} without "
                         "values); pass a tensor that holds data")


def check_bool(name: str, value: Any) -> bool:
    """Return ``value`` if it is a ``bool`` (not merely truthy)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def check_int(name: str, value: Any, minimum: int) -> int:
    """Return ``value`` as ``int`` if it is an integer ``>= minimum``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def check_positive_float(name: str, value: Any) -> float:
    """Return ``value`` as ``float`` if it is a finite real number ``> 0``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not (value > 0.0 and value < float("inf")):
        raise ValueError(f"{name} must be a finite number > 0, got {value}")
    return value


def check_nonnegative_float(name: str, value: Any) -> float:
    """Return ``value`` as ``float`` if it is a finite real number ``>= 0``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not (value >= 0.0 and value < float("inf")):
        raise ValueError(f"{name} must be a finite number >= 0, got {value}")
    return value


def check_step_size(value: Any, dim: int, name: str = "step_size"):
    """A step size: a finite float ``> 0`` or a ``(dim,)`` tensor of them (per coordinate)."""
    if isinstance(value, torch.Tensor):
        check_has_data(name, value)
        if value.dim() == 0:
            if not value.is_floating_point():
                raise TypeError(f"{name} must be a real number, got a {value.dtype} tensor")
            return check_positive_float(name, value.item())
        if tuple(value.shape) != (dim,) or not value.is_floating_point():
            raise ValueError(
                f"{name} must be a float or a floating ({dim},) tensor (one step per "
                f"coordinate), got a {value.dtype} tensor of shape {tuple(value.shape)}"
            )
        if not bool(torch.isfinite(value).all() & (value > 0).all()):
            raise ValueError(f"{name} must hold finite values > 0")
        return value
    return check_positive_float(name, value)


def check_choice(name: str, value: Any, choices: Iterable[str]) -> str:
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


def check_particles(
    particles: Any, dim: int, name: str = "particles", min_particles: int = 1
) -> torch.Tensor:
    """Check flat unconstrained particles of shape ``(M, D)`` or ``(T, M, D)``."""
    if not isinstance(particles, torch.Tensor):
        raise TypeError(
            f"{name} must be a torch.Tensor of shape (M, {dim}) or (T, M, {dim}), "
            f"got {type(particles).__name__}"
        )
    check_has_data(name, particles)
    if not particles.is_floating_point():
        raise TypeError(f"{name} must have a floating dtype, got {particles.dtype}")
    if particles.dim() not in (2, 3) or particles.size(-1) != dim:
        raise ValueError(
            f"{name} must have shape (M, {dim}) or (T, M, {dim}) "
            f"(one row per particle, D = {dim} unconstrained coordinates), "
            f"got shape {tuple(particles.shape)}"
        )
    if particles.size(-2) < min_particles:
        raise ValueError(
            f"{name} must hold at least {min_particles} particles (M), "
            f"got shape {tuple(particles.shape)}"
        )
    if value_checks_enabled() and not all_finite(particles):
        raise ValueError(f"{name} contains non-finite values (NaN or inf)")
    return particles


def check_finite_data(args: tuple, kwargs: dict, dtype: Optional[torch.dtype] = None) -> None:
    """Reject NaN/inf in any floating tensor passed to a model, empty data tensors, and
    (with ``dtype``, the particles' dtype) floating data of another dtype."""
    checks = value_checks_enabled()
    for i, leaf in enumerate(tree_leaves((args, kwargs))):
        if not isinstance(leaf, torch.Tensor):
            continue
        if leaf.device.type == "meta":  # (the name's path is built only for a bad argument)
            check_has_data(f"model argument {_leaf_name(args, kwargs, i)}", leaf)
        if leaf.dim() > 0 and leaf.numel() == 0:
            raise ValueError(f"model argument {_leaf_name(args, kwargs, i)} is empty (shape "
                             f"{tuple(leaf.shape)}); give at least one data point")
        if leaf.is_floating_point():
            if dtype is not None and leaf.dtype != dtype:
                raise TypeError(
                    f"model argument {_leaf_name(args, kwargs, i)} is {leaf.dtype} but the "
                    f"particles are {dtype}: cast the data (e.g. x.to({dtype})) or the particles")
            if checks and not all_finite(leaf):
                raise ValueError(
                    f"model argument {_leaf_name(args, kwargs, i)} contains non-finite values "
                    "(NaN or inf); data passed to the model must be finite"
                )


def describe_arguments(args: tuple, kwargs: dict) -> str:
    """``args[0] (shape (5, 1), float32), y=None``: each argument of a model call, tensors by
    shape and dtype (for error messages)."""
    def one(value):
        if isinstance(value, torch.Tensor):
            return f"(shape {tuple(value.shape)}, {str(value.dtype).replace('torch.', '')})"
        return f"= {type(value).__name__}" if value is not None else "= None"
    parts = [f"args[{i}] {one(a)}" for i, a in enumerate(args)]
    parts += [f"{k} {one(v)}" for k, v in kwargs.items()]
    return ", ".join(parts) or "(none)"


def _leaf_name(args: tuple, kwargs: dict, index: int) -> str:
    """The name of the ``index``-th leaf of ``(args, kwargs)`` (in ``tree_leaves`` order),
    e.g. ``args[1]``; the paths are built only to name a bad argument."""
    path, _ = tree_flatten_with_path((args, kwargs))[0][index]
    return _describe_path(path)


def _describe_path(path) -> str:
    # path[0] selects args (0) or kwargs (1); the rest is the position inside.
    head, rest = path[0].idx, path[1:]
    if head == 0 and rest:
        return f"args[{rest[0].idx}]" + keystr(rest[1:])
    return keystr(rest) if rest else "?"
