"""Lesson 03 (03_minibatch_training): cross-entropy from scratch.

softmax -> log_softmax (three lesson versions, the last one public) -> nll by integer array indexing
-> cross_entropy; `logsumexp` with the max trick; `accuracy`. `LOG_SOFTMAXES` keeps the lesson's
evolution as a table that the spec tests and benchmarks parametrize over.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = [
    "softmax",
    "log_softmax",
    "log_softmax_naive",
    "log_softmax_sum_log",
    "log_softmax_logsumexp",
    "LOG_SOFTMAXES",
    "logsumexp",
    "nll",
    "cross_entropy",
    "accuracy",
    "check_logits_and_target",
]


def _check_logits(x: torch.Tensor, name: str, arg: str = "x") -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: {arg} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        # The contract: a wrong dtype is a ValueError (TypeError is kept for "not a tensor at all").
        raise ValueError(f"{name}: {arg} must be a floating-point tensor of scores, got dtype {x.dtype}")
    if x.dim() == 0:
        raise ValueError(f"{name}: {arg} must have at least one dimension (classes last), got a scalar")
    if x.shape[-1] == 0:
        raise ValueError(
            f"{name}: {arg} must have at least one class in its last dim, got shape {tuple(x.shape)}"
        )


def check_logits_and_target(
    input: torch.Tensor,
    target: torch.Tensor,
    name: str,
    input_name: str = "input",
    target_name: str = "target",
) -> None:
    """The contract's checks for an ``[N, C]`` input and an int64 ``[N]`` target with classes in ``[0, C)``.

    ``input_name``/``target_name`` are the caller's argument names, so that ``accuracy(out, yb)``
    complains about ``out`` and ``yb``, the names its user typed.
    """
    i, t = input_name, target_name
    _check_logits(input, name, i)
    if input.dim() != 2:
        raise ValueError(
            f"{name}: {i} must be 2-D [N, C] (a batch of rows of class scores), "
            f"got shape {tuple(input.shape)}"
        )
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"{name}: {t} must be a torch.Tensor, got {type(target).__name__}")
    if target.dtype != torch.int64:
        raise ValueError(f"{name}: {t} must be int64 class indices, got dtype {target.dtype}")
    if target.dim() != 1 or target.shape[0] != input.shape[0]:
        raise ValueError(
            f"{name}: {t} must be 1-D with one class per row of {i}: {i} is "
            f"{tuple(input.shape)} but {t} is {tuple(target.shape)}"
        )
    if input.shape[0] == 0:
        raise ValueError(
            f"{name}: {i} must hold at least one row (a mean over no rows is nan), "
            f"got shape {tuple(input.shape)}"
        )
    if target.device != input.device:
        raise ValueError(f"{name}: {i} is on {input.device} but {t} is on {target.device}")
    n_classes = input.shape[1]
    bad = (target < 0) | (target >= n_classes)
    if bool(bad.any()):
        pos = int(bad.nonzero()[0, 0])
        raise IndexError(
            f"{name}: {t} holds class {int(target[pos])} at position {pos}, "
            f"but {i} has only {n_classes} classes"
        )


def softmax(x: torch.Tensor) -> torch.Tensor:
    """exp(x) / sum(exp(x)) over the last dim, as exp(log_softmax(x)) so that large logits cannot overflow."""
    _check_logits(x, "softmax")
    return log_softmax(x).exp()


def log_softmax_naive(x: torch.Tensor) -> torch.Tensor:
    """Lesson version 1: the log of the softmax. exp overflows for logits above ~88 (float32)."""
    _check_logits(x, "log_softmax_naive")
    return (x.exp() / x.exp().sum(-1, keepdim=True)).log()


def log_softmax_sum_log(x: torch.Tensor) -> torch.Tensor:
    """Lesson version 2: log(a/b) = log a - log b, so x - log(sum(exp(x))). Still overflows inside the sum."""
    _check_logits(x, "log_softmax_sum_log")
    return x - x.exp().sum(-1, keepdim=True).log()


def _row_max(x: torch.Tensor) -> torch.Tensor:
    """The shift of the LogSumExp trick: each row's max, detached, with an infinite max replaced by 0.

    Detached, because the result does not depend on the shift (log-sum-exp is shift-invariant): its
    exact gradient through m is 0, and tracking it would only add the rounding noise of
    1 - sum(softmax) to the max element's gradient. An infinite max (a row of all -inf, or a +inf)
    becomes 0 so that the result is what PyTorch gives (-inf, +inf) rather than the nan of inf - inf.
    """
    m = x.detach().amax(-1, keepdim=True)
    return torch.where(torch.isinf(m), torch.zeros_like(m), m)


def logsumexp(x: torch.Tensor) -> torch.Tensor:
    """log(sum(exp(x))) over the last dim, as m + log(sum(exp(x - m))) with m the row max.

    Subtracting the max changes nothing mathematically and keeps every exp() at most 1, so logits of
    any finite size (1e4, -1e4, mixed) give a finite result; a row of all -inf gives -inf, as PyTorch.
    """
    _check_logits(x, "logsumexp")
    m = _row_max(x)
    return (m + (x - m).exp().sum(-1, keepdim=True).log()).squeeze(-1)


def log_softmax_logsumexp(x: torch.Tensor) -> torch.Tensor:
    """Lesson version 3 (the final one): x - logsumexp(x), finite for logits of any finite size.

    Computed as (x - m) - log(sum(exp(x - m))) rather than x - (m + log(...)): forming m + log(...)
    first rounds it to the float spacing near |m| (about 1e-3 at 1e4 in float32), an error that would
    then land on every small log-probability; x - m is exact for the logits that matter.
    """
    _check_logits(x, "log_softmax")
    shifted = x - _row_max(x)
    return shifted - shifted.exp().sum(-1, keepdim=True).log()


def log_softmax(x: torch.Tensor) -> torch.Tensor:
    """log(softmax(x)) over the last dim, via the LogSumExp trick."""
    return log_softmax_logsumexp(x)


LOG_SOFTMAXES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "naive": log_softmax_naive,
    "sum_log": log_softmax_sum_log,
    "logsumexp": log_softmax_logsumexp,
}


def nll(input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean negative log likelihood of log-probabilities ``input`` [N, C] for class indices ``target`` [N].

    ``input[range(N), target]`` picks each row's log-probability of its target (integer array indexing).
    The minus sign turns maximising the likelihood into a loss to minimise.
    """
    check_logits_and_target(input, target, "nll")
    return -input[torch.arange(input.shape[0], device=input.device), target].mean()


def cross_entropy(input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of raw scores ``input`` [N, C] against class indices ``target`` [N]."""
    check_logits_and_target(input, target, "cross_entropy")
    return nll(log_softmax(input), target)


def accuracy(out: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
    """Fraction of rows whose highest score is the target class."""
    check_logits_and_target(out, yb, "accuracy", "out", "yb")
    return (torch.argmax(out, dim=1) == yb).float().mean()
