"""Lesson 01 (01_matmul): matrix multiplication four ways, each moving more of the work from Python into C.

`MATMULS` is the reference table that the spec tests and the benchmarks parametrize over.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = [
    "check_matmul_args",
    "matmul_loops",
    "matmul_elementwise",
    "matmul_broadcast",
    "matmul_einsum",
    "matmul_torch",
    "MATMULS",
]


def _shape(t: torch.Tensor) -> str:
    return "x".join(str(s) for s in t.shape) or "scalar"


def check_matmul_args(a: torch.Tensor, b: torch.Tensor, name: str = "matmul") -> tuple[int, int, int]:
    """Validate two 2-D tensors for ``a @ b`` and return ``(m, k, n)``."""
    for arg, t in (("a", a), ("b", b)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: {arg} must be a torch.Tensor, got {type(t).__name__}")
    if a.dim() != 2 or b.dim() != 2:
        raise ValueError(
            f"{name}: expected 2-D tensors, but a is {_shape(a)} ({a.dim()}-D) and b is {_shape(b)} ({b.dim()}-D)"
        )
    if a.shape[1] != b.shape[0]:
        raise ValueError(
            f"{name}: inner sizes differ: a is {_shape(a)} but b is {_shape(b)} "
            f"(a's columns must equal b's rows)"
        )
    if a.device != b.device:
        raise ValueError(f"{name}: a is on {a.device} but b is on {b.device}; move both to one device")
    return a.shape[0], a.shape[1], b.shape[1]


def _result(a: torch.Tensor, b: torch.Tensor, m: int, n: int) -> torch.Tensor:
    return torch.zeros(m, n, dtype=torch.promote_types(a.dtype, b.dtype), device=a.device)


def matmul_loops(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Three nested Python loops: every multiply-add goes through the interpreter."""
    m, k, n = check_matmul_args(a, b, "matmul_loops")
    c = _result(a, b, m, n)
    for i in range(m):
        for j in range(n):
            for p in range(k):
                c[i, j] += a[i, p] * b[p, j]
    return c


def matmul_elementwise(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The inner loop becomes one elementwise row-times-column product and ``.sum()`` in C."""
    m, _, n = check_matmul_args(a, b, "matmul_elementwise")
    c = _result(a, b, m, n)
    for i in range(m):
        for j in range(n):
            c[i, j] = (a[i, :] * b[:, j]).sum()
    return c


def matmul_broadcast(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Broadcasting removes the column loop: row i (as a k x 1 column) times all of b, summed over k."""
    m, _, n = check_matmul_args(a, b, "matmul_broadcast")
    c = _result(a, b, m, n)
    for i in range(m):
        c[i] = (a[i].unsqueeze(-1) * b).sum(0)
    return c


def matmul_einsum(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Einstein summation: no Python loop at all, the index notation says which axis is summed."""
    check_matmul_args(a, b, "matmul_einsum")
    return torch.einsum("ik,kj->ij", a, b)


def matmul_torch(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """PyTorch's ``@``: a tuned BLAS kernel (cache blocking, SIMD, threads)."""
    check_matmul_args(a, b, "matmul_torch")
    return a @ b


MATMULS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "loops": matmul_loops,
    "elementwise": matmul_elementwise,
    "broadcast": matmul_broadcast,
    "einsum": matmul_einsum,
    "torch": matmul_torch,
}
