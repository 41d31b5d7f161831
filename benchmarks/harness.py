"""What every benchmark shares: the case sets, the machine's measured limits, check-then-time, the roofline.

Every benchmark follows one recipe:

1. build the inputs and the float64 reference;
2. call the kernel once, untimed (`call_with_peak_memory`), recording the peak memory of that call, and
   check its output against the reference (`check_close`): a wrong kernel is never timed;
3. time it with pytest-benchmark (`time_kernel`): calibrated rounds for fast kernels, a few pedantic rounds
   for slow ones; CUDA work is synchronised inside the timed function, so a round ends when the GPU is done;
4. record in ``extra_info`` (`record`) what a reader needs to judge the number: shape, dtype, device,
   flops and bytes, GFLOP/s and GB/s, the limit compared with, and ``fraction_of_limit``: the roofline
   floor ``max(flops / peak, bytes / bandwidth)`` divided by the measured (minimum) time;
5. at the end of the run (`settle_limits`), each limit becomes the larger of its measured value and the
   best any case reached, and every case is judged again against it: no case can beat its limit.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

from minilib import testing
from minilib.testing import test_close

SETS = ("tiny", "quick", "full")

# Sizes per set. "tiny" is what `pytest --benchmark-disable` (nox -s tests) runs: every case once, in seconds.
# "quick" must finish in well under 3 minutes on a shared 2-core machine; "full" is the documented set.
SIZES: dict[str, dict[str, Any]] = {
    "tiny": {
        "ladder": (3, 16, 4),
        "wide": (64, 16, 4),
        "wide_kernels": ("elementwise", "broadcast", "einsum", "torch"),
        "square_cpu": (32, 64),
        "square_gpu": (64,),
        "ce_cpu": ((64, 10), (32, 100)),
        "ce_gpu": ((64, 1000),),
        "limit_sgemm": 128,
        "limit_sgemm_gpu": 256,
        "limit_stream_mib": 4,
        "limit_seconds": 0.0,
        "budget_s": 0.0,
        "min_slow_rounds": 1,
    },
    "quick": {
        "ladder": (5, 784, 10),
        "wide": (50_000, 784, 10),
        "wide_kernels": ("einsum", "torch"),
        "square_cpu": (256, 1024),
        "square_gpu": (1024, 4096),
        "ce_cpu": ((50_000, 10), (1024, 32_000)),
        "ce_gpu": ((8192, 128_256),),
        "limit_sgemm": 2048,
        "limit_sgemm_gpu": 8192,
        "limit_stream_mib": 256,
        "limit_seconds": 1.5,
        "budget_s": 1.0,
        "min_slow_rounds": 1,
    },
    "full": {
        "ladder": (5, 784, 10),
        "wide": (50_000, 784, 10),
        "wide_kernels": ("elementwise", "broadcast", "einsum", "torch"),
        "square_cpu": (128, 256, 512, 1024, 2048),
        "square_gpu": (1024, 2048, 4096, 8192),
        "ce_cpu": ((50_000, 10), (4096, 32_000), (8192, 32_000)),
        "ce_gpu": ((8192, 32_000), (8192, 128_256)),
        "limit_sgemm": 2048,
        "limit_sgemm_gpu": 8192,
        "limit_stream_mib": 512,
        "limit_seconds": 3.0,
        "budget_s": 3.0,
        "min_slow_rounds": 2,
    },
}

# A kernel whose first (checking) call takes longer than this is timed in pedantic mode with a few rounds;
# faster ones go through pytest-benchmark's calibration, which repeats sub-millisecond kernels per round.
SLOW_CALL_S = 0.02

DTYPES = {"float32": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16, "float64": torch.float64}

# The lesson's tolerance (minilib.testing's `near`) for float32; reduced-precision formats round their
# inputs (tf32 keeps 10 mantissa bits, bf16 keeps 7), so their checks are looser by that much.
TOLERANCES = {"float32": (testing.RTOL, testing.ATOL), "tf32": (5e-3, testing.ATOL), "bf16": (2e-2, 1e-3)}


def bench_set(config: Any) -> str:
    """The set a pytest run asked for (--bench-set); default: tiny under --benchmark-disable, else full."""
    chosen = config.getoption("bench_set", None)
    if chosen:
        return chosen
    return "tiny" if config.getoption("benchmark_disable", False) else "full"


def sizes(set_name: str) -> dict[str, Any]:
    return SIZES[set_name]


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def synchronised(fn: Callable[[], Any], device: str) -> Callable[[], Any]:
    """`fn`, but on CUDA it returns only once the GPU has finished, so a timer around it times the kernel."""
    if not device.startswith("cuda"):
        return fn

    def run() -> Any:
        out = fn()
        torch.cuda.synchronize()
        return out

    return run


# ---------------------------------------------------------------------------------------------------------
# Limits, measured at the start of a run (never assumed from a datasheet).


def best_of(fn: Callable[[], Any], device: str, repeats: int, min_seconds: float = 0.0) -> float:
    """Fastest of at least `repeats` calls, going on until `min_seconds` have passed.

    On a shared machine a limit measured in one busy moment comes out low (a 2-thread BLAS call waits
    for a busy core); repeating for a while gives it a chance to see the machine as it can be.
    """
    fn()  # warm-up: first-touch page faults, BLAS thread start, CUDA context and kernel selection
    sync(device)
    best, n, begin = math.inf, 0, time.perf_counter()
    while n < repeats or time.perf_counter() - begin < min_seconds:
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - start)
        n += 1
    return best


def measure_cpu_limits(set_name: str) -> dict[str, Any]:
    """Peak float32 FLOP/s (a square sgemm) and read bandwidth (`x.sum()` over an array beyond the caches)."""
    s = SIZES[set_name]
    n, seconds = s["limit_sgemm"], s["limit_seconds"]
    a, b = torch.rand(n, n), torch.rand(n, n)
    t_mm = best_of(lambda a=a, b=b: torch.mm(a, b), "cpu", 5, seconds)
    del a, b
    numel = s["limit_stream_mib"] * 2**20 // 4
    x = torch.rand(numel)
    t_sum = best_of(lambda x=x: x.sum(), "cpu", 10, seconds)
    del x
    return {
        "device": "cpu",
        "peak_gflops": {"float32": 2 * n**3 / t_mm / 1e9},
        "bandwidth_gbps": numel * 4 / t_sum / 1e9,
        "method": {
            "peak_gflops": f"torch.mm of two {n}x{n} float32 matrices, fastest of >= 5 calls "
            f"over >= {seconds} s",
            "bandwidth_gbps": f"x.sum() over {numel * 4 // 2**20} MiB of float32, fastest of >= 10 calls "
            f"over >= {seconds} s (bytes read)",
        },
        "threads": torch.get_num_threads(),
    }


def measure_gpu_limits(set_name: str) -> dict[str, Any]:
    """Copy bandwidth (read + write of a large tensor) and matmul peaks for bf16, tf32 and float32."""
    s = SIZES[set_name]
    dev = "cuda"
    n = s["limit_sgemm_gpu"]
    peaks, methods = {}, {}
    for label in ("bf16", "tf32", "float32"):
        a = torch.rand(n, n, device=dev, dtype=DTYPES[label])
        b = torch.rand(n, n, device=dev, dtype=DTYPES[label])
        with allow_tf32(label == "tf32"):
            t = best_of(lambda a=a, b=b: torch.mm(a, b), dev, 5)
        peaks[label] = 2 * n**3 / t / 1e9
        del a, b
    methods["peak_gflops"] = f"torch.mm of two {n}x{n} matrices per dtype, best of 5 (synchronised)"
    numel = s["limit_stream_mib"] * 4 * 2**20 // 4  # 4x the CPU size: GPU caches are large
    x = torch.rand(numel, device=dev)
    y = torch.empty_like(x)
    t_copy = best_of(lambda x=x, y=y: y.copy_(x), dev, 10)
    del x, y
    methods["bandwidth_gbps"] = (
        f"y.copy_(x) of {numel * 4 // 2**20} MiB float32, best of 10 (bytes read + written)"
    )
    return {
        "device": "cuda",
        "name": torch.cuda.get_device_name(0),
        "peak_gflops": peaks,
        "bandwidth_gbps": 2 * numel * 4 / t_copy / 1e9,
        "method": methods,
    }


@contextmanager
def allow_tf32(enabled: bool) -> Iterator[None]:
    """Let CUDA matmuls use TensorFloat-32 inside the block (PyTorch's default is off for matmul)."""
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


# ---------------------------------------------------------------------------------------------------------
# Peak memory of one call.

CPU_PEAK_METHOD = (
    "rise of the process's resident-set high-water mark (VmHWM, reset through /proc/self/clear_refs) "
    "over its resident set before the call; memory the allocator kept from earlier calls is not counted, "
    "so small cases can read low"
)
GPU_PEAK_METHOD = (
    "torch.cuda.max_memory_allocated() after reset_peak_memory_stats(), minus memory allocated before"
)


def _proc_status_kib(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            m = re.search(rf"^{key}:\s+(\d+) kB", f.read(), re.M)
    except OSError:
        return None
    return int(m.group(1)) if m else None


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # "5" resets the peak RSS to the current RSS (Linux >= 4.0)
    except OSError:
        return False
    return True


def call_with_peak_memory(fn: Callable[[], Any], device: str) -> tuple[Any, float, int | None, str]:
    """Call `fn` once; return (result, seconds, peak extra bytes or None, how the peak was measured)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        start = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        return out, seconds, torch.cuda.max_memory_allocated() - before, GPU_PEAK_METHOD
    rss = _proc_status_kib("VmRSS")
    ok = rss is not None and _reset_hwm()
    start = time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - start
    hwm = _proc_status_kib("VmHWM") if ok else None
    if rss is None or hwm is None:
        return out, seconds, None, "not measured (no /proc/self/clear_refs)"
    return out, seconds, max(hwm - rss, 0) * 1024, CPU_PEAK_METHOD


# ---------------------------------------------------------------------------------------------------------
# Checks.


def check_close(
    what: str, got: torch.Tensor, want: torch.Tensor, rtol: float, atol: float, scale: float = 1.0
) -> float:
    """minilib.testing's `test_close` on ``got * scale`` against `want`, compared in float64.

    Returns the largest absolute difference. Works through the tensors in chunks, so that checking a
    gigabyte of logits' gradient does not need four more gigabytes of float64 temporaries; a failure
    says which chunk, then test_close's own message.
    """
    if got.shape != want.shape:
        raise AssertionError(f"{what}: shape {tuple(got.shape)} but the reference has {tuple(want.shape)}")
    g_all, w_all = got.detach().reshape(-1), want.detach().reshape(-1)
    chunk = 1 << 22
    max_diff = 0.0
    for start in range(0, g_all.numel(), chunk):
        g = g_all[start : start + chunk].double() * scale
        w = w_all[start : start + chunk].double()
        try:
            test_close(g, w, rtol=rtol, atol=atol)
        except AssertionError as e:
            end = start + g.numel() - 1
            raise AssertionError(
                f"{what}: flat elements {start}..{end} differ from the reference: {e}"
            ) from None
        max_diff = max(max_diff, (g - w).abs().max().item())
    return max_diff


# ---------------------------------------------------------------------------------------------------------
# Timing and the roofline record.


def time_kernel(
    benchmark: Any, fn: Callable[[], Any], first_call_s: float, sizes: dict[str, Any], device: str
) -> None:
    """Time `fn` with pytest-benchmark: calibrated for fast kernels, a few pedantic rounds for slow ones.

    `first_call_s` is the checking call's time. On CUDA that call may have included compiling and autotuning
    a Triton kernel, so one more (cheap) call decides; CPU kernels are warmed up before their checking call.
    """
    if first_call_s >= SLOW_CALL_S and device.startswith("cuda"):
        start = time.perf_counter()
        fn()
        first_call_s = time.perf_counter() - start
    if first_call_s < SLOW_CALL_S:
        benchmark(fn)  # calibration repeats sub-millisecond kernels enough per round
        return
    rounds = int(sizes["budget_s"] / first_call_s) if first_call_s > 0 else 1
    rounds = max(1 if first_call_s > 3.0 else sizes["min_slow_rounds"], min(rounds, 10))
    # The checking call warmed caches and the allocator; a warm-up round would double the cost of slow cases.
    benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=0)


def record(
    benchmark: Any,
    limits: dict[str, Any],
    *,
    dtype: str,
    flops: float | None,
    bytes_moved: float,
    first_call_s: float,
    peak_mem: int | None,
    peak_mem_method: str,
    **info: Any,
) -> None:
    """Fill `benchmark.extra_info` with the case, its throughput and its fraction of the roofline floor."""
    stats = getattr(benchmark, "stats", None)
    if benchmark.enabled and stats:
        seconds, timing = stats.stats.min, f"min of {stats.stats.rounds} rounds"
    else:
        seconds, timing = first_call_s, "one untimed call (benchmarks disabled)"
    extra = benchmark.extra_info
    extra.update(info)
    extra.update(
        dtype=dtype,
        device=limits["device"],
        flops=flops,
        bytes=bytes_moved,
        seconds=seconds,
        timing=timing,
        gflops=flops / seconds / 1e9 if flops else None,
        gbps=bytes_moved / seconds / 1e9,
        peak_mem_bytes=peak_mem,
        peak_mem_method=peak_mem_method,
    )
    judge(extra, limits["peak_gflops"].get(dtype), limits["bandwidth_gbps"])


def judge(info: dict[str, Any], peak: float | None, bandwidth: float) -> None:
    """Set a case's limits, its bound and its ``fraction_of_limit`` from its flops, bytes and seconds."""
    floor_compute = info["flops"] / (peak * 1e9) if (info["flops"] and peak) else 0.0
    floor_memory = info["bytes"] / (bandwidth * 1e9)
    bound = "compute" if floor_compute > floor_memory else "memory"
    info.update(
        limit_peak_gflops=peak,
        limit_bandwidth_gbps=bandwidth,
        bound=bound,
        limit=f"{peak:.1f} GFLOP/s peak ({info['dtype']})" if bound == "compute" else f"{bandwidth:.1f} GB/s",
        roofline_floor_s=max(floor_compute, floor_memory),
        fraction_of_limit=max(floor_compute, floor_memory) / info["seconds"],
    )


def settle_limits(limits: dict[str, dict[str, Any]], cases: list[tuple[str, dict[str, Any]]]) -> None:
    """At the end of a run: each limit becomes the larger of its measured value and the best that any case
    of the run reached, and every case is judged again against it, so no case can beat its limit.

    A limit measured in one busy moment of a shared machine comes out low (a quick run once measured an
    83 GFLOP/s peak and then timed a matmul at 152). ``measured`` keeps the values measured at the start,
    ``source`` says for each limit which it is: "measured" or "best case: <its name>". ``cases`` are
    (name, extra_info) pairs, changed in place. Settling twice changes nothing.
    """
    for device, lim in limits.items():
        measured = lim.setdefault(
            "measured", {"peak_gflops": dict(lim["peak_gflops"]), "bandwidth_gbps": lim["bandwidth_gbps"]}
        )
        mine = [(name, info) for name, info in cases if info.get("device") == device]
        source: dict[str, str] = {}
        for dtype, peak in measured["peak_gflops"].items():
            best = max(
                ((i["gflops"], n) for n, i in mine if i["dtype"] == dtype and i["gflops"]), default=None
            )
            lim["peak_gflops"][dtype], source[f"peak {dtype}"] = _larger(peak, best)
        best = max(((i["gbps"], n) for n, i in mine if i["gbps"]), default=None)
        lim["bandwidth_gbps"], source["bandwidth"] = _larger(measured["bandwidth_gbps"], best)
        lim["source"] = source
        for _, info in mine:
            judge(info, lim["peak_gflops"].get(info["dtype"]), lim["bandwidth_gbps"])


def settle_floors(cases: list[dict[str, Any]]) -> None:
    """At the end of a run: every case that names a ``floor_key`` gets the fastest ``floor_s`` measured for
    that key in the run (a floor timed in a busy moment is slow and flatters the case judged against it),
    and its ``fraction_of_floor`` again. Cases without a ``floor_key`` keep their own floor."""
    fastest: dict[str, float] = {}
    for info in cases:
        key = info.get("floor_key")
        if key is not None and info.get("floor_s"):
            fastest[key] = min(fastest.get(key, info["floor_s"]), info["floor_s"])
    for info in cases:
        if info.get("floor_key") in fastest:
            info["floor_s"] = fastest[info["floor_key"]]
            info["fraction_of_floor"] = info["floor_s"] / info["seconds"]


def _larger(measured: float, best: tuple[float, str] | None) -> tuple[float, str]:
    if best is None or best[0] <= measured:
        return measured, "measured"
    return best[0], f"best case: {best[1]}"
