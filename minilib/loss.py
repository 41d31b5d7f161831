"""Lesson 03 (03_minibatch_training): cross-entropy from scratch.

softmax -> log_softmax (three lesson versions, the last one public) -> nll by integer array indexing
-> cross_entropy; `logsumexp` with the max trick; `accuracy`. `LOG_SOFTMAXES` keeps the lesson's
evolution as a table that the spec tests and benchmarks parametrize over.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from minilib import contract

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
]


def softmax(x: torch.Tensor) -> torch.Tensor:
    """exp(x) / sum(exp(x)) over the last dim, as exp(log_softmax(x)) so that large logits cannot overflow."""
    contract.scores("softmax", x=x)
    return log_softmax(x).exp()


def log_softmax_naive(x: torch.Tensor) -> torch.Tensor:
    """Lesson version 1: the log of the softmax. exp overflows for logits above ~88 (float32).

    The two first versions are the lesson's history, kept as it wrote them (no contract) so that the
    tests and benchmarks show what the LogSumExp trick fixes; `log_softmax` is the one to use."""
    return (x.exp() / x.exp().sum(-1, keepdim=True)).log()


def log_softmax_sum_log(x: torch.Tensor) -> torch.Tensor:
    """Lesson version 2: log(a/b) = log a - log b, so x - log(sum(exp(x))). Still overflows inside the sum."""
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
    contract.scores("logsumexp", x=x)
    m = _row_max(x)
    return (m + (x - m).exp().sum(-1, keepdim=True).log()).squeeze(-1)


def log_softmax_logsumexp(x: torch.Tensor) -> torch.Tensor:
    """Lesson version 3 (the final one): x - logsumexp(x), finite for logits of any finite size.

    Computed as (x - m) - log(sum(exp(x - m))) rather than x - (m + log(...)): forming m + log(...)
    first rounds it to the float spacing near |m| (about 1e-3 at 1e4 in float32), an error that would
    then land on every small log-probability; x - m is exact for the logits that matter.
    """
    contract.scores("log_softmax", x=x)
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
    contract.classification("nll", input=input, target=target)
    return -input[torch.arange(input.shape[0], device=input.device), target].mean()


def cross_entropy(input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of raw scores ``input`` [N, C] against class indices ``target`` [N]."""
    contract.classification("cross_entropy", input=input, target=target)
    return nll(log_softmax(input), target)


def accuracy(out: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
    """Fraction of rows whose highest score is the target class."""
    contract.classification("accuracy", out=out, yb=yb)
    return (torch.argmax(out, dim=1) == yb).float().mean()
