"""Lesson 01 (01_matmul), timed: each matmul moves more of the work from Python into C.

The lesson multiplies five validation images (5x784) by a 784x10 weight matrix four ways, then with
PyTorch's ``@``, and times each: 835 ms, 1.39 ms, 254 us, 57.2 us, 18.2 us. `test_matmul_ladder` repeats that
ladder (minilib.matmul.MATMULS, in lesson order) so the report can show each step's speed-up next to the
lesson's; `test_matmul_wide` does the whole 50,000-image training set (all but the triple loop, which would
take minutes); `test_matmul_square` times square matmuls, where a BLAS (or Triton) kernel can approach the
machine's peak FLOP/s. On CUDA the same cases run in float32, TF32 and bf16.

Inputs are uniform in [0, 1) (like the lesson's pixels): with no cancellation, every output element can be
held to the lesson's relative tolerance against the float64 reference, which each kernel meets before it is
timed.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from benchmarks import harness
from minilib.kernels import triton_available, triton_matmul
from minilib.matmul import MATMULS

GPU_DTYPES = ("float32", "tf32", "bf16")


def _id(device: str, dtype: str, m: int, k: int, n: int, kernel: str) -> str:
    return f"{device}-{dtype}-{m}x{k}@{k}x{n}-{kernel}"


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    s = harness.sizes(harness.bench_set(metafunc.config))
    name = metafunc.function.__name__
    cases: list[tuple[str, str, int, int, int, str]] = []
    if name == "test_matmul_ladder":
        m, k, n = s["ladder"]
        cases += [("cpu", "float32", m, k, n, kern) for kern in MATMULS]
        # On a GPU the triple loop would be ~40,000 tiny kernel launches per call: left out.
        cases += [("cuda", "float32", m, k, n, kern) for kern in MATMULS if kern != "loops"]
    elif name == "test_matmul_wide":
        m, k, n = s["wide"]
        cases += [("cpu", "float32", m, k, n, kern) for kern in s["wide_kernels"]]
        cases += [("cuda", dt, m, k, n, kern) for dt in GPU_DTYPES for kern in ("einsum", "torch")]
    elif name == "test_matmul_square":
        cases += [("cpu", "float32", sz, sz, sz, "torch") for sz in s["square_cpu"]]
        for dt in GPU_DTYPES:
            cases += [("cuda", dt, sz, sz, sz, "torch") for sz in s["square_gpu"]]
        # minilib's Triton matmul follows torch.backends.cuda.matmul.allow_tf32 for float32, as torch does.
        for dt in GPU_DTYPES:
            cases += [("cuda", dt, sz, sz, sz, "triton") for sz in s["square_gpu"]]
    else:
        return
    params = [pytest.param(*c, id=_id(*c), marks=[pytest.mark.gpu] if c[0] == "cuda" else []) for c in cases]
    metafunc.parametrize("device,dtype,m,k,n,kernel", params)


def _kernel(name: str):
    if name == "triton":
        if not triton_available():  # minilib.kernels imports without Triton; triton_matmul would raise
            pytest.skip(
                "Triton is not installed (pip install 'minilib[triton]'), so triton_matmul cannot run"
            )
        return triton_matmul
    return MATMULS[name]


def _bench_matmul(benchmark: Any, limits_for, sizes, device, dtype, m, k, n, kernel, group: str) -> None:
    benchmark.group = f"{group} {m}x{k}@{k}x{n} {device} {dtype}"
    limits = limits_for(device)  # skips a CUDA case without CUDA, before any tensor is made
    matmul = _kernel(kernel)
    torch_dtype = harness.DTYPES[dtype]
    a = torch.rand(m, k, device=device, dtype=torch_dtype)
    b = torch.rand(k, n, device=device, dtype=torch_dtype)
    want = a.double() @ b.double()
    rtol, atol = harness.TOLERANCES[dtype]
    with harness.allow_tf32(dtype == "tf32"):
        fn = harness.synchronised(lambda: matmul(a, b), device)
        got, first_s, peak, how = harness.call_with_peak_memory(fn, device)
        max_diff = harness.check_close(f"matmul {kernel} {m}x{k}@{k}x{n} {dtype}", got, want, rtol, atol)
        del got, want
        harness.time_kernel(benchmark, fn, first_s, sizes, device)
    harness.record(
        benchmark,
        limits,
        dtype=dtype,
        flops=2 * m * k * n,
        # The floor's traffic: each operand read once, the result written once.
        bytes_moved=(m * k + k * n + m * n) * a.element_size(),
        first_call_s=first_s,
        peak_mem=peak,
        peak_mem_method=how,
        op="matmul",
        case=group,
        kernel=kernel,
        shape=f"{m}x{k}@{k}x{n}",
        m=m,
        k=k,
        n=n,
        checked_against="float64 torch.matmul",
        rtol=rtol,
        atol=atol,
        max_abs_diff=max_diff,
    )


def test_matmul_ladder(benchmark, limits_for, sizes, device, dtype, m, k, n, kernel):
    """The lesson's ladder, 5x784 @ 784x10: each step's time, to set beside the lesson's published times."""
    _bench_matmul(benchmark, limits_for, sizes, device, dtype, m, k, n, kernel, "ladder")


def test_matmul_wide(benchmark, limits_for, sizes, device, dtype, m, k, n, kernel):
    """The whole training set through the 784x10 layer: Python's per-row overhead is now paid 50,000 times."""
    _bench_matmul(benchmark, limits_for, sizes, device, dtype, m, k, n, kernel, "wide")


def test_matmul_square(benchmark, limits_for, sizes, device, dtype, m, k, n, kernel):
    """Square matmuls: enough work per byte that a tuned kernel can approach the measured peak FLOP/s."""
    _bench_matmul(benchmark, limits_for, sizes, device, dtype, m, k, n, kernel, "square")
