"""`python -m benchmarks.run [--quick] [--out DIR] [pytest args...]`: what `nox -s bench` runs.

1. runs pytest on benchmarks/ with pytest-benchmark, writing DIR/bench.json (DIR defaults to bench-results);
2. generates DIR/bench-report.md and DIR/*.png from that JSON (`python -m benchmarks.report DIR/bench.json`).

`--quick` runs the reduced set (about 2 minutes on 2 cores); without it the full set runs (see README).
Any other argument goes to pytest unchanged, e.g. `-k ladder`, `--benchmark-save=before`,
`--benchmark-compare=0001`.
Exits with pytest's status (after writing the report, if pytest wrote its JSON).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

from benchmarks import report

HERE = Path(__file__).resolve().parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.run",
        allow_abbrev=False,  # so that no pytest option is taken for an abbreviation of ours
        description="Time minilib's kernels with pytest-benchmark and write a Markdown report with charts.",
        epilog="Unrecognised arguments are passed to pytest (e.g. -k ladder, --benchmark-save=NAME).",
    )
    parser.add_argument("--quick", action="store_true", help="the reduced set: about 2 minutes on 2 cores")
    parser.add_argument("--out", default="bench-results", help="output folder (default: bench-results)")
    args, pytest_args = parser.parse_known_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / "bench.json"
    json_path.unlink(missing_ok=True)  # a failed run must not leave an old JSON to be reported as new
    bench_set = "quick" if args.quick else "full"
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        *sorted(str(p) for p in HERE.glob("bench_*.py")),  # the benchmarks, not the harness's own tests
        f"--bench-set={bench_set}",
        f"--benchmark-json={json_path}",
        "--benchmark-columns=min,median,mean,stddev,rounds,iterations",
    ]
    if args.quick:
        cmd += ["--benchmark-max-time=0.25"]  # calibrated cases: a quarter second of rounds each
    cmd += pytest_args  # after ours, so that a user's --benchmark-max-time etc. wins
    print("$", " ".join(cmd), flush=True)
    start = time.perf_counter()
    rc = subprocess.call(cmd)
    wall = time.perf_counter() - start
    print(f"benchmarks: pytest exited with {rc} after {wall:.0f} s", flush=True)
    if json_path.exists():
        command = " ".join(["python -m benchmarks.run", *(sys.argv[1:] if argv is None else argv)])
        written = report.write_report(json_path, out, wall_s=wall, command=command)
        for path in written:
            print(f"benchmarks: wrote {path}")
    else:
        print(f"benchmarks: no {json_path} (pytest wrote none), so no report", file=sys.stderr)
    return rc


if __name__ == "__main__":
    sys.exit(main())
