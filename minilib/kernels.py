"""Beyond the lessons: the fast paths of lessons 01 (01_matmul) and 03 (03_minibatch_training).

``fused_cross_entropy(logits, target)`` is lesson 03's ``nll(log_softmax(x), y)`` in one pass. The
lesson's version writes log_softmax, an N x V tensor, to memory and reads it back to pick one
number per row; at (8192, 32000) float32 that is 1 GiB written and read again for 8192 numbers.
The fused version reads each row once, keeping a running max and a running sum of exponentials
(the online softmax), and keeps three numbers per row for the backward, which writes the gradient
``(softmax - onehot(target)) * grad_out / N`` in one more sweep. Where it runs:

============================================  =====================================================
logits                                        path
============================================  =====================================================
CUDA float32/float16/bfloat16, with Triton    Triton kernels (``minilib._triton_kernels``)
CPU float32                                   C++ kernel built on first use (``minilib/csrc``), or,
                                              if it cannot be built, the chunked torch path (warns
                                              once)
anything else (CPU float64/bfloat16/float16,  chunked torch path (half precision computed in
CUDA float64, CUDA without Triton, ...)       float32), extra memory one chunk + O(N)
============================================  =====================================================

The C++ kernel is compiled with ``torch.utils.cpp_extension`` (ninja and the system C++ compiler,
-O3 -march=native -fopenmp) the first time it is needed, which takes ~30-60 s once; the build is
cached in torch's extension folder (``$TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``).
``MINILIB_NO_EXTENSION=1`` forces the chunked torch path. ``cpu_backend()`` says which CPU path runs.
The C++ and Triton kernels take logits with unit column stride (any row stride, e.g. a column
slice); other layouts (a transpose) are copied to contiguous first.

``triton_matmul(a, b)`` is lesson 01's matmul tiled for a GPU: every program computes one tile of
C with a float32 accumulator, tiles are ordered in groups so neighbouring programs share the rows
and columns they load, and the tile sizes are autotuned per shape. It takes CUDA tensors (float16,
bfloat16, float32; float32 uses TF32 only if ``torch.backends.cuda.matmul.allow_tf32`` is set, as
torch.matmul does). Under ``TRITON_INTERPRET=1`` it runs the same kernel with fixed 32 x 32 x 32
tiles in Triton's interpreter instead, on CPU tensors too: that is how the tests check it on a
machine without a GPU (float32 and float16; the interpreter's bfloat16 dot is not exact).
"""

from __future__ import annotations

import torch

from minilib import _cpu_cross_entropy as _cpu
from minilib.loss import check_logits_and_target

try:
    from minilib import _triton_kernels as _tk
except ImportError:  # Triton is an optional extra
    _tk = None

__all__ = ["fused_cross_entropy", "triton_matmul", "cpu_backend", "triton_available"]


def triton_available() -> bool:
    """True when Triton is installed (the GPU kernels can run on CUDA tensors, or in the interpreter)."""
    return _tk is not None


def cpu_backend() -> str:
    """Which path CPU float32 logits take: 'cpp', or 'torch fallback (why)'. Builds the kernel if needed."""
    _cpu.load_extension()
    return _cpu.extension_status()


# float64 on CUDA goes to the torch path: the Triton kernel computes in float32.
_TRITON_CE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _unit_column_stride(x: torch.Tensor) -> torch.Tensor:
    # The kernels walk a row with stride 1; any row stride is fine (a column slice needs no copy).
    return x if x.shape[1] <= 1 or x.stride(1) == 1 else x.contiguous()


def fused_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of raw scores ``logits`` [N, V] against classes ``target`` [N], in one fused pass.

    Equal to ``F.cross_entropy(logits, target)`` (values and gradients) and differentiable; the
    result is a 0-d tensor on the logits' device and dtype. Bad input fails as in ``minilib.loss``:
    TypeError for a non-float input, ValueError for shapes/dtypes/devices, IndexError for a class
    outside ``[0, V)``. See the module docstring for which kernel runs where.
    """
    check_logits_and_target(logits, target, "fused_cross_entropy")
    if logits.is_cuda and _tk is not None and logits.dtype in _TRITON_CE_DTYPES:
        return _tk.cross_entropy_fixed(_unit_column_stride(logits), target)
    if logits.device.type == "cpu" and logits.dtype == torch.float32 and _cpu.load_extension() is not None:
        return _cpu.CppCrossEntropy.apply(_unit_column_stride(logits), target.contiguous())
    return _cpu.ChunkedCrossEntropy.apply(logits, target)


def _check_matmul_operands(a: torch.Tensor, b: torch.Tensor) -> None:
    for arg, x in (("a", a), ("b", b)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"triton_matmul: {arg} must be a torch.Tensor, got {type(x).__name__}")
        if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise ValueError(
                f"triton_matmul: {arg} must be float16, bfloat16 or float32, got dtype {x.dtype}"
            )
        if x.dim() != 2:
            raise ValueError(f"triton_matmul: {arg} must be a 2-D matrix, got shape {tuple(x.shape)}")
    if a.dtype != b.dtype:
        raise ValueError(f"triton_matmul: a and b must have the same dtype, got {a.dtype} and {b.dtype}")
    if a.shape[1] != b.shape[0]:
        raise ValueError(
            f"triton_matmul: inner sizes differ: a is {a.shape[0]}x{a.shape[1]} but b is "
            f"{b.shape[0]}x{b.shape[1]} (a's columns must equal b's rows)"
        )
    if a.device != b.device:
        raise ValueError(f"triton_matmul: a is on {a.device} but b is on {b.device}")


def triton_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` by a tiled Triton kernel: float32 accumulation, grouped tile order, autotuned tile sizes.

    ``a`` [M, K] and ``b`` [K, N] are CUDA tensors of one dtype (float16, bfloat16 or float32); the
    result [M, N] has that dtype. Under ``TRITON_INTERPRET=1`` the kernel runs in Triton's
    interpreter with fixed 32 x 32 x 32 tiles (CPU tensors allowed). Raises TypeError for a
    non-tensor, ValueError for a wrong dtype, shape or device (CPU tensors outside the interpreter),
    ImportError without Triton.
    """
    _check_matmul_operands(a, b)
    if _tk is None:
        raise ImportError(
            "triton_matmul: Triton is not installed; pip install 'minilib[triton]' (needs a CUDA GPU)"
        )
    if _tk.INTERPRET:
        return _tk.matmul_fixed(a, b)
    if not a.is_cuda:
        raise ValueError(
            f"triton_matmul: a and b must be CUDA tensors, got tensors on {a.device}. On the CPU use "
            "minilib.matmul, or set TRITON_INTERPRET=1 (before importing minilib) to run this kernel "
            "in Triton's interpreter."
        )
    return _tk.matmul_autotuned(a, b)
