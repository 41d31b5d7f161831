"""Beyond the lessons: the fast paths of lessons 01 (01_matmul) and 03 (03_minibatch_training).

``fused_cross_entropy(logits, target, *, reduction, ignore_index, label_smoothing)`` is lesson 03's
``nll(log_softmax(x), y)`` in one pass, with F.cross_entropy's keywords. The lesson's version writes
log_softmax, an N x V tensor, to memory and reads it back to pick one number per row; at (8192, 32000)
float32 that is 1 GiB written and read again for 8192 numbers. The fused version reads each row once,
keeping a running max and a running sum of exponentials (the online softmax). When the logits need a
gradient (CPU, 'mean' or 'sum'), the same sweep also writes the gradient
``(softmax - (1 - eps) onehot - eps / V) / n_valid`` while the row is still in cache, so a training step
reads the logits once and writes the gradient once; the backward only hands it over (multiplying by
grad_out if that is not 1). The gradient goes into memory that is reused from step to step once PyTorch
has freed the previous gradient (the C++ extension's ``pooled_empty``): fresh pages would cost more than
the arithmetic, and a block returns to the pool only when no storage refers to it, so a gradient the
caller keeps in any form (tensor, view, storage, a copy sent to another process) is never written again.
Elsewhere ('none', GPUs: grad_out unknown until the backward and not readable without a host sync) the
backward writes the gradient from the logits in its own sweep.
Second derivatives (``create_graph=True``) are taken through F.cross_entropy's own graph: right, if slow.

``fused_linear_cross_entropy(input, linear_weight, target, ...)`` is ``F.linear_cross_entropy``: lesson
01's matmul and lesson 03's loss without ever holding the [N, V] logits. Rows go in chunks
(``linear_chunk_rows``) through ``x_c @ W.T`` into one reused buffer; the row loss kernel writes each row's
loss and overwrites the buffer with the gradient of the logits; then ``dlogits @ W`` is the chunk's input
gradient and ``dlogits.T @ x_c`` its share of the weight's (summed in float32 for half precision).

Where the row loss kernel runs:

============================================  =====================================================
logits                                        path
============================================  =====================================================
CUDA float32/float16/bfloat16, with Triton    Triton kernel (``minilib._triton_kernels.triton_loss``)
CPU float32                                   C++ kernel built on first use (``minilib/csrc``), or,
                                              if it cannot be built, the chunked torch path (warns
                                              once)
anything else (CPU float64/bfloat16/float16,  chunked torch path (half precision computed in
CUDA float64, CUDA without Triton, ...)       float32), extra memory one chunk + O(N)
============================================  =====================================================

On CUDA no call waits for the GPU: the target range check is a device-side assert (as in
F.cross_entropy's own kernel), the mean's divisor and the gradient's scale stay on the device.

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

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from minilib import _cpu_batch_norm as _cpu_bn
from minilib import _cpu_cross_entropy as _cpu
from minilib import contract

try:
    from minilib import _triton_kernels as _tk
except ImportError:  # Triton is an optional extra
    _tk = None
try:
    from minilib import _triton_batch_norm as _tbn
except ImportError:
    _tbn = None

__all__ = [
    "fused_cross_entropy",
    "fused_linear_cross_entropy",
    "triton_matmul",
    "cpu_backend",
    "triton_available",
    "LINEAR_CHUNK_ELEMENTS",
    "fused_batch_norm",
    "FusedBatchNorm2d",
    "batch_norm_backend",
]

#: The fused linear cross-entropy's largest chunk of logits (64 MiB of float32). Each chunk adds its
#: share of the weight's gradient into one V x H accumulator, which is read and written once per chunk,
#: so fewer, larger chunks run faster (measured at (2048, 256, 32000): 64 rows 1.55x the three matmuls'
#: time, 128 rows 1.25x, 256 rows 1.11x, 512 rows 1.02x); the memory bound below caps them.
LINEAR_CHUNK_ELEMENTS = 1 << 24

#: At most this fraction of the rows per chunk, so that the buffer stays under the eighth of the logits
#: that the contract promises, with room for the O(N) and O(V) extras, whatever N is.
LINEAR_CHUNK_FRACTION = 12

REDUCTIONS = ("mean", "sum", "none")


def triton_available() -> bool:
    """True when Triton is installed (the GPU kernels can run on CUDA tensors, or in the interpreter)."""
    return _tk is not None


def cpu_backend() -> str:
    """Which path CPU float32 logits take: 'cpp', or 'torch fallback (why)'. Builds the kernel if needed."""
    _cpu.load_extension()
    return _cpu.extension_status()


# float64 on CUDA goes to the torch path: the Triton kernel computes in float32.
_TRITON_CE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# A row loss kernel: (logits [n, V] unit column stride, target [n], ignore_index, label_smoothing,
# grad_mode 0/1/2, row_scale [n] or None) -> (row_loss [n], gradient or None). See _cpu_cross_entropy.
LossKernel = Callable[..., tuple[torch.Tensor, torch.Tensor | None]]


def _unit_column_stride(x: torch.Tensor) -> torch.Tensor:
    # The kernels walk a row with stride 1; any row stride is fine (a column slice needs no copy).
    return x if x.shape[1] <= 1 or x.stride(1) == 1 else x.contiguous()


def _loss_kernel(x: torch.Tensor) -> LossKernel:
    """The row loss kernel for logits like ``x``: Triton on CUDA, C++ for CPU float32, else chunked torch."""
    if x.is_cuda and _tk is not None and x.dtype in _TRITON_CE_DTYPES:
        return _tk.triton_loss
    if x.device.type == "cpu" and x.dtype == torch.float32 and _cpu.load_extension() is not None:
        return _cpu.cpp_loss
    return _cpu.chunked_loss


# --- Checks (the contract's words, the arguments' own names) ----------------------------------------------


def _check_options(fname: str, reduction: Any, ignore_index: Any, label_smoothing: Any, unsupported: dict):
    if unsupported:
        name = next(iter(unsupported))
        what = "class weights" if name == "weight" else "an argument of this function"
        contract.fail(fname, f"{name}=", f"left out ({what}: not supported)", unsupported[name], TypeError)
    contract.one_of(fname, "reduction", reduction, REDUCTIONS)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        contract.fail(fname, "ignore_index", "an int", ignore_index, TypeError)
    eps = contract.finite_number(fname, label_smoothing=label_smoothing)
    if not 0.0 <= eps <= 1.0:
        contract.fail(fname, "label_smoothing", "in [0, 1]", label_smoothing)
    return eps


def _check_target(
    fname: str, target: Any, n: int, n_classes: int, ignore_index: int, rows: str, classes: str
) -> None:
    """``target`` holds one class per row of the argument ``rows`` (n of them), each in [0, n_classes) (the
    classes of the argument ``classes``) or ``ignore_index``."""
    contract.tensor(fname, target=target)
    contract.dense(fname, "target", target)
    if target.dtype != torch.int64:
        contract.fail(fname, "target", "int64 class indices", target)
    if target.dim() != 1 or target.shape[0] != n:
        contract.fail(fname, "target", f"1-D with one class per row of {rows} ({n})", target)
    if target.is_cuda:
        # No host sync on the GPU: a device-side assert, as F.cross_entropy's own kernel does.
        bad = ((target < 0) | (target >= n_classes)) & (target != ignore_index)
        torch._assert_async(~bad.any(), f"{fname}: target holds a class outside [0, {n_classes})")
    else:
        contract.class_indices(fname, target, n_classes, scores=classes, ignore_index=ignore_index)


def _check_rows(fname: str, arg: str, x: torch.Tensor) -> None:
    if x.shape[0] == 0:
        contract.fail(fname, arg, "a batch of at least one row (a mean over no rows is nan)", x)


def _check_classes(fname: str, arg: str, n_classes: int, x: torch.Tensor, layout: str) -> None:
    # With no classes there is no softmax (its sum is empty): no target can be valid.
    if n_classes == 0:
        contract.fail(fname, arg, f"{layout} with V >= 1 classes (a softmax over no classes is undefined)", x)


# --- fused_cross_entropy ----------------------------------------------------------------------------------


def _reduce(
    row_loss: torch.Tensor, n_valid: torch.Tensor, reduction: str, dtype: torch.dtype
) -> torch.Tensor:
    if reduction == "none":
        return row_loss.to(dtype)
    # Summed in float64: 8192 float32 terms summed naively would cost a few ulps. 0 / 0 = nan for a
    # mean over no targets, as F.cross_entropy gives.
    total = row_loss.sum(dtype=torch.float64)
    return (total / n_valid if reduction == "mean" else total).to(dtype)


def _scale_dtype(dtype: torch.dtype) -> torch.dtype:
    # float64 keeps its precision (a float32 1/n would cost float64 gradients 8 digits); the kernels for
    # float32 and half precision compute in float32.
    return torch.float64 if dtype == torch.float64 else torch.float32


def _grad_scale(target: torch.Tensor, ignore_index: int, reduction: str, dtype: torch.dtype):
    """(n_valid, the per-row scale of the gradient: 1 / n_valid for 'mean', 1 for 'sum'/'none'), in the
    precision the gradient of ``dtype`` inputs is computed in."""
    valid = target != ignore_index
    n_valid = valid.sum()
    scale = valid.to(_scale_dtype(dtype))
    if reduction == "mean":
        scale = scale / n_valid  # tensor ops: no host sync on the GPU
    return n_valid, scale


class _FusedCrossEntropy(torch.autograd.Function):
    """F.cross_entropy by a row loss kernel. With ``one_sweep`` (CPU, 'mean'/'sum', logits needing a
    gradient) the forward writes the gradient in the same sweep as the loss and the backward only hands it
    over (scaled if grad_out is not 1); otherwise the backward writes it from the logits again."""

    @staticmethod
    def forward(ctx, logits, target, reduction, ignore_index, eps, kernel, one_sweep):
        n_valid, scale = _grad_scale(target, ignore_index, reduction, logits.dtype)
        sweep = one_sweep and ctx.needs_input_grad[0] and reduction != "none"
        row_loss, grad = kernel(logits, target, ignore_index, eps, 1, scale if sweep else None)
        ctx.grad = grad  # the gradient of the loss itself (grad_out = 1), or None
        ctx.options = (reduction, ignore_index, eps, kernel)
        ctx.save_for_backward(logits, target, scale)
        return _reduce(row_loss, n_valid, reduction, logits.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        reduction, ignore_index, eps, kernel = ctx.options
        logits, target, scale = ctx.saved_tensors
        grad, ctx.grad = ctx.grad, None  # handed over once: autograd may accumulate into it
        if torch.is_grad_enabled():  # create_graph=True: second derivatives through PyTorch's own graph
            options = dict(reduction=reduction, ignore_index=ignore_index, label_smoothing=eps)
            grads = _reference_grad(lambda x: F.cross_entropy(x, target, **options), [logits], grad_out)
            return grads + (None,) * 6
        if grad is not None:  # written in the forward for grad_out = 1
            if float(grad_out) != 1.0:  # one_sweep runs on the CPU only, where this read costs nothing
                grad.mul_(grad_out.to(grad.dtype))
            return grad, None, None, None, None, None, None
        row_scale = scale * (grad_out if reduction == "none" else grad_out.reshape(()))
        row_scale = row_scale.to(_scale_dtype(logits.dtype)).contiguous()
        _, grad = kernel(logits, target, ignore_index, eps, 1, row_scale)
        return grad, None, None, None, None, None, None


def _reference_grad(loss_fn, inputs, grad_out):
    """The gradients of ``loss_fn(*inputs)`` by PyTorch's autograd with create_graph, so differentiable
    again (a gradient penalty, a Hessian-vector product); None for inputs that need none."""
    wanted = [x for x in inputs if x is not None and x.requires_grad]
    with torch.enable_grad():
        grads = iter(torch.autograd.grad(loss_fn(*inputs), wanted, grad_out, create_graph=True))
    return tuple(next(grads) if x is not None and x.requires_grad else None for x in inputs)


def fused_cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    reduction: str = "mean",
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    **unsupported: Any,
) -> torch.Tensor:
    """``F.cross_entropy(logits, target, reduction=, ignore_index=, label_smoothing=)`` in one fused pass.

    ``logits`` [N, V] raw scores, ``target`` int64 [N] classes in ``[0, V)`` or ``ignore_index``. Equal to
    F.cross_entropy in value and gradient, differentiable (twice, too: second derivatives go through
    PyTorch's own graph); the result has the logits' device and dtype. When the logits need a gradient
    (CPU, 'mean' or 'sum'), the forward writes it in the same sweep as the loss, while each row is in
    cache, and holds it (N x V) until the backward hands it over. Errors name the arguments: TypeError for
    a non-tensor or an unsupported keyword (``weight=``), ValueError for shapes, dtypes, devices, an empty
    batch, zero classes, sparse logits (as F.cross_entropy refuses them) or a bad option, IndexError for a
    target outside ``[0, V)`` other than ``ignore_index``. float64 logits get float64 values and gradients.
    """
    fname = "fused_cross_entropy"
    eps = _check_options(fname, reduction, ignore_index, label_smoothing, unsupported)
    contract.float_tensor(fname, logits=logits)
    if logits.layout != torch.strided:  # as F.cross_entropy, which has no sparse log_softmax
        contract.fail(fname, "logits", "a dense (strided) tensor (sparse logits are not supported)", logits)
    contract.ndim(fname, "logits", logits, 2, "[N, V] (a batch of rows of class scores)")
    _check_rows(fname, "logits", logits)
    _check_classes(fname, "logits", logits.shape[1], logits, "[N, V]")
    contract.tensor(fname, target=target)
    contract.same_device(fname, logits=logits, target=target)
    _check_target(fname, target, *logits.shape, ignore_index, rows="logits", classes="logits")
    kernel = _loss_kernel(logits)
    # One sweep where the backward can check grad_out for free (CPU); on a GPU the backward's own sweep
    # avoids both a host sync and a third pass to scale by grad_out.
    # (Not under no_grad: there the forward would write a gradient nobody asks for.)
    one_sweep = logits.device.type == "cpu" and torch.is_grad_enabled()
    return _FusedCrossEntropy.apply(
        _unit_column_stride(logits), target.contiguous(), reduction, ignore_index, eps, kernel, one_sweep
    )


# --- fused_linear_cross_entropy ---------------------------------------------------------------------------


def linear_chunk_rows(n: int, n_classes: int) -> int:
    """Rows per chunk: at most LINEAR_CHUNK_ELEMENTS of logits and a LINEAR_CHUNK_FRACTION-th of the rows,
    at least one."""
    return max(1, min(n, LINEAR_CHUNK_ELEMENTS // max(1, n_classes), n // LINEAR_CHUNK_FRACTION))


def _linear_sweep(x, w, b, target, ignore_index, eps, row_scale, needs, kernel):
    """The loss of every row, chunk by chunk through one reused logits buffer, and where ``row_scale`` is
    given the gradients the ``needs`` flags ask for (input, weight, bias), accumulated chunk by chunk.

    Per chunk: logits = x_c @ w.T (+ b) into the buffer; the loss kernel writes each row's loss and
    overwrites the buffer with d loss / d logits (times row_scale); then grad_x_c = dlogits @ w,
    grad_w += dlogits.T @ x_c and grad_b += dlogits.sum(0). Weight and bias gradients of half-precision
    inputs accumulate in float32.
    """
    N, _ = x.shape
    V = w.shape[0]
    rows = linear_chunk_rows(N, V)
    acc = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    buf = torch.empty(rows, V, dtype=x.dtype, device=x.device)
    row_loss = torch.empty(N, dtype=acc, device=x.device)
    want = row_scale is not None
    gx = torch.empty_like(x) if want and needs[0] else None
    gw = torch.zeros(w.shape, dtype=acc, device=x.device) if want and needs[1] else None
    gb = torch.zeros(V, dtype=acc, device=x.device) if want and b is not None and needs[2] else None
    for i in range(0, N, rows):
        j = min(i + rows, N)
        xc, logits = x[i:j], buf[: j - i]
        if b is None:
            torch.mm(xc, w.t(), out=logits)
        else:
            torch.addmm(b, xc, w.t(), out=logits)
        scale = row_scale[i:j] if want else None
        row_loss[i:j], _ = kernel(logits, target[i:j], ignore_index, eps, 2, scale)
        if not want:
            continue
        if gx is not None:
            torch.mm(logits, w, out=gx[i:j])
        if gw is not None:
            if gw.dtype == logits.dtype:
                gw.addmm_(logits.t(), xc)
            else:  # half precision: each chunk's product rounds once, the sum over chunks is float32
                gw.add_(torch.mm(logits.t(), xc))
        if gb is not None:
            gb.add_(logits.sum(0, dtype=acc))
    return row_loss, gx, gw, gb


class _FusedLinearCrossEntropy(torch.autograd.Function):
    """F.linear_cross_entropy without the [N, V] logits. For 'mean' and 'sum' the forward computes the
    gradients too (one matmul of logits per chunk, not two); for 'none' (grad_out per row unknown until
    the backward) the backward runs the sweep again with grad_out as the row scale."""

    @staticmethod
    def forward(ctx, x, w, b, target, reduction, ignore_index, eps, kernel, grad_enabled):
        n_valid, scale = _grad_scale(target, ignore_index, reduction, x.dtype)
        needs = ctx.needs_input_grad[:3] if grad_enabled else (False,) * 3  # no gradients under no_grad
        sweep = any(needs) and reduction != "none"
        row_loss, *grads = _linear_sweep(
            x, w, b, target, ignore_index, eps, scale if sweep else None, needs, kernel
        )
        ctx.grads = grads if sweep else None
        ctx.options = (reduction, ignore_index, eps, kernel)
        ctx.save_for_backward(x, w, b, target, scale)
        return _reduce(row_loss, n_valid, reduction, x.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        reduction, ignore_index, eps, kernel = ctx.options
        x, w, b, target, scale = ctx.saved_tensors
        grads, ctx.grads = ctx.grads, None
        if torch.is_grad_enabled():  # create_graph=True: second derivatives through PyTorch's own graph
            options = dict(reduction=reduction, ignore_index=ignore_index, label_smoothing=eps)
            grads = _reference_grad(
                lambda x, w, b: F.cross_entropy(F.linear(x, w, b), target, **options), [x, w, b], grad_out
            )
            return grads + (None,) * 6
        if grads is None:
            row_scale = scale * grad_out.reshape(-1 if reduction == "none" else ())
            row_scale = row_scale.to(_scale_dtype(x.dtype))
            needs = ctx.needs_input_grad[:3]
            _, *grads = _linear_sweep(
                x, w, b, target, ignore_index, eps, row_scale.contiguous(), needs, kernel
            )
        elif grad_out.is_cuda or float(grad_out) != 1.0:  # small tensors: scaling them costs little
            grads = [g if g is None else g.mul_(grad_out.to(g.dtype)) for g in grads]
        gx, gw, gb = grads
        gw = None if gw is None else gw.to(w.dtype)
        gb = None if gb is None else gb.to(w.dtype)
        return gx, gw, gb, None, None, None, None, None, None


def fused_linear_cross_entropy(
    input: torch.Tensor,
    linear_weight: torch.Tensor,
    target: torch.Tensor,
    *,
    linear_bias: torch.Tensor | None = None,
    reduction: str = "mean",
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    **unsupported: Any,
) -> torch.Tensor:
    """``F.cross_entropy(F.linear(input, linear_weight, linear_bias), target, ...)`` without the logits.

    ``input`` [N, H], ``linear_weight`` [V, H] (nn.Linear's layout), ``linear_bias`` [V] or None,
    ``target`` int64 [N]. Chunks of rows go through a matmul into one reused buffer (at most an eighth of
    the N x V logits, and at most LINEAR_CHUNK_ELEMENTS), the fused loss turns the chunk into its gradient
    in place, and two more matmuls give the chunk's share of the input's and the weight's gradients. Equal
    to PyTorch's F.linear_cross_entropy in value and gradients; same keywords, errors and second-derivative
    rule as fused_cross_entropy. A sparse operand is made dense first (it is no larger than a dense one
    would be) and gets a dense gradient, as F.linear_cross_entropy gives.
    """
    fname = "fused_linear_cross_entropy"
    eps = _check_options(fname, reduction, ignore_index, label_smoothing, unsupported)
    named = {"input": input, "linear_weight": linear_weight}
    if linear_bias is not None:
        named["linear_bias"] = linear_bias
    contract.float_tensor(fname, **named)
    contract.ndim(fname, "input", input, 2, "[N, H]")
    contract.ndim(fname, "linear_weight", linear_weight, 2, "[V, H] (nn.Linear's layout)")
    if input.shape[1] != linear_weight.shape[1]:
        contract.fail(
            fname, "linear_weight", f"[V, H] with H = input's {input.shape[1]} columns", linear_weight
        )
    if linear_bias is not None:
        contract.ndim(fname, "linear_bias", linear_bias, 1, "[V]")
        if linear_bias.shape[0] != linear_weight.shape[0]:
            contract.fail(
                fname,
                "linear_bias",
                f"[V] with V = linear_weight's {linear_weight.shape[0]} rows",
                linear_bias,
            )
    contract.same_device(fname, **named)
    contract.same_dtype(fname, **named)
    _check_rows(fname, "input", input)
    _check_classes(fname, "linear_weight", linear_weight.shape[0], linear_weight, "[V, H]")
    contract.tensor(fname, target=target)
    contract.same_device(fname, input=input, target=target)
    n, v = input.shape[0], linear_weight.shape[0]
    _check_target(fname, target, n, v, ignore_index, rows="input", classes="linear_weight")
    x, w, b = (_dense(t) for t in (input, linear_weight, linear_bias))
    return _FusedLinearCrossEntropy.apply(
        x.contiguous(), w.contiguous(), b, target.contiguous(), reduction, ignore_index, eps,
        _loss_kernel(x), torch.is_grad_enabled(),
    )  # fmt: skip


class _Densify(torch.autograd.Function):
    """``x.to_dense()`` whose backward hands the dense gradient back as it is, as F.linear_cross_entropy
    does for a sparse operand (autograd's own to_dense would mask it to the sparsity pattern)."""

    @staticmethod
    def forward(ctx, x):
        return x.to_dense()

    @staticmethod
    def backward(ctx, grad):
        return grad


def _dense(x: torch.Tensor | None) -> torch.Tensor | None:
    """A sparse (COO, CSR, ...) operand made dense: it is N x H or V x H, the size of a dense argument,
    far below the N x V logits; the kernels walk dense rows."""
    return x if x is None or x.layout == torch.strided else _Densify.apply(x)


def _apply_fused(kernel, logits, target, *, reduction="mean", ignore_index=-100, label_smoothing=0.0,
                 one_sweep=False):  # fmt: skip
    """fused_cross_entropy through a chosen row loss kernel, unchecked (the tests' way to reach each path)."""
    return _FusedCrossEntropy.apply(
        _unit_column_stride(logits), target, reduction, ignore_index, label_smoothing, kernel, one_sweep
    )


def _apply_fused_linear(kernel, input, linear_weight, target, *, linear_bias=None, reduction="mean",
                        ignore_index=-100, label_smoothing=0.0):  # fmt: skip
    """fused_linear_cross_entropy through a chosen row loss kernel, unchecked (for the tests)."""
    return _FusedLinearCrossEntropy.apply(
        input, linear_weight, linear_bias, target, reduction, ignore_index, label_smoothing, kernel,
        torch.is_grad_enabled(),
    )  # fmt: skip


# --- triton_matmul ----------------------------------------------------------------------------------------


_TRITON_MATMUL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def triton_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` by a tiled Triton kernel: float32 accumulation, grouped tile order, autotuned tile sizes.

    ``a`` [M, K] and ``b`` [K, N] are CUDA tensors of one dtype (float16, bfloat16 or float32); the
    result [M, N] has that dtype. Under ``TRITON_INTERPRET=1`` the kernel runs in Triton's
    interpreter with fixed 32 x 32 x 32 tiles (CPU tensors allowed). Raises TypeError for a
    non-tensor, ValueError for a wrong dtype, shape or device (CPU tensors outside the interpreter),
    ImportError without Triton.
    """
    contract.tensor("triton_matmul", a=a, b=b)
    for arg, x in (("a", a), ("b", b)):
        if x.dtype not in _TRITON_MATMUL_DTYPES:
            contract.fail("triton_matmul", arg, "float16, bfloat16 or float32", x)
    contract.matmul("triton_matmul", a=a, b=b)  # 2-D, inner sizes, one device, one dtype
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


# --- fused_batch_norm -------------------------------------------------------------------------------------
#
# Lesson 07's BatchNorm (x.mean, x.var, subtract, divide, multiply, add: six sweeps over the activations)
# in two sweeps per channel, the second while the channel is still in cache; the backward likewise (one
# sweep for sum(dy) and sum(dy * xhat), one for dx). Where it runs:
#
# ============================================  =====================================================
# input                                         path
# ============================================  =====================================================
# CUDA float32/float16/bfloat16, with Triton    Triton kernels (``minilib._triton_batch_norm``)
# CPU float32                                   C++ kernel built on first use (``minilib/csrc``), or,
#                                               if it cannot be built, the torch path (warns once)
# anything else (CPU float64/half, ...)         torch ops (``_cpu_batch_norm.torch_batch_norm``),
#                                               half precision computed in float32
# ============================================  =====================================================
#
# The kernels read contiguous [N, C, *] and channels-last input in place; other layouts are copied to
# contiguous first (``_cpu_batch_norm.kernel_layout``), and the output has the layout the kernel read.


class _Backend:
    """A batch norm kernel pair with ``_cpu_batch_norm.cpp_forward``'s and ``cpp_backward``'s interface."""

    def __init__(self, name: str, forward: Callable, backward: Callable):
        self.name, self.forward, self.backward = name, forward, backward


_CPP_BN = _Backend("cpp", _cpu_bn.cpp_forward, _cpu_bn.cpp_backward)
_TRITON_BN = None if _tbn is None else _Backend("triton", _tbn.triton_forward, _tbn.triton_backward)
_TRITON_BN_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _batch_norm_backend(x: torch.Tensor) -> _Backend | None:
    """The kernels for input like ``x``: Triton on CUDA, C++ for CPU float32; None: the torch path."""
    if x.is_cuda and _TRITON_BN is not None and x.dtype in _TRITON_BN_DTYPES:
        return _TRITON_BN
    if x.device.type == "cpu" and x.dtype == torch.float32 and _cpu_bn.load_extension() is not None:
        return _CPP_BN
    return None


class _FusedBatchNorm(torch.autograd.Function):
    """F.batch_norm by a kernel pair. Training: the batch statistics come from the forward sweep, the
    running buffers are updated from them, and the backward goes through them. Eval: the running buffers
    normalise, and are constants for the backward. Second derivatives (create_graph=True) go through
    ``torch_batch_norm``'s graph: right, if slower."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, training, momentum, eps, backend):
        xk, C, S = _cpu_bn.kernel_layout(x)
        if training:
            y, mean, var = backend.forward(xk, C, S, weight, bias, None, None, eps, True)
            _cpu_bn.update_running_stats(running_mean, running_var, mean, var, x.numel() // C, momentum)
        else:  # copies in float64: a later training step may change the buffers before this backward
            mean, var = running_mean.to(torch.float64, copy=True), running_var.to(torch.float64, copy=True)
            y, _, _ = backend.forward(xk, C, S, weight, bias, mean, var, eps, False)
        ctx.options = (training, eps, backend)
        # x itself, not xk: with create_graph=True the saved x is the one connected to the graph.
        ctx.save_for_backward(x, weight, bias, mean, var)
        return y

    @staticmethod
    def backward(ctx, grad_out):
        training, eps, backend = ctx.options
        x, weight, bias, mean, var = ctx.saved_tensors
        needs = ctx.needs_input_grad[:3]
        if torch.is_grad_enabled():  # create_graph=True: second derivatives through torch ops' graph
            grads = _reference_grad(
                lambda x, w, b: _cpu_bn.torch_batch_norm(x, w, b, mean, var, eps, training)[0],
                [x, weight, bias],
                grad_out,
            )
            return grads + (None,) * 6
        xk, C, S = _cpu_bn.kernel_layout(x)
        dx, dw, db = backend.backward(grad_out, xk, C, S, weight, mean, var, eps, training, needs[0])
        dw = dw.to(weight.dtype) if needs[1] else None
        db = db.to(bias.dtype) if needs[2] else None
        return dx, dw, db, None, None, None, None, None, None


def _check_per_channel(fname: str, arg: str, p: Any, x: torch.Tensor) -> None:
    """A parameter or buffer: a [C] tensor on x's device, of x's dtype (float32 also for half input)."""
    C = x.shape[1]
    contract.tensor(fname, **{arg: p})
    if p.shape != (C,):
        contract.fail(fname, arg, f"[C] = [{C}] (one value per channel of input)", p)
    allowed = {x.dtype, torch.float32} if x.dtype in (torch.float16, torch.bfloat16) else {x.dtype}
    if p.dtype not in allowed:
        names = " or ".join(sorted(str(d).removeprefix("torch.") for d in allowed))
        contract.fail(fname, arg, f"{names} (input's dtype)", p)
    if p.device != x.device:
        contract.fail(fname, arg, f"on input's device ({x.device})", p)


def _check_batch_norm(fname, input, running_mean, running_var, weight, bias, training, momentum, eps):
    contract.float_tensor(fname, input=input)
    if input.dim() < 2:
        contract.fail(fname, "input", "at least 2-D [N, C, ...] (a batch of C channels)", input)
    if not isinstance(training, bool):
        contract.fail(fname, "training", "a bool", training, TypeError)
    if momentum is None:
        contract.fail(fname, "momentum", "a float (as in F.batch_norm)", momentum, TypeError)
    contract.finite_number(fname, momentum=momentum)
    if not contract.finite_number(fname, eps=eps) >= 0:
        contract.fail(fname, "eps", "a finite number >= 0", eps)
    named = {"running_mean": running_mean, "running_var": running_var, "weight": weight, "bias": bias}
    for arg, p in named.items():
        if p is None:
            if not training and arg.startswith("running"):
                contract.fail(fname, arg, "a [C] tensor in eval (training=False normalises with it)", p)
            continue
        _check_per_channel(fname, arg, p, input)
    per_channel = input.numel() // max(1, input.shape[1])
    if training and per_channel == 1:
        contract.fail(
            fname, "input",
            "a batch with more than 1 value per channel when training (the variance of one value is 0)",
            f"input size {list(input.shape)}",
        )  # fmt: skip


def fused_batch_norm(
    input: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> torch.Tensor:
    """``F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)`` in two
    sweeps per channel (lesson 07's BatchNorm, fused).

    ``input`` [N, C, ...] (2-D to 5-D on the kernels; any rank >= 2 works). In training the statistics are
    the batch's, over every dim but 1 (the biased variance normalises), and ``running_mean`` /
    ``running_var`` (either may be None) are updated in place, ``(1 - momentum) running + momentum batch``
    with the unbiased variance, as PyTorch does; the gradient flows through the batch statistics. In eval
    the running buffers normalise (both required). Differentiable in input, weight and bias (twice too:
    second derivatives go through torch ops). Errors name the argument: TypeError for a non-tensor, a
    non-bool ``training`` or ``momentum=None``; ValueError for a parameter or buffer of the wrong shape,
    dtype or device, a missing running buffer in eval, or one value per channel in training.
    """
    fname = "fused_batch_norm"
    _check_batch_norm(fname, input, running_mean, running_var, weight, bias, training, momentum, eps)
    momentum, eps = float(momentum), float(eps)
    backend = _batch_norm_backend(input) if input.numel() > 0 else None
    if backend is None:
        if input.numel() == 0:  # nothing to normalise; PyTorch leaves the buffers alone too
            C = input.shape[1]
            zeros, ones = input.new_zeros(C), input.new_ones(C)
            return _cpu_bn.torch_batch_norm(input, weight, bias, zeros, ones, 0.0, False)[0]
        y, mean, var = _cpu_bn.torch_batch_norm(input, weight, bias, running_mean, running_var, eps, training)
        if training:
            n = input.numel() // input.shape[1]
            _cpu_bn.update_running_stats(running_mean, running_var, mean.detach(), var.detach(), n, momentum)
        return y
    return _FusedBatchNorm.apply(
        input, weight, bias, running_mean, running_var, training, momentum, eps, backend
    )


def _apply_batch_norm(backend, input, running_mean, running_var, weight=None, bias=None, training=False,
                      momentum=0.1, eps=1e-5):  # fmt: skip
    """fused_batch_norm through a chosen backend ('cpp', 'triton' or 'torch'), unchecked (for the tests)."""
    if backend == "torch":
        y, mean, var = _cpu_bn.torch_batch_norm(input, weight, bias, running_mean, running_var, eps, training)
        if training:
            n = input.numel() // input.shape[1]
            _cpu_bn.update_running_stats(running_mean, running_var, mean.detach(), var.detach(), n, momentum)
        return y
    kernels = {"cpp": _CPP_BN, "triton": _TRITON_BN}[backend]
    return _FusedBatchNorm.apply(
        input, weight, bias, running_mean, running_var, training, momentum, eps, kernels
    )


def batch_norm_backend(input: torch.Tensor) -> str:
    """Which path ``fused_batch_norm`` takes for input like this: 'triton', 'cpp' or 'torch (why)'."""
    backend = _batch_norm_backend(input)
    if backend is not None:
        return backend.name
    if input.device.type == "cpu" and input.dtype == torch.float32:
        return f"torch ({_cpu_bn.extension_status()})"
    return f"torch (no kernel for {str(input.dtype).removeprefix('torch.')} on {input.device.type})"


class FusedBatchNorm2d(nn.BatchNorm2d):
    """A drop-in ``nn.BatchNorm2d`` (its parameters, buffers and ``state_dict`` keys; loads one's state,
    and is one for ``isinstance``) whose forward runs ``fused_batch_norm``.

    ``momentum=None`` is the cumulative average, ``1 / num_batches_tracked``, as nn's. A non-4-D input:
    ValueError naming it.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, device=None,
                 dtype=None):  # fmt: skip
        contract.positive_int("FusedBatchNorm2d", num_features=num_features)
        super().__init__(num_features, eps=eps, momentum=momentum, device=device, dtype=dtype)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        contract.tensor("FusedBatchNorm2d", input=input)
        contract.ndim("FusedBatchNorm2d", "input", input, 4, "[N, C, H, W]")
        # nn.BatchNorm2d's rule for the factor and for when the batch's statistics are used.
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        use_batch = self.training or (self.running_mean is None and self.running_var is None)
        track = not self.training or self.track_running_stats
        return fused_batch_norm(
            input,
            self.running_mean if track else None,
            self.running_var if track else None,
            self.weight,
            self.bias,
            use_batch,
            factor,
            self.eps,
        )
