"""The CPU side of `minilib.kernels.fused_cross_entropy`: a C++ kernel built on first use, a torch fallback.

Beyond lesson 03 (03_minibatch_training): the lesson's ``nll(log_softmax(x), y)`` as one fused pass.

- ``load_extension()`` compiles ``minilib/csrc/fused_cross_entropy.cpp`` with
  ``torch.utils.cpp_extension.load`` (ninja + the system C++ compiler, -O3 -march=native -fopenmp)
  the first time it is needed; later processes reuse the build in torch's extension cache
  (``$TORCH_EXTENSIONS_DIR``, by default ``~/.cache/torch_extensions``). If the build fails (no
  compiler, no ninja, an unknown flag), it warns once and returns None, and the caller uses the
  torch fallback below. ``MINILIB_NO_EXTENSION=1`` skips the build and always uses the fallback.
- ``chunked_forward``/``chunked_backward`` are the fallback, and the path for dtypes the C++ kernel
  does not take (float64, bfloat16, float16 on CPU; devices without a Triton kernel): the same
  algorithm in vectorised torch ops, a chunk of rows at a time through one reused buffer, so the
  extra memory is one chunk (``CHUNK_ELEMENTS``) plus O(N) row statistics, never N x V. Half
  precision is computed in float32 chunk by chunk.

Both paths save only per-row statistics for the backward: the row max ``m`` and ``l = log(sum(exp(x - m)))``,
from which the gradient ``(exp(x - m - l) - onehot(target)) * grad_out / N`` is written in one sweep.
"""

from __future__ import annotations

import hashlib
import os
import platform
import threading
import warnings
from pathlib import Path

import torch
from torch.autograd.function import once_differentiable

__all__ = [
    "CHUNK_ELEMENTS",
    "EXTENSION_FLAGS",
    "extension_status",
    "load_extension",
    "chunk_rows",
    "chunked_forward",
    "chunked_backward",
    "CppCrossEntropy",
    "ChunkedCrossEntropy",
]

#: Elements per chunk of the torch fallback (16 MiB of float32): a bounded buffer, independent of N,
#: yet few enough torch calls per pass; each call is a parallel region, and on a busy machine
#: every region waits for a descheduled thread (measured: ~8 ms per call on 1M elements here).
CHUNK_ELEMENTS = 1 << 22

_SOURCE = Path(__file__).parent / "csrc" / "fused_cross_entropy.cpp"
_NAME = "minilib_fused_cross_entropy"

#: Compiler flags, tried in order until one set builds. -march=native is safe because the build
#: happens on the machine that runs it. -mtune=generic: gcc tunes some AMD CPUs for 128-bit vectors,
#: which halves the exp loop's width for no gain. -fno-trapping-math lets gcc if-convert the exp's
#: clamp (it changes no result, only what gcc may assume about floating-point exceptions); we avoid
#: -ffast-math, which would break inf/nan handling.
EXTENSION_FLAGS: tuple[tuple[str, ...], ...] = (
    ("-O3", "-march=native", "-mtune=generic", "-fno-trapping-math", "-fopenmp"),
    ("-O3", "-fno-trapping-math", "-fopenmp"),
)

_lock = threading.Lock()
_state: dict[str, object] = {"module": None, "tried": False, "error": None}


def load_extension():
    """The compiled module (``forward``, ``backward``), built on first call; None if it cannot be built."""
    if _state["tried"]:
        return _state["module"]
    with _lock:
        if _state["tried"]:
            return _state["module"]
        if os.environ.get("MINILIB_NO_EXTENSION") == "1":
            _state["error"] = "disabled by MINILIB_NO_EXTENSION=1"
        else:
            _state["module"], _state["error"] = _build()
            if _state["module"] is None:
                warnings.warn(
                    "minilib.kernels.fused_cross_entropy: could not build the C++ kernel "
                    f"({_state['error']}); using the slower torch fallback. Install a C++ compiler and "
                    "ninja (pip install ninja) to get the fast path.",
                    RuntimeWarning,
                    stacklevel=3,
                )
        _state["tried"] = True
    return _state["module"]


def _cpu_tag() -> str:
    """A short fingerprint of this CPU's instruction sets: a -march=native build cached in a shared home
    folder must not be loaded on a machine whose CPU lacks those instructions (it would die of SIGILL)."""
    flags = platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            flags += next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        flags += platform.processor()
    return hashlib.sha1(flags.encode()).hexdigest()[:8]


def _build():
    # Imported here: cpp_extension pulls in setuptools, which `import minilib.kernels` should not pay for.
    try:
        from torch.utils import cpp_extension
    except Exception as e:  # pragma: no cover - torch without its build tools
        return None, f"torch.utils.cpp_extension unavailable: {e}"
    errors = []
    for i, flags in enumerate(EXTENSION_FLAGS):
        try:
            module = cpp_extension.load(
                # A cache folder per flag set (a fallback build never evicts the first) and per CPU.
                name=f"{_NAME}_{i}_{_cpu_tag()}",
                sources=[str(_SOURCE)],
                extra_cflags=list(flags),
                extra_ldflags=["-fopenmp"],
                verbose=False,
            )
            return module, None
        except Exception as e:  # noqa: BLE001 - any build failure (no compiler, no ninja, bad flag) means fallback
            errors.append(f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}")
    return None, "; ".join(errors)


def extension_status() -> str:
    """'cpp' if the C++ kernel is loaded, else why not (after the first call to ``load_extension``)."""
    if _state["module"] is not None:
        return "cpp"
    return f"torch fallback ({_state['error']})" if _state["tried"] else "not loaded yet"


def chunk_rows(n_classes: int) -> int:
    """Rows per chunk of the fallback: as many as fit in CHUNK_ELEMENTS, at least one."""
    return max(1, CHUNK_ELEMENTS // max(1, n_classes))


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # Half precisions are summed in float32 (as F.cross_entropy does); float32/64 keep their own.
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def chunked_forward(logits: torch.Tensor, target: torch.Tensor):
    """(row_max, row_logsum, row_loss), each [N] in the compute dtype, a chunk of rows at a time."""
    N, V = logits.shape
    cdt = _compute_dtype(logits.dtype)
    rows = min(chunk_rows(V), max(N, 1))
    buf = torch.empty(rows, V, dtype=cdt, device=logits.device)  # the one reused N-independent buffer
    row_max = torch.empty(N, dtype=cdt, device=logits.device)
    row_logsum = torch.empty(N, dtype=cdt, device=logits.device)
    row_loss = torch.empty(N, dtype=cdt, device=logits.device)
    for i in range(0, N, rows):
        j = min(i + rows, N)
        b = buf[: j - i]
        b.copy_(logits[i:j])
        m = torch.amax(b, dim=1, keepdim=True, out=row_max[i:j].unsqueeze(1))
        b.sub_(m)  # x - m <= 0: exp cannot overflow
        x_t = b.gather(1, target[i:j].unsqueeze(1)).squeeze(1)  # x_t - m, read before exp overwrites it
        b.exp_()
        torch.sum(b, dim=1, out=row_logsum[i:j]).log_()
        torch.sub(row_logsum[i:j], x_t, out=row_loss[i:j])
    return row_max, row_logsum, row_loss


def chunked_backward(
    logits: torch.Tensor,
    target: torch.Tensor,
    row_max: torch.Tensor,
    row_logsum: torch.Tensor,
    scale: torch.Tensor,
) -> torch.Tensor:
    """(softmax(logits) - onehot(target)) * scale, a new contiguous tensor in logits' dtype, by chunks."""
    N, V = logits.shape
    grad = torch.empty(N, V, dtype=logits.dtype, device=logits.device)
    cdt = row_max.dtype
    rows = min(chunk_rows(V), max(N, 1))
    # Same dtype: work straight in the gradient's rows. Otherwise through one float32 buffer.
    buf = None if cdt == logits.dtype else torch.empty(rows, V, dtype=cdt, device=logits.device)
    scale = scale.to(cdt)
    for i in range(0, N, rows):
        j = min(i + rows, N)
        b = grad[i:j] if buf is None else buf[: j - i]
        torch.sub(logits[i:j], row_max[i:j].unsqueeze(1), out=b)
        b.sub_(row_logsum[i:j].unsqueeze(1)).exp_().mul_(scale)
        b.scatter_add_(1, target[i:j].unsqueeze(1), (-scale).expand(j - i, 1))
        if buf is not None:
            grad[i:j].copy_(b)
    return grad


def _mean(row_loss: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # The mean in float64: 8192 float32 terms summed naively would cost a few ulps.
    return row_loss.sum(dtype=torch.float64).div(row_loss.shape[0]).to(dtype)


class CppCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy by the C++ kernel (CPU float32, unit column stride); saves O(N) for backward."""

    @staticmethod
    def forward(ctx, logits, target):
        ext = load_extension()
        row_max, row_logsum, row_loss = ext.forward(logits, target)
        ctx.save_for_backward(logits, target, row_max, row_logsum)
        return _mean(row_loss, logits.dtype)

    @staticmethod
    @once_differentiable  # the backward is a kernel, not a graph: no second derivative
    def backward(ctx, grad_out):
        logits, target, row_max, row_logsum = ctx.saved_tensors
        scale = float(grad_out) / logits.shape[0]
        grad = load_extension().backward(logits, target, row_max, row_logsum, scale)
        return grad, None


class ChunkedCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy through the chunked torch fallback, any device and float dtype."""

    @staticmethod
    def forward(ctx, logits, target):
        row_max, row_logsum, row_loss = chunked_forward(logits, target)
        ctx.save_for_backward(logits, target, row_max, row_logsum)
        return _mean(row_loss, logits.dtype)

    @staticmethod
    @once_differentiable  # the backward is a kernel, not a graph: no second derivative
    def backward(ctx, grad_out):
        logits, target, row_max, row_logsum = ctx.saved_tensors
        # A tensor, not a float: no device sync on GPUs.
        scale = grad_out.to(row_max.dtype) / logits.shape[0]
        return chunked_backward(logits, target, row_max, row_logsum, scale), None
