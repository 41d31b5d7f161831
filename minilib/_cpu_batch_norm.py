"""The CPU side of `minilib.kernels.fused_batch_norm`: a C++ kernel built on first use, a torch fallback.

Beyond lesson 07 (07_batchnorm): the lesson's BatchNorm in two sweeps over each channel instead of six.

- ``load_extension()`` compiles ``minilib/csrc/fused_batch_norm.cpp`` the first time it is needed
  (``minilib._cpp_extension``: -O3 -march=native -fopenmp, cached in ``$TORCH_EXTENSIONS_DIR``). If the
  build fails it warns once and returns None, and ``minilib.kernels`` uses ``torch_batch_norm``;
  ``MINILIB_NO_EXTENSION=1`` skips the build and always uses the fallback.
- ``kernel_layout(x)`` says how the kernels see a tensor: memory of ``[R, C, S]`` (R rows, C channels, S
  values per channel per row). Contiguous ``[N, C, *]`` is ``R = N``, ``S = prod(*)``; channels-last
  (4-D ``channels_last``, 5-D ``channels_last_3d``) is ``R = N x prod(*)``, ``S = 1``, read in place;
  any other layout (a transpose, a slice with gaps, an expanded gradient) is copied to contiguous first.
- ``cpp_forward`` / ``cpp_backward`` call the C++ kernel; the Triton kernels
  (``minilib._triton_batch_norm``) have the same interface.
- ``torch_batch_norm`` is the fallback, and the path for dtypes and devices without a kernel: the same
  mathematics in torch ops (``torch.var_mean``, which is accurate for large means, then one affine
  map), differentiable by autograd, so its gradients flow through the batch statistics; also what the
  kernels' backward uses for second derivatives.

The kernels return the batch mean and the biased variance in float64 ``[C]``; the running buffers are
updated from them by ``update_running_stats``, once, whatever path ran.
"""

from __future__ import annotations

import math
import threading

import torch

from minilib._cpp_extension import CSRC, build, load_once, status

__all__ = [
    "load_extension",
    "extension_status",
    "kernel_layout",
    "cpp_forward",
    "cpp_backward",
    "torch_batch_norm",
    "update_running_stats",
]

_SOURCE = CSRC / "fused_batch_norm.cpp"
_NAME = "minilib_fused_batch_norm"

_lock = threading.Lock()
_state: dict[str, object] = {"module": None, "tried": False, "error": None}


def load_extension():
    """The compiled module (``forward``, ``backward``), built on first call; None if it cannot be built."""
    # `_build` is looked up at each call, so a test can simulate a failed build by replacing it.
    return load_once(_state, _lock, lambda: _build(), "minilib.kernels.fused_batch_norm")


def _build():
    return build(_NAME, _SOURCE)


def extension_status() -> str:
    """'cpp' if the C++ kernel is loaded, else why not (after the first call to ``load_extension``)."""
    return status(_state)


def kernel_layout(x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """(x or a contiguous copy, C, S): the kernels read the returned tensor's memory as [R, C, S]."""
    C = x.shape[1]
    spatial = math.prod(x.shape[2:])
    if x.is_contiguous():
        return x, C, spatial
    channels_last = {4: torch.channels_last, 5: torch.channels_last_3d}.get(x.dim())
    if channels_last is not None and x.is_contiguous(memory_format=channels_last):
        return x, C, 1
    return x.contiguous(), C, spatial


def same_layout(grad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``grad`` with ``x``'s strides (the kernels walk both with one index), copied only if needed."""
    if grad.stride() == x.stride():
        return grad
    return torch.empty_like(x).copy_(grad)  # empty_like keeps x's strides: x is dense


def cpp_forward(x, C, S, weight, bias, mean, var, eps, training):
    """(y with x's layout, batch mean, biased batch variance) by the C++ kernel; in eval (``mean``, ``var``
    given as float64 [C]) y from them, and the same mean and var back."""
    y, mean, var = load_extension().forward(x, C, S, weight, bias, mean, var, eps, training)
    return y, mean, var


def cpp_backward(grad_out, x, C, S, weight, mean, var, eps, training, need_input_grad):
    """(dx or None, dweight, dbias) by the C++ kernel; in training through the batch statistics."""
    dx, dw, db = load_extension().backward(
        same_layout(grad_out, x), x, C, S, weight, mean, var, eps, training, need_input_grad
    )
    return (dx if need_input_grad else None), dw, db


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # Half precisions are computed in float32 (as F.batch_norm does); float32/64 keep their own.
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def torch_batch_norm(x, weight, bias, mean, var, eps, training):
    """(y, batch mean, biased batch variance), differentiable in x, weight and bias; in training the
    statistics are the batch's own (and the gradient flows through them), in eval the given ``mean``
    and ``var``. Half precision is computed in float32 and returned in x's dtype."""
    cdt = _compute_dtype(x.dtype)
    shape = (1, -1) + (1,) * (x.dim() - 2)
    xc = x.to(cdt)
    if training:
        dims = [0, *range(2, x.dim())]
        var, mean = torch.var_mean(xc, dims, correction=0)
    scale = torch.rsqrt(var.to(cdt) + eps)
    if weight is not None:
        scale = scale * weight.to(cdt)
    y = (xc - mean.to(cdt).reshape(shape)) * scale.reshape(shape)
    if bias is not None:
        y = y + bias.to(cdt).reshape(shape)
    return y.to(x.dtype), mean, var


@torch.no_grad()
def update_running_stats(running_mean, running_var, mean, var, n: int, momentum: float) -> None:
    """PyTorch's update, in place: running = (1 - momentum) running + momentum batch, where the batch's
    variance is the unbiased one (n / (n - 1) times the biased variance used to normalise)."""
    if running_mean is not None:
        running_mean.mul_(1 - momentum).add_(mean.to(running_mean.dtype), alpha=momentum)
    if running_var is not None:
        unbiased = var.to(torch.float64) * (n / (n - 1))
        running_var.mul_(1 - momentum).add_(unbiased.to(running_var.dtype), alpha=momentum)
