"""The CPU side of `minilib.kernels.fused_cross_entropy`: a C++ kernel built on first use, a torch fallback.

Beyond lesson 03 (03_minibatch_training): the lesson's ``nll(log_softmax(x), y)`` as one fused pass.

- ``load_extension()`` compiles ``minilib/csrc/fused_cross_entropy.cpp`` the first time it is needed
  (``minilib._cpp_extension``: -O3 -march=native -fopenmp, cached in ``$TORCH_EXTENSIONS_DIR``). If the
  build fails (no compiler, no ninja, an unknown flag), it warns once and returns None, and the caller
  uses the torch fallback below. ``MINILIB_NO_EXTENSION=1`` skips the build and always uses the fallback.
- ``chunked_loss`` is the fallback, and the path for dtypes the C++ kernel does not take (float64,
  bfloat16, float16 on CPU; devices without a Triton kernel): the same algorithm in vectorised torch
  ops, a chunk of rows at a time through one reused buffer, so the extra memory is one chunk
  (``CHUNK_ELEMENTS``) plus O(N), never N x V. Half precision is computed in float32 chunk by chunk.
- ``cpp_loss`` calls the C++ kernel with the same arguments. Its gradient tensor comes from the
  extension's pool of one block (``pooled_empty``): memory PyTorch has freed, reused because fresh pages
  cost more than the arithmetic; ``release_gradient_memory()`` frees the kept block.

Both take F.cross_entropy's ``ignore_index`` and ``label_smoothing`` and return each row's loss; given a
``row_scale`` [N] they also write the gradient, ``(softmax - (1 - eps) onehot - eps / V) * row_scale``
(0 on ignored rows), in the same sweep: into a new tensor (``grad_mode=1``) or over the logits
themselves (``grad_mode=2``, what the fused linear cross-entropy does with its chunk buffer).
"""

from __future__ import annotations

import threading

import torch

from minilib._cpp_extension import CSRC, EXTENSION_FLAGS, build, load_once, status

__all__ = [
    "CHUNK_ELEMENTS",
    "EXTENSION_FLAGS",
    "extension_status",
    "load_extension",
    "chunk_rows",
    "chunk_loss",
    "chunked_loss",
    "cpp_loss",
    "release_gradient_memory",
]

#: Elements per chunk of the torch fallback (16 MiB of float32): a bounded buffer, independent of N,
#: yet few enough torch calls per pass; each call is a parallel region, and on a busy machine
#: every region waits for a descheduled thread (measured: ~8 ms per call on 1M elements here).
CHUNK_ELEMENTS = 1 << 22

_SOURCE = CSRC / "fused_cross_entropy.cpp"
_NAME = "minilib_fused_cross_entropy"

_lock = threading.Lock()
_state: dict[str, object] = {"module": None, "tried": False, "error": None}


def load_extension():
    """The compiled module (``forward``, ``backward``), built on first call; None if it cannot be built."""
    # `_build` is looked up at each call, so a test can simulate a failed build by replacing it.
    return load_once(_state, _lock, lambda: _build(), "minilib.kernels.fused_cross_entropy")


def _build():
    return build(_NAME, _SOURCE)


def extension_status() -> str:
    """'cpp' if the C++ kernel is loaded, else why not (after the first call to ``load_extension``)."""
    return status(_state)


def chunk_rows(n_classes: int) -> int:
    """Rows per chunk of the fallback: as many as fit in CHUNK_ELEMENTS, at least one."""
    return max(1, CHUNK_ELEMENTS // max(1, n_classes))


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # Half precisions are summed in float32 (as F.cross_entropy does); float32/64 keep their own.
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def chunk_loss(
    x: torch.Tensor,
    target: torch.Tensor,
    ignore_index: int,
    label_smoothing: float,
    row_scale: torch.Tensor | None = None,
    grad_out: torch.Tensor | None = None,
    buf: torch.Tensor | None = None,
) -> torch.Tensor:
    """The loss of each row of one chunk ``x`` [n, V] (0 where ignored) in the compute dtype; with
    ``row_scale`` [n], also its gradient times row_scale, written into ``grad_out`` (which may be ``x``).

    Works in ``buf`` (compute dtype, at least x's size) or, when x already has the compute dtype and is
    the output, in x itself: extra memory is that one buffer plus O(n).
    """
    n, V = x.shape
    cdt = _compute_dtype(x.dtype)
    in_place = grad_out is not None and grad_out.data_ptr() == x.data_ptr() and x.dtype == cdt
    if in_place:
        b = x
    else:
        b = buf[:n] if buf is not None else torch.empty(n, V, dtype=cdt, device=x.device)
        b.copy_(x)
    ignored = target == ignore_index
    t = target.masked_fill(ignored, 0).unsqueeze(1)  # a safe index for ignored rows (their loss is zeroed)
    m = torch.amax(b, dim=1, keepdim=True)
    b.sub_(m)  # x - m <= 0: exp cannot overflow
    loss = -b.gather(1, t).squeeze(1)  # -(x_t - m), read before exp overwrites it
    mean_term = b.sum(1).div_(V) if label_smoothing else None  # mean(x) - m, for the smoothing term
    b.exp_()
    l = b.sum(1).log_()
    loss.add_(l)
    if mean_term is not None:
        loss.mul_(1 - label_smoothing).add_((l - mean_term).mul_(label_smoothing))
    loss.masked_fill_(ignored, 0.0)
    if row_scale is not None:
        s = row_scale.to(cdt).masked_fill(ignored, 0.0).unsqueeze(1)
        b.mul_(torch.exp(-l).unsqueeze(1) * s)  # softmax * scale
        if label_smoothing:
            b.sub_(s * (label_smoothing / V))
        b.scatter_add_(1, t, s * -(1 - label_smoothing))
        # An ignored row of +-inf logits would leave nan * 0 = nan behind. (On a GPU, asking whether any
        # row is ignored would wait for the device: there the fill runs always.)
        if b.is_cuda or ignored.any():
            b.masked_fill_(ignored.unsqueeze(1), 0.0)
        if not in_place:
            grad_out.copy_(b)
    return loss


def chunked_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    ignore_index: int,
    label_smoothing: float,
    grad_mode: int = 0,
    row_scale: torch.Tensor | None = None,
):
    """(row_loss [N] in the compute dtype, gradient or None), a chunk of rows at a time, any device/dtype.

    grad_mode 0: no gradient; 1: a new tensor in logits' dtype; 2: in place, over the logits.
    """
    N, V = logits.shape
    cdt = _compute_dtype(logits.dtype)
    rows = min(chunk_rows(V), max(N, 1))
    grad = None
    grad_mode = grad_mode if row_scale is not None else 0
    if grad_mode == 1:
        grad = torch.empty(N, V, dtype=logits.dtype, device=logits.device)
    elif grad_mode == 2:
        grad = logits
    # The one reused N-independent buffer (not needed where the gradient itself can be the workspace).
    work_in_grad = grad is not None and logits.dtype == cdt
    buf = None if work_in_grad else torch.empty(rows, V, dtype=cdt, device=logits.device)
    row_loss = torch.empty(N, dtype=cdt, device=logits.device)
    for i in range(0, N, rows):
        j = min(i + rows, N)
        x = logits[i:j]
        out = None
        if grad is not None:
            out = grad[i:j]
            if work_in_grad and grad_mode == 1:
                out.copy_(x)
                x = out
        scale = None if row_scale is None else row_scale[i:j]
        row_loss[i:j] = chunk_loss(x, target[i:j], ignore_index, label_smoothing, scale, out, buf)
    return row_loss, grad


def release_gradient_memory() -> None:
    """Frees the C++ path's kept gradient block (see ``cpp_loss``), e.g. after training; no-op without it."""
    if _state["module"] is not None:
        _state["module"].release_pool()


def cpp_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    ignore_index: int,
    label_smoothing: float,
    grad_mode: int = 0,
    row_scale: torch.Tensor | None = None,
):
    """The same as ``chunked_loss``, by the C++ kernel (CPU float32, unit column stride)."""
    ext = load_extension()
    if row_scale is None:
        return ext.forward(logits, target, ignore_index, label_smoothing, 0, 1.0, None)[2], None
    out = None
    if grad_mode == 1:
        # From the extension's pool: fresh pages would cost a page fault each on first write, more than
        # the gradient's arithmetic, so a block freed by PyTorch is reused. The block returns to the pool
        # only from its tensor's deleter, when no storage refers to it any more, so a gradient the caller
        # still holds in any form is never written again.
        out = ext.pooled_empty(*logits.shape)
    result = ext.forward(logits, target, ignore_index, label_smoothing, grad_mode, 1.0, row_scale, out)
    return result[2], (result[3] if grad_mode == 1 else logits)
