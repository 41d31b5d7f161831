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

# ------------------------------------------------------------------------ minilib.schedules

# ------------------------------------------------------------------------ minilib.learner

# ------------------------------------------------------------------------ minilib.callbacks

# ------------------------------------------------------------------------ minilib.kernels

# ------------------------------------------------------------------------ minilib.distributed


def _ddp_fit(train_dl=None, **ddp_kwargs):
    """Fit a tiny learner for one epoch with ``DDPCallback(**ddp_kwargs)``, in this process (no group)."""
    # Imported here, not at the top, so that this section merges on its own.
    from torch.utils.data import DataLoader as TorchDataLoader

    from minilib.data import DataBunch, Dataset
    from minilib.distributed import DDPCallback
    from minilib.learner import Learner, Runner, get_model

    ds = Dataset(torch.randn(4, 3), torch.tensor([0, 1, 0, 1]))
    data = DataBunch(TorchDataLoader(ds, batch_size=2), TorchDataLoader(ds), c=2)
    learn = Learner(*get_model(data, nh=4), torch.nn.functional.cross_entropy, data)
    if train_dl is not None:
        data.train_dl = train_dl
    Runner([DDPCallback(**ddp_kwargs)]).fit(1, learn)


BAD += [
    Bad("DDPCallback: fit without init_process_group", _ddp_fit, RuntimeError, r"init_process_group"),
    Bad(
        "DDPCallback: seed -1",
        lambda: _ddp_fit(seed=-1),
        ValueError,
        r"DDPCallback: seed must be an int >= 0",
    ),
    Bad("DDPCallback: seed 1.5", lambda: _ddp_fit(seed=1.5), TypeError, r"DDPCallback: seed"),
    Bad(
        "DDPCallback: process_group a str",
        lambda: _ddp_fit(process_group="gloo"),
        TypeError,
        r"process_group",
    ),
    Bad(
        "DDPCallback: train_dl a list",
        lambda: _ddp_fit(train_dl=[(torch.ones(2, 3), torch.ones(2))]),
        TypeError,
        r"learn.data.train_dl must be a torch.utils.data.DataLoader",
    ),
]

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
