"""Lesson 04 (04_callbacks), its opening: the ``Learner`` and the helpers both loop designs share.

Before the notebook builds any training loop it gathers what one run needs (model, optimizer, loss
function, ``DataBunch``) into a plain ``Learner``, and writes ``get_model``, ``camel2snake`` and
``listify``. Both loops of the lesson, the ``CallbackHandler`` (``minilib.callback_handler``) and the
``Runner`` (``minilib.learner``), import them from here; ``minilib.learner`` re-exports every name.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from functools import partial

from torch import nn, optim

from minilib import contract

__all__ = ["Learner", "get_model", "get_model_func", "create_learner", "camel2snake", "listify"]


class Learner:
    """The model, its optimizer, the loss function and the data (a ``DataBunch``): storage, no logic."""

    def __init__(self, model, opt, loss_func, data):
        self.model, self.opt, self.loss_func, self.data = model, opt, loss_func, data

    def __repr__(self) -> str:
        return f"Learner(model={self.model!r}, opt={type(self.opt).__name__}, data={self.data!r})"


def get_model(data, lr: float = 0.5, nh: int = 50) -> tuple[nn.Sequential, optim.SGD]:
    """The lesson's MLP ``Linear(m, nh) -> ReLU -> Linear(nh, data.c)`` and an ``optim.SGD`` on it.

    ``m`` is the number of input features of one training item, ``data.c`` the number of classes.
    """
    contract.positive_int("get_model", nh=nh, **{"data.c": getattr(data, "c", None)})  # c: the outputs
    contract.finite_number("get_model", positive=True, lr=lr)
    m = data.train_ds[0][0].numel()
    model = nn.Sequential(nn.Linear(m, nh), nn.ReLU(), nn.Linear(nh, data.c))
    return model, optim.SGD(model.parameters(), lr=lr)


def get_model_func(lr: float = 0.5):
    """``get_model`` with ``lr`` fixed: a ``data -> (model, opt)`` function for ``create_learner``."""
    return partial(get_model, lr=lr)


def create_learner(model_func, loss_func, data) -> Learner:
    """``Learner(*model_func(data), loss_func, data)``: a fresh model and optimizer for ``data``."""
    return Learner(*model_func(data), loss_func, data)


# Insert "_" before a capitalised word or after a lower-case letter/digit followed by a capital, but
# never right after an existing "_" (so LR_Find gives lr_find, not fastai's lr__find).
_camel_re1 = re.compile(r"([^_])([A-Z][a-z]+)")
_camel_re2 = re.compile(r"([a-z0-9])([A-Z])")


def camel2snake(name: str) -> str:
    """``TrainEvalCallback`` -> ``train_eval_callback``; ``AvgStats`` -> ``avg_stats``."""
    if not isinstance(name, str):
        contract.fail("camel2snake", "name", "a str", name, TypeError)
    s1 = _camel_re1.sub(r"\1_\2", name)
    return _camel_re2.sub(r"\1_\2", s1).lower()


def listify(o) -> list:
    """None -> ``[]``; a list -> itself; a str or non-iterable -> ``[o]``; other iterables -> ``list(o)``."""
    if o is None:
        return []
    if isinstance(o, list):
        return o
    if isinstance(o, (str, bytes)):
        return [o]
    if isinstance(o, Iterable):
        return list(o)
    return [o]
