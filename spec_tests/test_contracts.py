"""The contract: every public name, the bad inputs it refuses, and the error each gets.

The lessons' files hold the lessons' claims; this file holds, in one table, what every public function
does with input it cannot use. A user who passes the wrong thing must get, at once, an error of the
contract's type (TypeError for a value of the wrong kind, ValueError for a wrong shape, dtype, device or
value, IndexError for a class index out of range) whose message names the argument as the signature
spells it. Never a bare assert, never a NaN silently returned, never a hang, never a message about some
other argument deep inside torch.

Rows marked ``defect`` are holes found by trying minilib as a careless user and as an attacker
would: each failed before its fix.

A second table says that functions leave their inputs as they found them (only names ending in ``_``,
the lesson's ``.g`` gradients and the optimizer mutate, by design).
"""

from __future__ import annotations

import math
import os
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from support import tiny_data
from torch import optim
from torch.utils.data import DataLoader as TorchDataLoader

from minilib import backprop, contract, data, init, kernels, loss, nn, schedules, testing
from minilib.callbacks import AvgStats, LR_Find, ParamScheduler, Recorder
from minilib.data import DataBunch, Dataset
from minilib.distributed import DDPCallback
from minilib.learner import Callback, Learner, Runner, camel2snake, create_learner, get_model, get_model_func
from minilib.matmul import MATMULS
from minilib.mnist import get_data
from minilib.schedules import sched_no


@dataclass(frozen=True)
class Bad:
    """One row: ``call()`` must raise ``error`` with ``names`` (the argument's own name) in its message."""

    id: str
    call: Callable[[], Any]
    error: type[BaseException]
    names: str  # a regex the message must match, usually the argument's name
    defect: bool = False  # True where this row failed before its fix


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
    Bad(
        "contract.finite_number: nan", lambda: contract.finite_number("f", lr=float("nan")), ValueError, r"lr"
    ),
    Bad(
        "contract.finite_number: outside within",
        lambda: contract.finite_number("f", within=(0, 1), pos=torch.tensor(1.5)),
        ValueError,
        r"f: pos must be in \[0, 1\], got a float \(1.5\)",
    ),
]

# ------------------------------------------------------------------------ minilib.testing, minilib.matmul


BAD += [
    Bad("test: cmp not callable", lambda: testing.test(1, 1, "=="), TypeError, r"test: cmp must be"),
    Bad(
        "test_near_zero: tol 0",
        lambda: testing.test_near_zero(0.0, tol=0),
        ValueError,
        r"test_near_zero: tol",
    ),
    Bad("test_near_zero: tol nan", lambda: testing.test_near_zero(0.0, tol=float("nan")), ValueError, r"tol"),
    Bad(
        "test_near: a column for a row",
        lambda: testing.test_near(t(3, 1), t(3)),
        AssertionError,
        r"3x1 and 3",
    ),
    Bad(
        "test_close: 0.25 apart",
        lambda: testing.test_close(t(2), t(2) + 0.25),
        AssertionError,
        r"max abs diff",
    ),
]
for _name, _mm in MATMULS.items():
    _f = f"matmul_{_name}"
    BAD += [
        Bad(
            f"{_f}: a a list", lambda f=_mm: f([[1.0, 2.0]], t(2, 1)), TypeError, rf"{_f}: a must be a torch"
        ),
        Bad(
            f"{_f}: b a list",
            lambda f=_mm: f(t(1, 2), [[1.0], [2.0]]),
            TypeError,
            rf"{_f}: b must be a torch",
        ),
        Bad(
            f"{_f}: a 1-D",
            lambda f=_mm: f(t(4), t(4, 2)),
            ValueError,
            r"a and b must be 2-D.*got a 4 and b 4x2",
        ),
        Bad(f"{_f}: b 1-D", lambda f=_mm: f(t(3, 4), t(4)), ValueError, r"got a 3x4 and b 4$"),
        Bad(f"{_f}: a batch", lambda f=_mm: f(t(2, 3, 4), t(4, 2)), ValueError, r"got a 2x3x4 and b 4x2"),
        Bad(
            f"{_f}: inner sizes",
            lambda f=_mm: f(t(3, 4), t(5, 2)),
            ValueError,
            r"inner sizes differ: a is 3x4 but b is 5x2",
        ),
        Bad(
            f"{_f}: b on meta",
            lambda f=_mm: f(t(3, 4), t(4, 2).to("meta")),
            ValueError,
            r"a on cpu, b on meta",
        ),
        Bad(
            f"{_f}: mixed dtypes",
            lambda f=_mm: f(t(3, 4), t(4, 2, dtype=torch.float64)),
            ValueError,
            r"a float32, b float64",
        ),
        Bad(
            f"{_f}: bool a",
            lambda f=_mm: f(t(3, 4) > 0, t(4, 2) > 0),
            ValueError,
            rf"{_f}: a must be a numeric",
            defect=True,
        ),
        Bad(
            f"{_f}: bool b",
            lambda f=_mm: f(t(3, 4), t(4, 2) > 0),
            ValueError,
            rf"{_f}: b must be a numeric",
            defect=True,
        ),
    ]
    UNTOUCHED += [Untouched(_f, _mm, lambda: (t(3, 4), t(4, 2)))]
UNTOUCHED += [
    Untouched("near", testing.near, lambda: (t(3), t(3))),
    Untouched("test_near", lambda a, b: testing.test_near(a, a.double()), lambda: (t(3), t(3))),
    Untouched("test_close", lambda a, b: testing.test_close(a, a.double()), lambda: (t(3), t(3))),
]


# ------------------------------------------------------------------------ minilib.backprop, minilib.init


def _with_g(x: torch.Tensor, g: torch.Tensor | None = None) -> torch.Tensor:
    """``x`` carrying the gradient ``g`` (default: ones like x), as the step after it leaves it."""
    x.g = torch.ones_like(x) if g is None else g
    return x


BAD += [
    Bad("lin: x a list", lambda: backprop.lin([[1.0]], t(1, 2), t(2)), TypeError, r"lin: x must be a torch"),
    Bad("lin: x 1-D", lambda: backprop.lin(t(3), t(3, 2), t(2)), ValueError, r"lin: x must be 2-D \[N, in\]"),
    Bad(
        "lin: b 2-D",
        lambda: backprop.lin(t(4, 3), t(3, 2), t(1, 2)),
        ValueError,
        r"lin: b must be 1-D \[out\]",
    ),
    Bad("lin: sizes", lambda: backprop.lin(t(4, 3), t(5, 2), t(2)), ValueError, r"x 4x3, w 5x2, b 2"),
    Bad(
        "lin: int x",
        lambda: backprop.lin(t(4, 3, dtype=torch.int64), t(3, 2), t(2)),
        ValueError,
        r"lin: x must be a floating",
    ),
    Bad("lin: w on meta", lambda: backprop.lin(t(4, 3), t(3, 2).to("meta"), t(2)), ValueError, r"w on meta"),
    Bad("lin: mixed dtypes", lambda: backprop.lin(t(4, 3), t(3, 2).double(), t(2)), ValueError, r"w float64"),
    Bad("relu: a list", lambda: backprop.relu([1.0, -1.0]), TypeError, r"relu: x must be a torch"),
    Bad("relu: int x", lambda: backprop.relu(torch.arange(3)), ValueError, r"relu: x must be a floating"),
    Bad("relu: shift nan", lambda: backprop.relu(t(3), shift=float("nan")), ValueError, r"relu: shift"),
    Bad(
        "mse: one target short",
        lambda: backprop.mse(t(4, 1), t(5)),
        ValueError,
        r"mse: targ must be \[N\].*got a 5 ",
    ),
    Bad(
        "mse: output [N, 2]",
        lambda: backprop.mse(t(4, 2), t(4)),
        ValueError,
        r"mse: output must be \[N\] or \[N, 1\]",
    ),
    Bad("mse: no rows", lambda: backprop.mse(t(0, 1), t(0)), ValueError, r"mse: output must be .* N >= 1"),
    Bad(
        "mse: targ a list", lambda: backprop.mse(t(2, 1), [1.0, 2.0]), TypeError, r"mse: targ must be a torch"
    ),
    Bad(
        "mse: int output",
        lambda: backprop.mse(torch.ones(2, 1, dtype=torch.int64), t(2)),
        ValueError,
        r"output",
    ),
    Bad("mse: targ on meta", lambda: backprop.mse(t(2, 1), t(2).to("meta")), ValueError, r"targ on meta"),
    Bad(
        "mse_grad: output [N, 2]",
        lambda: backprop.mse_grad(t(4, 2), t(4)),
        ValueError,
        r"mse_grad: inp must be",
    ),
    Bad(
        "relu_grad: shapes differ",
        lambda: backprop.relu_grad(t(4, 3), _with_g(t(4, 2))),
        ValueError,
        r"inp 4x3, out 4x2",
    ),
    Bad(
        "relu_grad: inp a list",
        lambda: backprop.relu_grad([1.0], _with_g(t(1))),
        TypeError,
        r"relu_grad: inp",
    ),
    Bad(
        "lin_grad: out.g missing",
        lambda: backprop.lin_grad(t(4, 3), t(4, 2), t(3, 2), t(2)),
        ValueError,
        r"lin_grad: out.g",
    ),
    Bad(
        "lin_grad: out.g wrong shape",
        lambda: backprop.lin_grad(t(4, 3), _with_g(t(4, 2), t(4, 1)), t(3, 2), t(2)),
        ValueError,
        r"lin_grad: out.g.*got a 4x1",
    ),
    Bad(
        "lin_grad: out wrong shape",
        lambda: backprop.lin_grad(t(4, 3), _with_g(t(4, 5)), t(3, 2), t(2)),
        ValueError,
        r"lin_grad: out must be 4x2",
    ),
    Bad(
        "lin_grad: sizes",
        lambda: backprop.lin_grad(t(4, 3), _with_g(t(4, 2)), t(5, 2), t(2)),
        ValueError,
        r"inp 4x3, w 5x2",
    ),
    Bad(
        "Lin: b too long",
        lambda: backprop.Lin(t(3, 2), t(3)),
        ValueError,
        r"Lin: b must be 2 long|w's columns",
    ),
    Bad("Lin: w 1-D", lambda: backprop.Lin(t(3), t(3)), ValueError, r"Lin: w must be 2-D"),
    Bad(
        "Model: w1 a list",
        lambda: backprop.Model([[1.0]], t(1), t(1, 1), t(1)),
        TypeError,
        r"Model: w1 must be",
    ),
    Bad(
        "Model: w2 wrong size",
        lambda: backprop.Model(t(3, 4), t(4), t(5, 1), t(1)),
        ValueError,
        r"Model: .*w2",
    ),
    Bad(
        "Module: backward before a call",
        lambda: backprop.Relu().backward(),
        RuntimeError,
        r"has not been called",
    ),
    Bad("gain: a a str", lambda: init.gain("sqrt5"), TypeError, r"gain: a must be a real number"),
    Bad("gain: a nan", lambda: init.gain(float("nan")), ValueError, r"gain: a must be a finite"),
    Bad("stats: a list", lambda: init.stats([1.0, 2.0]), TypeError, r"stats: x must be a torch"),
    Bad("stats: int x", lambda: init.stats(torch.arange(4)), ValueError, r"stats: x must be a floating"),
    Bad("stats: one element", lambda: init.stats(t(1)), ValueError, r"stats: x must .* at least 2 elements"),
    Bad(
        "fan_in_fan_out: a bias",
        lambda: init.fan_in_fan_out(t(5)),
        ValueError,
        r"fan_in_fan_out: w must be 2/3/4/5-D",
    ),
    Bad("fan_in_fan_out: a list", lambda: init.fan_in_fan_out([[1.0]]), TypeError, r"fan_in_fan_out: w"),
    Bad("kaiming2: a list", lambda: init.kaiming2([[0.0]], a=0), TypeError, r"kaiming2: x must be a torch"),
    Bad(
        "kaiming2: int x",
        lambda: init.kaiming2(torch.zeros(3, 3, dtype=torch.int64), a=0),
        ValueError,
        r"kaiming2: x must be a floating",
    ),
    Bad(
        "kaiming2: 1-D x",
        lambda: init.kaiming2(t(5), a=0),
        ValueError,
        r"kaiming2: x must be 2/3/4/5-D \[out, in, \*kernel\]",
    ),
    Bad(
        "kaiming2: 0-d x",
        lambda: init.kaiming2(torch.tensor(1.0), a=0),
        ValueError,
        r"kaiming2: x must be 2/",
    ),
    Bad(
        "kaiming2: a None",
        lambda: init.kaiming2(t(3, 3), a=None),
        TypeError,
        r"kaiming2: a must be a real number",
    ),
    Bad(
        "kaiming2: a inf",
        lambda: init.kaiming2(t(3, 3), a=math.inf),
        ValueError,
        r"kaiming2: a must be a finite",
    ),
    Bad(
        "deep_matmul_stds: n_units 1",
        lambda: init.deep_matmul_stds(1.0, n_units=1),
        ValueError,
        r"n_units must be an int >= 2",
    ),
    Bad(
        "deep_matmul_stds: n_steps 0",
        lambda: init.deep_matmul_stds(1.0, n_steps=0),
        ValueError,
        r"n_steps must be an int >= 1",
    ),
    Bad(
        "deep_matmul_stds: n_units 2.5",
        lambda: init.deep_matmul_stds(1.0, n_units=2.5),
        TypeError,
        r"n_units",
    ),
    Bad(
        "deep_matmul_stds: scale a str",
        lambda: init.deep_matmul_stds("0.01"),
        TypeError,
        r"scale must be a real",
    ),
]
UNTOUCHED += [
    Untouched("lin", backprop.lin, lambda: (t(4, 3), t(3, 2), t(2))),
    Untouched("relu", backprop.relu, lambda: (t(4, 3),)),
    Untouched("mse", backprop.mse, lambda: (t(4, 1), t(4))),
    Untouched("stats", init.stats, lambda: (t(4, 3),)),
    Untouched("fan_in_fan_out", init.fan_in_fan_out, lambda: (t(4, 3, 5, 5),)),
]


# ------------------------------------------------------------------------ minilib.loss, minilib.nn

_CLASSIFIERS = {"nll": loss.nll, "cross_entropy": loss.cross_entropy, "accuracy": loss.accuracy}
_ARGS = {"nll": ("input", "target"), "cross_entropy": ("input", "target"), "accuracy": ("out", "yb")}
for _f, _fn in _CLASSIFIERS.items():
    _i, _t = _ARGS[_f]
    BAD += [
        Bad(
            f"{_f}: {_i} a list",
            lambda f=_fn: f([[0.0, 1.0]], torch.tensor([0])),
            TypeError,
            rf"{_f}: {_i} must be a torch",
        ),
        Bad(
            f"{_f}: {_i} 1-D",
            lambda f=_fn: f(t(5), torch.arange(5)),
            ValueError,
            rf"{_f}: {_i} must be 2-D \[N, C\]",
        ),
        Bad(
            f"{_f}: {_i} 3-D",
            lambda f=_fn: f(t(2, 3, 5), torch.arange(2)),
            ValueError,
            rf"{_f}: {_i} must be 2-D",
        ),
        Bad(
            f"{_f}: int {_i}",
            lambda f=_fn: f(torch.ones(2, 5, dtype=torch.int64), torch.arange(2)),
            ValueError,
            rf"{_f}: {_i} must be a floating",
        ),
        Bad(
            f"{_f}: no classes",
            lambda f=_fn: f(t(2, 0), torch.arange(2)),
            ValueError,
            rf"{_f}: {_i} must be .* at least one class",
        ),
        Bad(
            f"{_f}: no rows",
            lambda f=_fn: f(t(0, 5), torch.arange(0)),
            ValueError,
            rf"{_f}: {_i} must be a batch of at least one row",
        ),
        Bad(
            f"{_f}: float {_t}",
            lambda f=_fn: f(t(2, 5), torch.tensor([0.0, 1.0])),
            ValueError,
            rf"{_f}: {_t} must be int64",
        ),
        Bad(
            f"{_f}: int32 {_t}",
            lambda f=_fn: f(t(2, 5), torch.tensor([0, 1], dtype=torch.int32)),
            ValueError,
            rf"{_t} must be int64",
        ),
        Bad(
            f"{_f}: {_t} too short",
            lambda f=_fn: f(t(3, 5), torch.arange(2)),
            ValueError,
            rf"{_t} must be 1-D with one class per row of {_i} \({_i} is 3x5\), got a 2 ",
        ),
        Bad(
            f"{_f}: 2-D {_t}",
            lambda f=_fn: f(t(2, 5), torch.tensor([[0], [1]])),
            ValueError,
            rf"{_t} must be 1-D",
        ),
        Bad(
            f"{_f}: sparse {_i}",
            lambda f=_fn: f(t(2, 5).to_sparse(), torch.arange(2)),
            ValueError,
            rf"{_f}: {_i} must be a dense \(strided\) tensor",
            defect=True,
        ),
        Bad(
            f"{_f}: sparse {_t}",
            lambda f=_fn: f(t(2, 5), torch.arange(2).to_sparse()),
            ValueError,
            rf"{_f}: {_t} must be a dense \(strided\) tensor",
            defect=True,
        ),
        Bad(
            f"{_f}: {_t} a list", lambda f=_fn: f(t(2, 5), [0, 1]), TypeError, rf"{_f}: {_t} must be a torch"
        ),
        Bad(
            f"{_f}: {_t} on meta",
            lambda f=_fn: f(t(2, 5), torch.arange(2, device="meta")),
            ValueError,
            rf"{_t} on meta",
        ),
        Bad(
            f"{_f}: class 7 of 5",
            lambda f=_fn: f(t(4, 5), torch.tensor([0, 1, 7, 2])),
            IndexError,
            rf"{_t} holds class 7 at position 2, but {_i} has only 5",
        ),
        Bad(
            f"{_f}: class -1",
            lambda f=_fn: f(t(4, 5), torch.tensor([-1, 1, 2, 2])),
            IndexError,
            rf"{_t} holds class -1 at position 0",
        ),
    ]
    UNTOUCHED += [Untouched(_f, _fn, lambda: (t(4, 5), torch.tensor([0, 1, 4, 2])))]
for _f in ("softmax", "log_softmax", "logsumexp"):
    _fn = getattr(loss, _f)
    BAD += [
        Bad(f"{_f}: a list", lambda f=_fn: f([1.0, 2.0]), TypeError, rf"{_f}: x must be a torch"),
        Bad(f"{_f}: int x", lambda f=_fn: f(torch.arange(3)), ValueError, rf"{_f}: x must be a floating"),
        Bad(
            f"{_f}: a 0-d x",
            lambda f=_fn: f(torch.tensor(1.0)),
            ValueError,
            rf"{_f}: x must be .* at least one class",
        ),
        Bad(
            f"{_f}: no classes",
            lambda f=_fn: f(t(3, 0)),
            ValueError,
            rf"{_f}: x must be .* at least one class",
        ),
    ]
    UNTOUCHED += [Untouched(_f, _fn, lambda: (t(4, 5),))]
BAD += [
    Bad(
        "DummyModule: n_in 0",
        lambda: nn.DummyModule(0, 50, 10),
        ValueError,
        r"DummyModule: n_in must be an int >= 1",
    ),
    Bad(
        "DummyModule: nh missing",
        lambda: nn.DummyModule(784, None, 10),
        TypeError,
        r"DummyModule: nh must be an int",
    ),
    Bad("DummyModule: n_out 2.0", lambda: nn.DummyModule(784, 50, 2.0), TypeError, r"DummyModule: n_out"),
    Bad(
        "SequentialModel: a function as a layer",
        lambda: nn.SequentialModel([torch.nn.Linear(2, 2), torch.relu]),
        TypeError,
        r"SequentialModel: layers\[1\] must be an nn.Module",
    ),
    Bad(
        "Optimizer: no params",
        lambda: nn.Optimizer(iter([])),
        ValueError,
        r"Optimizer: params must be non-empty",
    ),
    Bad(
        "Optimizer: a list in params",
        lambda: nn.Optimizer([t(2), [1.0]]),
        TypeError,
        r"Optimizer: params\[1\] must be a torch",
    ),
    Bad(
        "Optimizer: lr -1", lambda: nn.Optimizer([t(2)], lr=-1), ValueError, r"Optimizer: lr must be .* >= 0"
    ),
    Bad(
        "Optimizer: lr nan",
        lambda: nn.Optimizer([t(2)], lr=math.nan),
        ValueError,
        r"Optimizer: lr must be a finite",
    ),
    Bad(
        "Optimizer: lr a str",
        lambda: nn.Optimizer([t(2)], lr="0.1"),
        TypeError,
        r"Optimizer: lr must be a real",
    ),
    Bad(
        "fit: epochs -1",
        lambda: nn.fit(-1, torch.nn.Linear(4, 2), loss.cross_entropy, None, [], []),
        ValueError,
        r"fit: epochs must be an int >= 0",
    ),
    Bad(
        "fit: epochs 1.5",
        lambda: nn.fit(1.5, torch.nn.Linear(4, 2), loss.cross_entropy, None, [], []),
        TypeError,
        r"fit: epochs",
    ),
    Bad(
        "fit: empty valid_dl",
        lambda: _fit_without_validation(),
        ValueError,
        r"fit: valid_dl must be a loader that yields samples",
    ),
]


def _fit_without_validation():
    model = torch.nn.Linear(4, 2)
    return nn.fit(1, model, loss.cross_entropy, nn.Optimizer(model.parameters()), [], [])


# ------------------------------------------------------------------------ minilib.data: datasets and loaders

BAD += [
    Bad(
        "normalize: x a list",
        lambda: data.normalize([1.0], 0.0, 1.0),
        TypeError,
        r"normalize: x must be a torch",
    ),
    Bad(
        "normalize: s 0",
        lambda: data.normalize(t(3), 0.0, 0.0),
        ValueError,
        r"normalize: s must be finite and non-zero",
    ),
    Bad(
        "normalize: one s 0",
        lambda: data.normalize(t(3, 2), 0.0, torch.tensor([1.0, 0.0])),
        ValueError,
        r"normalize: s .*holding 0",
    ),
    Bad(
        "normalize: m nan",
        lambda: data.normalize(t(3), torch.tensor(math.nan), 1.0),
        ValueError,
        r"normalize: m must be finite",
        defect=True,
    ),
    Bad(
        "normalize: s nan",
        lambda: data.normalize(t(3), 0.0, torch.tensor(math.nan)),
        ValueError,
        r"normalize: s must be finite",
        defect=True,
    ),
    Bad(
        "normalize: s inf",
        lambda: data.normalize(t(3), 0.0, math.inf),
        ValueError,
        r"normalize: s must be finite",
        defect=True,
    ),
    Bad("normalize: m a str", lambda: data.normalize(t(3), "0.13", 1.0), TypeError, r"normalize: m must be"),
    Bad(
        "Dataset: lengths differ",
        lambda: data.Dataset(t(5, 2), t(4)),
        ValueError,
        r"Dataset: x and y must have one length, got x 5, y 4",
    ),
    Bad("Dataset: x has no len", lambda: data.Dataset(3, t(3)), TypeError, r"Dataset: x must be"),
    Bad("Sampler: bs 0", lambda: data.Sampler(range(4), 0), ValueError, r"Sampler: bs must be an int >= 1"),
    Bad("Sampler: bs True", lambda: data.Sampler(range(4), True), TypeError, r"Sampler: bs must be an int"),
    Bad("collate: empty batch", lambda: data.collate([]), ValueError, r"collate: batch must be non-empty"),
    Bad(
        "collate: not pairs",
        lambda: data.collate([(t(2), t(1), t(1))]),
        ValueError,
        r"collate: batch\[0\] must be an \(x, y\) pair",
    ),
    Bad(
        "get_dls: empty train_ds",
        lambda: data.get_dls(data.Dataset(t(0, 2), t(0)), data.Dataset(t(2, 2), t(2)), 2),
        ValueError,
        r"get_dls: train_ds must be non-empty",
        defect=True,
    ),
    Bad(
        "get_dls: empty valid_ds",
        lambda: data.get_dls(data.Dataset(t(2, 2), t(2)), data.Dataset(t(0, 2), t(0)), 2),
        ValueError,
        r"get_dls: valid_ds must be non-empty",
        defect=True,
    ),
    Bad(
        "get_dls: bs 0",
        lambda: data.get_dls(data.Dataset(t(2, 2), t(2)), data.Dataset(t(2, 2), t(2)), 0),
        ValueError,
        r"get_dls: bs must be an int >= 1",
    ),
    Bad(
        "get_dls: bs 2.5",
        lambda: data.get_dls(data.Dataset(t(2, 2), t(2)), data.Dataset(t(2, 2), t(2)), 2.5),
        TypeError,
        r"get_dls: bs must be an int",
        defect=True,
    ),
    Bad(
        "DataBunch: c 0", lambda: data.DataBunch([], [], c=0), ValueError, r"DataBunch: c must be an int >= 1"
    ),
]
UNTOUCHED += [
    Untouched("normalize", data.normalize, lambda: (t(4, 3), t(3), t(3).abs() + 1)),
    Untouched("collate", lambda *xy: data.collate([xy, xy]), lambda: (t(3), torch.tensor(1))),
    Untouched("Dataset slice", lambda x, y: data.Dataset(x, y)[1:3], lambda: (t(4, 3), t(4))),
    Untouched(
        "DataLoader",
        lambda x, y: list(data.DataLoader(data.Dataset(x, y), data.Sampler(x, 2))),
        lambda: (t(5, 3), t(5)),
    ),
]


# ------------------------------------------------------------------------ minilib.mnist: get_data


def _get_data_with_a_directory_for_a_file():
    """get_data on a folder where ``t10k-images-idx3-ubyte.gz`` is a directory."""
    with tempfile.TemporaryDirectory() as folder:
        os.mkdir(os.path.join(folder, "t10k-images-idx3-ubyte.gz"))
        get_data(folder, sample=True)


BAD += [
    Bad("get_data: path an int", lambda: get_data(3), TypeError, r"get_data: path must be a str"),
    Bad("get_data: sample a str", lambda: get_data(sample="yes"), TypeError, r"get_data: sample "),
    Bad(
        "get_data: a directory under a data file's name",
        _get_data_with_a_directory_for_a_file,
        ValueError,
        r"t10k-images-idx3-ubyte.gz in .* is a directory.*MINILIB_DATA",
        defect=True,
    ),
]


# ------------------------------------------------------------------------ minilib.schedules

_SCHEDS = {
    "sched_lin": schedules.sched_lin,
    "sched_cos": schedules.sched_cos,
    "sched_no": schedules.sched_no,
    "sched_exp": schedules.sched_exp,
}
for _f, _fn in _SCHEDS.items():
    BAD += [
        Bad(f"{_f}: pos 1.5", lambda f=_fn: f(1, 2)(1.5), ValueError, rf"{_f}: pos must be in \[0, 1\]"),
        Bad(f"{_f}: pos -0.1", lambda f=_fn: f(1, 2)(-0.1), ValueError, rf"{_f}: pos must be in \[0, 1\]"),
        Bad(f"{_f}: pos nan", lambda f=_fn: f(1, 2)(math.nan), ValueError, rf"{_f}: pos must be a finite"),
        Bad(f"{_f}: pos a str", lambda f=_fn: f(1, 2)("0.5"), TypeError, rf"{_f}: pos must be a real"),
        Bad(f"{_f}: start a str", lambda f=_fn: f("1", 2), TypeError, rf"{_f}: start must be a real"),
        Bad(f"{_f}: end inf", lambda f=_fn: f(1, math.inf), ValueError, rf"{_f}: end must be a finite"),
        Bad(f"{_f}: start a bool", lambda f=_fn: f(True, 2), TypeError, rf"{_f}: start must be a real"),
    ]
BAD += [
    Bad(
        "sched_exp: start 0",
        lambda: schedules.sched_exp(0, 1),
        ValueError,
        r"sched_exp: start must be non-zero",
    ),
    Bad(
        "sched_exp: end -0.0",
        lambda: schedules.sched_exp(-1, -0.0),
        ValueError,
        r"sched_exp: end must be non-zero",
    ),
    Bad(
        "sched_exp: across zero",
        lambda: schedules.sched_exp(1, -1),
        ValueError,
        r"sched_exp: end must be non-zero and of start's sign \(start is 1\), got an int \(-1\)",
    ),
    Bad("annealer: not a function", lambda: schedules.annealer(3), TypeError, r"annealer: f must be"),
    Bad(
        "combine_scheds: sum 0.9",
        lambda: schedules.combine_scheds([0.3, 0.6], [schedules.sched_no(1, 1)] * 2),
        ValueError,
        r"combine_scheds: pcts must be fractions that sum to 1",
    ),
    Bad(
        "combine_scheds: a negative pct",
        lambda: schedules.combine_scheds([0.5, -0.2, 0.7], [schedules.sched_no(1, 1)] * 3),
        ValueError,
        r"combine_scheds: pcts\[1\] must be in \[0, 1\]",
    ),
    Bad(
        "combine_scheds: counts differ",
        lambda: schedules.combine_scheds([0.5, 0.5], [schedules.sched_no(1, 1)]),
        ValueError,
        r"combine_scheds: scheds must be 2 schedules, one per pct, got 1",
    ),
    Bad(
        "combine_scheds: no pcts",
        lambda: schedules.combine_scheds([], []),
        ValueError,
        r"combine_scheds: pcts must be fractions that sum to 1 \(within 1e-6\), got \[\], sum 0",
    ),
    Bad(
        "combine_scheds: a nan pct",
        lambda: schedules.combine_scheds([math.nan, 1.0], [schedules.sched_no(1, 1)] * 2),
        ValueError,
        r"pcts\[0\] must be a finite",
    ),
    Bad(
        "combine_scheds: pcts a str",
        lambda: schedules.combine_scheds("01", [schedules.sched_no(1, 1)] * 2),
        TypeError,
        r"combine_scheds: pcts must be a list",
    ),
    Bad(
        "combine_scheds: a sched not callable",
        lambda: schedules.combine_scheds([0.5, 0.5], [schedules.sched_no(1, 1), 2.0]),
        TypeError,
        r"combine_scheds: scheds\[1\] must be a schedule",
    ),
    Bad(
        "combine_scheds: pos 1.5",
        lambda: schedules.combine_scheds([1.0], [schedules.sched_no(1, 1)])(1.5),
        ValueError,
        r"combine_scheds: pos must be in",
    ),
    Bad(
        "cos_1cycle_anneal: high nan",
        lambda: schedules.cos_1cycle_anneal(0.1, math.nan, 0.1),
        ValueError,
        r"cos_1cycle_anneal: high must be a finite",
    ),
]
UNTOUCHED += [
    Untouched(
        "sched_cos at a tensor pos", lambda pos: schedules.sched_cos(1, 2)(pos), lambda: (torch.tensor(0.3),)
    )
]


# ------------------------------------------------------------------------ minilib.learner


def _learner_rows():
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
        "fused_cross_entropy: zero classes names logits",
        lambda: _fce(t(3, 0), torch.zeros(3, dtype=torch.int64)),
        ValueError,
        r"fused_cross_entropy: logits must be \[N, V\] with V >= 1 classes",
        defect=True,
    ),
    Bad(
        "fused_cross_entropy: sparse logits named logits",
        lambda: _fce(t(3, 5).to_sparse(), _y3),
        ValueError,
        r"fused_cross_entropy: logits must be a dense \(strided\) tensor",
        defect=True,
    ),
    Bad(
        "fused_cross_entropy: sparse target named target",
        lambda: _fce(t(3, 5), _y3.to_sparse()),
        ValueError,
        r"fused_cross_entropy: target must be a dense \(strided\) tensor",
        defect=True,
    ),
    Bad(
        "fused_linear_cross_entropy: sparse target named target",
        lambda: _flce(t(3, 4), t(5, 4), _y3.to_sparse()),
        ValueError,
        r"fused_linear_cross_entropy: target must be a dense \(strided\) tensor",
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
        "fused_linear_cross_entropy: a short target is blamed on input's rows",
        lambda: _flce(t(3, 4), t(5, 4), _y3[:2]),
        ValueError,
        r"fused_linear_cross_entropy: target must be 1-D with one class per row of input \(3\)",
        defect=True,
    ),
    Bad(
        "fused_linear_cross_entropy: zero classes names linear_weight",
        lambda: _flce(t(3, 4), t(0, 4), torch.zeros(3, dtype=torch.int64)),
        ValueError,
        r"fused_linear_cross_entropy: linear_weight must be \[V, H\] with V >= 1 classes",
        defect=True,
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


def _ddp_fit(train_dl=None, **ddp_kwargs):
    """Fit a tiny learner for one epoch with ``DDPCallback(**ddp_kwargs)``, in this process (no group)."""
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

# ------------------------------------------------------------------------ lesson 10
# minilib.cnn, minilib.hooks, minilib.norm, minilib.lsuv (06_cuda_cnn_hooks_init, 07_batchnorm, 07a_lsuv)
from minilib import cnn, hooks, lsuv, norm  # noqa: E402  (kept with their rows, appended for lesson 10)


def _lsuv_on(layer, xb=None, **kw):
    """``lsuv_module`` on a one-layer model."""
    return lsuv.lsuv_module(torch.nn.Sequential(layer), layer, t(4, 1, 8, 8) if xb is None else xb, **kw)


def _set_bias(layer, value):
    layer.bias = value


BAD += [
    Bad(
        "normalize_to: valid a list",
        lambda: cnn.normalize_to(t(4, 3), [1.0]),
        TypeError,
        r"normalize_to: valid",
    ),
    Bad("Lambda: func 3", lambda: cnn.Lambda(3), TypeError, r"Lambda: func must be a callable"),
    Bad("view_tfm: size 0", lambda: cnn.view_tfm(1, 0, 28), ValueError, r"view_tfm: size\[1\] must be"),
    Bad(
        "BatchTransformXCallback: tfm None",
        lambda: cnn.BatchTransformXCallback(None),
        TypeError,
        r"BatchTransformXCallback: tfm",
    ),
    Bad("GeneralRelu: sub nan", lambda: cnn.GeneralRelu(sub=float("nan")), ValueError, r"GeneralRelu: sub"),
    Bad("GeneralRelu: leak a str", lambda: cnn.GeneralRelu(leak="0.1"), TypeError, r"GeneralRelu: leak"),
    Bad(
        "GeneralRelu: leak '0.1' is said to be a str (not 'got 0.1', which reads as a good value)",
        lambda: cnn.GeneralRelu(leak="0.1"),
        TypeError,
        r"GeneralRelu: leak must be a real number, got a str \('0\.1'\)",
        defect=True,
    ),
    Bad(
        "conv_layer: nf '8' is said to be a str",
        lambda: cnn.conv_layer(1, "8"),
        TypeError,
        r"conv_layer: nf must be an int >= 1, got a str \('8'\)",
        defect=True,
    ),
    Bad("conv_layer: ni 0", lambda: cnn.conv_layer(0, 8), ValueError, r"conv_layer: ni must be an int >= 1"),
    Bad("conv_layer: norm 3", lambda: cnn.conv_layer(1, 8, norm=3), TypeError, r"conv_layer: norm"),
    Bad("init_cnn: m a list", lambda: cnn.init_cnn([torch.nn.Conv2d(1, 1, 3)]), TypeError, r"init_cnn: m"),
    Bad(
        "get_cnn_layers: data without c",
        lambda: cnn.get_cnn_layers(DataBunch(None, None), [8]),
        TypeError,
        r"get_cnn_layers: data\.c",
    ),
    Bad(
        "get_cnn_layers: nfs empty",
        lambda: cnn.get_cnn_layers(DataBunch(None, None, c=2), []),
        ValueError,
        r"nfs",
    ),
    Bad(
        "get_runner: lr -1",
        lambda: cnn.get_runner(torch.nn.Linear(2, 2), tiny_data(), lr=-1),
        ValueError,
        r"get_runner: lr must be a finite number > 0",
    ),
    Bad("Hook: m a function", lambda: hooks.Hook(print, hooks.append_stats), TypeError, r"Hook: m"),
    Bad("Hook: f 3", lambda: hooks.Hook(torch.nn.ReLU(), 3), TypeError, r"Hook: f"),
    Bad(
        "ListContainer: a mask too short",
        lambda: hooks.ListContainer([1, 2, 3])[[True, False]],
        IndexError,
        r"mask has 2, the container 3",
    ),
    Bad(
        "get_hist: a hook that recorded nothing",
        lambda: hooks.get_hist(hooks.Hook(torch.nn.ReLU(), hooks.append_stats)),
        ValueError,
        r"get_hist: h must be a hook that has recorded",
    ),
    Bad(
        "get_min: a hook that recorded nothing (named get_min, not get_hist)",
        lambda: hooks.get_min(hooks.Hook(torch.nn.ReLU(), hooks.append_stats)),
        ValueError,
        r"get_min: h must be a hook that has recorded",
        defect=True,
    ),
    Bad("ActivationStats: mod_filter 3", lambda: hooks.ActivationStats(3), TypeError, r"mod_filter"),
    Bad("BatchNorm: nf 0", lambda: norm.BatchNorm(0), ValueError, r"BatchNorm: nf must be an int >= 1"),
    Bad(
        "BatchNorm: mom 2",
        lambda: norm.BatchNorm(3, mom=2),
        ValueError,
        r"BatchNorm: mom must be in \[0, 1\]",
    ),
    Bad("BatchNorm: x 2-D", lambda: norm.BatchNorm(3)(t(4, 3)), ValueError, r"BatchNorm: x must be 4-D"),
    Bad(
        "BatchNorm: x with 5 channels",
        lambda: norm.BatchNorm(3)(t(2, 5, 4, 4)),
        ValueError,
        r"BatchNorm: x must be \[N, 3, H, W\]",
    ),
    Bad("LayerNorm: eps 0", lambda: norm.LayerNorm(eps=0), ValueError, r"LayerNorm: eps"),
    Bad(
        "InstanceNorm: x int",
        lambda: norm.InstanceNorm(3)(torch.ones(2, 3, 4, 4, dtype=torch.int64)),
        ValueError,
        r"x",
    ),
    Bad(
        "RunningBatchNorm: one sample in training",
        lambda: norm.RunningBatchNorm(3)(t(1, 3, 4, 4)),
        ValueError,
        r"RunningBatchNorm: x must be a batch of at least two samples",
    ),
    Bad("ConvLayer: nf 0", lambda: lsuv.ConvLayer(1, 0), ValueError, r"ConvLayer: nf"),
    Bad(
        "ConvLayer: bias set to nan",
        lambda: _set_bias(lsuv.ConvLayer(1, 2), float("nan")),
        ValueError,
        r"bias",
    ),
    Bad("lsuv_module: tol 0", lambda: _lsuv_on(lsuv.ConvLayer(1, 2), tol=0), ValueError, r"lsuv_module: tol"),
    Bad(
        "lsuv_module: max_iters 0",
        lambda: _lsuv_on(lsuv.ConvLayer(1, 2), max_iters=0),
        ValueError,
        r"lsuv_module: max_iters",
    ),
    Bad(
        "get_runner: cbs holding an int",
        lambda: cnn.get_runner(torch.nn.Linear(2, 2), tiny_data(), cbs=[cnn.CudaCallback, 3]),
        TypeError,
        r"get_runner: cbs\[1\] must be a Callback class, a factory or a Callback instance",
        defect=True,
    ),
    Bad(
        "CudaCallback: device 'gpu'",
        lambda: cnn.CudaCallback("gpu"),
        ValueError,
        r"CudaCallback: device must be a device",
        defect=True,
    ),
    Bad(
        "Hooks: ms holding a str",
        lambda: hooks.Hooks([torch.nn.ReLU(), "relu"], hooks.append_stats),
        TypeError,
        r"Hooks: ms\[1\] must be an nn.Module",
        defect=True,
    ),
    Bad(
        "ConvLayer: sub None (its bias could not be read)",
        lambda: lsuv.ConvLayer(1, 2, sub=None),
        TypeError,
        r"ConvLayer: sub must be a real number",
        defect=True,
    ),
    Bad(
        "lsuv_module: model None",
        lambda: lsuv.lsuv_module(None, lsuv.ConvLayer(1, 2), t(4, 1, 8, 8)),
        TypeError,
        r"lsuv_module: model must be an nn.Module",
        defect=True,
    ),
    Bad(
        "lsuv_module: m not in the model",
        lambda: lsuv.lsuv_module(
            torch.nn.Sequential(lsuv.ConvLayer(1, 2)), lsuv.ConvLayer(1, 2), t(4, 1, 8, 8)
        ),
        ValueError,
        r"lsuv_module: m must be a module of model",
        defect=True,
    ),
    Bad(
        "lsuv_module: m a Sequential (no weight and bias)",
        lambda: _lsuv_on(cnn.conv_layer(1, 2, bn=False)),
        TypeError,
        r"lsuv_module: m must be a layer with a weight and a bias",
        defect=True,
    ),
    Bad(
        "lsuv_module: m a conv without a bias",
        lambda: _lsuv_on(torch.nn.Conv2d(1, 2, 3, bias=False)),
        TypeError,
        r"lsuv_module: m must be a layer with a weight and a bias",
        defect=True,
    ),
    Bad(
        "lsuv_module: a NaN in the batch",
        lambda: _lsuv_on(lsuv.ConvLayer(1, 2), torch.full((4, 1, 8, 8), float("nan"))),
        RuntimeError,
        r"lsuv_module: the output of ConvLayer model\.0 has mean nan",
    ),
]
UNTOUCHED += [
    Untouched("normalize_to", cnn.normalize_to, lambda: (t(6, 4), t(3, 4))),
    Untouched("GeneralRelu(leak, sub, maxv)", cnn.GeneralRelu(0.1, 0.4, 6.0), lambda: (t(3, 5) * 8,)),
    Untouched("GeneralRelu(sub)", cnn.GeneralRelu(sub=0.4), lambda: (t(3, 5),)),
    Untouched("BatchNorm in training", norm.BatchNorm(3), lambda: (t(4, 3, 2, 2),)),
    Untouched("LayerNorm", norm.LayerNorm(), lambda: (t(4, 3, 2, 2),)),
    Untouched("InstanceNorm", norm.InstanceNorm(3), lambda: (t(4, 3, 2, 2),)),
    Untouched("RunningBatchNorm in training", norm.RunningBatchNorm(3), lambda: (t(4, 3, 2, 2),)),
    Untouched(
        "append_stats",
        lambda x: hooks.append_stats(hooks.Hook(torch.nn.ReLU(), print), torch.nn.ReLU(), None, x),
        lambda: (t(9),),
    ),
]

# ------------------------------------------------------------------------ fused batch norm

_fbn = kernels.fused_batch_norm


def _bn(**changes):
    """fused_batch_norm on a [4, 3, 5, 5] batch with good buffers and parameters, some replaced."""
    args = dict(input=t(4, 3, 5, 5), running_mean=torch.zeros(3), running_var=torch.ones(3),
                weight=torch.ones(3), bias=torch.zeros(3), training=True)  # fmt: skip
    args.update(changes)
    return _fbn(**args)


BAD += [
    Bad(
        "fused_batch_norm: momentum None",
        lambda: _bn(momentum=None),
        TypeError,
        r"fused_batch_norm: momentum",
    ),
    Bad("fused_batch_norm: 1-D input", lambda: _bn(input=t(6)), ValueError, r"fused_batch_norm: input .*2-D"),
    Bad(
        "fused_batch_norm: int input",
        lambda: _bn(input=torch.ones(4, 3, dtype=torch.int64)),
        ValueError,
        r"fused_batch_norm: input must be a floating-point",
    ),
    Bad("fused_batch_norm: input a list", lambda: _bn(input=[[1.0]]), TypeError, r"fused_batch_norm: input"),
    Bad(
        "fused_batch_norm: weight [4] for 3 channels", lambda: _bn(weight=t(4)), ValueError, r"weight .*\[3\]"
    ),
    Bad(
        "fused_batch_norm: bias float64 for float32 input",
        lambda: _bn(bias=torch.zeros(3, dtype=torch.float64)),
        ValueError,
        r"fused_batch_norm: bias must be float32",
    ),
    Bad(
        "fused_batch_norm: running_mean on another device",
        lambda: _bn(running_mean=torch.zeros(3, device="meta")),
        ValueError,
        r"fused_batch_norm: running_mean must be on input's device",
    ),
    Bad(
        "fused_batch_norm: running_var [3, 1]",
        lambda: _bn(running_var=torch.ones(3, 1)),
        ValueError,
        r"fused_batch_norm: running_var",
    ),
    Bad(
        "fused_batch_norm: eval without running_mean",
        lambda: _bn(running_mean=None, training=False),
        ValueError,
        r"fused_batch_norm: running_mean .*eval",
    ),
    Bad(
        "fused_batch_norm: eval without running_var",
        lambda: _bn(running_var=None, training=False),
        ValueError,
        r"fused_batch_norm: running_var .*eval",
    ),
    Bad(
        "fused_batch_norm: one value per channel in training",
        lambda: _bn(input=t(1, 3)),
        ValueError,
        r"fused_batch_norm: input must be a batch with more than 1 value per channel",
    ),
    Bad(
        "fused_batch_norm: training 'yes'", lambda: _bn(training="yes"), TypeError, r"training must be a bool"
    ),
    Bad("fused_batch_norm: eps -1", lambda: _bn(eps=-1.0), ValueError, r"fused_batch_norm: eps"),
    Bad(
        "FusedBatchNorm2d: 3-D input",
        lambda: kernels.FusedBatchNorm2d(3)(t(4, 3, 5)),
        ValueError,
        r"FusedBatchNorm2d: input must be 4-D",
    ),
    Bad("FusedBatchNorm2d: num_features 0", lambda: kernels.FusedBatchNorm2d(0), ValueError, r"num_features"),
]

UNTOUCHED += [
    Untouched(
        "fused_batch_norm forward+backward (the running buffers are updated, by design)",
        lambda x, w, b: (
            _fbn(
                x.detach().requires_grad_(),
                torch.zeros(3),
                torch.ones(3),
                w.detach().requires_grad_(),
                b.detach().requires_grad_(),
                training=True,
            )
            .sum()
            .backward()
        ),
        lambda: (t(4, 3, 5, 5), t(3), t(3)),
    ),  # fmt: skip
    Untouched(
        "fused_batch_norm channels-last, eval",
        lambda x, rm, rv: _fbn(x, rm, rv.abs(), training=False),
        lambda: (t(4, 3, 5, 5).contiguous(memory_format=torch.channels_last), t(3), t(3)),
    ),
]

# ------------------------------------------------------------------------ the Runner's callbacks as they join


def _ddp_twice():
    """One DDPCallback listed twice: a fit would wrap the wrapped model (checked before any process group)."""
    ddp = DDPCallback()
    Runner([ddp, ddp]).fit(1, create_learner(get_model_func(0.1), F.cross_entropy, tiny_data()))


def _odd_order(order):
    return type("OddCallback", (Callback,), {"_order": order})()


BAD += [
    Bad(
        "Runner: a callback's _order 'late'",
        lambda: Runner([_odd_order("late")]),
        TypeError,
        r"OddCallback\._order",
        defect=True,
    ),
    Bad(
        "Runner: a callback's _order None",
        lambda: Runner([_odd_order(None)]),
        TypeError,
        r"OddCallback\._order",
        defect=True,
    ),
    Bad(
        "Runner: a callback's _order nan",
        lambda: Runner([_odd_order(math.nan)]),
        TypeError,
        r"OddCallback\._order",
        defect=True,
    ),
    Bad(
        "Runner: two DDPCallbacks",
        lambda: Runner([DDPCallback(), DDPCallback()]),
        ValueError,
        r"DDPCallback",
        defect=True,
    ),
    Bad(
        "Runner: the same DDPCallback twice",
        lambda: _ddp_twice(),
        ValueError,
        r"Runner: cbs must be one DDPCallback per Runner",
        defect=True,
    ),
]


# ------------------------------------------------------------------------ minilib.checkpoint
# checkpoint (its own import here, for the merge; the lead may move it to the block at the top)
from minilib.checkpoint import CheckpointCallback  # noqa: E402

_NO_FOLDER = os.path.join(tempfile.gettempdir(), "minilib-no-such-folder", "ckpt.pt")

BAD += [
    Bad(
        "CheckpointCallback: path an int",
        lambda: CheckpointCallback(3),
        TypeError,
        r"CheckpointCallback: path",
    ),
    Bad(
        "CheckpointCallback: path in a folder that does not exist",
        lambda: CheckpointCallback(_NO_FOLDER),
        ValueError,
        r"CheckpointCallback: path must be a file in an existing folder",
    ),
    Bad(
        "CheckpointCallback: path a folder",
        lambda: CheckpointCallback(tempfile.gettempdir()),
        ValueError,
        r"CheckpointCallback: path must be a file name, not a folder",
    ),
    Bad(
        "CheckpointCallback: every_batches 0",
        lambda: CheckpointCallback("ckpt.pt", every_batches=0),
        ValueError,
        r"CheckpointCallback: every_batches must be an int >= 1",
    ),
    Bad(
        "CheckpointCallback: every_batches True",
        lambda: CheckpointCallback("ckpt.pt", every_batches=True),
        TypeError,
        r"every_batches",
    ),
    Bad(
        "CheckpointCallback: resume 'yes'",
        lambda: CheckpointCallback("ckpt.pt", resume="yes"),
        TypeError,
        r"CheckpointCallback: resume must be True or False",
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
    for i, (x, old) in enumerate(zip(inputs, before, strict=True)):
        if isinstance(x, torch.Tensor):
            assert torch.equal(x, old), f"{row.id}: input {i} changed (max diff {(x - old).abs().max()})"
