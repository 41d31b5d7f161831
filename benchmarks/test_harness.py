"""The harness's own guards: a wrong kernel is never timed, and the roofline arithmetic is what it says."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from benchmarks import bench_matmul, harness
from minilib import testing


def test_check_close_rejects_a_wrong_or_nan_result_before_timing():
    """The check that runs before every timing (minilib.testing's test_close, chunk by chunk) fails on a
    wrong element or a NaN, naming what was checked and where."""
    want = torch.ones(3, 4, dtype=torch.float64)
    assert harness.check_close("ok", want.float(), want, 1e-3, 1e-5) == 0.0
    wrong = want.float().clone()
    wrong[1, 2] = 1.01
    with pytest.raises(AssertionError, match=r"^wrong: flat elements 0\.\.11 differ"):
        harness.check_close("wrong", wrong, want, 1e-3, 1e-5)
    wrong[1, 2] = math.nan
    with pytest.raises(AssertionError, match="(?s)nan: .*nan"):
        harness.check_close("nan", wrong, want, 1e-3, 1e-5)


def test_check_close_is_minilib_testings_test_close(monkeypatch):
    """No private copy of the tolerance arithmetic: the harness asks minilib.testing, with the lesson's
    float32 tolerance taken from there too."""
    calls = []
    monkeypatch.setattr(harness, "test_close", lambda a, b, rtol, atol: calls.append((rtol, atol)))
    harness.check_close(
        "spy", torch.zeros(3), torch.ones(3, dtype=torch.float64), *harness.TOLERANCES["float32"]
    )
    assert calls == [(testing.RTOL, testing.ATOL)]


def test_check_close_scales_the_result_before_comparing():
    """Gradients of a mean loss are compared as n * grad, so that the tolerance is relative to softmax."""
    want = torch.full((4,), 0.5, dtype=torch.float64)
    harness.check_close("scaled", torch.full((4,), 0.125), want, 1e-3, 1e-5, scale=4)
    with pytest.raises(AssertionError):
        harness.check_close("unscaled", torch.full((4,), 0.125), want, 1e-3, 1e-5)


def test_record_gives_the_roofline_floor_over_the_measured_time():
    """fraction_of_limit = max(flops / peak, bytes / bandwidth) / time, against the measured limits."""
    limits = {"device": "cpu", "peak_gflops": {"float32": 100.0}, "bandwidth_gbps": 10.0}
    bench = SimpleNamespace(enabled=False, stats=None, extra_info={})
    harness.record(
        bench,
        limits,
        dtype="float32",
        flops=2e9,  # 20 ms at the peak
        bytes_moved=1e8,  # 10 ms at the bandwidth
        first_call_s=0.04,
        peak_mem=None,
        peak_mem_method="-",
    )
    info = bench.extra_info
    assert info["bound"] == "compute"
    assert info["gflops"] == pytest.approx(50.0) and info["gbps"] == pytest.approx(2.5)
    assert info["fraction_of_limit"] == pytest.approx(0.5)


def test_triton_cases_skip_with_the_reason_when_triton_is_missing(monkeypatch):
    """On a CUDA machine without Triton the Triton matmul cases skip, saying why, instead of erroring
    (minilib.kernels imports without Triton, so only triton_available() can tell)."""
    monkeypatch.setattr(bench_matmul, "triton_available", lambda: False)
    with pytest.raises(pytest.skip.Exception, match="Triton is not installed"):
        bench_matmul._kernel("triton")


def test_a_limit_is_never_beaten_by_a_case_it_judges():
    """A peak measured in a busy moment (83 GFLOP/s) and a matmul that then ran at 152: judged against the
    measured peak the matmul would reach 183% of its limit. Settled at the end of the run, the limit is the
    best the run reached, said to be so, and every fraction is at most 100%; the measured value is kept."""
    limits = {"cpu": {"device": "cpu", "peak_gflops": {"float32": 83.0}, "bandwidth_gbps": 10.0}}
    fast = {"device": "cpu", "dtype": "float32", "flops": 152e9, "bytes": 1e6, "seconds": 1.0, "gbps": 1e-3}
    slow = dict(fast, flops=76e9)
    for case in (fast, slow):
        case["gflops"] = case["flops"] / 1e9
        harness.judge(case, 83.0, 10.0)
    assert fast["fraction_of_limit"] == pytest.approx(152 / 83)  # what the report showed before
    cases = [("square-1024", fast), ("square-512", slow)]
    for _ in range(2):  # settling twice changes nothing
        harness.settle_limits(limits, cases)
        assert limits["cpu"]["peak_gflops"]["float32"] == 152.0
        assert limits["cpu"]["measured"]["peak_gflops"]["float32"] == 83.0
        assert limits["cpu"]["source"] == {"peak float32": "best case: square-1024", "bandwidth": "measured"}
        assert fast["fraction_of_limit"] == pytest.approx(1.0) and slow["fraction_of_limit"] == pytest.approx(
            0.5
        )


def test_cases_sharing_a_floor_are_judged_against_the_fastest_floor_of_the_run():
    """A copy floor timed in a busy moment (12 ms for what later took 0.2 ms) made a 0.7 ms kernel read
    1,700% of its floor. Settled at the end of the run, every case of that floor_key is judged against the
    fastest floor measured for it; a case with no floor_key keeps its own."""
    early = {"floor_key": "bn fwd conv1", "floor_s": 12e-3, "seconds": 0.7e-3, "fraction_of_floor": 12 / 0.7}
    late = {"floor_key": "bn fwd conv1", "floor_s": 0.2e-3, "seconds": 0.8e-3, "fraction_of_floor": 0.25}
    other = {"floor_s": 5e-3, "seconds": 10e-3, "fraction_of_floor": 0.5}
    harness.settle_floors([early, late, other])
    assert early["floor_s"] == late["floor_s"] == 0.2e-3
    assert early["fraction_of_floor"] == pytest.approx(0.2 / 0.7)
    assert other["floor_s"] == 5e-3 and other["fraction_of_floor"] == 0.5
