"""Lesson 01 (01_matmul): matrix multiplication four ways, each moving more of the work from Python into C.

Every version computes ``c[i, j] = sum_k a[i, k] * b[k, j]``; what changes is who runs the loops.
The triple loop runs all m*n*k multiply-adds in the interpreter; the elementwise version hands the
inner loop (over k) to one C call per output; broadcasting hands over the loop over j as well, one C
call per row; einsum and ``@`` leave no Python loop at all, and ``@`` ends in a tuned BLAS kernel.

`MATMULS` is the reference table (name -> function, in lesson order) that the spec tests and the
benchmarks parametrize over. All five validate their arguments the same way (`check_matmul_args`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = [
    "check_matmul_args",
    "shape_str",
    "matmul_loops",
    "matmul_elementwise",
    "matmul_broadcast",
    "matmul_einsum",
    "matmul_torch",
    "MATMULS",
]


def shape_str(t: torch.Tensor) -> str:
    """A tensor's shape as the error messages write it: ``3x4`` (``scalar`` for 0-d)."""
    return "x".join(str(s) for s in t.shape) or "scalar"


def check_matmul_args(a: torch.Tensor, b: torch.Tensor, name: str = "matmul") -> tuple[int, int, int]:
    """Validate two 2-D tensors for ``a @ b`` and return ``(m, k, n)``.

    TypeError if either is not a tensor; ValueError naming both shapes if either is not 2-D or the
    inner sizes differ, and naming both devices (dtypes) if those differ.
    """
    for arg, t in (("a", a), ("b", b)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: {arg} must be a torch.Tensor, got {type(t).__name__}")
    if a.dim() != 2 or b.dim() != 2:
        raise ValueError(
            f"{name}: expected 2-D tensors, but a is {shape_str(a)} ({a.dim()}-D) "
            f"and b is {shape_str(b)} ({b.dim()}-D)"
        )
    if a.shape[1] != b.shape[0]:
        raise ValueError(
            f"{name}: inner sizes differ: a is {shape_str(a)} but b is {shape_str(b)} "
            f"(a's columns must equal b's rows)"
        )
    if a.device != b.device:
        raise ValueError(
            f"{name}: a ({shape_str(a)}) is on {a.device} but b ({shape_str(b)}) is on {b.device}; "
            f"move both to one device"
        )
    if a.dtype != b.dtype:
        # `@` refuses mixed dtypes; the loop versions would silently promote. Refuse in all five alike.
        raise ValueError(
            f"{name}: a ({shape_str(a)}) is {a.dtype} but b ({shape_str(b)}) is {b.dtype}; "
            "cast one with .to()"
        )
    return a.shape[0], a.shape[1], b.shape[1]


def _result(a: torch.Tensor, m: int, n: int) -> torch.Tensor:
    return torch.zeros(m, n, dtype=a.dtype, device=a.device)


def matmul_loops(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Three nested Python loops: every multiply-add goes through the interpreter."""
    m, k, n = check_matmul_args(a, b, "matmul_loops")
    c = _result(a, m, n)
    for i in range(m):
        for j in range(n):
            for p in range(k):
                c[i, j] += a[i, p] * b[p, j]
    return c


def matmul_elementwise(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The inner loop becomes one elementwise row-times-column product and ``.sum()`` in C."""
    m, _, n = check_matmul_args(a, b, "matmul_elementwise")
    c = _result(a, m, n)
    for i in range(m):
        for j in range(n):
            c[i, j] = (a[i, :] * b[:, j]).sum()
    return c


def matmul_broadcast(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Broadcasting removes the column loop: row i (as a k x 1 column) times all of b, summed over k."""
    m, _, n = check_matmul_args(a, b, "matmul_broadcast")
    c = _result(a, m, n)
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
