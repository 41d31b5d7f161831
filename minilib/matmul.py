"""Lesson 01 (01_matmul): matrix multiplication four ways, each moving more of the work from Python into C.

Every version computes ``c[i, j] = sum_k a[i, k] * b[k, j]``; what changes is who runs the loops.
The triple loop runs all m*n*k multiply-adds in the interpreter; the elementwise version hands the
inner loop (over k) to one C call per output; broadcasting hands over the loop over j as well, one C
call per row; einsum and ``@`` leave no Python loop at all, and ``@`` ends in a tuned BLAS kernel.

`MATMULS` is the reference table (name -> function, in lesson order) that the spec tests and the
benchmarks parametrize over. All five state one contract, ``contract.matmul``: a [m, k] and b [k, n]
numeric matrices on one device with one dtype, so that they all refuse the same inputs.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from minilib import contract

__all__ = [
    "matmul_loops",
    "matmul_elementwise",
    "matmul_broadcast",
    "matmul_einsum",
    "matmul_torch",
    "MATMULS",
]


def matmul_loops(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Three nested Python loops: every multiply-add goes through the interpreter."""
    contract.matmul("matmul_loops", a=a, b=b)
    (ar, ac), bc = a.shape, b.shape[1]
    c = torch.zeros(ar, bc, dtype=a.dtype, device=a.device)
    for i in range(ar):
        for j in range(bc):
            for k in range(ac):
                c[i, j] += a[i, k] * b[k, j]
    return c


def matmul_elementwise(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The inner loop becomes one elementwise row-times-column product and ``.sum()`` in C."""
    contract.matmul("matmul_elementwise", a=a, b=b)
    ar, bc = a.shape[0], b.shape[1]
    c = torch.zeros(ar, bc, dtype=a.dtype, device=a.device)
    for i in range(ar):
        for j in range(bc):
            c[i, j] = (a[i, :] * b[:, j]).sum()
    return c


def matmul_broadcast(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Broadcasting removes the column loop: row i (as a k x 1 column) times all of b, summed over k."""
    contract.matmul("matmul_broadcast", a=a, b=b)
    ar, bc = a.shape[0], b.shape[1]
    c = torch.zeros(ar, bc, dtype=a.dtype, device=a.device)
    for i in range(ar):
        c[i] = (a[i].unsqueeze(-1) * b).sum(0)
    return c


def matmul_einsum(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Einstein summation: no Python loop at all, the index notation says which axis is summed."""
    contract.matmul("matmul_einsum", a=a, b=b)
    return torch.einsum("ik,kj->ij", a, b)


def matmul_torch(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """PyTorch's ``@``: a tuned BLAS kernel (cache blocking, SIMD, threads)."""
    contract.matmul("matmul_torch", a=a, b=b)
    return a @ b


MATMULS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "loops": matmul_loops,
    "elementwise": matmul_elementwise,
    "broadcast": matmul_broadcast,
    "einsum": matmul_einsum,
    "torch": matmul_torch,
}
