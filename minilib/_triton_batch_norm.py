"""The GPU side of `minilib.kernels.fused_batch_norm`: Triton kernels for batch norm (beyond lesson 07).

Importing this module needs Triton; `minilib.kernels` imports it only if Triton is installed. The
kernels run compiled on CUDA tensors, or in Triton's interpreter (``TRITON_INTERPRET=1`` at import
time, numpy on the CPU) on CPU tensors, which is how the tests check them without a GPU.

They read the memory of ``x`` as ``[R, C, S]`` (``minilib._cpu_batch_norm.kernel_layout``: contiguous
``[N, C, *]`` or channels-last) and index a channel's ``M = R x S`` values by ``i``: row ``i // S``,
place ``i % S``. A GPU wants far more programs than a batch has channels, so each channel is split:

- forward: ``_partial_moments``, grid (C, P): program (c, p) reduces its share of channel c block by
  block (a block's mean, then its centred sums, as the C++ kernel does: no E[x^2] - E[x]^2) and merges the
  blocks by Chan's formula into a (count, mean, M2) triple; the P triples per channel are merged in float64
  by torch ops on [C, P]; then ``_normalise``, grid (blocks, C), writes ``((x - hi) - lo) * a + b``, the
  mean split into two float32s so that a mean of 1e4 costs no precision;
- backward: ``_partial_grad_sums``, grid (C, P), the partial sum(dy) and sum(dy * (x - mean)); torch
  sums them over P in float64 and forms three coefficients per channel; ``_grad_input`` writes
  ``dx = g dy + k2 (x - mean) + k3``.

Everything is computed in float32 (float16 and bfloat16 input too) and written in the input's dtype.
No call waits for the GPU: the per-channel arithmetic stays on the device.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton import knobs

__all__ = ["INTERPRET", "BLOCK", "TARGET_PROGRAMS", "triton_forward", "triton_backward"]

#: True when the kernels below run in Triton's interpreter (TRITON_INTERPRET=1 at import time).
INTERPRET: bool = bool(knobs.runtime.interpret)
#: Values per block (per program step).
BLOCK = 1024
#: About this many programs per reduction: enough to fill a large GPU's multiprocessors several times.
TARGET_PROGRAMS = 1024


@triton.jit
def _offsets(i, c, C, S):
    r = i // S
    return r * C * S + c * S + (i - r * S)


@triton.jit
def _partial_moments(x_ptr, count_ptr, mean_ptr, m2_ptr, M, C, S, per_program, P, BLOCK: tl.constexpr):
    c = tl.program_id(0).to(tl.int64)
    p = tl.program_id(1).to(tl.int64)
    # Moments of x - pivot, the channel's first value: the running mean then stays small, so that its
    # float32 rounding is small next to the spread even when the mean is 1e4.
    pivot = tl.load(x_ptr + c * S).to(tl.float32)
    n = tl.zeros([], tl.float32)
    mean = tl.zeros([], tl.float32)
    m2 = tl.zeros([], tl.float32)
    for k in range(0, per_program, BLOCK):
        i = p * per_program + k + tl.arange(0, BLOCK)
        mask = i < M
        x = tl.load(x_ptr + _offsets(i, c, C, S), mask=mask, other=0.0).to(tl.float32)
        x = tl.where(mask, x - pivot, 0.0)
        cnt = tl.sum(mask.to(tl.float32), axis=0)
        safe = tl.maximum(cnt, 1.0)
        m_b = tl.sum(x, axis=0) / safe
        d = tl.where(mask, x - m_b, 0.0)
        r_b = tl.sum(d, axis=0)  # corrects m_b's rounding
        q_b = tl.maximum(tl.sum(d * d, axis=0) - r_b * r_b / safe, 0.0)
        m_b = m_b + r_b / safe
        total = n + cnt
        frac = cnt / tl.maximum(total, 1.0)
        delta = m_b - mean
        mean = mean + delta * frac
        m2 = m2 + q_b + delta * delta * n * frac
        n = total
    tl.store(count_ptr + c * P + p, n)
    tl.store(mean_ptr + c * P + p, mean)
    tl.store(m2_ptr + c * P + p, m2)


@triton.jit
def _normalise(x_ptr, y_ptr, hi_ptr, lo_ptr, a_ptr, b_ptr, M, C, S, BLOCK: tl.constexpr):
    c = tl.program_id(1).to(tl.int64)
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = i < M
    offs = _offsets(i, c, C, S)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    hi = tl.load(hi_ptr + c)
    lo = tl.load(lo_ptr + c)
    y = ((x - hi) - lo) * tl.load(a_ptr + c) + tl.load(b_ptr + c)
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _partial_grad_sums(
    dy_ptr, x_ptr, hi_ptr, lo_ptr, sum_dy_ptr, sum_dyd_ptr, M, C, S, per_program, P, BLOCK: tl.constexpr
):
    c = tl.program_id(0).to(tl.int64)
    p = tl.program_id(1).to(tl.int64)
    hi = tl.load(hi_ptr + c)
    lo = tl.load(lo_ptr + c)
    a = tl.zeros([BLOCK], tl.float32)
    b = tl.zeros([BLOCK], tl.float32)
    for k in range(0, per_program, BLOCK):
        i = p * per_program + k + tl.arange(0, BLOCK)
        mask = i < M
        offs = _offsets(i, c, C, S)
        dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        a += dy
        b += dy * tl.where(mask, (x - hi) - lo, 0.0)
    tl.store(sum_dy_ptr + c * P + p, tl.sum(a, axis=0))
    tl.store(sum_dyd_ptr + c * P + p, tl.sum(b, axis=0))


@triton.jit
def _grad_input(dy_ptr, x_ptr, dx_ptr, hi_ptr, lo_ptr, g_ptr, k2_ptr, k3_ptr, M, C, S, BLOCK: tl.constexpr):
    c = tl.program_id(1).to(tl.int64)
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = i < M
    offs = _offsets(i, c, C, S)
    dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    d = (x - tl.load(hi_ptr + c)) - tl.load(lo_ptr + c)
    dx = tl.load(g_ptr + c) * dy + tl.load(k2_ptr + c) * d + tl.load(k3_ptr + c)
    tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)


def _split(mean: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The float64 mean as float32 hi + lo: x - hi is exact for x near the mean, lo carries the rest."""
    hi = mean.to(torch.float32)
    return hi, (mean - hi.to(torch.float64)).to(torch.float32)


def _partition(M: int, C: int, block: int) -> tuple[int, int]:
    """(programs per channel P, values per program, a multiple of ``block``) for the reductions."""
    per = triton.cdiv(triton.cdiv(M, max(1, triton.cdiv(TARGET_PROGRAMS, C))), block) * block
    return triton.cdiv(M, per), per


def _per_channel(p: torch.Tensor | None, C: int, fill: float, like: torch.Tensor) -> torch.Tensor:
    return torch.full((C,), fill, dtype=torch.float64, device=like.device) if p is None else p.double()


def triton_forward(x, C, S, weight, bias, mean, var, eps, training, block=None):
    """(y with x's layout, batch mean, biased batch variance (float64 [C])); in eval (``mean``, ``var``
    given, float64 [C]) y from them. ``minilib._cpu_batch_norm.cpp_forward``'s interface."""
    block = block or BLOCK
    M = x.numel() // C
    if training:
        P, per = _partition(M, C, block)
        parts = torch.empty(3, C, P, dtype=torch.float32, device=x.device)
        _partial_moments[(C, P)](x, parts[0], parts[1], parts[2], M, C, S, per, P, BLOCK=block)
        counts, means, m2s = parts.double()
        shifted = (counts * means).sum(1) / M  # the mean of x - pivot
        var = (m2s.sum(1) + (counts * (means - shifted[:, None]) ** 2).sum(1)) / M
        mean = x.as_strided((C,), (S,)).double() + shifted  # each channel's first value is the pivot
    hi, lo = _split(mean)
    a = (_per_channel(weight, C, 1.0, x) * torch.rsqrt(var + eps)).to(torch.float32)
    b = _per_channel(bias, C, 0.0, x).to(torch.float32)
    y = torch.empty_like(x)  # empty_like keeps x's strides (x is dense)
    _normalise[(triton.cdiv(M, block), C)](x, y, hi, lo, a, b, M, C, S, BLOCK=block)
    return y, mean, var


def triton_backward(grad_out, x, C, S, weight, mean, var, eps, training, need_input_grad, block=None):
    """(dx or None, dweight, dbias): ``minilib._cpu_batch_norm.cpp_backward``'s interface."""
    from minilib._cpu_batch_norm import same_layout  # the kernels walk dy and x with one index

    block = block or BLOCK
    dy = same_layout(grad_out, x)
    M = x.numel() // C
    hi, lo = _split(mean)
    P, per = _partition(M, C, block)
    sums = torch.empty(2, C, P, dtype=torch.float32, device=x.device)
    _partial_grad_sums[(C, P)](dy, x, hi, lo, sums[0], sums[1], M, C, S, per, P, BLOCK=block)
    sum_dy, sum_dyd = sums.double().sum(2)
    inv = torch.rsqrt(var + eps)
    dx = None
    if need_input_grad:
        g = _per_channel(weight, C, 1.0, x) * inv
        if training:  # the terms through the batch mean and variance
            k2, k3 = -g * inv * inv * sum_dyd / M, -g * sum_dy / M
        else:
            k2 = k3 = torch.zeros_like(g)
        dx = torch.empty_like(x)
        coeffs = [t.to(torch.float32) for t in (g, k2, k3)]
        _grad_input[(triton.cdiv(M, block), C)](dy, x, dx, hi, lo, *coeffs, M, C, S, BLOCK=block)
    return dx, (sum_dyd * inv).to(torch.float32), sum_dy.to(torch.float32)
