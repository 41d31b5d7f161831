"""`python -m benchmarks.report BENCH_JSON [--out DIR]`: the Markdown report and charts, from the JSON alone.

Everything in the report comes from one pytest-benchmark JSON written by this harness: the machine
(``machine_info``), its limits and the skipped cases (``minilib``), and each benchmark's times (``stats``) and
roofline bookkeeping (``extra_info``). The only other numbers are the references in ``reference.json`` beside
this file (the lesson's published ladder, an earlier run on the project's 2-core machine), shown beside this
run's own. Tables are tabulate's GitHub Markdown; what is ours is the roofline and the ladder.

Every section about benchmark runs is one `Section` entry in `SECTIONS` (its title, which runs, how they are
grouped into tables, one row per what, and its columns), drawn by one renderer (`render_section`); every chart
is one `Chart` entry in `CHARTS`, drawn by one helper (`draw_chart`). A new benchmark gets its table and its
chart by adding an entry to each, not a function.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure
from tabulate import tabulate

from minilib.matmul import MATMULS

REFERENCE = Path(__file__).with_name("reference.json")
LADDER_ORDER = tuple(MATMULS)  # the lesson's order: loops, elementwise, broadcast, einsum, torch
LOSS_ORDER = ("naive", "sum_log", "logsumexp", "cross_entropy", "F.cross_entropy", "fused_cross_entropy")
LINEAR_ORDER = (
    "fused_linear_cross_entropy",
    "F.linear_cross_entropy",
    "F.linear_cross_entropy chunked",
    "torch.compile(two-step)",
)
BATCH_NORM_ORDER = ("lesson BatchNorm", "F.batch_norm", "fused_batch_norm")
CONV_ORDER = ("F.unfold + matmul", "F.conv2d")
STEP_ORDER = ("nn.BatchNorm2d", "FusedBatchNorm2d")


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
        self.group: str = raw.get("group") or ""
        self.time: float = raw["stats"]["min"]
        self.median: float = raw["stats"]["median"]
        self.rounds: int = raw["stats"]["rounds"]

    def __getitem__(self, key: str) -> Any:
        return self.info.get(key)


def all_runs(data: dict[str, Any]) -> list[Run]:
    return [Run(b) for b in data.get("benchmarks", [])]


def _by(runs: list[Run], *keys: str) -> dict[tuple, list[Run]]:
    groups: dict[tuple, list[Run]] = defaultdict(list)
    for r in runs:
        groups[tuple(r[k] for k in keys)].append(r)
    return dict(groups)


# ---------------------------------------------------------------------------------------------------------
# Which runs a section or chart is about.

Select = Callable[[Run], bool]


def op(name: str, *cases: str) -> Select:
    """The runs whose extra_info says ``op == name`` (and, given cases, whose ``case`` is one of them)."""
    return lambda r: r["op"] == name and (not cases or r["case"] in cases)


def group(name: str) -> Select:
    """The runs of pytest-benchmark group `name` (or a group named `name` followed by more words)."""
    return lambda r: r.group == name or r.group.startswith(name + " ")


# ---------------------------------------------------------------------------------------------------------
# A section as data, and its one renderer.


@dataclass(frozen=True)
class Row:
    """What a cell can read: the row's key, its run (under a pivot, the run of that column's case; None
    when the row has none), the row above (the ladder's speed-ups) and the table's runs by key (to compare
    with another row)."""

    key: Any
    run: Run | None
    prev: Row | None
    runs: dict[Any, Run]


@dataclass(frozen=True)
class Column:
    header: str
    cell: Callable[[Row], str]


def col(header: str, value: Callable[[Run], str]) -> Column:
    """A column of the row's own run; ``-`` where the row has none."""
    return Column(header, lambda row: "-" if row.run is None else value(row.run))


@dataclass(frozen=True)
class Section:
    """One section of the report: ``## title``, an intro, then one table per group of the selected runs.

    - ``group_by``: one table per distinct value of these extra_info keys, headed by ``heading(first run)``,
      in the order of ``group_order(first run)`` (default: the values themselves).
    - ``rows``: one row per distinct value of this key, led by a ``label`` column; ``order`` first, the rest
      sorted after (``all_rows``: every value of ``order``, with or without a run). Without ``rows``, one row
      per run, in the order of ``sort``.
    - ``pivot``: (key, values): the columns are repeated for each value (e.g. fwd, fwd+bwd), headed
      ``"value header"``.
    - ``columns`` (or a function of reference.json returning them), then ``footer(runs, reference)``.
    """

    title: str
    select: Select
    columns: tuple[Column, ...] | Callable[[dict[str, Any]], tuple[Column, ...]]
    intro: str | Callable[[list[Run]], str] = ""
    group_by: tuple[str, ...] = ()
    heading: Callable[[Run], str] | None = None
    group_order: Callable[[Run], Any] | None = None
    rows: str | None = None
    label: str = "kernel"
    order: tuple[Any, ...] = ()
    all_rows: bool = False
    sort: Callable[[Run], Any] | None = None
    pivot: tuple[str, tuple[str, ...]] | None = None
    footer: Callable[[list[Run], dict[str, Any]], list[str]] | None = None


def render_section(section: Section, data: dict[str, Any], reference: dict[str, Any]) -> list[str]:
    """The section's Markdown lines; none when the JSON has no run it selects."""
    s = section
    runs = [r for r in all_runs(data) if s.select(r)]
    if not runs:
        return []
    lines = [f"## {s.title}", ""]
    intro = s.intro(runs) if callable(s.intro) else s.intro
    if intro:
        lines += [intro, ""]
    columns = s.columns(reference) if callable(s.columns) else s.columns
    groups = _by(runs, *s.group_by)
    order = (lambda kv: s.group_order(kv[1][0])) if s.group_order else (lambda kv: kv[0])
    for _, members in sorted(groups.items(), key=order):
        if s.heading:
            lines += [f"### {s.heading(members[0])}", ""]
        lines += _table(s, members, columns)
    if s.footer:
        lines += s.footer(runs, reference)
    return lines


def _table(s: Section, runs: list[Run], columns: tuple[Column, ...]) -> list[str]:
    cases = s.pivot[1] if s.pivot else (None,)
    header = [c.header if case is None else f"{case} {c.header}" for case in cases for c in columns]
    if s.rows is None:
        rows, prev = [], None
        for r in sorted(runs, key=s.sort) if s.sort else runs:
            prev = Row(None, r, prev, {})
            rows.append([c.cell(prev) for c in columns])
        return table(header, rows)
    pivot_key = s.pivot[0] if s.pivot else None
    by = {(r[s.rows], r[pivot_key] if pivot_key else None): r for r in runs}
    present = {k for k, _ in by}
    keys = [k for k in s.order if s.all_rows or k in present] + sorted(present - set(s.order))
    by_key = {k: r for (k, case), r in by.items() if case == cases[0]}
    rows, above = [], dict.fromkeys(cases)
    for key in keys:
        row: list[str] = [str(key)]
        for case in cases:
            above[case] = Row(key, by.get((key, case)), above[case], by_key)
            row += [c.cell(above[case]) for c in columns]
        rows.append(row)
    return table([s.label, *header], rows)


# ---------------------------------------------------------------------------------------------------------
# The sections' cells.


def _speed_up(seconds: Callable[[Row], float | None]) -> Callable[[Row], str]:
    """The previous row's time over this row's (``-`` for the first row or a missing time)."""

    def cell(row: Row) -> str:
        now, before = seconds(row), seconds(row.prev) if row.prev else None
        return fmt_ratio(before / now) if (now and before) else "-"

    return cell


def _ladder_columns(reference: dict[str, Any]) -> tuple[Column, ...]:
    """This run's time and speed-up, then each reference's (reference.json), then the fraction of limit."""

    def this_run(row: Row) -> float | None:
        return row.run.time if row.run else None

    columns = [
        col("this run", lambda r: fmt_time(r.time)),
        Column("speed-up over the previous step", _speed_up(this_run)),
    ]
    for ref in reference["ladder"].values():

        def ref_seconds(row: Row, seconds=ref["seconds"]) -> float | None:
            return seconds.get(row.key)

        columns += [
            Column(ref["label"], lambda row, f=ref_seconds: fmt_time(f(row))),
            Column("its speed-up", _speed_up(ref_seconds)),
        ]
    return (*columns, col("fraction of limit", lambda r: fmt_frac(r["fraction_of_limit"])))


def _ladder_footer(runs: list[Run], reference: dict[str, Any]) -> list[str]:
    refs = reference["ladder"].values()
    return [f"{ref['label']}: {ref['about']} ({reference['ladder_shape']})." for ref in refs] + [""]


def _time_and_floor(r: Run) -> str:
    """The time, and where the run measured its floor, how many floors that is: ``4.2 ms (1.1x floor)``."""
    return fmt_time(r.time) + (f" ({fmt_ratio(r.time / r['floor_s'])} floor)" if r["floor_s"] else "")


def _peak_memory(r: Run) -> str:
    peak, logits = r["peak_mem_bytes"], r["logits_bytes"]
    return fmt_bytes(peak) + (f" ({peak / logits:.2g}x logits)" if peak is not None and logits else "")


def _peak_methods(runs: list[Run], reference: dict[str, Any]) -> list[str]:
    methods = sorted({r["peak_mem_method"] for r in runs if r["peak_mem_method"]})
    return ["Peak memory, as measured here: " + "; ".join(f"{m}." for m in methods), ""]


def _fraction_of_floor(r: Run) -> str:
    return fmt_frac(r["floor_s"] / r.time if r["floor_s"] else None)


def _fraction_of_peak(r: Run) -> str:
    """GFLOP/s over the run's settled matmul peak for its dtype (the harness's `judge` records it)."""
    peak = r["limit_peak_gflops"]
    return fmt_frac(r["gflops"] / peak if (peak and r["gflops"]) else None)


def _saved(baseline: str, seconds: Callable[[Run], float | None]) -> Callable[[Row], str]:
    """How much less time than the `baseline` row's this row took: ``12.3 ms (25%)``."""

    def cell(row: Row) -> str:
        base = row.runs.get(baseline)
        if row.run is None or base is None or row.key == baseline:
            return "-"
        now, before = seconds(row.run), seconds(base)
        if now is None or not before:
            return "-"
        saved = fmt_time(before - now) if before >= now else "-" + fmt_time(now - before)
        return f"{saved} ({fmt_frac(1 - now / before)})"

    return cell


def _matmul_table(case: str, title: str) -> Section:
    return Section(
        title=title,
        select=op("matmul", case),
        sort=lambda r: (r["device"], r["dtype"], r["kernel"], r["m"], r.time),
        columns=(
            col("device", lambda r: r["device"]),
            col("dtype", lambda r: r["dtype"]),
            col("kernel", lambda r: r["kernel"]),
            col("shape", lambda r: r["shape"]),
            col("time", lambda r: fmt_time(r.time)),
            col("GFLOP/s", lambda r: fmt_num(r["gflops"])),
            col("limit compared with", lambda r: r["limit"]),
            col("fraction of limit", lambda r: fmt_frac(r["fraction_of_limit"])),
        ),
    )


def _ddp_intro(runs: list[Run]) -> str:
    first = min(runs, key=lambda r: r["bs_global"])
    return (
        f"Training samples per second of `examples/train_mnist.py` ({first['model']}, {first['epochs']} "
        "epochs, start-up and validation excluded): one process against two (DistributedDataParallel over "
        "gloo, one thread each). The limit on two cores is 2x the best one-core rate; what DDP adds is "
        "per step (a gradient all-reduce and its hooks), so a larger batch hides more of it."
    )


def _step_norm_s(r: Run) -> float | None:
    return r["norm_layers_s"]


SECTIONS: tuple[Section, ...] = (
    Section(
        title="Matmul: the lesson's ladder",
        select=op("matmul", "ladder"),
        group_by=("device", "dtype", "shape"),
        heading=lambda r: f"{r['shape']}, {r['device']} {r['dtype']}",
        rows="kernel",
        label="step",
        order=LADDER_ORDER,
        all_rows=True,
        columns=_ladder_columns,
        footer=_ladder_footer,
    ),
    _matmul_table("wide", "Matmul: the whole training set through the 784x10 layer"),
    _matmul_table("square", "Matmul: square sizes"),
    Section(
        title="Cross-entropy kernels",
        select=op("cross_entropy"),
        intro="GB/s counts the least traffic the loss needs (the logits read once forward; read once, and a "
        "gradient as large written once, for forward+backward), so it compares with the measured bandwidth. "
        "No flops are counted for exp and log, so the fraction is of that memory floor only. "
        "Peak memory is the extra memory one call needed at its peak. Where a time says `(1.1x floor)`, "
        "the floor is that traffic timed in the same process (`x.sum()` over the logits forward; plus "
        "`g.fill_(1.0)` over a tensor of their size for forward+backward).",
        group_by=("device", "dtype", "n", "c"),
        group_order=lambda r: (r["device"], r["dtype"], r["n"] * r["c"]),
        heading=lambda r: (
            f"{r['n']} x {r['c']} logits, {r['device']} {r['dtype']} ({fmt_bytes(r['logits_bytes'])})"
        ),
        rows="kernel",
        order=LOSS_ORDER,
        pivot=("case", ("fwd", "fwd+bwd")),
        columns=(
            col("time", _time_and_floor),
            col("GB/s", lambda r: fmt_num(r["gbps"])),
            col("fraction of limit", lambda r: fmt_frac(r["fraction_of_limit"])),
            col("peak memory", _peak_memory),
        ),
        footer=_peak_methods,
    ),
    Section(
        title="Linear cross-entropy: the matmul and the loss fused",
        select=op("linear_cross_entropy"),
        intro="Forward+backward of `cross_entropy(input @ W.T, target)` at (N, H, V). Its floor is its three "
        "matmuls alone (`x @ W.T`, `dlogits @ W`, `dlogits.T @ x` by torch at the same shapes, timed in "
        "the same process): a fraction of 100% means the loss itself was free. Peak memory is the extra "
        "memory of one forward+backward beyond the inputs, next to the N x V logits it avoids holding.",
        group_by=("device", "dtype", "n", "h", "c"),
        heading=lambda r: (
            f"N, H, V = {r['n']}, {r['h']}, {r['c']}, {r['device']} {r['dtype']} "
            f"({fmt_bytes(r['logits_bytes'])} of logits)"
        ),
        rows="kernel",
        order=LINEAR_ORDER,
        columns=(
            col("fwd+bwd time", lambda r: fmt_time(r.time)),
            col("three matmuls", lambda r: fmt_time(r["floor_s"])),
            col("fraction of that floor", _fraction_of_floor),
            col(
                "peak memory",
                lambda r: (
                    fmt_bytes(r["peak_mem_bytes"])
                    + (
                        ""
                        if r["peak_mem_over_logits"] is None
                        else f" ({r['peak_mem_over_logits']:.2g}x logits)"
                    )
                ),
            ),
        ),
    ),
    Section(
        title="BatchNorm (lesson 07): the lesson's, PyTorch's and the fused kernel, in training",
        select=op("batch_norm"),
        intro="A training-mode BatchNorm at each layer of lesson 07's CNN (`nfs=[8,16,32,64,64]`, bs 512, "
        "28x28 MNIST) and at one larger activation. Its floor is the least traffic it needs, timed in the "
        "same process: forward, `y.copy_(x)` (read the input, write the output); forward+backward, that "
        "copy plus `torch.add(x, g, out=dx)` (read the input and the output's gradient, write the input's). "
        "GB/s counts that traffic; a fraction of 100% means the statistics and the normalisation were free. "
        "The lesson's BatchNorm (nb_07) takes the statistics under `no_grad`, so its backward skips their "
        "gradient: it is checked against `F.batch_norm` in eval mode with the batch's own statistics, the "
        "others against `F.batch_norm` in training mode (float64, before timing).",
        group_by=("device", "dtype", "shape"),
        group_order=lambda r: (r["device"], r["dtype"], r["numel"]),
        heading=lambda r: (
            f"{r['shape']} ({r['layer']}), {r['device']} {r['dtype']} ({fmt_bytes(r['input_bytes'])})"
        ),
        rows="kernel",
        order=BATCH_NORM_ORDER,
        pivot=("case", ("fwd", "fwd+bwd")),
        columns=(
            col("time", _time_and_floor),
            col("GB/s", lambda r: fmt_num(r["gbps"])),
            col("fraction of floor", _fraction_of_floor),
        ),
    ),
    Section(
        title="Convolution (lesson 06) as a matmul (lesson 01): `F.unfold` + matmul against `F.conv2d`",
        select=op("conv2d"),
        intro="Each convolution of lesson 06's CNN at bs 512 on 28x28 images, forward. `F.unfold` copies "
        "every receptive field into a column (k*k times the input for a stride of 1), then one matmul "
        "with the weights does all the multiply-adds; `F.conv2d` is PyTorch's own. Flops are 2 * N * "
        "C_out * C_in * k * k * H_out * W_out; the fraction is of the matmul peak this run measured.",
        group_by=("device", "dtype"),
        heading=lambda r: f"bs {r['n']}, {r['device']} {r['dtype']}",
        sort=lambda r: (r["layer_index"], CONV_ORDER.index(r["kernel"]) if r["kernel"] in CONV_ORDER else 9),
        columns=(
            col("layer", lambda r: r["layer"]),
            col("input -> output", lambda r: f"{r['input_shape']} -> {r['output_shape']}"),
            col("kernel", lambda r: r["kernel"]),
            col("time", lambda r: fmt_time(r.time)),
            col("GFLOP/s", lambda r: fmt_num(r["gflops"])),
            col("fraction of matmul peak", _fraction_of_peak),
        ),
    ),
    Section(
        title="A training step of lesson 07's CNN: how much was BatchNorm, and what fusing saved",
        select=op("train_step"),
        intro="One step (forward, cross-entropy, backward, SGD) of lesson 07's CNN (`nfs=[8,16,32,64,64]`, "
        "conv, ReLU, then BatchNorm) at bs 512, with `nn.BatchNorm2d` and with `FusedBatchNorm2d`. The "
        "norm layers alone: each norm layer's forward+backward on the activations and gradients it saw in "
        "the step (captured once, then timed in the same process).",
        group_by=("device", "dtype", "bs"),
        heading=lambda r: f"bs {r['bs']}, {r['device']} {r['dtype']}",
        rows="kernel",
        label="norm",
        order=STEP_ORDER,
        columns=(
            col("step time", lambda r: fmt_time(r.time)),
            col("norm layers alone", lambda r: fmt_time(r["norm_layers_s"])),
            col(
                "norm share of the step",
                lambda r: fmt_frac(r["norm_layers_s"] / r.time if r["norm_layers_s"] else None),
            ),
            Column("step time saved", _saved("nn.BatchNorm2d", lambda r: r.time)),
            Column("norm time saved", _saved("nn.BatchNorm2d", _step_norm_s)),
        ),
    ),
    Section(
        title="More than one process: DDP scaling",
        select=op("ddp_scaling"),
        intro=_ddp_intro,
        sort=lambda r: r["bs_global"],
        columns=(
            col("global batch", lambda r: str(r["bs_global"])),
            col("1 process, 2 threads", lambda r: f"{r['samples_per_s_one_2_threads']:,.0f}"),
            col("1 process, 1 thread", lambda r: f"{r['samples_per_s_one_1_thread']:,.0f}"),
            col("2 processes, 1 thread each", lambda r: f"{r['samples_per_s_two_1_thread']:,.0f}"),
            col("2 processes / 1 process (2 threads)", lambda r: fmt_ratio(r["scaling"])),
            col(
                "2 processes / 1 process (1 thread)",
                lambda r: fmt_ratio(r["scaling_vs_1_thread"]) + f" of {fmt_ratio(r['limit'])}",
            ),
            col(
                "valid loss/accuracy (2 processes)", lambda r: "/".join(fmt_num(v, 4) for v in r["valid_two"])
            ),
            col("load average", lambda r: fmt_num(r["load_average"], 2)),
        ),
    ),
    Section(
        title="Saving a checkpoint: what it costs",
        select=group("checkpoint"),
        intro="The time to write one checkpoint (`minilib.checkpoint`: model, optimiser and Runner state, "
        "written to a temporary file and renamed over the last one) and its size.",
        sort=lambda r: (str(r["model"]), r["bytes"] or 0),
        columns=(
            col("model", lambda r: str(r["model"])),
            col("checkpoint size", lambda r: fmt_bytes(r["bytes"])),
            col("time per save", lambda r: fmt_time(r["seconds_per_save"])),
            col(
                "MB/s",
                lambda r: fmt_num(
                    r["bytes"] / r["seconds_per_save"] / 1e6 if r["seconds_per_save"] else None
                ),
            ),
        ),
    ),
)


# ---------------------------------------------------------------------------------------------------------
# The sections that are not about runs.


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
# A chart as data, and its one helper.


@dataclass(frozen=True)
class Chart:
    """One PNG: for each value of ``panels`` (the runs' ``case``; none: one panel of all), a subplot with one
    series per distinct value of the ``series`` keys, labelled ``label(first run)``.

    - ``kind="lines"``: ``y(run)`` against the run's ``x`` value, sorted by x, drawn with ``style(run)``;
    - ``kind="bars"``: one bar per series in each category (the run's ``x`` value; ``categories`` in that
      order, then the rest; only those with a run), after the series that ``reference(reference.json)``
      gives. Series come in ``order`` of their first key's value, then sorted.
    - ``hlines(limits)``: dashed horizontal lines (value, label) from the JSON's measured limits.
    """

    file: str
    title: str
    select: Select
    kind: str
    x: str
    y: Callable[[Run], float | None]
    series: tuple[str, ...]
    label: Callable[[Run], str]
    ylabel: str
    xlabel: str = ""
    panels: tuple[str, ...] = ()
    categories: tuple[Any, ...] = ()
    order: tuple[Any, ...] = ()
    reference: Callable[[dict[str, Any]], list[tuple[str, dict[Any, float]]]] | None = None
    style: Callable[[Run], str] = lambda r: "o-"
    hlines: Callable[[dict[str, Any]], list[tuple[float, str]]] | None = None
    xlog: bool = True
    ylog: bool = True


def draw_chart(chart: Chart, data: dict[str, Any], reference: dict[str, Any], out_dir: Path) -> Path | None:
    """Draw `chart` into out_dir/chart.file; None (and no file) when the JSON has no run it selects."""
    runs = [r for r in all_runs(data) if chart.select(r)]
    if not runs:
        return None
    panels = chart.panels or (None,)
    fig = Figure(figsize=(8, 4.5) if len(panels) == 1 else (5.5 * len(panels), 4.5))
    axes = fig.subplots(1, len(panels), sharey=True, squeeze=False)[0]
    limits = data.get("minilib", {}).get("limits", {})
    for ax, panel in zip(axes, panels, strict=True):
        mine = [r for r in runs if panel is None or r["case"] == panel]
        series = sorted(
            _by(mine, *chart.series).items(), key=lambda kv: (_rank(chart.order, kv[0][0]), kv[0])
        )
        if chart.kind == "bars":
            _bars(ax, chart, series, reference)
        else:
            for _, members in series:
                members = sorted(members, key=lambda r: r[chart.x])
                ax.plot(
                    [r[chart.x] for r in members],
                    [chart.y(r) for r in members],
                    chart.style(members[0]),
                    label=chart.label(members[0]),
                )
        for value, text in chart.hlines(limits) if chart.hlines else ():
            ax.axhline(value, ls="--", lw=1, color="grey")
            ax.text(0.01, value, text, transform=ax.get_yaxis_transform(), fontsize=7, va="bottom")
        if chart.xlog:
            ax.set_xscale("log")
        if chart.ylog:
            ax.set_yscale("log")
        if chart.xlabel:
            ax.set_xlabel(chart.xlabel)
        ax.set_title(chart.title if panel is None else chart.title.format(panel=panel))
        ax.grid(axis="y" if chart.kind == "bars" else "both", which="both", alpha=0.3)
    axes[0].set_ylabel(chart.ylabel)
    axes[-1].legend(fontsize=7)
    fig.tight_layout()
    path = out_dir / chart.file
    fig.savefig(path, dpi=110)
    return path


def _bars(ax: Any, chart: Chart, series: list[tuple[tuple, list[Run]]], reference: dict[str, Any]) -> None:
    bars = list(chart.reference(reference)) if chart.reference else []
    bars += [(chart.label(members[0]), {r[chart.x]: chart.y(r) for r in members}) for _, members in series]
    present = {c for _, values in bars for c in values}
    categories = [c for c in chart.categories if c in present] + sorted(
        present - set(chart.categories), key=str
    )
    width = 0.8 / len(bars)
    for i, (label, values) in enumerate(bars):
        xs = [j + (i - (len(bars) - 1) / 2) * width for j, c in enumerate(categories) if c in values]
        ax.bar(xs, [values[c] for c in categories if c in values], width=width, label=label)
    ax.set_xticks(range(len(categories)), [str(c) for c in categories])


def _rank(order: tuple[Any, ...], value: Any) -> int:
    """Where `value` comes in `order` (after all of it when it is not there)."""
    return order.index(value) if value in order else len(order)


def _peaks(limits: dict[str, Any]) -> list[tuple[float, str]]:
    return [(p, f"{d} {t} peak") for d, lim in limits.items() for t, p in lim.get("peak_gflops", {}).items()]


def _bandwidths(limits: dict[str, Any]) -> list[tuple[float, str]]:
    return [(lim["bandwidth_gbps"], f"{d} bandwidth") for d, lim in limits.items()]


CHARTS: tuple[Chart, ...] = (
    Chart(
        file="ladder.png",
        title="Lesson 01's matmul ladder: each step moves work from Python into C",
        select=op("matmul", "ladder"),
        kind="bars",
        x="kernel",
        y=lambda r: r.time,
        series=("device", "dtype", "shape"),
        label=lambda r: f"this run: {r['device']} {r['dtype']} {r['shape']}",
        categories=LADDER_ORDER,
        reference=lambda ref: [(s["label"], s["seconds"]) for s in ref["ladder"].values()],
        ylabel="time per call (s, log scale)",
        xlog=False,
    ),
    Chart(
        file="matmul_throughput.png",
        title="Matmul throughput against size (dashed: measured peaks)",
        select=op("matmul", "square", "wide"),
        kind="lines",
        x="flops",
        y=lambda r: r["gflops"],
        series=("device", "dtype", "kernel", "case"),
        label=lambda r: f"{r['kernel']} {r['case']} ({r['device']} {r['dtype']})",
        style=lambda r: "o-" if r["case"] == "square" else "s",
        hlines=_peaks,
        xlabel="flops per call (2 m k n)",
        ylabel="GFLOP/s",
    ),
    Chart(
        file="cross_entropy_throughput.png",
        title="cross-entropy {panel}",
        select=op("cross_entropy"),
        kind="lines",
        panels=("fwd", "fwd+bwd"),
        x="logits_bytes",
        y=lambda r: r["gbps"],
        series=("device", "dtype", "kernel"),
        label=lambda r: f"{r['kernel']} ({r['device']} {r['dtype']})",
        hlines=_bandwidths,
        xlabel="logits size (bytes)",
        ylabel="GB/s (least traffic / time)",
    ),
    Chart(
        file="batch_norm_floor.png",
        title="BatchNorm {panel}: fraction of the read+write floor",
        select=op("batch_norm"),
        kind="bars",
        panels=("fwd", "fwd+bwd"),
        x="layer",
        y=lambda r: r["floor_s"] / r.time if r["floor_s"] else 0.0,
        series=("kernel", "device", "dtype"),
        order=BATCH_NORM_ORDER,
        label=lambda r: f"{r['kernel']} ({r['device']} {r['dtype']})",
        categories=("conv1", "conv2", "conv3", "conv4", "conv5"),
        hlines=lambda limits: [(1.0, "the floor")],
        ylabel="floor time / time (1: as fast as a copy)",
        xlog=False,
        ylog=False,
    ),
    Chart(
        file="conv_as_matmul.png",
        title="Lesson 06's convolutions: F.unfold + matmul against F.conv2d (dashed: measured peaks)",
        select=op("conv2d"),
        kind="bars",
        x="layer",
        y=lambda r: r["gflops"],
        series=("kernel", "device", "dtype"),
        order=CONV_ORDER,
        label=lambda r: f"{r['kernel']} ({r['device']} {r['dtype']})",
        hlines=_peaks,
        ylabel="GFLOP/s (log scale)",
        xlog=False,
    ),
)


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
    body = machine_section(data)
    for section in SECTIONS:
        body += render_section(section, data, reference)
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
    charts = [p for p in (draw_chart(c, data, reference, out_dir) for c in CHARTS) if p is not None]
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
