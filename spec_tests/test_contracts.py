"""The contract (../shared/API.md): every public name, the bad inputs it refuses, and the error each gets.

The lessons' files hold the lessons' claims; this file holds, in one table, what every public function
does with input it cannot use. A user who passes the wrong thing must get, at once, an error of the
contract's type (TypeError for a value of the wrong kind, ValueError for a wrong shape, dtype, device or
value, IndexError for a class index out of range) whose message names the argument as the signature
spells it. Never a bare assert, never a NaN silently returned, never a hang, never a message about some
other argument deep inside torch.

Rows marked ``defect`` are the holes issue 9 found by trying minilib as a careless user and as an
attacker would: each failed before its fix.

A second table says that functions leave their inputs as they found them (only names ending in ``_``,
the lesson's ``.g`` gradients and the optimizer mutate, by design).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch

from minilib import contract


@dataclass(frozen=True)
class Bad:
    """One row: ``call()`` must raise ``error`` with ``names`` (the argument's own name) in its message."""

    id: str
    call: Callable[[], Any]
    error: type[BaseException]
    names: str  # a regex the message must match, usually the argument's name
    defect: bool = False  # True where this row failed before issue 9's fix


@dataclass(frozen=True)
class Untouched:
    """One row: ``call(*inputs)`` must leave every tensor in ``inputs`` equal to what it was."""

    id: str
    call: Callable[..., Any]
    inputs: Callable[[], tuple] = field(default=tuple)


BAD: list[Bad] = []
UNTOUCHED: list[Untouched] = []


def t(*shape, dtype=torch.float32):
    """A small random tensor of ``shape`` (the seed is fixed by conftest)."""
    return torch.randn(*shape).to(dtype)


# ------------------------------------------------------------------------ the vocabulary: minilib.contract

BAD += [
    Bad("contract.tensor: a list", lambda: contract.tensor("f", x=[1.0]), TypeError, r"f: x must be a torch"),
    Bad("contract.positive_int: a bool", lambda: contract.positive_int("f", n=True), TypeError, r"f: n "),
    Bad("contract.finite_number: nan", lambda: contract.finite_number("f", lr=float("nan")), ValueError, r"lr"),
]

# ------------------------------------------------------------------------ minilib.testing, minilib.matmul

# ------------------------------------------------------------------------ minilib.backprop, minilib.init

# ------------------------------------------------------------------------ minilib.loss, minilib.nn

# ------------------------------------------------------------------------ minilib.data: datasets and loaders

# ------------------------------------------------------------------------ minilib.mnist: get_data


def _get_data_with_a_directory_for_a_file():
    """get_data on a folder where ``t10k-images-idx3-ubyte.gz`` is a directory (imports stay in this
    section, so that sections merge cleanly)."""
    import os
    import tempfile

    from minilib.mnist import get_data

    with tempfile.TemporaryDirectory() as folder:
        os.mkdir(os.path.join(folder, "t10k-images-idx3-ubyte.gz"))
        get_data(folder, sample=True)


def _get_data_mnist():
    from minilib.mnist import get_data

    return get_data


BAD += [
    Bad("get_data: path an int", lambda: _get_data_mnist()(3), TypeError, r"get_data: path must be a str"),
    Bad("get_data: sample a str", lambda: _get_data_mnist()(sample="yes"), TypeError, r"get_data: sample "),
    Bad(
        "get_data: a directory under a data file's name",
        _get_data_with_a_directory_for_a_file,
        ValueError,
        r"t10k-images-idx3-ubyte.gz in .* is a directory.*MINILIB_DATA",
        defect=True,
    ),
]


# ------------------------------------------------------------------------ minilib.schedules

# ------------------------------------------------------------------------ minilib.learner

# ------------------------------------------------------------------------ minilib.callbacks

# ------------------------------------------------------------------------ minilib.kernels

# ------------------------------------------------------------------------ minilib.distributed

# ------------------------------------------------------------------------ the claims over both tables


@pytest.mark.parametrize("row", BAD, ids=[r.id for r in BAD])
def test_bad_input_gets_the_contracts_error_naming_the_argument(row: Bad):
    """Each row's call fails at once with the contract's error type, and the message names the
    argument the user typed (as the signature spells it), so the user knows what to fix."""
    with pytest.raises(row.error) as caught:
        row.call()
    message = str(caught.value)
    assert re.search(row.names, message), f"{row.id}: message {message!r} does not match {row.names!r}"


@pytest.mark.parametrize("row", UNTOUCHED, ids=[r.id for r in UNTOUCHED])
def test_inputs_are_not_mutated(row: Untouched):
    """A function whose name does not end in ``_`` leaves its input tensors as it found them."""
    inputs = row.inputs()
    before = [x.clone() if isinstance(x, torch.Tensor) else x for x in inputs]
    row.call(*inputs)
    for i, (x, old) in enumerate(zip(inputs, before)):
        if isinstance(x, torch.Tensor):
            assert torch.equal(x, old), f"{row.id}: input {i} changed (max diff {(x - old).abs().max()})"
