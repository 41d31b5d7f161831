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

from minilib import kernels  # noqa: E402  (imported in its own section: the sections merge independently)

_fce, _flce = kernels.fused_cross_entropy, kernels.fused_linear_cross_entropy
_y3 = torch.tensor([0, 1, 2])

BAD += [
    Bad(
        "fused_cross_entropy: logits a list",
        lambda: _fce([[0.5, 0.5]], torch.tensor([0])),
        TypeError,
        r"logits",
    ),
    Bad(
        "fused_cross_entropy: integer logits named logits",
        lambda: _fce(torch.ones(3, 5, dtype=torch.int64), _y3),
        ValueError,
        r"fused_cross_entropy: logits must be a floating-point",
        defect=True,
    ),
    Bad(
        "fused_cross_entropy: 1-D logits", lambda: _fce(t(5), torch.tensor([0])), ValueError, r"logits .*2-D"
    ),
    Bad("fused_cross_entropy: int32 target", lambda: _fce(t(3, 5), _y3.int()), ValueError, r"target"),
    Bad("fused_cross_entropy: target per element", lambda: _fce(t(3, 5), _y3[:2]), ValueError, r"target"),
    Bad(
        "fused_cross_entropy: class 5 of 5",
        lambda: _fce(t(3, 5), torch.tensor([0, 5, 1])),
        IndexError,
        r"target",
    ),
    Bad(
        "fused_cross_entropy: -1 is not ignore_index",
        lambda: _fce(t(3, 5), torch.tensor([0, -1, 1])),
        IndexError,
        r"target holds class -1 at position 1",
    ),
    Bad(
        "fused_cross_entropy: an empty batch names logits",
        lambda: _fce(t(0, 5), torch.zeros(0, dtype=torch.int64)),
        ValueError,
        r"fused_cross_entropy: logits must be a batch of at least one row",
        defect=True,
    ),
    Bad(
        "fused_cross_entropy: weight= is refused",
        lambda: _fce(t(3, 5), _y3, weight=torch.ones(5)),
        TypeError,
        r"fused_cross_entropy: weight=",
    ),
    Bad(
        "fused_cross_entropy: reduction typo",
        lambda: _fce(t(3, 5), _y3, reduction="avg"),
        ValueError,
        r"reduction",
    ),
    Bad(
        "fused_cross_entropy: smoothing 1.5",
        lambda: _fce(t(3, 5), _y3, label_smoothing=1.5),
        ValueError,
        r"label_smoothing",
    ),
    Bad(
        "fused_cross_entropy: ignore_index a str",
        lambda: _fce(t(3, 5), _y3, ignore_index="pad"),
        TypeError,
        r"ignore_index",
    ),
    Bad(
        "fused_cross_entropy: target on another device",
        lambda: _fce(t(3, 5), _y3.to("meta")),
        ValueError,
        r"logits and target must be on one device",
    ),
    Bad(
        "fused_linear_cross_entropy: input a list",
        lambda: _flce([[1.0]], t(5, 1), torch.tensor([0])),
        TypeError,
        r"input",
    ),
    Bad(
        "fused_linear_cross_entropy: H differs",
        lambda: _flce(t(3, 4), t(5, 6), _y3),
        ValueError,
        r"linear_weight must be \[V, H\] with H = input's 4 columns",
    ),
    Bad(
        "fused_linear_cross_entropy: bias length",
        lambda: _flce(t(3, 4), t(5, 4), _y3, linear_bias=t(4)),
        ValueError,
        r"linear_bias",
    ),
    Bad(
        "fused_linear_cross_entropy: dtypes differ",
        lambda: _flce(t(3, 4), t(5, 4, dtype=torch.float64), _y3),
        ValueError,
        r"input and linear_weight must have one dtype, got input float32, linear_weight float64",
    ),
    Bad(
        "fused_linear_cross_entropy: 2-D target",
        lambda: _flce(t(3, 4), t(5, 4), _y3[:, None]),
        ValueError,
        r"target",
    ),
    Bad(
        "fused_linear_cross_entropy: class beyond the weight's rows",
        lambda: _flce(t(3, 4), t(5, 4), torch.tensor([0, 9, 1])),
        IndexError,
        r"target holds class 9 .* linear_weight has only 5 classes",
    ),
    Bad(
        "fused_linear_cross_entropy: an empty batch",
        lambda: _flce(t(0, 4), t(5, 4), torch.zeros(0, dtype=torch.int64)),
        ValueError,
        r"input must be a batch of at least one row",
    ),
    Bad(
        "fused_linear_cross_entropy: weight=",
        lambda: _flce(t(3, 4), t(5, 4), _y3, weight=t(5)),
        TypeError,
        r"weight=",
    ),
    Bad(
        "triton_matmul: a a list",
        lambda: kernels.triton_matmul([[1.0]], t(1, 1)),
        TypeError,
        r"triton_matmul: a ",
    ),
    Bad(
        "triton_matmul: int b",
        lambda: kernels.triton_matmul(t(2, 3), torch.ones(3, 2, dtype=torch.int64)),
        ValueError,
        r"b must",
    ),
    Bad(
        "triton_matmul: inner sizes",
        lambda: kernels.triton_matmul(t(2, 3), t(2, 3)),
        ValueError,
        r"a is 2x3 but b is 2x3",
    ),
]

UNTOUCHED += [
    Untouched(
        "fused_cross_entropy",
        lambda x, y: _fce(x, y, label_smoothing=0.1),
        lambda: (t(4, 7), torch.tensor([0, 6, -100, 2])),
    ),
    Untouched(
        "fused_cross_entropy forward+backward",
        lambda x, y: _fce(x.detach().requires_grad_(), y).backward(),
        lambda: (t(4, 7), torch.tensor([0, 6, 3, 2])),
    ),
    Untouched(
        "fused_linear_cross_entropy forward+backward",
        lambda x, w, b, y: _flce(
            x.detach().requires_grad_(),
            w.detach().requires_grad_(),
            y,
            linear_bias=b.detach().requires_grad_(),
        ).backward(),
        lambda: (t(5, 3), t(7, 3), t(7), torch.tensor([0, 6, -100, 2, 1])),
    ),
]


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
