"""Lesson 04 (04_callbacks): the FIRST callback design, ``CallbackHandler``, kept to show why it went.

Every step of ``fit`` asks the handler whether to go on, and the handler asks each ``HandlerCallback``
in turn: an event CONTINUES only while every callback answers True (``res = res and cb.event()``, so
after a falsy answer the later callbacks are not even asked). A callback that forgets ``return True``
answers None, and the loop quietly skips its work. The lesson replaces this design with the ``Runner``
of ``minilib.learner`` (True means STOP, so Python's implicit None means "carry on"); these names are
re-exported from there. This module imports only ``minilib.learner_core``, never ``minilib.learner``:
the two designs share the Learner and nothing else.
"""

from __future__ import annotations

import torch

from minilib.learner_core import Learner

__all__ = ["HandlerCallback", "CallbackHandler", "fit"]


class HandlerCallback:
    """A callback for ``CallbackHandler``: every event must return True to CONTINUE.

    Subclass it and override events; forget a ``return True`` and the fit stops (the reason for the
    Runner's opposite convention).
    """

    def begin_fit(self, learn):
        self.learn = learn
        return True

    def after_fit(self):
        return True

    def begin_epoch(self, epoch):
        self.epoch = epoch
        return True

    def begin_validate(self):
        return True

    def after_epoch(self):
        return True

    def begin_batch(self, xb, yb):
        self.xb, self.yb = xb, yb
        return True

    def after_loss(self, loss):
        self.loss = loss
        return True

    def after_backward(self):
        return True

    def after_step(self):
        return True


class CallbackHandler:
    """A list of ``HandlerCallback``s asked at every step of ``fit``; True from all of them means go on.

    Setting ``learn.stop = True`` stops the pass after the current batch (``do_stop``).
    """

    def __init__(self, cbs=None):
        self.cbs = list(cbs) if cbs else []

    def _ask(self, event: str, *args, res: bool = True) -> bool:
        # The lesson's ``res = res and cb.event()``: after a falsy answer, later callbacks are not asked.
        for cb in self.cbs:
            res = res and getattr(cb, event)(*args)
        return res

    def begin_fit(self, learn):
        self.learn, self.in_train = learn, True
        learn.stop = False
        return self._ask("begin_fit", learn)

    def after_fit(self):
        return self._ask("after_fit", res=not self.in_train)

    def begin_epoch(self, epoch):
        self.learn.model.train()
        self.in_train = True
        return self._ask("begin_epoch", epoch)

    def begin_validate(self):
        self.learn.model.eval()
        self.in_train = False
        return self._ask("begin_validate")

    def after_epoch(self):
        return self._ask("after_epoch")

    def begin_batch(self, xb, yb):
        return self._ask("begin_batch", xb, yb)

    def after_loss(self, loss):
        return self._ask("after_loss", loss, res=self.in_train)  # validating: the batch ends before backward

    def after_backward(self):
        return self._ask("after_backward")

    def after_step(self):
        return self._ask("after_step")

    def do_stop(self):
        try:
            return self.learn.stop
        finally:
            self.learn.stop = False


def one_batch(xb, yb, cb: CallbackHandler) -> None:
    if not cb.begin_batch(xb, yb):
        return
    loss = cb.learn.loss_func(cb.learn.model(xb), yb)
    if not cb.after_loss(loss):
        return
    loss.backward()
    if cb.after_backward():
        cb.learn.opt.step()
    if cb.after_step():
        cb.learn.opt.zero_grad()


def all_batches(dl, cb: CallbackHandler) -> None:
    for xb, yb in dl:
        one_batch(xb, yb, cb)
        if cb.do_stop():
            return


def fit(epochs: int, learn: Learner, cb: CallbackHandler) -> None:
    """The lesson's first ``fit``: every step asks the ``CallbackHandler`` whether to go on."""
    if not cb.begin_fit(learn):
        return
    for epoch in range(epochs):
        if not cb.begin_epoch(epoch):
            continue
        all_batches(learn.data.train_dl, cb)
        if cb.begin_validate():
            with torch.no_grad():
                all_batches(learn.data.valid_dl, cb)
        if cb.do_stop() or not cb.after_epoch():
            break
    cb.after_fit()
