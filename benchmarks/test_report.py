"""The report generator reads a pytest-benchmark JSON of this harness and writes Markdown and charts.

`nox -s tests` runs the benchmarks with benchmarking disabled, which writes no JSON; this test feeds the
generator a small JSON in the harness's shape instead, so that the report code cannot rot either.
"""

from __future__ import annotations

import json

from benchmarks import report

LIMITS = {
    "cpu": {
        "device": "cpu",
        "peak_gflops": {"float32": 50.0},
        "bandwidth_gbps": 12.5,
        "method": {"peak_gflops": "sgemm", "bandwidth_gbps": "x.sum()"},
    }
}


def _bench(name: str, seconds: float, **info) -> dict:
    stats = {"min": seconds, "median": seconds * 1.1, "mean": seconds * 1.2, "rounds": 5}
    return {"name": name, "group": "g", "stats": stats, "extra_info": info}


def _fake_json() -> dict:
    ladder = [
        _bench(
            f"test_matmul_ladder[{k}]",
            t,
            op="matmul",
            case="ladder",
            kernel=k,
            shape="5x784@784x10",
            m=5,
            device="cpu",
            dtype="float32",
            flops=78400,
            gflops=78400 / t / 1e9,
            limit="50.0 GFLOP/s peak (float32)",
            fraction_of_limit=78400 / 50e9 / t,
        )
        for k, t in (
            ("loops", 0.5),
            ("elementwise", 5e-4),
            ("broadcast", 8e-5),
            ("einsum", 2e-5),
            ("torch", 8e-6),
        )
    ]
    loss = [
        _bench(
            f"test_cross_entropy[{mode}-{k}]",
            t,
            op="cross_entropy",
            case=mode,
            kernel=k,
            device="cpu",
            dtype="float32",
            n=50000,
            c=10,
            logits_bytes=2_000_000,
            gbps=2e6 / t / 1e9,
            fraction_of_limit=2e6 / 12.5e9 / t,
            peak_mem_bytes=4_000_000,
            peak_mem_method="VmHWM rise",
        )
        for mode in ("fwd", "fwd+bwd")
        for k, t in (("naive", 2e-3), ("F.cross_entropy", 1e-3))
    ]
    return {
        "machine_info": {"cpu_model": "Test CPU", "cpu_count": 2, "torch_version": "2.x", "gpu": None},
        "benchmarks": ladder + loss,
        "datetime": "2026-01-01T00:00:00",
        "version": "5",
        "minilib": {
            "bench_set": "quick",
            "limits": LIMITS,
            "skipped": [{"nodeid": "benchmarks/bench_matmul.py::test_x[cuda]", "reason": "no CUDA"}],
        },
    }


def test_report_is_generated_from_the_json_with_ladder_loss_tables_and_charts(tmp_path):
    """The report shows this JSON's times beside the lesson's, its loss table, its limits, and its charts."""
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(_fake_json()))
    written = report.write_report(path, tmp_path)
    md = (tmp_path / "bench-report.md").read_text()
    assert "| loops | 500 ms |" in md, md  # this run's time, from the JSON
    assert "835 ms" in md and "590 ms" in md  # the lesson's and the earlier 2-core run's, beside it
    assert "| elementwise | 500 us | 1,000x |" in md, md  # each step's speed-up over the previous one
    assert "| F.cross_entropy | 1 ms | 2 | 16% | 3.81 MiB (2x logits) |" in md, md
    assert "50.0 GFLOP/s" in md and "12.5 GB/s" in md
    assert "GPU timings are still to be taken" in md
    assert "no CUDA" in md
    charts = [p for p in written if p.suffix == ".png"]
    assert {p.name for p in charts} == {"ladder.png", "cross_entropy_throughput.png"}
    assert all(p.stat().st_size > 1000 for p in charts)
