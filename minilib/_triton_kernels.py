"""The GPU side of `minilib.kernels`: Triton kernels for the fused cross-entropy and a tiled matmul.

Beyond lessons 01 (01_matmul: the matmul, tiled for a GPU) and 03 (03_minibatch_training: the
cross-entropy, fused). Importing this module needs Triton; `minilib.kernels` imports it only if
Triton is installed.

The kernels are decorated when this module is imported, and Triton decides then whether they run
compiled (CUDA) or in its interpreter (``TRITON_INTERPRET=1``, numpy on the CPU, for tests).
``INTERPRET`` records which. In the interpreter, autotuning does not run and bf16 ``tl.dot`` is not
exact, so the test-facing helpers (``cross_entropy_fixed``, ``matmul_fixed``) take explicit block
sizes and run on CPU tensors; the tests use float32 and float16 only.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable
from triton import knobs

__all__ = [
    "INTERPRET",
    "ce_block_v",
    "ce_forward",
    "ce_backward",
    "TritonCrossEntropy",
    "cross_entropy_fixed",
    "MATMUL_CONFIGS",
    "matmul_fixed",
    "matmul_autotuned",
]

#: True when the kernels below run in Triton's interpreter (TRITON_INTERPRET=1 at import time).
INTERPRET: bool = bool(knobs.runtime.interpret)


# --------------------------------------------------------------------------------------------
# Fused cross-entropy: one program per row, a loop over the vocabulary in BLOCK_V columns.
# Forward: online max and sum of exponentials (one exp per logit, one rescale per block), so the
# row is read once and only three float32 numbers per row are written. Backward: the gradient in
# one sweep from the saved row max m and l = log(sum(exp(x - m))).
# --------------------------------------------------------------------------------------------


@triton.jit
def _ce_forward_kernel(
    x_ptr, stride_x, t_ptr, m_ptr, l_ptr, loss_ptr, V, BLOCK_V: tl.constexpr
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)  # int64: row * stride passes 2^31 at (8192, 256k)
    x_row = x_ptr + row * stride_x
    m = tl.full([], float("-inf"), tl.float32)
    s = tl.zeros([], tl.float32)
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        x = tl.load(x_row + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        # While every logit seen is -inf, shift by 0 instead (-inf - -inf would be nan).
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        s = s * tl.exp(m - shift) + tl.sum(tl.exp(x - shift), axis=0)
        m = m_new
    target = tl.load(t_ptr + row)
    x_t = tl.load(x_row + target).to(tl.float32)
    l = tl.log(s)
    tl.store(m_ptr + row, m)
    tl.store(l_ptr + row, l)
    tl.store(loss_ptr + row, l - (x_t - m))  # -log softmax(x)[t], with x - m exact for huge logits


@triton.jit
def _ce_backward_kernel(
    x_ptr, stride_x, g_ptr, stride_g, t_ptr, m_ptr, l_ptr, grad_out_ptr, inv_n, V, BLOCK_V: tl.constexpr
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_x
    g_row = g_ptr + row * stride_g
    m = tl.load(m_ptr + row)
    l = tl.load(l_ptr + row)
    target = tl.load(t_ptr + row)
    # grad_out read on the device: no host sync between forward and backward.
    scale = tl.load(grad_out_ptr).to(tl.float32) * inv_n
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = cols < V
        x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
        p = tl.exp((x - m) - l)
        g = (p - tl.where(cols == target, 1.0, 0.0)) * scale
        tl.store(g_row + cols, g.to(g_ptr.dtype.element_ty), mask=mask)


def ce_block_v(n_classes: int) -> int:
    """Columns per step: V rounded up to a power of two, capped at 4096 (registers per program)."""
    return min(4096, triton.next_power_of_2(max(n_classes, 16)))


def _num_warps(block_v: int) -> int:
    return 8 if block_v >= 2048 else 4


def ce_forward(logits: torch.Tensor, target: torch.Tensor, block_v: int):
    """(row_max, row_logsum, row_loss), float32 [N], by the forward kernel (logits: unit column stride)."""
    N, V = logits.shape
    stats = torch.empty(3, N, dtype=torch.float32, device=logits.device)
    row_max, row_logsum, row_loss = stats[0], stats[1], stats[2]
    if N > 0:
        _ce_forward_kernel[(N,)](
            logits, logits.stride(0), target, row_max, row_logsum, row_loss, V,
            BLOCK_V=block_v, num_warps=_num_warps(block_v),
        )  # fmt: skip
    return row_max, row_logsum, row_loss


def ce_backward(logits, target, row_max, row_logsum, grad_out: torch.Tensor, block_v: int) -> torch.Tensor:
    """(softmax(logits) - onehot(target)) * grad_out / N, a new contiguous tensor of logits' dtype."""
    N, V = logits.shape
    grad = torch.empty(N, V, dtype=logits.dtype, device=logits.device)
    if N > 0:
        _ce_backward_kernel[(N,)](
            logits, logits.stride(0), grad, grad.stride(0), target, row_max, row_logsum,
            grad_out.reshape(1), 1.0 / N, V, BLOCK_V=block_v, num_warps=_num_warps(block_v),
        )  # fmt: skip
    return grad


class TritonCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy through the Triton kernels; saves three float32 numbers per row for backward."""

    @staticmethod
    def forward(ctx, logits, target, block_v):
        row_max, row_logsum, row_loss = ce_forward(logits, target, block_v)
        ctx.save_for_backward(logits, target, row_max, row_logsum)
        ctx.block_v = block_v
        return (row_loss.sum() / logits.shape[0]).to(logits.dtype)

    @staticmethod
    @once_differentiable  # the backward is a kernel, not a graph: no second derivative
    def backward(ctx, grad_out):
        logits, target, row_max, row_logsum = ctx.saved_tensors
        grad = ce_backward(logits, target, row_max, row_logsum, grad_out.contiguous(), ctx.block_v)
        return grad, None, None


def cross_entropy_fixed(
    logits: torch.Tensor, target: torch.Tensor, block_v: int | None = None
) -> torch.Tensor:
    """The Triton cross-entropy with an explicit block width (no checks; for tests and the interpreter)."""
    if logits.shape[1] > 1 and logits.stride(1) != 1:
        logits = logits.contiguous()
    return TritonCrossEntropy.apply(logits, target.contiguous(), block_v or ce_block_v(logits.shape[1]))


# --------------------------------------------------------------------------------------------
# Matmul: each program computes one BLOCK_M x BLOCK_N tile of C, walking K in BLOCK_K steps with a
# float32 accumulator. Grouped ordering: consecutive programs take GROUP_M tiles down a column of
# tiles before moving right, so the A rows and B columns they read are shared in L2 instead of
# being fetched once per tile.
# --------------------------------------------------------------------------------------------


@triton.jit
def _matmul_kernel(
    a_ptr, b_ptr, c_ptr, M, N, K,
    stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    tiles_per_group = GROUP_M * tiles_n
    group = pid // tiles_per_group
    first_m = group * GROUP_M
    group_m = tl.minimum(tiles_m - first_m, GROUP_M)  # the last group can be shorter
    pid_m = first_m + (pid % tiles_per_group) % group_m
    pid_n = (pid % tiles_per_group) // group_m

    # Rows/columns past the edge wrap around (% M, % N): the loads stay in bounds without a mask,
    # and the store below masks the wrapped ones out.
    # (No contiguity hints: they would be false at the wrap; Triton infers enough when N % 16 == 0.)
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)) % M
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % N
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = b_ptr + offs_k[:, None] * stride_bk + offs_n[None, :] * stride_bn

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - k * BLOCK_K
        a = tl.load(a_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
        b = tl.load(b_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    c_ptrs = c_ptr + rows[:, None] * stride_cm + cols[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=(rows[:, None] < M) & (cols[None, :] < N))


def _cfg(bm, bn, bk, group, stages, warps):
    return triton.Config(
        {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group}, num_stages=stages, num_warps=warps
    )


#: Candidate tilings for the autotuner (the large ones are for H100-class GPUs at 4096^3 bf16; the
#: small ones for small or skinny problems). Timed once per (M, N, K, dtype) and cached.
MATMUL_CONFIGS = [
    _cfg(128, 256, 64, 8, 3, 8),
    _cfg(256, 128, 64, 8, 3, 8),
    _cfg(128, 256, 64, 8, 4, 8),
    _cfg(128, 128, 64, 8, 4, 8),
    _cfg(128, 128, 64, 8, 4, 4),
    _cfg(64, 256, 32, 8, 4, 4),
    _cfg(128, 128, 32, 8, 4, 4),
    _cfg(128, 64, 32, 8, 4, 4),
    _cfg(64, 128, 32, 8, 4, 4),
    _cfg(64, 64, 32, 8, 5, 2),
    _cfg(32, 64, 32, 8, 5, 2),
]

_matmul_tuned = triton.autotune(configs=MATMUL_CONFIGS, key=["M", "N", "K", "INPUT_PRECISION"])(
    _matmul_kernel
)


def _input_precision(dtype: torch.dtype) -> str:
    # float32 follows torch's switch (off by default), so triton_matmul matches torch.matmul's precision.
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def _launch(a, b, kernel, grid, **meta):
    M, K = a.shape
    N = b.shape[1]
    c = torch.empty(M, N, dtype=a.dtype, device=a.device)
    if M == 0 or N == 0:
        return c
    if K == 0:
        return c.zero_()
    kernel[grid](
        a, b, c, M, N, K, a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0), c.stride(1),
        INPUT_PRECISION=_input_precision(a.dtype), **meta,
    )  # fmt: skip
    return c


def matmul_fixed(
    a, b, block_m=32, block_n=32, block_k=32, group_m=4, num_warps=4, num_stages=2
) -> torch.Tensor:
    """The matmul kernel with fixed tile sizes (no checks; runs on CPU tensors in the interpreter)."""
    M, N = a.shape[0], b.shape[1]
    grid = (triton.cdiv(M, block_m) * triton.cdiv(N, block_n),)
    return _launch(
        a, b, _matmul_kernel, grid, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=group_m,
        num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip


def matmul_autotuned(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The matmul kernel with autotuned tile sizes (CUDA; compiled Triton only)."""
    M, N = a.shape[0], b.shape[1]

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)

    return _launch(a, b, _matmul_tuned, grid)
