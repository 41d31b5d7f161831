"""Lessons 00-02: the course's tiny test helpers (`test`, `test_eq`, `near`, `test_near`, `test_near_zero`).

The notebooks check every result with these instead of a test framework, so the spec tests use them
too, under the same names. Two things are stricter than the notebooks' one-liners, because both hid
real bugs in the lessons:

- ``near`` refuses to compare tensors of different shapes (only a plain number may broadcast): the
  course's ``allclose`` would silently compare a ``[N, 1]`` output with a ``[N]`` target by
  broadcasting both to ``[N, N]``, the very bug ``squeeze(-1)`` fixes in lesson 02's MSE.
- A failure message shows both sides and the largest absolute difference, so a reader sees at once
  whether a comparison missed by rounding or by a real error.

They carry ``__test__ = False`` so pytest does not collect them when a spec file imports them by
their lesson names.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["test", "test_eq", "near", "test_near", "test_near_zero", "test_close", "max_abs_diff"]

RTOL, ATOL = 1e-3, 1e-5  # the course's tolerances for `near`


def _as_tensor(x: Any) -> torch.Tensor:
    return x if isinstance(x, torch.Tensor) else torch.as_tensor(x)


def _common(a: Any, b: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Both sides as tensors of one dtype on one device, so mixed float32/float64 compare by value."""
    ta, tb = _as_tensor(a), _as_tensor(b)
    if ta.device != tb.device:
        ta, tb = ta.cpu(), tb.cpu()
    dtype = torch.promote_types(ta.dtype, tb.dtype)
    return ta.to(dtype), tb.to(dtype)


def max_abs_diff(a: Any, b: Any) -> float | None:
    """Largest |a - b| when both sides are tensors (or numbers) of broadcastable shapes; else None."""
    try:
        ta, tb = _as_tensor(a), _as_tensor(b)
        if ta.numel() == 0 or tb.numel() == 0:
            return None
        return (ta.detach().double().cpu() - tb.detach().double().cpu()).abs().max().item()
    except (TypeError, ValueError, RuntimeError):
        return None


def _describe(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        return f"tensor of shape {list(x.shape)}, {x.dtype}, on {x.device}"
    return type(x).__name__


def test(a: Any, b: Any, cmp: Callable[[Any, Any], Any], cname: str | None = None) -> None:
    """Raise AssertionError unless ``cmp(a, b)``; the message shows the comparison and both values."""
    if cname is None:
        cname = getattr(cmp, "__name__", repr(cmp))
    result = cmp(a, b)
    ok = bool(result.all()) if isinstance(result, torch.Tensor) else bool(result)
    if not ok:
        lines = [f"{cname}:", f"{a}", f"{b}"]
        diff = max_abs_diff(a, b)
        if diff is not None:
            lines.append(f"max abs diff {diff:.6g}")
        if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
            lines.append(f"left: {_describe(a)}; right: {_describe(b)}")
        raise AssertionError("\n".join(lines))


def _equal(a: Any, b: Any) -> bool:
    """``a == b``, with tensors equal only when their shapes and every element agree."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        ta, tb = _common(a, b)
        return ta.shape == tb.shape and bool((ta == tb).all())
    result = operator.eq(a, b)
    return bool(result.all()) if hasattr(result, "all") else bool(result)


def test_eq(a: Any, b: Any) -> None:
    """Assert ``a == b`` (for tensors: same shape and every element equal)."""
    test(a, b, _equal, "==")


def near(a: Any, b: Any) -> bool:
    """The course's tolerance: ``torch.allclose(a, b, rtol=1e-3, atol=1e-5)``.

    Mixed dtypes are compared in the wider one. Different shapes are never near (a plain number or a
    0-d tensor may still stand for every element), so a ``[N, 1]`` never passes for a ``[N]``.
    """
    ta, tb = _common(a, b)
    if ta.shape != tb.shape and ta.dim() != 0 and tb.dim() != 0:
        return False
    return torch.allclose(ta, tb, rtol=RTOL, atol=ATOL)


def test_near(a: Any, b: Any) -> None:
    """Assert ``near(a, b)``; on failure the message shows both sides and the max abs difference."""
    test(a, b, near)


def test_close(a: Any, b: Any, rtol: float = 1e-10, atol: float = 1e-12) -> None:
    """Assert ``a`` and ``b`` agree within tolerances of your choosing (default: float64-tight).

    Where the course's tolerance is not the point, e.g. checking a rewrite against its reference in
    float64, where a different summation order moves only the last few bits.
    """

    def close(x: Any, y: Any) -> bool:
        tx, ty = _common(x, y)
        if tx.shape != ty.shape and tx.dim() != 0 and ty.dim() != 0:
            return False
        return torch.allclose(tx, ty, rtol=rtol, atol=atol)

    test(a, b, close, f"close (rtol={rtol:g}, atol={atol:g})")


def test_near_zero(a: Any, tol: float = 1e-3) -> None:
    """Assert ``|a| < tol`` for every element of ``a`` (e.g. a mean after normalisation)."""
    if not tol > 0:
        raise ValueError(f"test_near_zero: tol must be positive, got {tol}")
    value = _as_tensor(a).detach().abs()
    if value.numel() == 0 or not bool((value < tol).all()):
        worst = value.max().item() if value.numel() else float("nan")
        raise AssertionError(f"Near zero: {a} (max abs {worst:.6g}, tolerance {tol})")


for _helper in (test, test_eq, test_near, test_near_zero, test_close):
    _helper.__test__ = False  # type: ignore[attr-defined]
