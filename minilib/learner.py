"""Lessons 04 (04_callbacks) and 05b (05b_early_stopping): the Learner, callbacks and the Runner.

The lesson builds the training loop twice. First ``CallbackHandler`` (``minilib.callback_handler``,
re-exported here): every event returns True to CONTINUE, so a callback that forgets ``return True``
(Python returns None) silently stops the fit. Then the ``Runner``: callbacks are small classes with an
``_order``; an event returning True means STOP/SKIP, so Python's implicit None means "carry on"; and
05b lets any callback cancel a batch, a pass over the data or the whole fit by raising
``Cancel{Batch,Epoch,Train}Exception``. The three loop levels (``one_batch``, ``all_batches``, ``fit``)
all run through one helper, ``Runner._with_events``, as fastai v2's Learner does: it catches the
level's own Cancel exception, answers it with ``after_cancel_<level>``, and ends the level with its
``after_*`` event whatever happened.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from contextlib import suppress
from functools import partial

import torch
from torch import nn, optim

from minilib import contract
from minilib.callback_handler import CallbackHandler, HandlerCallback, fit

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


# ---------------------------------------------------------------------------------------------------
# Small helpers.

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


def _check_event(event_name, fname: str) -> None:
    if event_name not in _EVENT_SET:  # the fast path: run() checks every event of every batch
        contract.one_of(fname, "event_name", event_name, EVENTS)


class CancelTrainException(Exception):
    """Raise from any event to end the fit; ``after_cancel_train`` then ``after_fit`` run."""


class CancelEpochException(Exception):
    """Raise from a batch event, ``begin_epoch`` or ``begin_validate`` to end the current pass over a
    DataLoader (training or validation); ``after_cancel_epoch`` runs, then the epoch goes on."""


class CancelBatchException(Exception):
    """Raise from a batch event to skip the rest of the batch; ``after_cancel_batch``, ``after_batch`` run."""


#: The Runner's three loop levels, each with the exception that cancels it (answered by
#: ``after_cancel_<level>``). A Cancel exception raised outside its level (a CancelBatchException in
#: ``begin_epoch``: there is no batch to cancel) is an ordinary error.
CANCELS = {"batch": CancelBatchException, "epoch": CancelEpochException, "train": CancelTrainException}


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
    {"xb", "yb", "pred", "loss", "epoch", "epochs", "dl", "iters", "in_train", "n_epochs", "n_iter"}
    | {"learn", "cbs"}
)


class Runner:
    """The training loop of lesson 05b, one method per loop level: ``fit`` > ``all_batches`` > ``one_batch``.

    ``Runner(cbs, cb_funcs)``: ``cbs`` are callback instances, ``cb_funcs`` callables that build one
    (``Recorder``, ``partial(ParamScheduler, 'lr', sched)``). A ``TrainEvalCallback`` is always added.
    Every callback is reachable as ``run.<its name>`` (``run.recorder``, ``run.avg_stats``); two with
    the same name: the later one. During a fit the runner holds the loop's state for the callbacks:
    ``learn``, ``epochs``, ``epoch``, ``dl`` (the DataLoader of the current pass) and its length
    ``iters``, ``in_train``, ``xb``, ``yb``, ``pred``, ``loss``.
    """

    def __init__(self, cbs=None, cb_funcs=None):
        self.in_train = False
        cbs = list(listify(cbs))  # a copy: never append to the caller's list
        for cbf in listify(cb_funcs):
            # A Callback instance is callable too (cb(event_name)), so calling it would fail obscurely.
            if isinstance(cbf, Callback) or not callable(cbf):
                want = "callables that build a Callback (pass the class, or put the instance in cbs)"
                contract.fail("Runner", "cb_funcs", want, cbf, TypeError)
            cbs.append(cbf())
        if not any(isinstance(cb, TrainEvalCallback) for cb in cbs):
            cbs.insert(0, TrainEvalCallback())
        for cb in cbs:
            self._add(cb)
        # Sorted once, stably: callbacks with equal _order run in the order they were given.
        self.cbs = sorted(cbs, key=lambda cb: cb._order)

    def _add(self, cb) -> None:
        """Make ``cb`` reachable as ``run.<cb.name>``, once it is known to be a callback the loop can call."""
        if not isinstance(cb, Callback):
            contract.fail("Runner", "cbs", "Callback instances", cb, TypeError)
        if hasattr(type(self), cb.name) or cb.name in _RUNNER_STATE:
            want = "a name the Runner does not use itself (rename the class)"
            contract.fail("Runner", f"{type(cb).__name__}'s name", want, f"{cb.name!r} (run.{cb.name})")
        for attr in dir(type(cb)):  # a misspelt event (begin_bacth) would otherwise never run, silently
            if attr.startswith(("begin_", "after_")):
                contract.one_of("Runner", f"{type(cb).__name__}.{attr}", attr, EVENTS)
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

    # --- The one helper every loop level runs through ----------------------------------------------

    def _with_events(self, f, level: str, after: str | None = None, final=None) -> None:
        """Run one loop level: ``f()``, then, whatever happened in it, ``final()`` and the event ``after``.

        The level's own Cancel exception (``CANCELS[level]``), raised in ``f`` or in ``after``, ends the
        level: ``after_cancel_<level>`` answers it and it goes no further. Any other exception goes on
        up unchanged once the level has ended (the lesson's ``finally``), so that ``after_batch`` and
        ``after_fit`` always run; a Cancel raised while ending the level must not swallow it.
        """
        cancel = CANCELS[level]
        try:
            try:
                f()
            except cancel:
                self._answer(level)
        except BaseException:
            with suppress(cancel):
                self._end(after, final)
            raise
        try:
            self._end(after, final)
        except cancel:
            self._answer(level)

    def _end(self, after: str | None, final) -> None:
        if final is not None:
            final()
        if after is not None:
            self(after)

    def _answer(self, level: str) -> None:
        with suppress(CANCELS[level]):  # cancelling the level again while it is being cancelled: no-op
            self(f"after_cancel_{level}")

    # --- The three levels ----------------------------------------------------------------------------

    def one_batch(self, xb, yb) -> None:
        self.xb, self.yb = xb, yb
        self._with_events(self._batch, "batch", after="after_batch", final=self._zero_grad)

    def _batch(self) -> None:
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

    def _zero_grad(self) -> None:
        # At the end of every training batch, even a cancelled one: a batch cancelled after its backward
        # must not leave its gradients to be added to the next batch's.
        if self.in_train:
            self.opt.zero_grad()

    def all_batches(self, dl, begin: str = "begin_epoch") -> None:
        """One pass over ``dl``, opened by ``begin`` (begin_epoch or begin_validate: True from it skips)."""
        self._with_events(partial(self._batches, dl, begin), "epoch")

    def _batches(self, dl, begin: str) -> None:
        self.dl, self.iters = dl, len(dl)
        if self(begin):
            return
        for xb, yb in dl:
            self.one_batch(xb, yb)

    def fit(self, epochs: int, learn: Learner) -> None:
        """Train ``learn`` for ``epochs`` epochs, each a training pass then a validation pass."""
        contract.positive_int("Runner.fit", minimum=0, epochs=epochs)
        if not all(hasattr(learn, a) for a in ("model", "opt", "loss_func", "data")):
            contract.fail("Runner.fit", "learn", "a Learner (model, opt, loss_func, data)", learn, TypeError)
        self.epochs, self.learn, self.loss = epochs, learn, torch.tensor(0.0)
        for cb in self.cbs:
            cb.set_runner(self)
        try:
            self._with_events(self._epochs, "train", after="after_fit")
        finally:
            self.in_train = False
        # Unlike the lesson, keep run.learn after the fit: run.model and run.opt stay readable.

    def _epochs(self) -> None:
        self("begin_fit")
        for epoch in range(self.epochs):
            self.epoch = epoch
            self.all_batches(self.data.train_dl, "begin_epoch")
            with torch.no_grad():
                self.all_batches(self.data.valid_dl, "begin_validate")
            self("after_epoch")

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
