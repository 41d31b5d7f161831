"""Lessons 04 (04_callbacks) and 05b (05b_early_stopping): the Learner, callbacks and the Runner.

The lesson builds the training loop twice. First ``CallbackHandler``: every event returns True to
CONTINUE, so a callback that forgets ``return True`` (Python returns None) silently stops the fit.
Then the ``Runner``: callbacks are small classes with an ``_order``; an event returning True means
STOP/SKIP, so Python's implicit None means "carry on"; and 05b lets any callback cancel a batch, an
epoch or the whole fit by raising ``Cancel{Batch,Epoch,Train}Exception``, each caught at its own loop
level (``one_batch``, ``all_batches``, ``fit``) and followed by an ``after_cancel_*`` event.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from functools import partial

import torch
from torch import nn, optim

__all__ = [
    "Learner",
    "get_model",
    "get_model_func",
    "create_learner",
    "camel2snake",
    "listify",
    "EVENTS",
    "Callback",
    "TrainEvalCallback",
    "CancelTrainException",
    "CancelEpochException",
    "CancelBatchException",
    "Runner",
    "HandlerCallback",
    "CallbackHandler",
    "fit",
]


# ---------------------------------------------------------------------------------------------------
# The Learner: plain storage for what one training run needs.


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
    if getattr(data, "c", None) is None:
        raise ValueError("get_model: data.c (the number of classes, i.e. outputs) must be set, got None")
    if isinstance(nh, bool) or not isinstance(nh, int) or nh < 1:
        raise ValueError(f"get_model: nh (hidden units) must be a positive int, got {nh!r}")
    if not lr > 0:
        raise ValueError(f"get_model: lr must be > 0, got {lr!r}")
    m = data.train_ds[0][0].numel()
    model = nn.Sequential(nn.Linear(m, nh), nn.ReLU(), nn.Linear(nh, data.c))
    return model, optim.SGD(model.parameters(), lr=lr)


def get_model_func(lr: float = 0.5):
    """``get_model`` with ``lr`` fixed: a ``data -> (model, opt)`` function for ``create_learner``."""
    return partial(get_model, lr=lr)


def create_learner(model_func, loss_func, data) -> Learner:
    """``Learner(*model_func(data), loss_func, data)``: a fresh model and optimizer for ``data``."""
    return Learner(*model_func(data), loss_func, data)


# ---------------------------------------------------------------------------------------------------
# Small helpers.

# Insert "_" before a capitalised word or after a lower-case letter/digit followed by a capital, but
# never right after an existing "_" (so LR_Find gives lr_find, not fastai's lr__find).
_camel_re1 = re.compile(r"([^_])([A-Z][a-z]+)")
_camel_re2 = re.compile(r"([a-z0-9])([A-Z])")


def camel2snake(name: str) -> str:
    """``TrainEvalCallback`` -> ``train_eval_callback``; ``AvgStats`` -> ``avg_stats``."""
    if not isinstance(name, str):
        raise TypeError(f"camel2snake: name must be a str, got {type(name).__name__}")
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


# ---------------------------------------------------------------------------------------------------
# The Runner's callbacks (05b design).

#: Every event the Runner fires, in the order one training batch meets them (then the rest).
EVENTS = (
    "begin_fit",
    "begin_epoch",
    "begin_batch",
    "after_pred",
    "after_loss",
    "after_backward",
    "after_step",
    "after_batch",
    "begin_validate",
    "after_epoch",
    "after_cancel_batch",
    "after_cancel_epoch",
    "after_cancel_train",
    "after_fit",
)
_EVENT_SET = frozenset(EVENTS)


def _check_event(event_name, where: str) -> None:
    if event_name not in _EVENT_SET:
        raise ValueError(f"{where}: unknown event {event_name!r}; the events are: {', '.join(EVENTS)}")


class CancelTrainException(Exception):
    """Raise from any callback to end the fit; ``after_cancel_train`` then ``after_fit`` run."""


class CancelEpochException(Exception):
    """Raise from a batch event to end the current pass over a DataLoader; ``after_cancel_epoch`` runs."""


class CancelBatchException(Exception):
    """Raise from a batch event to skip the rest of the batch; ``after_cancel_batch``, ``after_batch`` run."""


class Callback:
    """A Runner callback: define methods named after ``EVENTS``; return True to stop/skip, None to go on.

    A callback reads what it does not have from its runner (``self.model``, ``self.in_train``,
    ``self.loss``...), so its code reads like the loop's. It WRITES to the runner explicitly
    (``self.run.n_iter = 0``): assigning ``self.x`` sets an attribute of the callback.
    """

    _order = 0

    def set_runner(self, run) -> None:
        self.run = run

    def __getattr__(self, k):
        # Python calls __getattr__ only for attributes not found normally. Read the runner from the
        # instance dict, never as self.run: before set_runner (or in copy/pickle, which build an empty
        # instance and look up __setstate__ & co.) self.run would call __getattr__ again, forever.
        run = self.__dict__.get("run")
        if run is None or (k.startswith("__") and k.endswith("__")):
            why = "" if run is not None else " (and it has no runner to read it from yet: see set_runner)"
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {k!r}{why}")
        try:
            return getattr(run, k)
        except AttributeError:
            raise AttributeError(
                f"{type(self).__name__!r} object has no attribute {k!r}, and neither has its runner"
            ) from None

    @property
    def name(self) -> str:
        """The class name without ``Callback``, snake_case: the attribute the runner keeps it under."""
        name = re.sub(r"Callback$", "", type(self).__name__)
        return camel2snake(name or "callback")

    def __call__(self, event_name: str):
        """Call this callback's method for ``event_name`` if it has one, and return what it returns."""
        _check_event(event_name, f"{type(self).__name__}.__call__")
        # Look on the class, not the instance: through __getattr__, getattr(self, ...) would fall back to
        # an attribute of the runner that happens to share the event's name.
        if getattr(type(self), event_name, None) is None:
            return None
        return getattr(self, event_name)()

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class TrainEvalCallback(Callback):
    """Keeps ``run.n_epochs`` (float progress: epoch + fraction of its batches) and ``run.n_iter``
    (training batches so far), and switches the model between ``train()`` and ``eval()``.

    ``n_epochs`` is a float because a schedule needs to know where training is WITHIN an epoch:
    ``ParamScheduler`` sets the learning rate from ``n_epochs / epochs`` before every batch.
    """

    def begin_fit(self):
        self.run.n_epochs = 0.0
        self.run.n_iter = 0

    def begin_epoch(self):
        self.run.n_epochs = float(self.epoch)
        self._batch = 0
        self.model.train()
        self.run.in_train = True

    def after_batch(self):
        if not self.in_train:
            return
        # epoch + k / iters rather than the lesson's repeated += 1 / iters: the same number without the
        # rounding drift, so the last batch of the last epoch ends at exactly n_epochs == epochs.
        self._batch += 1
        self.run.n_epochs = self.epoch + self._batch / self.iters
        self.run.n_iter += 1

    def begin_validate(self):
        self.model.eval()
        self.run.in_train = False


# Attributes the Runner itself sets during a fit: a callback named like one would be overwritten.
_RUNNER_STATE = frozenset(
    {"xb", "yb", "pred", "loss", "epoch", "epochs", "iters", "in_train", "n_epochs", "n_iter", "learn", "cbs"}
)


class Runner:
    """The training loop of lesson 05b, one method per loop level: ``fit`` > ``all_batches`` > ``one_batch``.

    ``Runner(cbs, cb_funcs)``: ``cbs`` are callback instances, ``cb_funcs`` callables that build one
    (``partial(ParamScheduler, 'lr', sched)``). A ``TrainEvalCallback`` is always added. Every callback
    is reachable as ``run.<its name>`` (``run.recorder``, ``run.avg_stats``); two with the same name:
    the later one.
    """

    def __init__(self, cbs=None, cb_funcs=None):
        self.in_train = False
        cbs = list(listify(cbs))  # a copy: never append to the caller's list
        for cbf in listify(cb_funcs):
            if not callable(cbf):
                raise TypeError(f"Runner: cb_funcs must be callables that build a Callback, got {cbf!r}")
            cbs.append(cbf())
        if not any(isinstance(cb, TrainEvalCallback) for cb in cbs):
            cbs.insert(0, TrainEvalCallback())
        for cb in cbs:
            self._check_callback(cb)
            setattr(self, cb.name, cb)
        # Sorted once, stably: callbacks with equal _order run in the order they were given.
        self.cbs = sorted(cbs, key=lambda cb: cb._order)

    def _check_callback(self, cb) -> None:
        if not isinstance(cb, Callback):
            raise TypeError(f"Runner: callbacks must be Callback instances, got {type(cb).__name__} {cb!r}")
        name = cb.name
        if hasattr(type(self), name) or name in _RUNNER_STATE:
            raise ValueError(
                f"Runner: callback {type(cb).__name__} would be reachable as run.{name}, which the Runner "
                f"already uses; rename the class"
            )
        # A misspelt event (begin_bacth) would otherwise never run, silently.
        for attr in dir(type(cb)):
            if attr.startswith(("begin_", "after_")) and attr not in _EVENT_SET:
                raise ValueError(
                    f"Runner: callback {type(cb).__name__} defines {attr}, which is not an event; "
                    f"the events are: {', '.join(EVENTS)}"
                )

    # What the callbacks read through the runner.
    @property
    def opt(self):
        return self.learn.opt

    @property
    def model(self):
        return self.learn.model

    @property
    def loss_func(self):
        return self.learn.loss_func

    @property
    def data(self):
        return self.learn.data

    def one_batch(self, xb, yb) -> None:
        try:
            self.xb, self.yb = xb, yb
            self("begin_batch")
            self.pred = self.model(self.xb)
            self("after_pred")
            self.loss = self.loss_func(self.pred, self.yb)
            self("after_loss")
            if not self.in_train:
                return  # validation: no backward, no step
            self.loss.backward()
            self("after_backward")
            self.opt.step()
            self("after_step")
        except CancelBatchException:
            self("after_cancel_batch")
        finally:
            # Zeroed here, not after the step: a batch cancelled after its backward must not leave its
            # gradients to be added to the next batch's.
            if self.in_train:
                self.opt.zero_grad()
            self("after_batch")

    def all_batches(self, dl) -> None:
        self.iters = len(dl)
        try:
            for xb, yb in dl:
                self.one_batch(xb, yb)
        except CancelEpochException:
            self("after_cancel_epoch")

    def fit(self, epochs: int, learn: Learner) -> None:
        """Train ``learn`` for ``epochs`` epochs, each a training pass then a validation pass."""
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0:
            raise ValueError(f"Runner.fit: epochs must be an int >= 0, got {epochs!r}")
        for attr in ("model", "opt", "loss_func", "data"):
            if not hasattr(learn, attr):
                raise TypeError(
                    f"Runner.fit: learn must be a Learner (with .{attr}), got {type(learn).__name__}"
                )
        self.epochs, self.learn, self.loss = epochs, learn, torch.tensor(0.0)
        try:
            for cb in self.cbs:
                cb.set_runner(self)
            self("begin_fit")
            for epoch in range(epochs):
                self.epoch = epoch
                if not self("begin_epoch"):
                    self.all_batches(self.data.train_dl)
                with torch.no_grad():
                    if not self("begin_validate"):
                        self.all_batches(self.data.valid_dl)
                self("after_epoch")
        except CancelTrainException:
            self("after_cancel_train")
        finally:
            self("after_fit")
            self.in_train = False
        # Unlike the lesson, keep run.learn after the fit: run.model and run.opt stay readable.

    def run(self, event_name: str) -> bool:
        """Call every callback's ``event_name`` method, in ``_order``; True if ANY of them returned truthy.

        All of them are called, even after one returned True. (The lesson's exported
        ``res = cb(name) and res``, starting from False, could never be True.)
        """
        _check_event(event_name, "Runner.run")
        res = False
        for cb in self.cbs:
            res = bool(cb(event_name)) or res  # cb first: no short-circuit may skip a callback
        return res

    def __call__(self, event_name: str) -> bool:
        return self.run(event_name)

    def __repr__(self) -> str:
        return f"Runner(cbs=[{', '.join(type(cb).__name__ for cb in self.cbs)}])"


# ---------------------------------------------------------------------------------------------------
# The lesson's FIRST design (04): kept so that the spec can show why it was replaced.


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
    """The lesson's first design: a list of ``HandlerCallback``s; an event continues only while ALL of
    them return True (``res = res and cb.event()``: after a falsy answer, later callbacks are not even
    called). Setting ``learn.stop = True`` stops after the current batch."""

    def __init__(self, cbs=None):
        self.cbs = list(cbs) if cbs else []

    def begin_fit(self, learn):
        self.learn, self.in_train = learn, True
        learn.stop = False
        res = True
        for cb in self.cbs:
            res = res and cb.begin_fit(learn)
        return res

    def after_fit(self):
        res = not self.in_train
        for cb in self.cbs:
            res = res and cb.after_fit()
        return res

    def begin_epoch(self, epoch):
        self.learn.model.train()
        self.in_train = True
        res = True
        for cb in self.cbs:
            res = res and cb.begin_epoch(epoch)
        return res

    def begin_validate(self):
        self.learn.model.eval()
        self.in_train = False
        res = True
        for cb in self.cbs:
            res = res and cb.begin_validate()
        return res

    def after_epoch(self):
        res = True
        for cb in self.cbs:
            res = res and cb.after_epoch()
        return res

    def begin_batch(self, xb, yb):
        res = True
        for cb in self.cbs:
            res = res and cb.begin_batch(xb, yb)
        return res

    def after_loss(self, loss):
        res = self.in_train  # False while validating: the batch ends before backward
        for cb in self.cbs:
            res = res and cb.after_loss(loss)
        return res

    def after_backward(self):
        res = True
        for cb in self.cbs:
            res = res and cb.after_backward()
        return res

    def after_step(self):
        res = True
        for cb in self.cbs:
            res = res and cb.after_step()
        return res

    def do_stop(self):
        try:
            return self.learn.stop
        finally:
            self.learn.stop = False


def _handler_one_batch(xb, yb, cb: CallbackHandler) -> None:
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


def _handler_all_batches(dl, cb: CallbackHandler) -> None:
    for xb, yb in dl:
        _handler_one_batch(xb, yb, cb)
        if cb.do_stop():
            return


def fit(epochs: int, learn: Learner, cb: CallbackHandler) -> None:
    """The lesson's first ``fit``: every step asks the ``CallbackHandler`` whether to go on."""
    if not cb.begin_fit(learn):
        return
    for epoch in range(epochs):
        if not cb.begin_epoch(epoch):
            continue
        _handler_all_batches(learn.data.train_dl, cb)
        if cb.begin_validate():
            with torch.no_grad():
                _handler_all_batches(learn.data.valid_dl, cb)
        if cb.do_stop() or not cb.after_epoch():
            break
    cb.after_fit()
