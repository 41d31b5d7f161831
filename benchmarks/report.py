"""`python -m benchmarks.report BENCH_JSON [--out DIR]`: the Markdown report and charts, from the JSON alone.

Everything in the report comes from one pytest-benchmark JSON written by this harness: the machine
(``machine_info``), its limits and the skipped cases (``minilib``), and each benchmark's times (``stats``) and
roofline bookkeeping (``extra_info``). The only other numbers are the references in ``reference.json`` beside
this file (the lesson's published ladder, an earlier run on the project's 2-core machine), shown beside this
run's own. Tables are tabulate's GitHub Markdown; what is ours is the roofline and the ladder.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure
from tabulate import tabulate

from minilib.matmul import MATMULS

REFERENCE = Path(__file__).with_name("reference.json")
LADDER_ORDER = tuple(MATMULS)  # the lesson's order: loops, elementwise, broadcast, einsum, torch
LOSS_ORDER = ("naive", "sum_log", "logsumexp", "cross_entropy", "F.cross_entropy", "fused_cross_entropy")


def load_reference(path: Path | None = None) -> dict[str, Any]:
    """The reference times (default: reference.json beside this file), read when a report is written."""
    return json.loads(Path(path or REFERENCE).read_text())


def fmt_time(s: float | None) -> str:
    if s is None:
        return "-"
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if s >= 0.9995 * scale:
            return f"{s / scale:.3g} {unit}"
    return f"{s / 1e-9:.3g} ns"


def fmt_bytes(b: float | None) -> str:
    if b is None:
        return "-"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if b >= 0.9995 * scale:
            v = b / scale
            return f"{v:.0f} {unit}" if v >= 100 else f"{v:.3g} {unit}"
    return f"{b:.0f} B"


def fmt_ratio(x: float) -> str:
    return f"{x:,.0f}x" if x >= 100 else f"{x:.3g}x"


def fmt_num(x: float | None, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}g}"


def fmt_frac(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{100 * x:.3g}%"


def table(header, rows) -> list[str]:
    """A GitHub Markdown table; cells are kept as written (no number parsing), then a blank line."""
    return [tabulate(rows, headers=list(header), tablefmt="github", disable_numparse=True), ""]


class Run:
    """One benchmark of the JSON: its extra_info, with the min time from its stats."""

    def __init__(self, raw: dict[str, Any]) -> None:
        self.raw = raw
        self.info: dict[str, Any] = raw.get("extra_info", {})
        self.time: float = raw["stats"]["min"]
        self.median: float = raw["stats"]["median"]
        self.rounds: int = raw["stats"]["rounds"]

    def __getitem__(self, key: str) -> Any:
        return self.info.get(key)


def _runs(data: dict[str, Any], op: str, case: str | None = None) -> list[Run]:
    runs = [Run(b) for b in data.get("benchmarks", []) if b.get("extra_info", {}).get("op") == op]
    return [r for r in runs if case is None or r["case"] == case]


def _by(runs: list[Run], *keys: str) -> dict[tuple, list[Run]]:
    groups: dict[tuple, list[Run]] = defaultdict(list)
    for r in runs:
        groups[tuple(r[k] for k in keys)].append(r)
    return dict(groups)


# ---------------------------------------------------------------------------------------------------------
# Sections.


def machine_section(data: dict[str, Any]) -> list[str]:
    mi = data.get("machine_info", {})
    cpu = mi.get("cpu", {})
    meta = data.get("minilib", {})
    gpu = mi.get("gpu")
    cpu_model = mi.get("cpu_model") or cpu.get("brand_raw", "?")
    cuda = mi.get("cuda_version")
    rows = [
        ("CPU", f"{cpu_model}, {mi.get('cpu_count', cpu.get('count', '?'))} cores"),
        (
            "torch",
            f"{mi.get('torch_version', '?')}, {mi.get('torch_threads', '?')} threads, CUDA {cuda or 'none'}",
        ),
        (
            "GPU",
            gpu or "none: the GPU cases were skipped; GPU timings are still to be taken on a CUDA machine",
        ),
        (
            "Python",
            f"{mi.get('python_implementation', '')} {mi.get('python_version', '?')}, {mi.get('system', '')}",
        ),
    ]
    load = meta.get("load_average") or {}
    cores = mi.get("cpu_count") or cpu.get("count")
    if load.get("start") is not None:
        # The start value is the minute before the run; the end value includes the run itself.
        busy = cores and load["start"] >= 0.5 * cores
        rows.append(
            (
                "Load average (1 min)",
                f"{load['start']:.2f} at the start, {fmt_num(load.get('end'))} at the end (this run included)"
                + (
                    f": other processes were competing for the {cores} cores, so times (and the limits) "
                    "are pessimistic and noisy"
                    if busy
                    else ""
                ),
            )
        )
    lines = ["## Machine", ""] + table(("", ""), rows)
    limit_rows = []
    for device, lim in meta.get("limits", {}).items():
        measured, source, how = lim.get("measured", lim), lim.get("source", {}), lim.get("method", {})
        for dtype, used in lim.get("peak_gflops", {}).items():
            was, why = measured["peak_gflops"][dtype], source.get(f"peak {dtype}", "measured")
            limit_rows.append(
                (
                    device,
                    f"peak {dtype} matmul",
                    f"{used:.1f} GFLOP/s",
                    f"{was:.1f}",
                    why,
                    how.get("peak_gflops"),
                )
            )
        used, was, why = (
            lim["bandwidth_gbps"],
            measured["bandwidth_gbps"],
            source.get("bandwidth", "measured"),
        )
        kind = "read" if device == "cpu" else "copy"
        limit_rows.append(
            (device, f"{kind} bandwidth", f"{used:.1f} GB/s", f"{was:.1f}", why, how.get("bandwidth_gbps"))
        )
    lines += ["### Limits", ""]
    header = (
        "device",
        "limit",
        "used",
        "measured at the start (same unit)",
        "used is",
        "how it was measured",
    )
    lines += table(header, limit_rows) if limit_rows else ["(none measured)", ""]
    lines += [
        "Each limit used is the larger of the value measured at the start of the run and the best that any "
        "benchmark of the run reached (`used is` says which): a limit measured in a busy moment comes out "
        "low, and a limit a benchmark beats is no limit. Each benchmark's `fraction_of_limit` is its "
        "roofline floor, max(flops / peak, bytes / bandwidth), divided by its measured time, so it is at "
        "most 100%.",
        "",
    ]
    return lines


def ladder_section(data: dict[str, Any], reference: dict[str, Any]) -> list[str]:
    runs = _runs(data, "matmul", "ladder")
    if not runs:
        return []
    refs = list(reference["ladder"].values())
    lines = ["## Matmul: the lesson's ladder", ""]
    for (device, dtype, shape), group in sorted(_by(runs, "device", "dtype", "shape").items()):
        by_kernel = {r["kernel"]: r for r in group}
        columns = [("this run", {k: r.time for k, r in by_kernel.items()})]
        columns += [(ref["label"], ref["seconds"]) for ref in refs]
        rows = []
        for i, kernel in enumerate(LADDER_ORDER):
            row = [kernel]
            for _, times in columns:
                now, before = times.get(kernel), times.get(LADDER_ORDER[i - 1]) if i else None
                row += [fmt_time(now), fmt_ratio(before / now) if (now and before) else "-"]
            r = by_kernel.get(kernel)
            rows.append(row + [fmt_frac(r["fraction_of_limit"]) if r else "-"])
        header = ["step"]
        for label, _ in columns:
            header += [label, "speed-up over the previous step" if label == "this run" else "its speed-up"]
        lines += [f"### {shape}, {device} {dtype}", ""] + table(header + ["fraction of limit"], rows)
    lines += [f"{ref['label']}: {ref['about']} ({reference['ladder_shape']})." for ref in refs] + [""]
    return lines


def matmul_table_section(data: dict[str, Any], case: str, title: str) -> list[str]:
    runs = _runs(data, "matmul", case)
    if not runs:
        return []
    rows = []
    for r in sorted(runs, key=lambda r: (r["device"], r["dtype"], r["kernel"], r["m"], r.time)):
        rows.append(
            (
                r["device"],
                r["dtype"],
                r["kernel"],
                r["shape"],
                fmt_time(r.time),
                fmt_num(r["gflops"]),
                r["limit"],
                fmt_frac(r["fraction_of_limit"]),
            )
        )
    return [f"## {title}", ""] + table(
        ("device", "dtype", "kernel", "shape", "time", "GFLOP/s", "limit compared with", "fraction of limit"),
        rows,
    )


def loss_section(data: dict[str, Any]) -> list[str]:
    runs = _runs(data, "cross_entropy")
    if not runs:
        return []
    lines = [
        "## Cross-entropy kernels",
        "",
        "GB/s counts the least traffic the loss needs (the logits read once forward; read once, and a "
        "gradient as large written once, for forward+backward), so it compares with the measured bandwidth. "
        "No flops are counted for exp and log, so the fraction is of that memory floor only. "
        "Peak memory is the extra memory one call needed at its peak. Where a time says `(1.1x floor)`, "
        "the floor is that traffic timed in the same process (`x.sum()` over the logits forward; plus "
        "`g.fill_(1.0)` over a tensor of their size for forward+backward).",
        "",
    ]
    shapes = _by(runs, "device", "dtype", "n", "c")
    for (device, dtype, n, c), group in sorted(
        shapes.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2] * kv[0][3])
    ):
        by = {(r["kernel"], r["case"]): r for r in group}
        logits = group[0]["logits_bytes"]
        lines += [f"### {n} x {c} logits, {device} {dtype} ({fmt_bytes(logits)})", ""]
        rows = []
        kernels = [k for k in LOSS_ORDER if any(k == kk for kk, _ in by)]
        kernels += sorted({k for k, _ in by} - set(kernels))
        for kernel in kernels:
            row: list[str] = [kernel]
            for mode in ("fwd", "fwd+bwd"):
                r = by.get((kernel, mode))
                if r is None:
                    row += ["-"] * 4
                    continue
                peak = r["peak_mem_bytes"]
                mult = f" ({peak / logits:.2g}x logits)" if peak is not None and logits else ""
                floor = f" ({fmt_ratio(r.time / r['floor_s'])} floor)" if r["floor_s"] else ""
                row += [
                    fmt_time(r.time) + floor,
                    fmt_num(r["gbps"]),
                    fmt_frac(r["fraction_of_limit"]),
                    fmt_bytes(peak) + mult,
                ]
            rows.append(row)
        lines += table(
            (
                "kernel",
                "fwd time",
                "fwd GB/s",
                "fwd fraction of limit",
                "fwd peak memory",
                "fwd+bwd time",
                "fwd+bwd GB/s",
                "fwd+bwd fraction of limit",
                "fwd+bwd peak memory",
            ),
            rows,
        )
    methods = sorted({r["peak_mem_method"] for r in runs if r["peak_mem_method"]})
    lines += ["Peak memory, as measured here: " + "; ".join(f"{m}." for m in methods), ""]
    return lines


LINEAR_ORDER = (
    "fused_linear_cross_entropy",
    "F.linear_cross_entropy",
    "F.linear_cross_entropy chunked",
    "torch.compile(two-step)",
)


def linear_section(data: dict[str, Any]) -> list[str]:
    runs = _runs(data, "linear_cross_entropy")
    if not runs:
        return []
    lines = [
        "## Linear cross-entropy: the matmul and the loss fused",
        "",
        "Forward+backward of `cross_entropy(input @ W.T, target)` at (N, H, V). Its floor is its three "
        "matmuls alone (`x @ W.T`, `dlogits @ W`, `dlogits.T @ x` by torch at the same shapes, timed in "
        "the same process): a fraction of 100% means the loss itself was free. Peak memory is the extra "
        "memory of one forward+backward beyond the inputs, next to the N x V logits it avoids holding.",
        "",
    ]
    for (device, dtype, n, h, c), group in sorted(_by(runs, "device", "dtype", "n", "h", "c").items()):
        by = {r["kernel"]: r for r in group}
        kernels = [k for k in LINEAR_ORDER if k in by] + sorted(set(by) - set(LINEAR_ORDER))
        logits = fmt_bytes(group[0]["logits_bytes"])
        lines += [f"### N, H, V = {n}, {h}, {c}, {device} {dtype} ({logits} of logits)", ""]
        rows = []
        for kernel in kernels:
            r = by[kernel]
            over = r["peak_mem_over_logits"]
            rows.append(
                (
                    kernel,
                    fmt_time(r.time),
                    fmt_time(r["floor_s"]),
                    fmt_frac(r["floor_s"] / r.time if r["floor_s"] else None),
                    fmt_bytes(r["peak_mem_bytes"]) + ("" if over is None else f" ({over:.2g}x logits)"),
                )
            )
        lines += table(
            ("kernel", "fwd+bwd time", "three matmuls", "fraction of that floor", "peak memory"), rows
        )
    return lines


def ddp_section(data: dict[str, Any]) -> list[str]:
    runs = sorted(_runs(data, "ddp_scaling"), key=lambda r: r["bs_global"])
    if not runs:
        return []
    first = runs[0]
    lines = [
        "## More than one process: DDP scaling",
        "",
        f"Training samples per second of `examples/train_mnist.py` ({first['model']}, {first['epochs']} "
        "epochs, start-up and validation excluded): one process against two (DistributedDataParallel over "
        "gloo, one thread each). The limit on two cores is 2x the best one-core rate; what DDP adds is "
        "per step (a gradient all-reduce and its hooks), so a larger batch hides more of it.",
        "",
    ]
    rows = [
        (
            str(r["bs_global"]),
            f"{r['samples_per_s_one_2_threads']:,.0f}",
            f"{r['samples_per_s_one_1_thread']:,.0f}",
            f"{r['samples_per_s_two_1_thread']:,.0f}",
            fmt_ratio(r["scaling"]),
            fmt_ratio(r["scaling_vs_1_thread"]) + f" of {fmt_ratio(r['limit'])}",
            "/".join(fmt_num(v, 4) for v in r["valid_two"]),
            fmt_num(r["load_average"], 2),
        )
        for r in runs
    ]
    lines += table(
        (
            "global batch",
            "1 process, 2 threads",
            "1 process, 1 thread",
            "2 processes, 1 thread each",
            "2 processes / 1 process (2 threads)",
            "2 processes / 1 process (1 thread)",
            "valid loss/accuracy (2 processes)",
            "load average",
        ),
        rows,
    )
    return lines


def skipped_section(data: dict[str, Any]) -> list[str]:
    skipped = data.get("minilib", {}).get("skipped", [])
    if not skipped:
        return []
    by_reason: dict[str, list[str]] = defaultdict(list)
    for s in skipped:
        by_reason[s["reason"]].append(s["nodeid"].split("::")[-1])
    lines = ["## Skipped cases", ""]
    for reason, ids in by_reason.items():
        shown = ", ".join(f"`{i}`" for i in ids[:3]) + (f" and {len(ids) - 3} more" if len(ids) > 3 else "")
        lines.append(f"- {len(ids)} skipped: {reason} ({shown})")
    return lines + [""]


# ---------------------------------------------------------------------------------------------------------
# Charts.


def ladder_chart(data: dict[str, Any], reference: dict[str, Any], path: Path) -> Path | None:
    runs = _runs(data, "matmul", "ladder")
    if not runs:
        return None
    fig = Figure(figsize=(8, 4.5))
    ax = fig.add_subplot()
    series = [(ref["label"], ref["seconds"]) for ref in reference["ladder"].values()]
    for (device, dtype, shape), group in sorted(_by(runs, "device", "dtype", "shape").items()):
        series.append((f"this run: {device} {dtype} {shape}", {r["kernel"]: r.time for r in group}))
    width = 0.8 / len(series)
    for i, (label, times) in enumerate(series):
        xs = [j + (i - (len(series) - 1) / 2) * width for j, k in enumerate(LADDER_ORDER) if k in times]
        ax.bar(xs, [times[k] for k in LADDER_ORDER if k in times], width=width, label=label)
    ax.set_xticks(range(len(LADDER_ORDER)), LADDER_ORDER)
    ax.set_yscale("log")
    ax.set_ylabel("time per call (s, log scale)")
    ax.set_title("Lesson 01's matmul ladder: each step moves work from Python into C")
    ax.legend(fontsize=8)
    ax.grid(axis="y", which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def matmul_chart(data: dict[str, Any], path: Path) -> Path | None:
    runs = [r for r in _runs(data, "matmul") if r["case"] in ("square", "wide")]
    if not runs:
        return None
    fig = Figure(figsize=(8, 4.5))
    ax = fig.add_subplot()
    for (device, dtype, kernel, case), group in sorted(
        _by(runs, "device", "dtype", "kernel", "case").items()
    ):
        group.sort(key=lambda r: r["flops"])
        style = "o-" if case == "square" else "s"
        ax.plot(
            [r["flops"] for r in group],
            [r["gflops"] for r in group],
            style,
            label=f"{kernel} {case} ({device} {dtype})",
        )
    for device, lim in data.get("minilib", {}).get("limits", {}).items():
        for dtype, peak in lim.get("peak_gflops", {}).items():
            ax.axhline(peak, ls="--", lw=1, color="grey")
            ax.text(
                0.01,
                peak,
                f"{device} {dtype} peak",
                transform=ax.get_yaxis_transform(),
                fontsize=7,
                va="bottom",
            )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("flops per call (2 m k n)")
    ax.set_ylabel("GFLOP/s")
    ax.set_title("Matmul throughput against size (dashed: measured peaks)")
    ax.legend(fontsize=7)
    ax.grid(which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def loss_chart(data: dict[str, Any], path: Path) -> Path | None:
    runs = _runs(data, "cross_entropy")
    if not runs:
        return None
    fig = Figure(figsize=(11, 4.5))
    axes = fig.subplots(1, 2, sharey=True)
    for ax, mode in zip(axes, ("fwd", "fwd+bwd"), strict=True):
        for (device, dtype, kernel), group in sorted(
            _by([r for r in runs if r["case"] == mode], "device", "dtype", "kernel").items()
        ):
            group.sort(key=lambda r: r["logits_bytes"])
            ax.plot(
                [r["logits_bytes"] for r in group],
                [r["gbps"] for r in group],
                "o-",
                label=f"{kernel} ({device} {dtype})",
            )
        for device, lim in data.get("minilib", {}).get("limits", {}).items():
            ax.axhline(lim["bandwidth_gbps"], ls="--", lw=1, color="grey")
            bw = lim["bandwidth_gbps"]
            ax.text(
                0.01, bw, f"{device} bandwidth", transform=ax.get_yaxis_transform(), fontsize=7, va="bottom"
            )
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("logits size (bytes)")
        ax.set_title(f"cross-entropy {mode}")
        ax.grid(which="both", alpha=0.3)
    axes[0].set_ylabel("GB/s (least traffic / time)")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


# ---------------------------------------------------------------------------------------------------------


def render(
    data: dict[str, Any],
    reference: dict[str, Any],
    charts: list[Path],
    json_name: str,
    wall_s: float | None,
    command: str | None,
) -> str:
    meta = data.get("minilib", {})
    n_runs = len(data.get("benchmarks", []))
    head = [
        "# minilib benchmark report",
        "",
        f"Generated by `python -m benchmarks.report` from `{json_name}` "
        f"(pytest-benchmark {data.get('version', '?')}, {data.get('datetime', '?')}). "
        f"Set: **{meta.get('bench_set', '?')}**, {n_runs} benchmarks"
        + (f", run in {wall_s:.0f} s of wall time" if wall_s is not None else "")
        + (f" by `{command}`" if command else "")
        + ".",
        "",
        "Times are the minimum over a benchmark's rounds (pytest-benchmark's `min`; the JSON also has mean, "
        "median and spread): on a shared machine the least disturbed estimate. Every kernel's output was "
        "checked against a float64 PyTorch reference in the same run before it was timed.",
        "",
    ]
    body = machine_section(data) + ladder_section(data, reference)
    body += matmul_table_section(data, "wide", "Matmul: the whole training set through the 784x10 layer")
    body += matmul_table_section(data, "square", "Matmul: square sizes")
    body += loss_section(data)
    body += linear_section(data)
    body += ddp_section(data)
    if charts:
        body += ["## Charts", ""] + [f"![{p.stem}]({p.name})" for p in charts] + [""]
    body += skipped_section(data)
    return "\n".join(head + body)


def write_report(
    json_path: Path, out_dir: Path, wall_s: float | None = None, command: str | None = None
) -> list[Path]:
    """Write bench-report.md and the charts into `out_dir` from `json_path`; return the paths written."""
    data = json.loads(Path(json_path).read_text())
    reference = load_reference()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    charts = [
        p
        for p in (
            ladder_chart(data, reference, out_dir / "ladder.png"),
            matmul_chart(data, out_dir / "matmul_throughput.png"),
            loss_chart(data, out_dir / "cross_entropy_throughput.png"),
        )
        if p is not None
    ]
    md = out_dir / "bench-report.md"
    md.write_text(render(data, reference, charts, Path(json_path).name, wall_s, command))
    return [md, *charts]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__.splitlines()[0])
    parser.add_argument("json", type=Path, help="a pytest-benchmark JSON written by the benchmarks")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: the JSON's folder)")
    args = parser.parse_args(argv)
    for path in write_report(args.json, args.out or args.json.parent):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
