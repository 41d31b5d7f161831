"""Lesson 03 (03_minibatch_training), timed: cross-entropy from softmax-then-log to a fused kernel.

The lesson builds cross-entropy in steps: log of the softmax (naive), then x - log(sum(exp(x))), then the
LogSumExp trick, then nll by integer indexing; PyTorch's F.cross_entropy does it in one call, and
minilib.kernels.fused_cross_entropy fuses it further. Cross-entropy does a few flops per logit, so every
version is bound by memory traffic: the report gives GB/s against the measured bandwidth (the floor is one
read of the logits forward, one read and one write of the gradient for forward+backward) and the extra
memory a call needs at its peak, which is where the step-by-step versions pay for their temporaries.
Each case also records ``floor_s``, the time of that traffic measured in the same process (``x.sum()`` over
the logits, plus ``g.fill_(1.0)`` into a tensor as large for forward+backward), and
``fraction_of_floor`` = floor_s / time (1.0: the loss costs no more than moving its bytes once).

Sizes: the lesson's (50,000 x 10), vocabulary-sized (4096 x 32,000) and (8192 x 32,000) on CPU in float32,
and a Llama-3-sized vocabulary (8192 x 128,256) in bf16 on CUDA. Each kernel's loss (and, forward+backward,
its gradient) is checked against F.cross_entropy in float64 before it is timed.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from benchmarks import harness
from minilib.kernels import fused_cross_entropy
from minilib.loss import LOG_SOFTMAXES, cross_entropy, nll


def _fused_path(device: str) -> str:
    """Which path fused_cross_entropy takes here, for the record (the C++ kernel may have failed to build)."""
    if device == "cuda":
        from minilib.kernels import triton_available  # without Triton, CUDA takes the chunked torch path

        return "triton" if triton_available() else "chunked torch (no Triton)"
    try:
        from minilib.kernels import cpu_backend
    except ImportError:
        return "unknown"
    return cpu_backend()


def _lesson_version(version: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    log_softmax = LOG_SOFTMAXES[version]

    def loss(input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return nll(log_softmax(input), target)

    return loss


# name -> loss(input, target), in the lesson's order; the report keeps this order.
KERNELS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None] = {
    "naive": _lesson_version("naive"),  # (x.exp() / x.exp().sum()).log(), then nll
    "sum_log": _lesson_version("sum_log"),  # x - x.exp().sum().log(), then nll
    "logsumexp": _lesson_version("logsumexp"),  # x - logsumexp(x), then nll
    "cross_entropy": cross_entropy,  # minilib's public one: the logsumexp version plus argument checks
    "F.cross_entropy": F.cross_entropy,
    "fused_cross_entropy": fused_cross_entropy,
}
MODES = ("fwd", "fwd+bwd")


@dataclass
class Problem:
    device: str
    dtype: str
    n: int
    c: int
    x: torch.Tensor
    target: torch.Tensor
    loss: torch.Tensor  # F.cross_entropy in float64
    grad_rows: torch.Tensor  # n * d(loss)/d(x) = softmax - one_hot, from float64 autograd, stored as float32
    floor_s: dict[
        str, float
    ]  # per mode: the memory floor measured here (x.sum(), + g.fill_(1.0) for fwd+bwd)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "problem" not in metafunc.fixturenames:
        return
    s = harness.sizes(harness.bench_set(metafunc.config))
    problems = [("cpu", "float32", n, c) for n, c in s["ce_cpu"]]
    problems += [("cuda", "bf16", n, c) for n, c in s["ce_gpu"]]
    # Module scope: pytest runs every case of one problem before building the next, and frees it after.
    params = [
        pytest.param(pr, id="{}-{}-{}x{}".format(*pr), marks=[pytest.mark.gpu] if pr[0] == "cuda" else [])
        for pr in problems
    ]
    metafunc.parametrize("problem", params, indirect=True, scope="module")
    metafunc.parametrize("mode", MODES)
    metafunc.parametrize("kernel", list(KERNELS))


@pytest.fixture(scope="module")
def problem(request: pytest.FixtureRequest):
    device, dtype, n, c = request.param
    if device == "cuda":
        request.getfixturevalue("cuda")  # skips without CUDA
    gen = torch.Generator(device=device).manual_seed(n + c)
    x = torch.randn(n, c, generator=gen, device=device).to(harness.DTYPES[dtype])
    target = torch.randint(0, c, (n,), generator=gen, device=device)
    x64 = x.double().requires_grad_()
    loss = F.cross_entropy(x64, target)
    loss.backward()
    grad_rows = x64.grad.mul_(n).float()
    loss = loss.detach()  # drops the graph, which would keep x64 alive
    del x64
    yield Problem(device, dtype, n, c, x, target, loss, grad_rows, _memory_floor(x))


def _memory_floor(x: torch.Tensor) -> dict[str, float]:
    """The time of the memory traffic a loss cannot avoid, measured on this machine in this process: one
    read of the logits (x.sum()) forward, plus one write of a gradient as large (g.fill_(1.0) into an
    existing tensor) for forward+backward. Best of 5 each."""
    g = torch.empty_like(x)
    device = str(x.device)

    def best(fn):
        fn()
        harness.sync(device)
        times = []
        for _ in range(5):
            start = time.perf_counter()
            fn()
            harness.sync(device)
            times.append(time.perf_counter() - start)
        return min(times)

    read, write = best(lambda: x.sum()), best(lambda: g.fill_(1.0))
    return {"fwd": read, "fwd+bwd": read + write}


def _warm_up(
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], like: torch.Tensor, mode: str
) -> None:
    """An untimed call on a 2x3 input of that device and dtype: builds a C++/Triton kernel on first use."""
    x = torch.zeros(2, 3, device=like.device, dtype=like.dtype, requires_grad=mode != "fwd")
    loss = loss_fn(x, torch.zeros(2, dtype=torch.int64, device=like.device))
    if mode != "fwd":
        loss.backward()
    harness.sync(str(like.device))


def test_cross_entropy(benchmark: Any, limits_for, sizes, problem: Problem, mode: str, kernel: str) -> None:
    """One cross-entropy version, forward or forward+backward, checked against float64 F.cross_entropy."""
    p = problem
    benchmark.group = f"cross-entropy {mode} {p.n}x{p.c} {p.device} {p.dtype}"
    limits = limits_for(p.device)
    loss_fn = KERNELS[kernel]
    target = p.target
    if mode == "fwd":
        x = p.x

        def step():
            return loss_fn(x, target)

    else:
        x = p.x.detach().requires_grad_()  # a new leaf on the same storage: the problem's x stays untouched

        def step():
            x.grad = None
            loss = loss_fn(x, target)
            loss.backward()
            return loss.detach(), x.grad

    _warm_up(loss_fn, p.x, mode)
    fn = harness.synchronised(step, p.device)
    rtol, atol = harness.TOLERANCES[p.dtype]
    out, first_s, peak, how = harness.call_with_peak_memory(fn, p.device)
    what = f"{kernel} {mode} {p.n}x{p.c} {p.dtype}"
    loss = out if mode == "fwd" else out[0]
    max_diff = harness.check_close(f"{what}: loss", loss, p.loss, rtol, atol)
    if mode == "fwd+bwd":
        # Compare n * grad (softmax minus one-hot, entries in [-1, 1]) so that the tolerance means something.
        max_diff = max(max_diff, harness.check_close(f"{what}: grad", out[1], p.grad_rows, rtol, atol, p.n))
    del out, loss
    harness.time_kernel(benchmark, fn, first_s, sizes, p.device)
    itemsize = p.x.element_size()
    logits_bytes = p.n * p.c * itemsize
    harness.record(
        benchmark,
        limits,
        dtype=p.dtype,
        flops=None,
        # The floor's traffic: the logits (and targets) read once; backward writes a gradient as large.
        bytes_moved=(logits_bytes if mode == "fwd" else 2 * logits_bytes) + p.n * 8,
        first_call_s=first_s,
        peak_mem=peak,
        peak_mem_method=how,
        op="cross_entropy",
        case=mode,
        kernel=kernel,
        shape=f"{p.n}x{p.c}",
        n=p.n,
        c=p.c,
        logits_bytes=logits_bytes,
        checked_against="float64 F.cross_entropy (loss; and n * grad for fwd+bwd)",
        rtol=rtol,
        atol=atol,
        max_abs_diff=max_diff,
        implementation=_fused_path(p.device) if kernel == "fused_cross_entropy" else kernel,
        floor="x.sum() (+ g.fill_(1.0) for fwd+bwd) over the logits' size, best of 5, same process",
        floor_s=p.floor_s[mode],
    )
    extra = benchmark.extra_info
    extra["fraction_of_floor"] = p.floor_s[mode] / extra["seconds"]
