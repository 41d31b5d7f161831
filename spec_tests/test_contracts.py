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


def _learner_rows():
    import torch.nn.functional as F
    from support import tiny_data

    from minilib.callbacks import Recorder
    from minilib.learner import Callback, Runner, camel2snake, create_learner, get_model, get_model_func

    def learn():
        return create_learner(get_model_func(0.1), F.cross_entropy, tiny_data())

    def data_with(c):
        data = tiny_data()
        data.c = c
        return data

    class XbCallback(Callback):  # reachable as run.xb, which the Runner sets for every batch
        pass

    return [
        Bad(
            "get_model: lr=inf",
            lambda: get_model(tiny_data(), lr=float("inf")),
            ValueError,
            r"lr",
            defect=True,
        ),
        Bad("get_model: lr=0", lambda: get_model(tiny_data(), lr=0), ValueError, r"get_model: lr must be"),
        Bad("get_model: data.c=0", lambda: get_model(data_with(0)), ValueError, r"data\.c", defect=True),
        Bad("get_model: data.c=None", lambda: get_model(data_with(None)), TypeError, r"data\.c"),
        Bad("get_model: nh=True", lambda: get_model(tiny_data(), nh=True), TypeError, r"nh"),
        Bad("camel2snake: an int", lambda: camel2snake(3), TypeError, r"camel2snake: name"),
        Bad(
            "Runner: an instance in cb_funcs",
            lambda: Runner(cb_funcs=[Recorder()]),
            TypeError,
            r"cb_funcs .*pass the class",
            defect=True,
        ),
        Bad(
            "Runner: not a callback in cbs",
            lambda: Runner([object()]),
            TypeError,
            r"Runner: cbs",
        ),
        Bad("Runner: a callback named run.xb", lambda: Runner([XbCallback()]), ValueError, r"run\.xb"),
        Bad(
            "Runner.run: unknown event",
            lambda: Runner().run("begin_bacth"),
            ValueError,
            r"event_name.*begin_batch",
        ),
        Bad("Callback: unknown event", lambda: Callback()("fit"), ValueError, r"event_name"),
        Bad("Runner.fit: epochs=-1", lambda: Runner().fit(-1, learn()), ValueError, r"Runner.fit: epochs"),
        Bad("Runner.fit: epochs=1.5", lambda: Runner().fit(1.5, learn()), TypeError, r"epochs"),
        Bad("Runner.fit: learn=None", lambda: Runner().fit(1, None), TypeError, r"Runner.fit: learn"),
    ]


BAD += _learner_rows()

# ------------------------------------------------------------------------ minilib.callbacks


def _callbacks_rows():
    import torch.nn.functional as F
    from support import tiny_data
    from torch import optim

    from minilib.callbacks import AvgStats, LR_Find, ParamScheduler, Recorder
    from minilib.learner import Learner, Runner, create_learner, get_model, get_model_func
    from minilib.schedules import sched_no

    def fit(*cbs, learn=None):
        run = Runner(list(cbs))
        run.fit(1, learn or create_learner(get_model_func(0.1), F.cross_entropy, tiny_data()))
        return run

    def two_groups():
        data = tiny_data()
        model, _ = get_model(data)
        opt = optim.SGD([{"params": model[0].parameters()}, {"params": model[2].parameters()}], lr=0.1)
        return Learner(model, opt, F.cross_entropy, data)

    lr = sched_no(0.1, 0.1)
    return [
        Bad(
            "ParamScheduler: pname 'lrr'",
            lambda: fit(ParamScheduler("lrr", lr)),
            ValueError,
            r"pname.*'lrr'",
            defect=True,
        ),
        Bad("ParamScheduler: pname not a str", lambda: ParamScheduler(3, lr), TypeError, r"pname"),
        Bad(
            "ParamScheduler: a number for a schedule",
            lambda: ParamScheduler("lr", 0.1),
            TypeError,
            r"sched_funcs",
        ),
        Bad(
            "ParamScheduler: 3 schedules, 2 groups",
            lambda: fit(ParamScheduler("lr", [lr] * 3), learn=two_groups()),
            ValueError,
            r"sched_funcs.*3 schedules for 2 param groups",
        ),
        Bad("AvgStats: a metric that is not callable", lambda: AvgStats([3], True), TypeError, r"metrics"),
        Bad("LR_Find: max_iter=0", lambda: LR_Find(max_iter=0), ValueError, r"max_iter"),
        Bad("LR_Find: max_lr=inf", lambda: LR_Find(max_lr=float("inf")), ValueError, r"max_lr", defect=True),
        Bad("LR_Find: min_lr > max_lr", lambda: LR_Find(min_lr=1, max_lr=0.1), ValueError, r"max_lr"),
        Bad("Recorder.plot_lr: pgid=5", lambda: fit(Recorder()).recorder.plot_lr(5), IndexError, r"pgid"),
        Bad(
            "Recorder.plot: skip_last=-1",
            lambda: fit(Recorder()).recorder.plot(skip_last=-1),
            ValueError,
            r"skip_last",
        ),
    ]


BAD += _callbacks_rows()

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
