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


def _row(md: str, first_cell: str) -> list[str]:
    """The cells of the first Markdown table row whose first cell is ``first_cell``."""
    for line in md.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0] == first_cell:
            return cells
    raise AssertionError(f"no table row starts with {first_cell!r} in:\n{md}")


def test_report_is_generated_from_the_json_with_ladder_loss_tables_and_charts(tmp_path):
    """The report shows this JSON's times beside the lesson's, its loss table, its limits, and its charts."""
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(_fake_json()))
    written = report.write_report(path, tmp_path)
    md = (tmp_path / "bench-report.md").read_text()
    # this run's time, from the JSON, then the lesson's and the earlier 2-core run's (reference.json)
    assert _row(md, "loops")[:6] == ["loops", "500 ms", "-", "835 ms", "-", "590 ms"], md
    assert _row(md, "elementwise")[:3] == [
        "elementwise",
        "500 us",
        "1,000x",
    ]  # speed-up over the previous step
    assert _row(md, "F.cross_entropy")[:5] == ["F.cross_entropy", "1 ms", "2", "16%", "3.81 MiB (2x logits)"]
    assert _row(md, "cpu")[:5] == ["cpu", "peak float32 matmul", "50.0 GFLOP/s", "50.0", "measured"]
    assert "12.5 GB/s" in md
    assert "GPU timings are still to be taken" in md
    assert "no CUDA" in md
    charts = [p for p in written if p.suffix == ".png"]
    assert {p.name for p in charts} == {"ladder.png", "cross_entropy_throughput.png"}
    assert all(p.stat().st_size > 1000 for p in charts)


def test_reference_times_are_read_from_reference_json_at_run_time(tmp_path, monkeypatch):
    """The lesson's published times are data, not code: change the file and the report follows."""
    reference = report.load_reference()
    reference["ladder"]["lesson"]["seconds"]["loops"] = 0.123
    (tmp_path / "reference.json").write_text(json.dumps(reference))
    monkeypatch.setattr(report, "REFERENCE", tmp_path / "reference.json")
    (tmp_path / "bench.json").write_text(json.dumps(_fake_json()))
    report.write_report(tmp_path / "bench.json", tmp_path)
    assert _row((tmp_path / "bench-report.md").read_text(), "loops")[3] == "123 ms"


def test_the_limits_table_says_when_a_case_beat_the_measured_limit(tmp_path):
    """A run whose fastest matmul beat the peak measured at its start: the report shows the limit used
    (the case's), the measured one beside it, and which case set it (see harness.settle_limits)."""
    data = _fake_json()
    data["minilib"]["limits"]["cpu"].update(
        peak_gflops={"float32": 152.0},
        measured={"peak_gflops": {"float32": 83.0}, "bandwidth_gbps": 12.5},
        source={"peak float32": "best case: test_matmul_square[1024]", "bandwidth": "measured"},
    )
    (tmp_path / "bench.json").write_text(json.dumps(data))
    report.write_report(tmp_path / "bench.json", tmp_path)
    row = _row((tmp_path / "bench-report.md").read_text(), "cpu")
    assert row[2:5] == ["152.0 GFLOP/s", "83.0", "best case: test_matmul_square[1024]"]


def test_the_ddp_scaling_table_shows_both_ratios_against_the_two_core_limit(tmp_path):
    """bench_ddp's runs become one row per global batch size: the three rates and the two ratios."""
    data = _fake_json()
    data["benchmarks"].append(
        _bench(
            "test_two_processes_against_one[512]",
            3.0,
            op="ddp_scaling",
            model="784-50-10 MLP",
            bs_global=512,
            epochs=2,
            samples_per_s_one_2_threads=10000.0,
            samples_per_s_one_1_thread=8000.0,
            samples_per_s_two_1_thread=12000.0,
            scaling=1.2,
            scaling_vs_1_thread=1.5,
            limit=2.0,
            valid_one=[0.25, 0.93],
            valid_two=[0.25, 0.93],
            load_average=0.5,
        )
    )
    (tmp_path / "bench.json").write_text(json.dumps(data))
    report.write_report(tmp_path / "bench.json", tmp_path)
    md = (tmp_path / "bench-report.md").read_text()
    assert "## More than one process: DDP scaling" in md
    expected = ["512", "10,000", "8,000", "12,000", "1.2x", "1.5x of 2x", "0.25/0.93", "0.5"]
    assert _row(md, "512") == expected, md


def test_the_linear_cross_entropy_table_shows_the_fraction_of_the_three_matmul_floor(tmp_path):
    """bench_linear_cross_entropy's runs: time, the three matmuls' floor, the fraction reached, and the
    peak memory next to the logits' size."""
    data = _fake_json()
    for kernel, t, peak in (
        ("fused_linear_cross_entropy", 1.25, 40 * 2**20),
        ("F.linear_cross_entropy", 2.0, 2**30),
    ):
        data["benchmarks"].append(
            _bench(
                f"test_linear[{kernel}]",
                t,
                op="linear_cross_entropy",
                case="fwd+bwd",
                kernel=kernel,
                device="cpu",
                dtype="float32",
                n=4096,
                h=256,
                c=32000,
                logits_bytes=500 * 2**20,
                floor_s=1.0,
                peak_mem_bytes=peak,
                peak_mem_over_logits=peak / (500 * 2**20),
            )
        )
    (tmp_path / "bench.json").write_text(json.dumps(data))
    report.write_report(tmp_path / "bench.json", tmp_path)
    md = (tmp_path / "bench-report.md").read_text()
    assert "### N, H, V = 4096, 256, 32000, cpu float32 (500 MiB of logits)" in md, md
    assert _row(md, "fused_linear_cross_entropy") == [
        "fused_linear_cross_entropy",
        "1.25 s",
        "1 s",
        "80%",
        "40 MiB (0.08x logits)",
    ], md
    assert _row(md, "F.linear_cross_entropy")[3] == "50%"
