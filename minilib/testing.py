"""Lessons 00-02: the course's tiny test helpers (`test`, `test_eq`, `near`, `test_near`, `test_near_zero`).

The notebooks check every result with these instead of a test framework, so the spec tests use them
too, under the same names. Every tolerance comparison here is one function, ``torch.testing.assert_close``
(`near` with the course's rtol 1e-3 and atol 1e-5, `test_close` with yours or PyTorch's per-dtype
defaults), with two things stricter than the notebooks' one-liners, because both hid real bugs:

- Different shapes are never close (only a plain number or a 0-d tensor stands for every element):
  the course's ``allclose`` would silently compare a ``[N, 1]`` output with a ``[N]`` target by
  broadcasting both to ``[N, N]``, the very bug ``squeeze(-1)`` fixes in lesson 02's MSE.
- A failure message shows both sides and the largest absolute difference, so a reader sees at once
  whether a comparison missed by rounding or by a real error.

Mixed float dtypes are compared in the wider one (a float32 result against a float64 reference is
what the spec tests do all the time). The helpers carry ``__test__ = False`` so pytest does not
collect them when a spec file imports them by their lesson names.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import torch

from minilib import contract

__all__ = ["test", "test_eq", "near", "test_near", "test_near_zero", "test_close", "max_abs_diff"]

RTOL, ATOL = 1e-3, 1e-5  # the course's tolerances for `near`


def _pair(a: Any, b: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Both sides as tensors; a plain number takes the other side's dtype and device, so 0.1 stays 0.1."""
    like = a if isinstance(a, torch.Tensor) else b if isinstance(b, torch.Tensor) else None
    if like is None:
        return torch.as_tensor(a), torch.as_tensor(b)
    as_like = {"device": like.device, "dtype": like.dtype} if like.is_floating_point() else {}
    ta = a if isinstance(a, torch.Tensor) else torch.as_tensor(a, **as_like)
    tb = b if isinstance(b, torch.Tensor) else torch.as_tensor(b, **as_like)
    return ta.detach(), tb.detach()


def _mismatch(a: Any, b: Any, rtol: float | None, atol: float | None, equal_nan: bool = False) -> str | None:
    """Why ``a`` and ``b`` are not close (assert_close's own words), or None when they are."""
    ta, tb = _pair(a, b)
    if ta.shape != tb.shape:
        if ta.dim() and tb.dim():
            return f"shapes differ: {contract.shape(ta)} and {contract.shape(tb)} (no broadcasting)"
        ta, tb = torch.broadcast_tensors(ta, tb)  # a 0-d side stands for every element
    try:
        torch.testing.assert_close(
            ta, tb, rtol=rtol, atol=atol, equal_nan=equal_nan, check_dtype=False, check_device=False
        )
    except AssertionError as e:
        return str(e)
    return None


def max_abs_diff(a: Any, b: Any) -> float | None:
    """Largest |a - b| when both sides are tensors (or numbers) of broadcastable shapes; else None."""
    try:
        ta, tb = _pair(a, b)
        if ta.numel() == 0 or tb.numel() == 0:
            return None
        return (ta.double().cpu() - tb.double().cpu()).abs().max().item()
    except (TypeError, ValueError, RuntimeError):
        return None


def _failure(cname: str, a: Any, b: Any, why: str | None = None) -> AssertionError:
    lines = [f"{cname}:", f"{a}", f"{b}"]
    diff = max_abs_diff(a, b)
    if diff is not None:
        lines.append(f"max abs diff {diff:.6g}")
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        lines.append(f"left: {contract.describe(a)}; right: {contract.describe(b)}")
    if why:
        lines.append(why)
    return AssertionError("\n".join(lines))


def test(a: Any, b: Any, cmp: Callable[[Any, Any], Any], cname: str | None = None) -> None:
    """Raise AssertionError unless ``cmp(a, b)``; the message shows the comparison and both values."""
    if not callable(cmp):
        contract.fail("test", "cmp", "a comparison function (a, b) -> bool", cmp, TypeError)
    result = cmp(a, b)
    if not (bool(result.all()) if isinstance(result, torch.Tensor) else bool(result)):
        raise _failure(cname or getattr(cmp, "__name__", repr(cmp)), a, b)


def _equal(a: Any, b: Any) -> bool:
    """``a == b``, with tensors equal only when their shapes and every element agree."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        ta, tb = _pair(a, b)
        return ta.shape == tb.shape and bool((ta.cpu() == tb.cpu()).all())
    result = operator.eq(a, b)
    return bool(result.all()) if hasattr(result, "all") else bool(result)


def test_eq(a: Any, b: Any) -> None:
    """Assert ``a == b`` (for tensors: same shape and every element equal)."""
    test(a, b, _equal, "==")


def near(a: Any, b: Any) -> bool:
    """The course's tolerance, ``allclose(a, b, rtol=1e-3, atol=1e-5)``, without broadcasting: a
    ``[N, 1]`` is never near a ``[N]`` (a plain number or a 0-d tensor stands for every element)."""
    return _mismatch(a, b, RTOL, ATOL) is None


def test_near(a: Any, b: Any) -> None:
    """Assert ``near(a, b)``; on failure the message shows both sides and the max abs difference."""
    why = _mismatch(a, b, RTOL, ATOL)
    if why is not None:
        raise _failure("near", a, b, why)


def test_close(
    a: Any, b: Any, rtol: float | None = None, atol: float | None = None, *, equal_nan: bool = False
) -> None:
    """Assert ``a`` and ``b`` agree within ``rtol``/``atol`` (one given alone: the other is 0), else within
    ``torch.testing.assert_close``'s defaults for their dtype (float64: 1e-7; float32: 1.3e-6 and 1e-5).

    Where the course's tolerance is not the point, e.g. checking a rewrite against its reference in
    float64, where a different summation order moves only the last few bits.
    """
    if (rtol, atol) != (None, None):
        rtol, atol = rtol or 0.0, atol or 0.0
    why = _mismatch(a, b, rtol, atol, equal_nan)
    if why is not None:
        raise _failure("close" if rtol is None else f"close (rtol={rtol:g}, atol={atol:g})", a, b, why)


def test_near_zero(a: Any, tol: float = 1e-3) -> None:
    """Assert ``|a| < tol`` for every element of ``a`` (e.g. a mean after normalisation)."""
    contract.finite_number("test_near_zero", positive=True, tol=tol)
    value = torch.as_tensor(a).detach().abs()
    if value.numel() == 0 or not bool((value < tol).all()):
        worst = value.max().item() if value.numel() else float("nan")
        raise AssertionError(f"Near zero: {a} (max abs {worst:.6g}, tolerance {tol})")


for _helper in (test, test_eq, test_near, test_near_zero, test_close):
    _helper.__test__ = False  # type: ignore[attr-defined]
