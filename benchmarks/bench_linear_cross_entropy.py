"""Lessons 01 and 03 together, timed: a language model's last layer and its loss, without the logits.

``F.cross_entropy(x @ W.T, y)`` writes [N, V] logits (lesson 01's matmul) only for the loss (lesson 03) to
read them; at (N, H, V) = (4096, 256, 32000) float32 that is 500 MiB, and its gradient as much again.
``minilib.kernels.fused_linear_cross_entropy`` runs chunks of rows through the matmul into one reused
buffer, turns the chunk into its gradient in place and does the chunk's two gradient matmuls, so a
training step costs its three matmuls (``x @ W.T``, ``dlogits @ W``, ``dlogits.T @ x``) and nearly nothing
else. The floor recorded with every case is the time of those three matmuls alone (torch, same shapes,
measured side by side in the same process); ``fraction_of_floor`` is that floor over the case's time
(1.0: the loss was free). Compared with PyTorch's ``F.linear_cross_entropy`` (which holds the logits),
the same with its chunking options (``nn.LinearCrossEntropyOptions()``), and ``torch.compile`` of the
two-step version (full set only: compiling takes a while). Each case's loss and input/weight gradients
are checked against float64 PyTorch before it is timed; the peak memory of one forward+backward is
recorded next to the logits' size.

Run ``python -m benchmarks.bench_linear_cross_entropy`` for the issue's two goals measured side by side,
round-robin in one process (fused cross-entropy against x.sum() + g.fill_(); the fused linear
cross-entropy against its three matmuls), which is less sensitive to a busy machine than separate cases.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from benchmarks import harness
from minilib.kernels import fused_linear_cross_entropy

# (N, H, V) per set; the quick set keeps one linear case, the full set the shape.
SIZES = {
    "tiny": {"cpu": ((64, 16, 100),), "cuda": ((64, 16, 1000),)},
    "quick": {"cpu": ((2048, 256, 32_000),), "cuda": ((4096, 2048, 128_256),)},
    "full": {"cpu": ((4096, 256, 32_000),), "cuda": ((8192, 4096, 128_256),)},
}
DEVICE_DTYPE = {"cpu": "float32", "cuda": "bf16"}


def _two_step(x: torch.Tensor, w: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(F.linear(x, w), y)


_compiled: dict[str, Callable] = {}


def _torch_compile(x: torch.Tensor, w: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if "fn" not in _compiled:
        _compiled["fn"] = torch.compile(_two_step)
    return _compiled["fn"](x, w, y)


KERNELS: dict[str, Callable[..., torch.Tensor] | None] = {
    "fused_linear_cross_entropy": fused_linear_cross_entropy,
    "F.linear_cross_entropy": lambda x, w, y: F.linear_cross_entropy(x, w, y),
    "F.linear_cross_entropy chunked": lambda x, w, y: F.linear_cross_entropy(
        x, w, y, options=nn.LinearCrossEntropyOptions()
    ),
    "torch.compile(two-step)": _torch_compile,
}
FULL_ONLY = {"torch.compile(two-step)"}


def three_matmuls(x: torch.Tensor, w: torch.Tensor, dlogits: torch.Tensor) -> Callable[[], Any]:
    """The floor: the three matmuls a forward+backward cannot avoid, at the same shapes, by torch."""

    def run():
        return x @ w.T, dlogits @ w, dlogits.T @ x

    return run


@dataclass
class Problem:
    device: str
    dtype: str
    n: int
    h: int
    v: int
    x: torch.Tensor
    w: torch.Tensor
    y: torch.Tensor
    ref: tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # float64 loss, input grad, weight grad
    floor_s: float


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "lce_problem" not in metafunc.fixturenames:
        return
    set_name = harness.bench_set(metafunc.config)
    problems = [(dev, DEVICE_DTYPE[dev], *shape) for dev in ("cpu", "cuda") for shape in SIZES[set_name][dev]]
    params = [
        pytest.param(p, id="{}-{}-{}x{}x{}".format(*p), marks=[pytest.mark.gpu] if p[0] == "cuda" else [])
        for p in problems
    ]
    metafunc.parametrize("lce_problem", params, indirect=True, scope="module")
    kernels = [k for k in KERNELS if set_name == "full" or k not in FULL_ONLY]
    metafunc.parametrize("kernel", kernels)


def make_inputs(n: int, h: int, v: int, device: str, dtype: torch.dtype, seed: int = 0):
    gen = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(n, h, generator=gen, device=device).to(dtype)
    w = (torch.randn(v, h, generator=gen, device=device) / h**0.5).to(dtype)  # logits of order 1
    y = torch.randint(0, v, (n,), generator=gen, device=device)
    return x, w, y


def best_of(fn: Callable[[], Any], device: str, repeats: int = 3) -> float:
    fn()
    harness.sync(device)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        harness.sync(device)
        best = min(best, time.perf_counter() - start)
    return best


@pytest.fixture(scope="module")
def lce_problem(request: pytest.FixtureRequest):
    device, dtype, n, h, v = request.param
    if device == "cuda":
        request.getfixturevalue("cuda")  # skips without CUDA
    x, w, y = make_inputs(n, h, v, device, harness.DTYPES[dtype])
    x64, w64 = x.double().requires_grad_(), w.double().requires_grad_()
    loss = F.linear_cross_entropy(x64, w64, y)
    loss.backward()
    ref = (loss.detach(), x64.grad.to(x.dtype), w64.grad.to(x.dtype))
    del x64, w64, loss
    dlogits = torch.randn(n, v, device=device, dtype=x.dtype)
    floor_s = best_of(three_matmuls(x, w, dlogits), device)
    del dlogits
    yield Problem(device, dtype, n, h, v, x, w, y, ref, floor_s)


def test_linear_cross_entropy(benchmark: Any, limits_for, sizes, lce_problem: Problem, kernel: str) -> None:
    """One linear cross-entropy, forward+backward, checked against float64 PyTorch, timed with its floor."""
    p = lce_problem
    benchmark.group = f"linear cross-entropy fwd+bwd {p.n}x{p.h}x{p.v} {p.device} {p.dtype}"
    limits = limits_for(p.device)
    loss_fn = KERNELS[kernel]
    x = p.x.detach().requires_grad_()
    w = p.w.detach().requires_grad_()

    def step():
        x.grad = w.grad = None
        loss = loss_fn(x, w, p.y)
        loss.backward()
        return loss.detach(), x.grad, w.grad

    fn = harness.synchronised(step, p.device)
    fn()  # warm-up: the C++/Triton kernel build, torch.compile's compilation
    rtol, atol = harness.TOLERANCES[p.dtype]
    out, first_s, peak, how = harness.call_with_peak_memory(fn, p.device)
    what = f"{kernel} {p.n}x{p.h}x{p.v} {p.dtype}"
    max_diff = harness.check_close(f"{what}: loss", out[0], p.ref[0], rtol, atol)
    for name, got, want in (("input grad", out[1], p.ref[1]), ("weight grad", out[2], p.ref[2])):
        # Gradients of a mean loss are small: compare at the scale of the largest entry.
        scale = max(want.abs().max().item(), 1e-30)
        max_diff = max(
            max_diff, harness.check_close(f"{what}: {name}", got / scale, want / scale, rtol, atol)
        )
    del out
    harness.time_kernel(benchmark, fn, first_s, sizes, p.device)
    itemsize = p.x.element_size()
    logits_bytes = p.n * p.v * itemsize
    harness.record(
        benchmark,
        limits,
        dtype=p.dtype,
        flops=3 * 2 * p.n * p.h * p.v,
        # Inputs read and gradients written; the logits themselves need not touch memory at all.
        bytes_moved=2 * (p.n * p.h + p.v * p.h) * itemsize,
        first_call_s=first_s,
        peak_mem=peak,
        peak_mem_method=how,
        op="linear_cross_entropy",
        case="fwd+bwd",
        kernel=kernel,
        shape=f"{p.n}x{p.h}x{p.v}",
        n=p.n,
        h=p.h,
        c=p.v,
        logits_bytes=logits_bytes,
        peak_mem_over_logits=None if peak is None else peak / logits_bytes,
        floor="x @ W.T, dlogits @ W, dlogits.T @ x by torch at the same shapes (best of 3, same process)",
        floor_s=p.floor_s,
        checked_against="float64 F.linear_cross_entropy (loss, input and weight gradients)",
        rtol=rtol,
        atol=atol,
        max_abs_diff=max_diff,
    )
    extra = benchmark.extra_info
    extra["fraction_of_floor"] = p.floor_s / extra["seconds"]


# ---------------------------------------------------------------------------------------------------------
# The goals, side by side: `python -m benchmarks.bench_linear_cross_entropy [--repeats R]`.


def _round_robin(fns: dict[str, Callable[[], Any]], repeats: int) -> dict[str, list[float]]:
    """Each function once per round, in turn, for `repeats` rounds (after one warm-up round): on a shared
    machine, a busy moment then slows every function of that round instead of one of them."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def _ratios(times: dict[str, list[float]], num: str, den: list[str]) -> tuple[float, float]:
    """(median over rounds of num / sum(den) per round, the same of the best times)."""
    per_round = [times[num][i] / sum(times[d][i] for d in den) for i in range(len(times[num]))]
    return statistics.median(per_round), min(times[num]) / sum(min(times[d]) for d in den)


def _exact_rss_peaks() -> None:
    """Make every allocation of 1 MiB or more its own mapping, returned to the OS when freed (glibc's
    mallopt; elsewhere nothing happens). By default glibc raises that threshold after a large free (to 32
    MiB), so a 31 MiB chunk buffer would reuse heap memory freed earlier and the peak RSS would read 0."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 1 << 20)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass


def _peak_mb(fn: Callable[[], Any]) -> float | None:
    _, _, peak, _ = harness.call_with_peak_memory(fn, "cpu")
    return None if peak is None else peak / 2**20


def goals(repeats: int, ce_shape=(8192, 32_000), lce_shape=(4096, 256, 32_000), compile_: bool = False):
    from minilib.kernels import cpu_backend

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU path: {cpu_backend()}")
    cross_entropy_goals(repeats, *ce_shape)
    linear_goals(repeats, *lce_shape, compile_)


def cross_entropy_goals(repeats: int, n: int, v: int) -> None:
    from minilib.kernels import fused_cross_entropy

    x = torch.randn(n, v)
    y = torch.randint(0, v, (n,))
    g = torch.empty(n, v)

    def step(loss_fn):
        # A leaf of its own per loss (same storage as x): freeing one loss's gradient at the start of its
        # step is that loss's cost, not the next one's in the round.
        xg = x.detach().requires_grad_()

        def run():
            xg.grad = None
            loss_fn(xg, y).backward()

        return run

    t = _round_robin(
        {
            "x.sum()": lambda: x.sum(),
            "g.fill_(1.0)": lambda: g.fill_(1.0),
            "fused fwd": lambda: fused_cross_entropy(x, y),
            "fused fwd+bwd": step(fused_cross_entropy),
            "F.cross_entropy fwd+bwd": step(F.cross_entropy),
        },
        repeats,
    )
    print(f"\nfused_cross_entropy ({n}, {v}) float32, {repeats} rounds (best ms):")
    for k, ts in t.items():
        print(f"  {k:26s} {min(ts) * 1e3:8.1f}")
    med, best = _ratios(t, "fused fwd", ["x.sum()"])
    print(
        f"  forward / x.sum():                          median {med:.2f}x, best-of {best:.2f}x  (goal <= 1.3)"
    )
    med, best = _ratios(t, "fused fwd+bwd", ["x.sum()", "g.fill_(1.0)"])
    print(
        f"  fwd+bwd / (x.sum() + g.fill_(1.0)):         median {med:.2f}x, best-of {best:.2f}x  (goal <= 1.6)"
    )
    med, best = _ratios(t, "F.cross_entropy fwd+bwd", ["x.sum()", "g.fill_(1.0)"])
    print(f"  F.cross_entropy fwd+bwd / the same floor:   median {med:.2f}x, best-of {best:.2f}x")


def linear_goals(repeats: int, n: int, h: int, v: int, compile_: bool) -> None:
    x, w, y = make_inputs(n, h, v, "cpu", torch.float32)
    dlogits = torch.randn(n, v)

    def step(loss_fn):
        xg, wg = x.detach().requires_grad_(), w.detach().requires_grad_()  # a leaf pair per loss

        def run():
            xg.grad = wg.grad = None
            loss_fn(xg, wg, y).backward()

        return run

    kernels = {k: fn for k, fn in KERNELS.items() if fn is not None and (compile_ or k not in FULL_ONLY)}
    fns = {"three matmuls": three_matmuls(x, w, dlogits)} | {k: step(fn) for k, fn in kernels.items()}
    t = _round_robin(fns, repeats)
    del dlogits
    logits_mb = n * v * 4 / 2**20
    returned_mb = (n * h + v * h) * 4 / 2**20  # the input's and weight's gradients: results, not overhead
    print(f"\nlinear cross-entropy fwd+bwd ({n}, {h}, {v}) float32, {repeats} rounds;", end=" ")
    print(f"logits {logits_mb:.0f} MiB:")
    for k in fns:
        line = f"  {k:34s} best {min(t[k]) * 1e3:8.1f} ms"
        if k != "three matmuls":
            med, best = _ratios(t, k, ["three matmuls"])
            peak = _peak_mb(step(kernels[k]))
            peak = None if peak is None else max(0.0, peak - returned_mb)
            line += f"   / three matmuls: median {med:.2f}x, best-of {best:.2f}x"
            line += (
                f"   peak extra beyond the gradients {peak:.0f} MiB ({peak / logits_mb:.2f} of the logits)"
                if peak is not None
                else ""
            )
        print(line)
    print("  goals: fused_linear_cross_entropy <= 1.15x the three matmuls, peak extra <= 0.125 of the logits")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_linear_cross_entropy", description=__doc__
    )
    parser.add_argument("--repeats", type=int, default=5, help="rounds of the round robin (default 5)")
    parser.add_argument(
        "--compile", action="store_true", help="also time torch.compile of the two-step version"
    )
    parser.add_argument("--small", action="store_true", help="a quarter of the sizes (a quick look)")
    args = parser.parse_args(argv)
    _exact_rss_peaks()
    if args.small:
        goals(args.repeats, (2048, 32_000), (1024, 256, 32_000), args.compile)
    else:
        goals(args.repeats, compile_=args.compile)


if __name__ == "__main__":
    main()
