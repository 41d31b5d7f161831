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


def _write_and_read(tmp_path, data: dict) -> tuple[str, list]:
    (tmp_path / "bench.json").write_text(json.dumps(data))
    written = report.write_report(tmp_path / "bench.json", tmp_path)
    return (tmp_path / "bench-report.md").read_text(), written


def test_the_batch_norm_table_shows_time_gbps_and_fraction_of_the_copy_floor_per_mode(tmp_path):
    """bench_batch_norm's runs: one table per shape, one row per ladder step in the lesson's order, and for
    forward and forward+backward the time (with how many floors), GB/s and the fraction of the floor; its
    chart is drawn."""
    data = _fake_json()
    for kernel, t in (("F.batch_norm", 2e-3), ("lesson BatchNorm", 8e-3)):  # out of order on purpose
        for mode, floor in (("fwd", 1e-3), ("fwd+bwd", 2.5e-3)):
            data["benchmarks"].append(
                _bench(
                    f"test_batch_norm[conv1-{mode}-{kernel}]",
                    t if mode == "fwd" else 2 * t,
                    op="batch_norm",
                    case=mode,
                    kernel=kernel,
                    layer="conv1",
                    shape="(512, 8, 14, 14)",
                    numel=802816,
                    input_bytes=3211264,
                    device="cpu",
                    dtype="float32",
                    gbps=3.2,
                    floor_s=floor,
                )
            )
    md, written = _write_and_read(tmp_path, data)
    assert "### (512, 8, 14, 14) (conv1), cpu float32 (3.06 MiB)" in md, md
    table_rows = [
        line.split("|")[1].strip()
        for line in md.splitlines()
        if line.startswith("| lesson BatchNorm") or line.startswith("| F.batch_norm")
    ]
    assert table_rows == ["lesson BatchNorm", "F.batch_norm"], md  # the lesson's order, whatever the JSON's
    assert _row(md, "F.batch_norm") == [
        "F.batch_norm",
        "2 ms (2x floor)",
        "3.2",
        "50%",
        "4 ms (1.6x floor)",
        "3.2",
        "62.5%",
    ], md
    assert "| fused_batch_norm" not in md  # a step without runs has no row
    assert "batch_norm_floor.png" in {p.name for p in written}


def test_the_conv_table_gives_gflops_as_a_fraction_of_the_measured_matmul_peak(tmp_path):
    """bench_conv's runs: per layer and kernel, GFLOP/s and the fraction of the (settled) matmul peak."""
    data = _fake_json()
    for kernel, t in (("F.conv2d", 1e-3), ("F.unfold + matmul", 4e-3)):
        data["benchmarks"].append(
            _bench(
                f"test_conv2d[conv1-{kernel}]",
                t,
                op="conv2d",
                case="fwd",
                kernel=kernel,
                layer="conv1: Conv(1,8,5,s2,p2)",
                layer_index=0,
                n=512,
                input_shape="(512, 1, 28, 28)",
                output_shape="(512, 8, 14, 14)",
                device="cpu",
                dtype="float32",
                gflops=40.0 * 1e-3 / t,
                limit_peak_gflops=80.0,
            )
        )
    md, written = _write_and_read(tmp_path, data)
    row = _row(md, "conv1: Conv(1,8,5,s2,p2)")  # the first row: unfold + matmul, as the lesson builds it
    assert row == [
        "conv1: Conv(1,8,5,s2,p2)",
        "(512, 1, 28, 28) -> (512, 8, 14, 14)",
        "F.unfold + matmul",
        "4 ms",
        "10",
        "12.5%",
    ], md
    assert "conv_as_matmul.png" in {p.name for p in written}


def test_the_training_step_table_shows_the_norms_share_and_what_fusing_saved(tmp_path):
    """bench_train_step's runs: the step, its norm layers alone, their share, and the time the fused norm
    saved against nn.BatchNorm2d (the step's and the norm layers')."""
    data = _fake_json()
    for kernel, t, norm_s in (("FusedBatchNorm2d", 0.075, 0.005), ("nn.BatchNorm2d", 0.1, 0.025)):
        data["benchmarks"].append(
            _bench(
                f"test_training_step[{kernel}]",
                t,
                op="train_step",
                case="fwd+bwd+sgd",
                kernel=kernel,
                device="cpu",
                dtype="float32",
                bs=512,
                norm_layers_s=norm_s,
            )
        )
    md, _ = _write_and_read(tmp_path, data)
    assert "### bs 512, cpu float32" in md, md
    assert _row(md, "nn.BatchNorm2d") == ["nn.BatchNorm2d", "100 ms", "25 ms", "25%", "-", "-"], md
    assert _row(md, "FusedBatchNorm2d") == [
        "FusedBatchNorm2d",
        "75 ms",
        "5 ms",
        "6.67%",
        "25 ms (25%)",
        "20 ms (80%)",
    ], md


def test_the_checkpoint_section_appears_only_with_checkpoint_runs(tmp_path):
    """The checkpoint-cost entry is keyed on the benchmark group `checkpoint`: no such run, no section;
    with one, its model, size, time per save and rate."""
    md, _ = _write_and_read(tmp_path, _fake_json())
    assert "checkpoint" not in md.lower(), md
    data = _fake_json()
    run = _bench("test_checkpoint_save[cnn]", 0.05, model="lesson 07 CNN", bytes=2**20, seconds_per_save=0.01)
    run["group"] = "checkpoint"
    data["benchmarks"].append(run)
    md, _ = _write_and_read(tmp_path, data)
    assert "## Saving a checkpoint: what it costs" in md
    assert _row(md, "lesson 07 CNN") == ["lesson 07 CNN", "1 MiB", "10 ms", "105"], md
