"""The contract layer: the words every public minilib function uses to state what it accepts.

A lesson function says its contract in a line or two and then reads like the notebook::

    def lin(x, w, b):
        contract.linear("lin", x=x, w=w, b=b)
        return x @ w + b

Every check raises with one message format, ``<function>: <argument> must be <expected>, got <given>``,
so a user reads at once which call, which argument, what it wanted and what it had:

    ValueError: lin: x must be a float tensor, got a 3x4 int64 tensor on cpu

The error types follow ../shared/API.md: TypeError when a value is not even of the right kind (not a
tensor, not a number), ValueError for a wrong shape, dtype, device or value, IndexError for a class
index out of range. Arguments are passed by keyword (``x=x``) so that the message uses the very name
the user typed. Nothing here mutates or copies its inputs.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from numbers import Integral, Real
from typing import Any, NoReturn

import torch

__all__ = [
    "fail",
    "shape",
    "describe",
    "tensor",
    "float_tensor",
    "ndim",
    "matrix",
    "same_device",
    "same_dtype",
    "positive_int",
    "finite_number",
    "one_of",
    "class_indices",
    "linear",
]


def shape(t: torch.Tensor) -> str:
    """A shape as every message writes it: ``3x4``, ``0x10``, ``scalar`` for a 0-d tensor."""
    return "x".join(str(s) for s in t.shape) or "scalar"


def describe(x: Any) -> str:
    """What was given, in a message: ``a 3x4 float32 tensor on cpu``, ``an int (3)``, ``a str ('lrr')``."""
    if isinstance(x, torch.Tensor):
        dtype = str(x.dtype).removeprefix("torch.")
        return f"a {shape(x)} {dtype} tensor on {x.device}"
    if x is None:
        return "None"
    kind = type(x).__name__
    article = "an" if kind[:1].lower() in "aeiou" else "a"
    text = repr(x)
    return f"{article} {kind} ({text[:60] + '...' if len(text) > 60 else text})"


def fail(fname: str, arg: str, expected: str, given: Any, error: type[Exception] = ValueError) -> NoReturn:
    """Raise ``error("<fname>: <arg> must be <expected>, got <given>")``; a str ``given`` is used as is."""
    got = given if isinstance(given, str) else describe(given)
    raise error(f"{fname}: {arg} must be {expected}, got {got}")


def tensor(fname: str, **named: Any) -> None:
    """Each value is a torch.Tensor (TypeError otherwise)."""
    for arg, x in named.items():
        if not isinstance(x, torch.Tensor):
            fail(fname, arg, "a torch.Tensor", x, TypeError)


def float_tensor(fname: str, **named: Any) -> None:
    """Each value is a floating-point tensor (TypeError if not a tensor, ValueError for another dtype)."""
    tensor(fname, **named)
    for arg, x in named.items():
        if not x.is_floating_point():
            fail(fname, arg, "a floating-point tensor", x)


def ndim(fname: str, arg: str, x: torch.Tensor, dims: int | Iterable[int], layout: str) -> None:
    """``x`` has ``dims`` dimensions (an int or a set of ints); ``layout`` says what they mean: ``[N, C]``."""
    allowed = {dims} if isinstance(dims, int) else set(dims)
    if x.dim() not in allowed:
        fail(fname, arg, f"{'/'.join(map(str, sorted(allowed)))}-D {layout}", x)


def matrix(fname: str, **named: Any) -> None:
    """Each value is a 2-D tensor."""
    tensor(fname, **named)
    for arg, x in named.items():
        ndim(fname, arg, x, 2, "(a matrix)")


def same_device(fname: str, **named: torch.Tensor) -> None:
    """All tensors are on one device; the message lists each argument's device."""
    if len({x.device for x in named.values()}) > 1:
        each = ", ".join(f"{arg} on {x.device}" for arg, x in named.items())
        raise ValueError(f"{fname}: {' and '.join(named)} must be on one device, got {each}")


def same_dtype(fname: str, **named: torch.Tensor) -> None:
    """All tensors have one dtype; the message lists each argument's dtype."""
    if len({x.dtype for x in named.values()}) > 1:
        each = ", ".join(f"{arg} {str(x.dtype).removeprefix('torch.')}" for arg, x in named.items())
        raise ValueError(f"{fname}: {' and '.join(named)} must have one dtype, got {each}")


def positive_int(fname: str, minimum: int = 1, **named: Any) -> int:
    """Each value is an int >= ``minimum`` (a bool is not a count: True would pass for 1). Returns the last."""
    value = 0
    for arg, value in named.items():
        if isinstance(value, bool) or not isinstance(value, Integral):
            fail(fname, arg, f"an int >= {minimum}", value, TypeError)
        if value < minimum:
            fail(fname, arg, f"an int >= {minimum}", value)
    return int(value)


def finite_number(fname: str, *, positive: bool = False, **named: Any) -> float:
    """Each value is a finite real number (and > 0 when ``positive``). Returns the last as a float."""
    value = 0.0
    for arg, value in named.items():
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        if isinstance(value, bool) or not isinstance(value, Real):
            fail(fname, arg, "a real number", value, TypeError)
        if not math.isfinite(value) or (positive and not value > 0):
            fail(fname, arg, "a finite number" + (" > 0" if positive else ""), value)
    return float(value)


def one_of(fname: str, arg: str, value: Any, choices: Iterable[Any]) -> None:
    """``value`` is one of ``choices`` (a typo must not silently pick a default)."""
    choices = list(choices)
    if value not in choices:
        fail(fname, arg, "one of " + ", ".join(map(repr, choices)), describe(value))


def class_indices(
    fname: str, target: torch.Tensor, n_classes: int, *, arg: str = "target", scores: str = "input",
    ignore_index: int | None = None,
) -> None:
    """``target`` holds int64 class indices in ``[0, n_classes)`` (or ``ignore_index``): IndexError naming the
    first bad one and its position. ``scores`` names the argument that has the classes."""
    bad = (target < 0) | (target >= n_classes)
    if ignore_index is not None:
        bad &= target != ignore_index
    if bool(bad.any()):
        pos = int(bad.nonzero()[0, 0])
        raise IndexError(
            f"{fname}: {arg} holds class {int(target[pos])} at position {pos}, "
            f"but {scores} has only {n_classes} classes"
        )


def linear(fname: str, **xwb: torch.Tensor) -> None:
    """The three operands of ``x @ w + b``: x [N, in], w [in, out], b [out], one device, one float dtype.

    Keywords name them as the caller does (``x=``/``inp=``, ``w=``, ``b=``), in that order.
    """
    (xn, x), (wn, w), (bn, b) = xwb.items()
    float_tensor(fname, **xwb)
    ndim(fname, xn, x, 2, "[N, in]")
    ndim(fname, wn, w, 2, "[in, out]")
    ndim(fname, bn, b, 1, "[out]")
    if x.shape[1] != w.shape[0] or b.shape[0] != w.shape[1]:
        raise ValueError(
            f"{fname}: sizes must agree ({xn}'s columns = {wn}'s rows, {bn}'s length = {wn}'s columns), "
            f"got {xn} {shape(x)}, {wn} {shape(w)}, {bn} {shape(b)}"
        )
    same_device(fname, **xwb)
    same_dtype(fname, **xwb)
