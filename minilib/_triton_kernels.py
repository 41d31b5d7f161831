"""The GPU side of `minilib.kernels`: Triton kernels for the fused cross-entropy and a tiled matmul.

Beyond lessons 01 (01_matmul: the matmul, tiled for a GPU) and 03 (03_minibatch_training: the
cross-entropy, fused). Importing this module needs Triton; `minilib.kernels` imports it only if
Triton is installed.

The kernels are decorated when this module is imported, and Triton decides then whether they run
compiled (CUDA) or in its interpreter (``TRITON_INTERPRET=1``, numpy on the CPU, for tests).
``INTERPRET`` records which. In the interpreter, autotuning does not run and bf16 ``tl.dot`` is not
exact, so the test-facing helpers (``triton_loss``'s ``block_v``, ``matmul_fixed``) take explicit block
sizes and run on CPU tensors; the tests use float32 and float16 only.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton import knobs

__all__ = [
    "INTERPRET",
    "ce_block_v",
    "triton_loss",
    "MATMUL_CONFIGS",
    "matmul_fixed",
    "matmul_autotuned",
]

#: True when the kernels below run in Triton's interpreter (TRITON_INTERPRET=1 at import time).
INTERPRET: bool = bool(knobs.runtime.interpret)


# --------------------------------------------------------------------------------------------
# Fused cross-entropy: one program per row, a loop over the vocabulary in BLOCK_V columns.
# Pass 1: online max and sum of exponentials (one exp per logit, one rescale per block), and the
# row's plain sum for label smoothing; the row's loss is written (0 where the target is ignored).
# Pass 2 (WRITE_GRAD): the gradient (softmax - (1 - eps) onehot - eps / V) * scale, where scale is
# read on the device (no host sync), per row; it may overwrite the logits (the fused linear
# cross-entropy's chunk buffer), since each block is read before it is written.
# --------------------------------------------------------------------------------------------


@triton.jit
def _ce_kernel(
    x_ptr, stride_x, t_ptr, loss_ptr, g_ptr, stride_g, scale_ptr, V, ignore_index, eps,
    WRITE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)  # int64: row * stride passes 2^31 at (8192, 256k)
    x_row = x_ptr + row * stride_x
    target = tl.load(t_ptr + row)
    ignored = target == ignore_index
    m = tl.full([], float("-inf"), tl.float32)
    s = tl.zeros([], tl.float32)
    total = tl.zeros([], tl.float32)
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = cols < V
        x = tl.load(x_row + cols, mask=mask, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        # While every logit seen is -inf, shift by 0 instead (-inf - -inf would be nan).
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        s = s * tl.exp(m - shift) + tl.sum(tl.exp(x - shift), axis=0)
        total += tl.sum(tl.where(mask, x, 0.0), axis=0)
        m = m_new
    x_t = tl.load(x_row + target, mask=~ignored, other=0.0).to(tl.float32)
    l = tl.log(s)
    nll = l - (x_t - m)  # -log softmax(x)[t], with x - m exact for huge logits
    smooth = l - (total / V - m)  # -mean_j log softmax(x)[j]
    loss = (1.0 - eps) * nll + eps * smooth
    tl.store(loss_ptr + row, tl.where(ignored, 0.0, loss))
    if WRITE_GRAD:
        g_row = g_ptr + row * stride_g
        scale = tl.where(ignored, 0.0, tl.load(scale_ptr + row).to(tl.float32))
        for start in range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            mask = cols < V
            x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
            p = tl.exp((x - m) - l)
            g = (p - eps / V - tl.where(cols == target, 1.0 - eps, 0.0)) * scale
            g = tl.where(ignored, 0.0, g)
            tl.store(g_row + cols, g.to(g_ptr.dtype.element_ty), mask=mask)


def ce_block_v(n_classes: int) -> int:
    """Columns per step: V rounded up to a power of two, capped at 4096 (registers per program)."""
    return min(4096, triton.next_power_of_2(max(n_classes, 16)))


def _num_warps(block_v: int) -> int:
    return 8 if block_v >= 2048 else 4


def triton_loss(logits, target, ignore_index, label_smoothing, grad_mode=0, row_scale=None, block_v=None):
    """(row_loss float32 [N], gradient or None) by the Triton kernel; the row loss kernel interface of
    minilib.kernels (grad_mode 1: a new tensor, 2: over the logits; only where row_scale is given)."""
    N, V = logits.shape
    block_v = block_v or ce_block_v(V)
    row_loss = torch.empty(N, dtype=torch.float32, device=logits.device)
    grad = None
    if row_scale is not None:
        grad = logits if grad_mode == 2 else torch.empty(N, V, dtype=logits.dtype, device=logits.device)
    if N > 0:
        _ce_kernel[(N,)](
            logits, logits.stride(0), target, row_loss,
            logits if grad is None else grad, V if grad is None else grad.stride(0),
            row_loss if row_scale is None else row_scale, V, ignore_index, float(label_smoothing),
            WRITE_GRAD=grad is not None, BLOCK_V=block_v, num_warps=_num_warps(block_v),
        )  # fmt: skip
    return row_loss, grad


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
