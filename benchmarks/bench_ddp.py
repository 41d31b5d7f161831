"""Beyond the lessons, timed: the MNIST training script on one process against two (DDP over gloo).

``examples/train_mnist.py`` trains the lessons' model (784-50-10) on the MNIST sample. The question a
learner asks before reaching for torchrun: on this machine, do two processes (one thread each) train
more samples per second than one process with two threads? The physical limit on 2 cores is 2x the
best single-core rate. What DDP adds per step: an all-reduce of the gradients (40k floats, 160 kB,
through gloo over the loopback), the hooks that start it, and each process's own Python overhead, against
a step that computes only a (B/W) x 784 @ 784 x 50 matmul and its gradients. So the batch size decides:
the overhead is per step, the work per sample.

Each case runs the script as a user would (``python examples/train_mnist.py --plain --threads 2``, then
``... --threads 1``, and ``torchrun --nproc-per-node 2 examples/train_mnist.py --threads 1``) and reads
the rate the script measures over its training passes (start-up and validation excluded). The recorded
``extra_info``: the three rates, ``scaling`` = two processes / one process with two threads,
``scaling_vs_1_thread`` = two processes / one process with one thread, ``limit`` 2.0 (two cores), and the
validation numbers of each run (one process and two agree when both use DDPCallback's sampler; ``--plain``
shuffles differently). The 1-minute load average is recorded too: on a busy machine two threads in one
process spin-wait on each other (OpenMP) and that rate collapses.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import harness
from minilib.data import get_data

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "examples" / "train_mnist.py"
# (global batch sizes, epochs) per set: lesson 03's batch 64 and lesson 05's 512.
CASES = {"tiny": ((512,), 1), "quick": ((64, 512), 8), "full": ((64, 512), 20)}
TIMEOUT_S = 600


def _mnist_sample_or_skip() -> None:
    try:
        get_data(sample=True)
    except FileNotFoundError as e:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"MNIST sample not available: {e}")


def run_script(tmp_path: Path, name: str, launcher: list[str], args: list[str]) -> dict:
    """Run the training script; its rank 0's JSON (rates, validation numbers)."""
    out = tmp_path / f"{name}.json"
    cmd = [*launcher, str(SCRIPT), *args, "--json", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S, cwd=ROOT)
    if done.returncode or not out.exists():
        raise AssertionError(f"{' '.join(cmd)} exited with {done.returncode}:\n{done.stderr[-3000:]}")
    return json.loads(out.read_text())


def bench_cases(config: pytest.Config) -> list[int]:
    return list(CASES[harness.bench_set(config)][0])


@pytest.mark.parametrize("bs", CASES["full"][0])
def test_two_processes_against_one(benchmark, pytestconfig, tmp_path, bs):
    if bs not in bench_cases(pytestconfig):
        pytest.skip(f"batch {bs} is not in the {harness.bench_set(pytestconfig)} set")
    _mnist_sample_or_skip()
    epochs = CASES[harness.bench_set(pytestconfig)][1]
    common = ["--epochs", str(epochs), "--bs", str(bs)]
    python = [sys.executable]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
    # The two-process job is what pytest-benchmark times (one round: start-up included); the rate that
    # counts is the script's own, over the training passes.
    two = benchmark.pedantic(
        lambda: run_script(tmp_path, "two", torchrun, [*common, "--threads", "1"]), rounds=1, iterations=1
    )
    assert two["processes"] == 2 and two["valid_accuracy"] > 0.5, two  # it trained, on two processes
    if harness.bench_set(pytestconfig) == "tiny":
        return  # the smoke run of `nox -s tests`: the script runs under torchrun; nothing to compare
    one_2t = run_script(tmp_path, "one_2t", python, [*common, "--plain", "--threads", "2"])
    one_1t = run_script(tmp_path, "one_1t", python, [*common, "--plain", "--threads", "1"])
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    benchmark.extra_info.update(
        op="ddp_scaling",
        model="784-50-10 MLP, SGD, cross-entropy (examples/train_mnist.py)",
        bs_global=bs,
        epochs=epochs,
        samples_per_s_one_2_threads=one_2t["samples_per_s"],
        samples_per_s_one_1_thread=one_1t["samples_per_s"],
        samples_per_s_two_1_thread=two["samples_per_s"],
        scaling=two["samples_per_s"] / one_2t["samples_per_s"],
        scaling_vs_1_thread=two["samples_per_s"] / one_1t["samples_per_s"],
        limit=2.0,
        valid_one=[one_2t["valid_loss"], one_2t["valid_accuracy"]],
        valid_two=[two["valid_loss"], two["valid_accuracy"]],
        load_average=load,
    )
