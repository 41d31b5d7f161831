"""Shared fixtures: the MNIST sample (8,000 train / 2,000 valid, from $MINILIB_DATA) and fixed seeds."""

from __future__ import annotations

import os

import pytest
import torch

from minilib.data import get_data


@pytest.fixture(scope="session")
def mnist_sample():
    """(x_train, y_train, x_valid, y_valid) of the MNIST sample; skips (locally) or fails (CI) without it."""
    try:
        return get_data(sample=True)
    except FileNotFoundError as e:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"MNIST sample not available: {e}")


@pytest.fixture(scope="session", autouse=True)
def _one_cpu_thread():
    """Run the spec tests on one CPU thread. The lessons' models are tiny (64 x 784 @ 784 x 50), so a
    second thread gains nothing, and on a busy 2-core machine OpenMP's spin-waiting made training up to
    50x slower (measured: lesson 03's file took 107 s with 2 threads, 21 s with 1)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same random state, so a test that trains is reproducible."""
    torch.manual_seed(42)
