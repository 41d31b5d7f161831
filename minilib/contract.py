"""The contract layer: the words every public minilib function uses to state what it accepts.

A lesson function says its contract in a line or two and then reads like the notebook::

    def lin(x, w, b):
        contract.linear("lin", x=x, w=w, b=b)
        return x @ w + b

Every check raises with one message format, ``<function>: <argument> must be <expected>, got <given>``,
so a user reads at once which call, which argument, what it wanted and what it had:

    ValueError: lin: x must be a float tensor, got a 3x4 int64 tensor on cpu

The error types are the ones spec_tests/test_contracts.py holds every public name to: TypeError when
a value is not even of the right kind (not a tensor, not a number), ValueError for a wrong shape, dtype,
device or value, IndexError for a class index out of range. Arguments are passed by keyword (``x=x``)
so that the message uses the very name the user typed. Nothing here mutates or copies its inputs.
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
    "same_device",
    "same_dtype",
    "positive_int",
    "finite_number",
    "one_of",
    "class_indices",
    "dense",
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


def dense(fname: str, arg: str, x: torch.Tensor) -> None:
    """``x`` is a dense (strided) tensor: a sparse one would fail inside torch, naming no argument."""
    if x.layout != torch.strided:
        fail(fname, arg, f"a dense (strided) tensor, not {str(x.layout).removeprefix('torch.')}", x)


def ndim(fname: str, arg: str, x: torch.Tensor, dims: int | Iterable[int], layout: str) -> None:
    """``x`` has ``dims`` dimensions (an int or a set of ints); ``layout`` says what they mean: ``[N, C]``."""
    allowed = {dims} if isinstance(dims, int) else set(dims)
    if x.dim() not in allowed:
        fail(fname, arg, f"{'/'.join(map(str, sorted(allowed)))}-D {layout}", x)


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
    """Each value is an int >= ``minimum`` (a bool is not a count: True would pass for 1); returns the last
    one."""
    value = 0
    for arg, value in named.items():
        if isinstance(value, bool) or not isinstance(value, Integral):
            fail(fname, arg, f"an int >= {minimum}", describe(value), TypeError)  # a str too, quoted
        if value < minimum:
            fail(fname, arg, f"an int >= {minimum}", value)
    return int(value)


def finite_number(
    fname: str, *, positive: bool = False, within: tuple[float, float] | None = None, **named: Any
) -> float:
    """Each value is a finite real number (a 1-element tensor will do), > 0 when ``positive``, in
    ``[low, high]`` when ``within=(low, high)``. Returns the last as a float."""
    value = 0.0
    for arg, given in named.items():
        value = given.item() if isinstance(given, torch.Tensor) and given.numel() == 1 else given
        if isinstance(value, bool) or not isinstance(value, Real):
            fail(fname, arg, "a real number", describe(given), TypeError)  # a str too, quoted
        if not math.isfinite(value) or (positive and not value > 0):
            fail(fname, arg, "a finite number" + (" > 0" if positive else ""), value)
        if within is not None and not within[0] <= value <= within[1]:
            fail(fname, arg, f"in [{within[0]:g}, {within[1]:g}]", value)
    return float(value)


def one_of(fname: str, arg: str, value: Any, choices: Iterable[Any]) -> None:
    """``value`` is one of ``choices`` (a typo must not silently pick a default)."""
    choices = list(choices)
    if value not in choices:
        fail(fname, arg, "one of " + ", ".join(map(repr, choices)), describe(value))


def class_indices(
    fname: str,
    target: torch.Tensor,
    n_classes: int,
    *,
    arg: str = "target",
    scores: str = "input",
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


# ------------------------------------------------------------------ words the lessons' modules use

__all__ += [
    "weight",
    "finite",
    "nonempty",
    "same_length",
    "matmul",
    "scores",
    "classification",
    "regression",
]


def weight(fname: str, **named: Any) -> None:
    """Each value is a float weight in PyTorch's layout ``[out, in, *kernel]``, of 2 to 5 dims."""
    float_tensor(fname, **named)
    for arg, x in named.items():
        ndim(fname, arg, x, range(2, 6), "[out, in, *kernel]")


def finite(fname: str, *, nonzero: bool = False, **named: Any) -> None:
    """Each value is a real number or a tensor whose every element is finite (and non-zero if ``nonzero``):
    a statistic such as a mean or a std that a NaN or a zero would turn into a silently NaN result."""
    expected = "finite" + (" and non-zero" if nonzero else "")
    for arg, value in named.items():
        if isinstance(value, bool) or not isinstance(value, (Real, torch.Tensor)):
            fail(fname, arg, f"a {expected} number or tensor", value, TypeError)
        v = torch.as_tensor(value).detach()
        if v.is_complex() or v.dtype == torch.bool:
            fail(fname, arg, f"a {expected} real number or tensor", value)
        bad = ~torch.isfinite(v) | ((v == 0) if nonzero else torch.zeros_like(v, dtype=torch.bool))
        if bool(bad.any()):
            got = (
                f"{describe(value)} holding {v[bad][0].item()}" if isinstance(value, torch.Tensor) else value
            )
            fail(fname, arg, expected, got)


def nonempty(fname: str, **named: Any) -> None:
    """Each value has a length of at least 1 (a dataset to draw batches from, a list of parameters)."""
    for arg, x in named.items():
        if not hasattr(x, "__len__"):
            fail(fname, arg, "a sized collection (with a len)", x, TypeError)
        if len(x) == 0:
            fail(fname, arg, "non-empty", f"{describe(x)} of length 0")


def same_length(fname: str, **named: Any) -> None:
    """All values have one length (inputs and their targets, say); the message lists each length."""
    for arg, x in named.items():
        if not hasattr(x, "__len__"):
            fail(fname, arg, "a sized collection (with a len)", x, TypeError)
    if len({len(x) for x in named.values()}) > 1:
        each = ", ".join(f"{arg} {len(x)}" for arg, x in named.items())
        raise ValueError(f"{fname}: {' and '.join(named)} must have one length, got {each}")


def matmul(fname: str, **ab: torch.Tensor) -> None:
    """The operands of ``a @ b``: a [m, k] and b [k, n] numeric (not bool) matrices, one device, one dtype.

    A shape problem names both shapes, as the lesson's check does: the fix is usually on either side.
    """
    (an, a), (bn, b) = ab.items()
    tensor(fname, **ab)
    if a.dim() != 2 or b.dim() != 2:
        raise ValueError(
            f"{fname}: {an} and {bn} must be 2-D matrices, got {an} {shape(a)} and {bn} {shape(b)}"
        )
    if a.shape[1] != b.shape[0]:
        raise ValueError(
            f"{fname}: inner sizes differ: {an} is {shape(a)} but {bn} is {shape(b)} "
            f"({an}'s columns must equal {bn}'s rows)"
        )
    for arg, x in ab.items():
        if x.dtype == torch.bool:  # True * True is True, but True + True is True too: no sum of products
            fail(fname, arg, "a numeric tensor (bool has no sum of products)", x)
    same_device(fname, **ab)
    same_dtype(fname, **ab)  # `@` refuses mixed dtypes while the loops would promote: refuse in all alike


def scores(fname: str, **named: Any) -> None:
    """Each value is a float tensor of class scores, classes in its last dim (at least one class)."""
    float_tensor(fname, **named)
    for arg, x in named.items():
        dense(fname, arg, x)
        if x.dim() == 0 or x.shape[-1] == 0:
            fail(fname, arg, "a tensor of scores with at least one class in its last dim", x)


def classification(fname: str, **scores_target: torch.Tensor) -> None:
    """Scores [N, C] (N >= 1) and int64 class indices [N] in [0, C), on one device.

    Keywords name them as the caller does (``input=``/``out=``/``logits=``, then ``target=``/``yb=``).
    """
    (sn, s), (tn, t) = scores_target.items()
    scores(fname, **{sn: s})
    ndim(fname, sn, s, 2, "[N, C] (a batch of rows of class scores)")
    if s.shape[0] == 0:
        fail(fname, sn, "a batch of at least one row (a mean over none is nan)", s)
    tensor(fname, **{tn: t})
    dense(fname, tn, t)
    if t.dtype != torch.int64:
        fail(fname, tn, "int64 class indices", t)
    if t.shape != s.shape[:1]:
        fail(fname, tn, f"1-D with one class per row of {sn} ({sn} is {shape(s)})", t)
    same_device(fname, **scores_target)
    class_indices(fname, t, s.shape[1], arg=tn, scores=sn)


def regression(fname: str, **output_targ: torch.Tensor) -> None:
    """One prediction per target: a float output [N] or [N, 1] and targets [N] (N >= 1), on one device.

    A [N, 1] output minus [N] targets would broadcast to [N, N], a silently wrong loss: so the sizes
    are checked here and the caller squeezes the column.
    """
    (on, o), (tn, t) = output_targ.items()
    float_tensor(fname, **{on: o})
    tensor(fname, **{tn: t})
    if o.dim() not in (1, 2) or o.shape[1:] not in ((), (1,)) or o.shape[0] == 0:
        fail(fname, on, "[N] or [N, 1] with N >= 1 (one prediction per target)", o)
    if t.shape not in (o.shape[:1], (o.shape[0], 1)):
        fail(fname, tn, f"[N] with one target per row of {on} ({on} is {shape(o)})", t)
    same_device(fname, **output_targ)


# ------------------------------------------------------------------ modules (lesson 10's hooks and LSUV)

__all__ += ["module", "part_of"]


def module(fname: str, **named: Any) -> None:
    """Each value is an ``nn.Module`` (TypeError otherwise)."""
    for arg, m in named.items():
        if not isinstance(m, torch.nn.Module):
            fail(fname, arg, "an nn.Module", describe(m), TypeError)


def part_of(fname: str, arg: str, m: Any, whole_arg: str, whole: Any, having: Iterable[str] = ()) -> None:
    """``m`` is a module inside ``whole`` (one of ``whole.modules()``, by identity) whose attributes
    ``having`` are set (not None): a layer to hook and change in place must be one that ``whole`` runs."""
    module(fname, **{whole_arg: whole, arg: m})
    having = list(having)
    missing = [a for a in having if getattr(m, a, None) is None]
    if missing:
        want = "a layer with a " + " and a ".join(having)
        fail(fname, arg, want, f"a {type(m).__name__} without {' or '.join(missing)}", TypeError)
    if not any(mod is m for mod in whole.modules()):
        fail(
            fname, arg, f"a module of {whole_arg}", f"a {type(m).__name__} that {whole_arg} does not contain"
        )
