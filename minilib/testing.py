"""Lessons 00-02: the course's tiny test helpers (`test`, `test_eq`, `near`, `test_near`, `test_near_zero`).

They carry ``__test__ = False`` so pytest does not collect them when a spec file imports them by
their lesson names.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["test", "test_eq", "near", "test_near", "test_near_zero", "max_abs_diff"]


def max_abs_diff(a: Any, b: Any) -> float | None:
    """Largest |a - b| when both sides are tensors (or numbers) of broadcastable shapes; else None."""
    try:
        ta, tb = torch.as_tensor(a), torch.as_tensor(b)
        if ta.is_floating_point() or tb.is_floating_point():
            return (ta.double().cpu() - tb.double().cpu()).abs().max().item()
    except (TypeError, ValueError, RuntimeError):
        return None
    return None


def test(a: Any, b: Any, cmp: Callable[[Any, Any], Any], cname: str | None = None) -> None:
    """Raise AssertionError unless ``cmp(a, b)``; the message shows the comparison and both values."""
    if cname is None:
        cname = cmp.__name__
    if not cmp(a, b):
        diff = max_abs_diff(a, b)
        extra = f" (max abs diff {diff:.3g})" if diff is not None else ""
        raise AssertionError(f"{cname}:\n{a}\n{b}{extra}")


def near(a: torch.Tensor, b: torch.Tensor) -> bool:
    """The course's tolerance: ``torch.allclose(a, b, rtol=1e-3, atol=1e-5)``."""
    return torch.allclose(torch.as_tensor(a), torch.as_tensor(b), rtol=1e-3, atol=1e-5)


def test_eq(a: Any, b: Any) -> None:
    """Assert ``a == b``."""
    test(a, b, operator.eq, "==")


def test_near(a: torch.Tensor, b: torch.Tensor) -> None:
    """Assert ``near(a, b)``."""
    test(a, b, near)


def test_near_zero(a: Any, tol: float = 1e-3) -> None:
    """Assert ``|a| < tol``."""
    value = torch.as_tensor(a).abs()
    if not bool((value < tol).all()):
        raise AssertionError(f"Near zero: {a} (tolerance {tol})")


for _helper in (test, test_eq, test_near, test_near_zero):
    _helper.__test__ = False  # type: ignore[attr-defined]
