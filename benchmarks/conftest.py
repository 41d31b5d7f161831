"""Fixtures and hooks of the benchmark harness.

- ``--bench-set=tiny|quick|full`` picks the sizes; without it, ``--benchmark-disable`` means tiny (the smoke
  run of ``nox -s tests``) and anything else means full.
- ``cpu_limits`` / ``gpu_limits`` measure the machine's limits once per session, before the first benchmark
  that needs them; ``cuda`` skips a GPU case with a reason when there is no CUDA device.
- The hooks add the torch/GPU facts to pytest-benchmark's ``machine_info`` and put the limits (settled at the
  end of the run: the measured value, or the best a case reached where that is higher) and the skipped cases
  into the JSON, so that the report is generated from the JSON alone; cases that share a ``floor_key`` get
  the fastest floor measured for it (``harness.settle_floors``).
"""

from __future__ import annotations

import os
import platform
from typing import Any

import pytest
import torch

from benchmarks import harness

_LIMITS = pytest.StashKey[dict[str, Any]]()
_SKIPPED = pytest.StashKey[list[dict[str, str]]]()
_LOAD_AT_START = pytest.StashKey[float | None]()


def _load_average() -> float | None:
    """The 1-minute load average: above the core count, other processes were competing for the CPU."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):  # not on every platform
        return None


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("minilib benchmarks")
    group.addoption(
        "--bench-set",
        choices=harness.SETS,
        default=None,
        help="which sizes to benchmark: tiny (smoke run), quick (about a minute on 2 cores) or full. "
        "Default: tiny under --benchmark-disable, else full.",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.stash[_LIMITS] = {}
    config.stash[_SKIPPED] = []
    config.stash[_LOAD_AT_START] = _load_average()
    config.pluginmanager.register(_SkipRecorder(config.stash[_SKIPPED]), "minilib-benchmark-skips")


@pytest.fixture(scope="session")
def sizes(pytestconfig: pytest.Config) -> dict[str, Any]:
    return harness.sizes(harness.bench_set(pytestconfig))


@pytest.fixture(scope="session")
def cpu_limits(pytestconfig: pytest.Config) -> dict[str, Any]:
    limits = harness.measure_cpu_limits(harness.bench_set(pytestconfig))
    pytestconfig.stash[_LIMITS]["cpu"] = limits
    return limits


@pytest.fixture(scope="session")
def cuda() -> None:
    if not torch.cuda.is_available():
        pytest.skip(
            "GPU case: no CUDA device here (torch.cuda.is_available() is False); run it on a CUDA machine"
        )


@pytest.fixture(scope="session")
def gpu_limits(cuda: None, pytestconfig: pytest.Config) -> dict[str, Any]:
    limits = harness.measure_gpu_limits(harness.bench_set(pytestconfig))
    pytestconfig.stash[_LIMITS]["cuda"] = limits
    return limits


@pytest.fixture
def limits_for(request: pytest.FixtureRequest):
    """``limits_for(device)``: the measured limits of that device (skips a CUDA case without CUDA)."""

    def get(device: str) -> dict[str, Any]:
        return request.getfixturevalue("gpu_limits" if device == "cuda" else "cpu_limits")

    return get


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


class _SkipRecorder:
    """Keeps each skipped benchmark and its reason, for the report (pytest-benchmark's JSON has only runs)."""

    def __init__(self, skipped: list[dict[str, str]]) -> None:
        self.skipped = skipped

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if report.skipped and report.nodeid.startswith("benchmarks/"):
            reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
            self.skipped.append({"nodeid": report.nodeid, "reason": reason.removeprefix("Skipped: ")})


def pytest_benchmark_update_machine_info(config: pytest.Config, machine_info: dict[str, Any]) -> None:
    machine_info["torch_version"] = torch.__version__
    machine_info["cpu_count"] = os.cpu_count()
    machine_info["torch_threads"] = torch.get_num_threads()
    machine_info["cpu_model"] = machine_info.get("cpu", {}).get("brand_raw") or platform.processor()
    machine_info["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    machine_info["cuda_version"] = torch.version.cuda


def pytest_benchmark_update_json(config: pytest.Config, benchmarks: Any, output_json: dict[str, Any]) -> None:
    # Limits are settled against the whole run before anything reads them (see harness.settle_limits).
    cases = [(b["name"], b["extra_info"]) for b in output_json["benchmarks"] if "seconds" in b["extra_info"]]
    harness.settle_limits(config.stash[_LIMITS], cases)
    harness.settle_floors([info for _, info in cases])
    output_json["minilib"] = {
        "bench_set": harness.bench_set(config),
        "limits": config.stash[_LIMITS],
        "skipped": config.stash[_SKIPPED],
        "load_average": {"start": config.stash[_LOAD_AT_START], "end": _load_average()},
    }
