"""Lessons 04 (04_callbacks) and 05b (05b_early_stopping): callbacks and the Runner.

The lesson builds the training loop twice. First ``CallbackHandler`` (``minilib.callback_handler``,
re-exported here): every event returns True to CONTINUE, so a callback that forgets ``return True``
silently stops the fit. Then the ``Runner``: callbacks are small classes with an ``_order``; True from an
event means STOP/SKIP, so Python's implicit None means "carry on"; and 05b lets any callback cancel a
batch, a pass over the data or the whole fit by raising ``Cancel{Batch,Epoch,Train}Exception``. The
Learner and the helpers both designs share live in ``minilib.learner_core`` and are re-exported here.
"""

from __future__ import annotations

import math
import re
from contextlib import contextmanager, suppress
from numbers import Real

import torch

from minilib import contract
from minilib.callback_handler import CallbackHandler, HandlerCallback, fit
from minilib.learner_core import Learner, camel2snake, create_learner, get_model, get_model_func, listify

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
    "silent",
    "HandlerCallback",
    "CallbackHandler",
    "fit",
]

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


def _check_event(event_name, fname: str) -> None:
    if event_name not in _EVENT_SET:
        contract.one_of(fname, "event_name", event_name, EVENTS)


# Each Cancel exception names the event that answers it.
class CancelTrainException(Exception):
    """Raise from any event to end the fit; ``after_cancel_train`` then ``after_fit`` run."""

    answer = "after_cancel_train"


class CancelEpochException(Exception):
    """Raise from a batch event, ``begin_epoch`` or ``begin_validate`` to end the current pass over a
    DataLoader (training or validation); ``after_cancel_epoch`` runs, then the epoch goes on."""

    answer = "after_cancel_epoch"


class CancelBatchException(Exception):
    """Raise from a batch event to skip the rest of the batch; ``after_cancel_batch``, ``after_batch`` run."""

    answer = "after_cancel_batch"


_CANCELS = (CancelTrainException, CancelEpochException, CancelBatchException)


def silent(*args, **kwargs) -> None:
    """A ``run.logger`` that shows nothing (``DDPCallback`` gives it to the ranks other than 0)."""


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
        # Only for names the callback lacks. Read the runner from __dict__: self.run would come back here
        # before set_runner, and copy/pickle look up dunders on an empty instance.
        run = self.__dict__.get("run")
        if run is not None and not k.startswith("__"):
            with suppress(AttributeError):
                return getattr(run, k)
        where = "neither has its runner" if run is not None else "it has no runner to read it from yet"
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {k!r}, and {where}")

    @property
    def name(self) -> str:
        """The class name without ``Callback``, snake_case: the attribute the runner keeps it under."""
        return camel2snake(re.sub(r"Callback$", "", type(self).__name__) or "callback")

    def __call__(self, event_name: str):
        """Call this callback's method for ``event_name`` if it has one, and return what it returns."""
        _check_event(event_name, f"{type(self).__name__}.__call__")
        return _method(self, event_name)()

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def _none() -> None:
    return None


def _method(cb: Callback, event_name: str):
    # Looked up on the class: through __getattr__, the runner's attribute of that name would answer.
    return getattr(cb, event_name) if hasattr(type(cb), event_name) else _none


class TrainEvalCallback(Callback):
    """Keeps ``run.n_epochs`` (float progress: epoch + fraction of its batches) and ``run.n_iter``
    (training batches so far), and switches the model between ``train()`` and ``eval()``.

    ``n_epochs`` is a float because a schedule needs to know where training is WITHIN an epoch:
    ``ParamScheduler`` sets the learning rate from ``n_epochs / epochs`` before every batch. It is
    computed from ``run.iter`` (epoch + (iter + 1) / iters rather than the lesson's repeated
    ``+= 1 / iters``: no rounding drift, and a resumed pass continues it exactly).
    """

    def begin_fit(self):
        self.run.n_epochs, self.run.n_iter = 0.0, 0

    def begin_epoch(self):
        self.run.n_epochs = float(self.epoch)
        self.model.train()
        self.run.in_train = True

    def after_batch(self):
        if self.in_train:
            self.run.n_epochs = self.epoch + (self.iter + 1) / self.iters
            self.run.n_iter += 1

    def begin_validate(self):
        self.model.eval()
        self.run.in_train = False


# What the Runner itself sets during a fit: a callback named like one would be overwritten.
_RUNNER_STATE = frozenset(
    {"xb", "yb", "pred", "loss", "epoch", "epochs", "start_epoch", "dl", "iter", "iters", "in_train"}
    | {"n_epochs", "n_iter", "learn", "logger"}
)


class _Callbacks(list):
    """``run.cbs``: a list that checks each callback as it joins and keeps itself sorted by ``_order``
    (stably: ties keep the order they were given or inserted in), however it is changed."""

    def __init__(self, run: Runner):
        super().__init__()
        self.run = run

    def _admitted(self, cbs) -> list:
        cbs = list(cbs)
        for cb in cbs:
            self.run._admit(cb)
        return cbs

    def append(self, cb) -> None:
        self.extend([cb])

    def extend(self, cbs) -> None:
        for cb in list(cbs):  # one at a time: a callback checking the others sees those before it
            self.run._admit(cb)
            super().append(cb)
        self.sort()

    def insert(self, i, cb) -> None:
        super().insert(i, *self._admitted([cb]))
        self.sort()

    def __setitem__(self, i, cbs) -> None:
        super().__setitem__(i, self._admitted(cbs) if isinstance(i, slice) else self._admitted([cbs])[0])
        self.sort()

    def __iadd__(self, cbs):
        self.extend(cbs)
        return self

    def __imul__(self, n):
        super().__imul__(n)
        self.sort()
        return self

    def reverse(self) -> None:
        super().reverse()
        self.sort()

    def sort(self) -> None:  # by _order only: any other order would be undone by the next change
        super().sort(key=lambda cb: cb._order)


class Runner:
    """The training loop of lesson 05b, one block per loop level: ``fit`` > ``all_batches`` > ``one_batch``.

    ``Runner(cbs, cb_funcs)``: ``cbs`` are callback instances, ``cb_funcs`` callables that build one
    (``Recorder``, ``partial(ParamScheduler, 'lr', sched)``). A ``TrainEvalCallback`` is always added.
    Each callback is checked once, when it joins ``run.cbs`` (at construction, or appended later):
    a Callback, a real ``_order``, a name the Runner does not use, no misspelt event method. It is
    then reachable as ``run.<its name>`` (two with the same name: the later one). ``run.cbs`` keeps
    itself sorted by ``_order`` however it is changed, and ``run(event)`` calls the callbacks that
    were there when the event began.

    ``run.logger`` (default ``print``) is how callbacks show things: ``ProgressCallback`` replaces it
    to put their lines in its own, ``DDPCallback`` silences it on ranks other than 0. A fit gives it
    back as it was. A fit cannot start while one runs (a RuntimeError): the inner fit would end the
    outer one's training mode.

    The loop's state, for the callbacks (and for resuming a fit, as a checkpoint callback does):
    - ``learn``, ``epochs``; ``epoch``, the current epoch: ``fit`` runs ``range(run.start_epoch,
      epochs)``, and ``start_epoch`` is 0 before ``begin_fit``, where a callback may raise it.
    - ``dl``, the loader of the current pass, and ``iters = len(dl)``, set before ``begin_epoch`` /
      ``begin_validate``. The pass iterates ``run.dl`` as it stands after that event, so a callback
      may replace it by the batches that remain and set ``run.iter`` to the number it skipped;
      ``iters`` stays the length of the whole pass. ``iter`` is the index of the current batch in
      the pass (0-based), set by the Runner before each batch.
    - ``in_train``, ``xb``, ``yb``, ``pred``, ``loss``; ``n_epochs`` and ``n_iter`` (TrainEvalCallback).
    """

    def __init__(self, cbs=None, cb_funcs=None):
        self.in_train, self.logger, self._fitting = False, print, False
        cbs = list(listify(cbs))  # a copy: never append to the caller's list
        for cbf in listify(cb_funcs):
            # A Callback instance is callable too (cb(event_name)), so calling it would fail obscurely.
            if isinstance(cbf, Callback) or not callable(cbf):
                want = "callables that build a Callback (pass the class, or put the instance in cbs)"
                contract.fail("Runner", "cb_funcs", want, cbf, TypeError)
            cbs.append(cbf())
        if not any(isinstance(cb, TrainEvalCallback) for cb in cbs):
            cbs.insert(0, TrainEvalCallback())
        self.cbs = cbs

    @property
    def cbs(self) -> list:
        return self._cbs

    @cbs.setter
    def cbs(self, cbs) -> None:
        self._cbs = _Callbacks(self)
        self._cbs.extend(listify(cbs))

    def _admit(self, cb) -> None:
        """Check ``cb`` once, as it joins ``run.cbs``, and make it reachable as ``run.<cb.name>``."""
        if not isinstance(cb, Callback):
            contract.fail("Runner", "cbs", "Callback instances", cb, TypeError)
        order = cb._order
        if not isinstance(order, Real) or math.isnan(order):  # NaN compares False: it scrambles sorting
            contract.fail("Runner", f"{type(cb).__name__}._order", "a real number", order, TypeError)
        if hasattr(type(self), cb.name) or cb.name in _RUNNER_STATE:
            want = "a name the Runner does not use itself (rename the class)"
            contract.fail("Runner", f"{type(cb).__name__}'s name", want, f"{cb.name!r} (run.{cb.name})")
        for attr in dir(type(cb)):  # a misspelt event (begin_bacth) would otherwise never run, silently
            if attr.startswith(("begin_", "after_")):
                contract.one_of("Runner", f"{type(cb).__name__}.{attr}", attr, EVENTS)
        cb.set_runner(self)
        setattr(self, cb.name, cb)

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

    # --- The three loop levels, each one block inside _with_events ---------------------------------------

    def one_batch(self, xb, yb) -> None:
        self.xb, self.yb = xb, yb
        with self._with_events(CancelBatchException, end=self._end_batch):
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

    def _end_batch(self) -> None:
        if self.in_train:  # even after a cancel: its gradients must not be added to the next batch's
            self.opt.zero_grad()
        self("after_batch")

    def all_batches(self, dl, begin: str = "begin_epoch") -> None:
        """One pass over ``dl``, opened by ``begin`` (begin_epoch or begin_validate: True from it skips)."""
        self.dl, self.iters, self.iter = dl, len(dl), 0
        with self._with_events(CancelEpochException):
            if self(begin):
                return
            for i, (xb, yb) in enumerate(self.dl, start=self.iter):  # run.dl and run.iter as begin left them
                self.iter = i
                self.one_batch(xb, yb)

    def fit(self, epochs: int, learn: Learner) -> None:
        """Train ``learn`` for ``epochs`` epochs, each a training pass then a validation pass."""
        contract.positive_int("Runner.fit", minimum=0, epochs=epochs)
        if not all(hasattr(learn, a) for a in ("model", "opt", "loss_func", "data")):
            contract.fail("Runner.fit", "learn", "a Learner (model, opt, loss_func, data)", learn, TypeError)
        if self._fitting:
            raise RuntimeError(
                "Runner.fit: a fit is already running on this Runner (fit called from a callback?); "
                "the inner fit would end the outer one's training mode, leaving its batches untrained"
            )
        self.epochs, self.learn, self.loss, self.start_epoch = epochs, learn, torch.tensor(0.0), 0
        for cb in self.cbs:
            cb.set_runner(self)
        self._fitting, logger = True, self.logger  # from here on, the finally below gives both back
        try:
            with self._with_events(CancelTrainException, end=lambda: self("after_fit")):
                self("begin_fit")
                for epoch in range(self.start_epoch, epochs):
                    self.epoch = epoch
                    self.all_batches(self.data.train_dl, "begin_epoch")
                    with torch.no_grad():
                        self.all_batches(self.data.valid_dl, "begin_validate")
                    self("after_epoch")
        finally:
            self.in_train, self._fitting, self.logger = False, False, logger
        # Unlike the lesson, keep run.learn after the fit: run.model and run.opt stay readable.

    @contextmanager
    def _with_events(self, cancel: type[Exception], end=_none):
        """One loop level: the body of the ``with``, then ``end()`` whatever happened in it (the lesson's
        ``finally``: after_batch and after_fit always run).

        The level's own ``cancel`` exception, raised in the body or in ``end``, stops the level and is
        answered by its event (``cancel.answer``, e.g. after_cancel_batch); cancelling again while it
        is answered changes nothing. Any other exception (a higher level's Cancel included) goes on up
        unchanged once the level has ended. While an ordinary error is in flight, nothing the ending raises
        replaces it: not an error (it would hide the first), not a Cancel (a level above would catch it and
        swallow the error); it is added to the error's notes instead.
        """
        try:
            try:
                yield
            except cancel:
                with suppress(cancel):
                    self(cancel.answer)
        except BaseException as error:
            try:
                with suppress(cancel):
                    end()
            except Exception as late:
                if isinstance(error, _CANCELS):
                    raise  # a higher level's cancel in flight: what the ending raised goes up instead
                if hasattr(error, "add_note"):  # Python 3.11+; on 3.10 the later error is dropped
                    error.add_note(f"while the loop ended after it: {type(late).__name__}: {late}")
            raise
        try:
            end()
        except cancel:
            with suppress(cancel):
                self(cancel.answer)

    def run(self, event_name: str) -> bool:
        """Call every callback's ``event_name`` method, in ``_order``; True if ANY of them returned truthy.

        All of them are called, even after one returned True (the lesson's exported
        ``res = cb(name) and res``, starting from False, could never be True), and those called are
        the ones there when the event began, whatever the callbacks do to ``run.cbs`` meanwhile.
        """
        _check_event(event_name, "Runner.run")
        res = False
        for cb in tuple(self.cbs):
            res = bool(_method(cb, event_name)()) or res  # the call first: no short-circuit may skip it
        return res

    def __call__(self, event_name: str) -> bool:
        return self.run(event_name)

    def __repr__(self) -> str:
        return f"Runner(cbs=[{', '.join(type(cb).__name__ for cb in self.cbs)}])"
