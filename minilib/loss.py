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
        raise TypeError(f"{name}: {arg} must be a floating-point tensor, got dtype {x.dtype}")
    if x.dim() == 0:
        raise ValueError(f"{name}: {arg} must have at least one dimension (classes last), got a scalar")


def check_logits_and_target(input: torch.Tensor, target: torch.Tensor, name: str) -> None:
    """The contract's checks for an ``[N, C]`` input and an int64 ``[N]`` target with classes in ``[0, C)``."""
    _check_logits(input, name, "input")
    if input.dim() != 2:
        raise ValueError(
            f"{name}: input must be 2-D [N, C] (a batch of rows of class scores), got shape {tuple(input.shape)}"
        )
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"{name}: target must be a torch.Tensor, got {type(target).__name__}")
    if target.dtype != torch.int64:
        raise ValueError(f"{name}: target must be int64 class indices, got dtype {target.dtype}")
    if target.dim() != 1 or target.shape[0] != input.shape[0]:
        raise ValueError(
            f"{name}: target must be 1-D with one class per row of input: input is "
            f"{tuple(input.shape)} but target is {tuple(target.shape)}"
        )
    if target.device != input.device:
        raise ValueError(f"{name}: input is on {input.device} but target is on {target.device}")
    n_classes = input.shape[1]
    bad = (target < 0) | (target >= n_classes)
    if bool(bad.any()):
        pos = int(bad.nonzero()[0, 0])
        raise IndexError(
            f"{name}: target holds class {int(target[pos])} at position {pos}, "
            f"but input has only {n_classes} classes"
        )


def softmax(x: torch.Tensor) -> torch.Tensor:
    """exp(x) / sum(exp(x)) over the last dim, computed as exp(log_softmax) so large logits cannot overflow."""
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


def logsumexp(x: torch.Tensor) -> torch.Tensor:
    """log(sum(exp(x))) over the last dim, as m + log(sum(exp(x - m))) with m the row max.

    Subtracting the max changes nothing mathematically and keeps every exp() at most 1.
    An infinite max (a row of all -inf, or a +inf) is replaced by 0 so that the result is what
    PyTorch gives (-inf, +inf) rather than the nan of inf - inf.
    """
    _check_logits(x, "logsumexp")
    m = x.max(-1, keepdim=True).values
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    return (m + (x - m).exp().sum(-1, keepdim=True).log()).squeeze(-1)


def log_softmax_logsumexp(x: torch.Tensor) -> torch.Tensor:
    """Lesson version 3 (the final one): x - logsumexp(x), finite for logits of any finite size."""
    _check_logits(x, "log_softmax")
    return x - logsumexp(x).unsqueeze(-1)


def log_softmax(x: torch.Tensor) -> torch.Tensor:
    """log(softmax(x)) over the last dim, via the LogSumExp trick."""
    return log_softmax_logsumexp(x)


LOG_SOFTMAXES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "naive": log_softmax_naive,
    "sum_log": log_softmax_sum_log,
    "logsumexp": log_softmax_logsumexp,
}


def nll(input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean negative log likelihood: pick each row's log-probability of its target by integer array indexing."""
    check_logits_and_target(input, target, "nll")
    return -input[torch.arange(input.shape[0], device=input.device), target].mean()


def cross_entropy(input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of raw scores ``input`` [N, C] against class indices ``target`` [N]."""
    check_logits_and_target(input, target, "cross_entropy")
    return nll(log_softmax(input), target)


def accuracy(out: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
    """Fraction of rows whose highest score is the target class."""
    check_logits_and_target(out, yb, "accuracy")
    return (torch.argmax(out, dim=1) == yb).float().mean()
