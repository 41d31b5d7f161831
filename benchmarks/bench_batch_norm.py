"""Lesson 10 (07_batchnorm), timed: the lesson's BatchNorm, PyTorch's, and a fused kernel, in training.

A BatchNorm in training reads its input once for the per-channel statistics and once more to normalise it,
and writes the output; its backward reads the input (or the output) and the output's gradient and writes the
input's, with two per-channel reductions in between. Little arithmetic per element: it is bound by memory.
So each case is compared with the least traffic it needs, timed in the same process at the same shape
(``floor_s``: the fastest of the run, measured before and after every case and settled at the end):
forward, ``y.copy_(x)`` (one read, one write); forward+backward, that copy plus ``torch.add(x, g, out=dx)``
(two reads, one write). ``fraction_of_floor`` = floor_s / time: 1.0 would mean the
statistics and the normalisation came free.

The ladder (in this order in the report):

- ``lesson BatchNorm``: nb_07's module: ``x.mean``/``x.var`` over (0, 2, 3) under ``no_grad``, the running
  buffers moved by ``lerp_``, then ``(x - m) / (v + eps).sqrt() * mults + adds``: five passes over the
  activation forward, each a tensor as large (``minilib.norm.BatchNorm``);
- ``F.batch_norm``: PyTorch's native kernel;
- ``fused_batch_norm``: ``minilib.kernels.fused_batch_norm`` (its C++ kernel on the CPU in float32: one
  sweep per channel for the statistics, one for the output, the channel still in cache).

Shapes: every BatchNorm of lesson 07's CNN (``nfs=[8,16,32,64,64]``, bs 512, 28x28 MNIST, each conv stride
2): (512, 8, 14, 14), (512, 16, 7, 7), (512, 32, 4, 4), (512, 64, 2, 2), (512, 64, 1, 1); and a larger
activation, (256, 64, 28, 28), 49 MiB, well beyond the caches.

Checked before timing, in float64: F.batch_norm and the fused kernel against ``F.batch_norm`` in training
mode (output; forward+backward also the input, weight and bias gradients). The lesson's module normalises
with the unbiased variance and takes its statistics under ``no_grad`` (its backward treats them as
constants), so it is checked against ``F.batch_norm`` in eval mode given the batch's own mean and unbiased
variance as the running statistics: the same function, with the same gradient.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from benchmarks import harness
from minilib.kernels import fused_batch_norm
from minilib.norm import BatchNorm as LessonBatchNorm

EPS, MOMENTUM = 1e-5, 0.1
LAYERS = {
    "conv1": (512, 8, 14, 14),
    "conv2": (512, 16, 7, 7),
    "conv3": (512, 32, 4, 4),
    "conv4": (512, 64, 2, 2),
    "conv5": (512, 64, 1, 1),
    "256x64x28x28": (256, 64, 28, 28),
}
# (layer, shape) per set: the tiny set keeps each kind of case, at sizes that cost nothing.
CASES = {
    "tiny": (("conv1", (4, 8, 14, 14)), ("conv5", (4, 64, 1, 1))),
    "quick": tuple((k, LAYERS[k]) for k in ("conv1", "conv5", "256x64x28x28")),
    "full": tuple(LAYERS.items()),
}
KERNELS = ("lesson BatchNorm", "F.batch_norm", "fused_batch_norm")
MODES = ("fwd", "fwd+bwd")


@dataclass
class Problem:
    layer: str
    shape: tuple[int, ...]
    x: torch.Tensor
    g: torch.Tensor  # the output's gradient, for forward+backward
    weight: torch.Tensor
    bias: torch.Tensor
    floor_s: dict[str, float] = field(default_factory=dict)  # per mode: the copy (+ add) floor, fastest yet
    refs: dict[str, tuple[torch.Tensor, ...]] = field(default_factory=dict)  # by reference kind, lazily


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "bn_problem" not in metafunc.fixturenames:
        return
    cases = CASES[harness.bench_set(metafunc.config)]
    ids = []
    for layer, shape in cases:
        size = "x".join(map(str, shape))
        ids.append(layer if layer == size else f"{layer}-{size}")
    params = [pytest.param(c, id=i) for c, i in zip(cases, ids, strict=True)]
    metafunc.parametrize("bn_problem", params, indirect=True, scope="module")
    metafunc.parametrize("mode", MODES)
    metafunc.parametrize("kernel", KERNELS)


# How long each floor is measured for, at least: a floor timed in one busy moment of a shared machine comes
# out slow and flatters every kernel judged against it, so it is measured again after every case, keeping
# the fastest (a floor can only get faster).
FLOOR_SECONDS = {"tiny": 0.0, "quick": 0.2, "full": 0.5}


def measure_floor(p: Problem, seconds: float) -> None:
    """The least traffic of a BatchNorm, timed into existing tensors: ``y.copy_(x)`` forward; plus
    ``torch.add(x, g, out=dx)`` (the backward's two reads and one write) for forward+backward. Each the
    fastest of at least 5 calls over at least `seconds`; `p.floor_s` keeps the fastest seen so far."""
    y, dx = torch.empty_like(p.x), torch.empty_like(p.x)
    copy = harness.best_of(lambda: y.copy_(p.x), "cpu", 5, seconds)
    add = harness.best_of(lambda: torch.add(p.x, p.g, out=dx), "cpu", 5, seconds)
    for mode, now in (("fwd", copy), ("fwd+bwd", copy + add)):
        p.floor_s[mode] = min(p.floor_s.get(mode, now), now)


@pytest.fixture(scope="module")
def bn_problem(request: pytest.FixtureRequest):
    layer, shape = request.param
    gen = torch.Generator().manual_seed(sum(shape))
    c = shape[1]
    x = torch.randn(shape, generator=gen) * 2 + 0.5  # a mean and a scale for the norm to remove
    g = torch.randn(shape, generator=gen)
    weight = 1 + 0.1 * torch.randn(c, generator=gen)
    bias = 0.1 * torch.randn(c, generator=gen)
    problem = Problem(layer, shape, x, g, weight, bias)
    measure_floor(problem, FLOOR_SECONDS[harness.bench_set(request.config)])
    yield problem


def reference(p: Problem, kind: str) -> tuple[torch.Tensor, ...]:
    """Float64 output and input, weight and bias gradients (stored as float32), of F.batch_norm in training
    mode (``kind="train"``), or in eval mode given the batch's own mean and unbiased variance (``"lesson"``:
    nb_07's BatchNorm, whose gradient treats its statistics as constants)."""
    if kind not in p.refs:
        x64 = p.x.double().requires_grad_()
        w64, b64 = p.weight.double().requires_grad_(), p.bias.double().requires_grad_()
        if kind == "train":
            y = F.batch_norm(x64, None, None, w64, b64, training=True, eps=EPS)
        else:
            dims = (0, *range(2, p.x.dim()))
            with torch.no_grad():
                mean, var = x64.mean(dims), x64.var(dims)
            y = F.batch_norm(x64, mean, var, w64, b64, training=False, eps=EPS)
        y.backward(p.g.double())
        p.refs[kind] = tuple(t.detach().float() for t in (y, x64.grad, w64.grad, b64.grad))
    return p.refs[kind]


def make_kernel(name: str, p: Problem) -> tuple[Callable[[torch.Tensor], torch.Tensor], list[torch.Tensor]]:
    """(norm(x) in training mode with running buffers of its own, [weight, bias]: leaves needing a grad)."""
    c = p.shape[1]
    if name == "lesson BatchNorm":
        bn = LessonBatchNorm(c, mom=MOMENTUM, eps=EPS).train()
        with torch.no_grad():
            bn.mults.copy_(p.weight.view(c, 1, 1))
            bn.adds.copy_(p.bias.view(c, 1, 1))
        return bn, [bn.mults, bn.adds]
    fn = F.batch_norm if name == "F.batch_norm" else fused_batch_norm
    weight, bias = p.weight.clone().requires_grad_(), p.bias.clone().requires_grad_()
    running_mean, running_var = torch.zeros(c), torch.ones(c)

    def norm(x: torch.Tensor) -> torch.Tensor:
        return fn(x, running_mean, running_var, weight, bias, training=True, momentum=MOMENTUM, eps=EPS)

    return norm, [weight, bias]


def test_batch_norm(
    benchmark: Any, request, limits_for, sizes, bn_problem: Problem, mode: str, kernel: str
) -> None:
    """One BatchNorm of the ladder, training forward or forward+backward, checked against float64
    F.batch_norm, then timed with its read+write floor beside it."""
    p = bn_problem
    shape = "x".join(map(str, p.shape))
    benchmark.group = f"batch norm {mode} {shape} cpu float32"
    limits = limits_for("cpu")
    norm, params = make_kernel(kernel, p)
    if mode == "fwd":

        def step():
            return (norm(p.x),)  # a training forward: the parameters need a gradient, so a graph is kept

    else:
        x = p.x.detach().requires_grad_()  # a leaf of its own on the problem's storage

        def step():
            x.grad = None
            for t in params:
                t.grad = None
            y = norm(x)
            y.backward(p.g)
            return y.detach(), x.grad, params[0].grad.view(-1), params[1].grad.view(-1)

    step()  # warm-up: the first use builds a C++ kernel
    out, first_s, peak, how = harness.call_with_peak_memory(step, "cpu")
    want = reference(p, "lesson" if kernel == "lesson BatchNorm" else "train")
    rtol, atol = harness.TOLERANCES["float32"]
    max_diff = 0.0
    for name, got, ref in zip(("output", "input grad", "weight grad", "bias grad"), out, want, strict=False):
        # Gradients (weight and bias: sums over the batch) are compared at the scale of their largest entry.
        scale = 1.0 if name == "output" else max(ref.abs().max().item(), 1e-30)
        what = f"{kernel} {mode} {shape}: {name}"
        max_diff = max(max_diff, harness.check_close(what, got / scale, ref / scale, rtol, atol))
    del out
    harness.time_kernel(benchmark, step, first_s, sizes, "cpu")
    measure_floor(p, FLOOR_SECONDS[harness.bench_set(request.config)] / 4)
    numel = p.x.numel()
    harness.record(
        benchmark,
        limits,
        dtype="float32",
        flops=None,
        # The floor's traffic: read x, write y; backward, read x and g, write dx (4 bytes each).
        bytes_moved=(2 if mode == "fwd" else 5) * numel * 4,
        first_call_s=first_s,
        peak_mem=peak,
        peak_mem_method=how,
        op="batch_norm",
        case=mode,
        kernel=kernel,
        layer=p.layer,
        shape=str(p.shape),
        numel=numel,
        input_bytes=numel * 4,
        implementation="minilib.norm.BatchNorm" if kernel == "lesson BatchNorm" else kernel,
        checked_against="float64 F.batch_norm "
        + (
            "in eval mode with the batch's statistics" if kernel == "lesson BatchNorm" else "in training mode"
        ),
        rtol=rtol,
        atol=atol,
        max_abs_diff=max_diff,
        floor="y.copy_(x) (+ torch.add(x, g, out=dx) for fwd+bwd), fastest seen in this process",
        floor_s=p.floor_s[mode],
        floor_key=f"batch norm {mode} {shape}",  # settled to the fastest at the end (harness.settle_floors)
    )
    benchmark.extra_info["fraction_of_floor"] = p.floor_s[mode] / benchmark.extra_info["seconds"]


# --- The goals, side by side: `python -m benchmarks.bench_batch_norm [--repeats 15] [--threads N]` -------
# pytest-benchmark times one case after another; on a shared machine the load changes in between. Here
# every function of one shape runs once per round, in turn (round robin), and each ratio is taken within
# a round before the median over rounds, so a busy moment slows both sides of a ratio alike.


def _round_robin(fns: dict[str, Callable[[], Any]], repeats: int) -> dict[str, list[float]]:
    import time

    for fn in fns.values():
        fn()  # warm-up (the first call builds the C++ kernel)
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - start)
    return times


#: The ratios the goals are stated in (issue: fused <= 1.5x its floors, >= 4x faster than F.batch_norm).
RATIOS = {
    ("fused_batch_norm fwd", "copy"): "(goal <= 1.5)",
    ("fused_batch_norm fwd+bwd", "copy+add"): "(goal <= 1.5)",
    ("F.batch_norm fwd+bwd", "fused_batch_norm fwd+bwd"): "(goal >= 4)",
    ("F.batch_norm fwd", "fused_batch_norm fwd"): "",
    ("lesson BatchNorm fwd", "fused_batch_norm fwd"): "",
    ("lesson BatchNorm fwd+bwd", "fused_batch_norm fwd+bwd"): "",
}


def goals(shape: tuple[int, ...], repeats: int) -> None:
    import statistics

    gen = torch.Generator().manual_seed(sum(shape))
    x, g = torch.randn(shape, generator=gen) * 2 + 0.5, torch.randn(shape, generator=gen)
    weight, bias = 1 + 0.1 * torch.randn(shape[1], generator=gen), 0.1 * torch.randn(shape[1], generator=gen)
    p = Problem("goals", shape, x, g, weight, bias)
    y, dx = torch.empty_like(p.x), torch.empty_like(p.x)
    fns: dict[str, Callable[[], Any]] = {
        "copy": lambda: y.copy_(p.x),
        "copy+add": lambda: (y.copy_(p.x), torch.add(p.x, p.g, out=dx)),
    }
    for kernel in KERNELS:
        norm, params = make_kernel(kernel, p)
        x = p.x.detach().requires_grad_()

        def fwd(norm=norm):
            with torch.no_grad():
                return norm(p.x)

        def fwd_bwd(norm=norm, params=params, x=x):
            x.grad = None
            for t in params:
                t.grad = None
            norm(x).backward(p.g)
            return x.grad

        # Checked before it is timed: the output against float64 F.batch_norm (the lesson's: in eval mode
        # with the batch's own statistics, its definition), and the input's gradient at its scale.
        want = reference(p, "lesson" if kernel == "lesson BatchNorm" else "train")
        harness.check_close(f"{kernel} output", fwd(), want[0], *harness.TOLERANCES["float32"])
        scale = want[1].abs().max().item()
        harness.check_close(f"{kernel} input grad", fwd_bwd() / scale, want[1] / scale, 1e-3, 1e-4)
        fns[f"{kernel} fwd"], fns[f"{kernel} fwd+bwd"] = fwd, fwd_bwd
    t = _round_robin(fns, repeats)

    def ratio(a: str, b: str) -> float:
        return statistics.median(x / y for x, y in zip(t[a], t[b], strict=True))

    print(f"\nBatchNorm in training, {shape} float32, {torch.get_num_threads()} threads, {repeats} rounds")
    print("  (medians; each ratio within a round, then the median over rounds)")
    for k in fns:
        print(f"  {k:28s} {statistics.median(t[k]) * 1e3:8.2f} ms")
    for (a, b), goal in RATIOS.items():
        print(f"  {a + ' / ' + b:48s} {ratio(a, b):6.2f}x  {goal}")


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_batch_norm", description=__doc__)
    parser.add_argument("--repeats", type=int, default=15, help="rounds of the round robin (default 15)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--layers", action="store_true", help="also lesson 07's layer shapes at bs 512")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    goals(LAYERS["256x64x28x28"], args.repeats)
    if args.layers:
        for layer in ("conv1", "conv2", "conv3", "conv4", "conv5"):
            goals(LAYERS[layer], args.repeats)


if __name__ == "__main__":
    main()
