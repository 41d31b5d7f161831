"""Lesson 05b (05b_early_stopping): cancelling from a callback, and the learning-rate finder.

Returning True from an event can only skip what that event guards. To stop from anywhere, the
notebook lets any callback raise ``CancelBatchException``, ``CancelEpochException`` or
``CancelTrainException``. The Runner catches each at its own loop level (``one_batch``,
``all_batches``, ``fit``), fires ``after_cancel_batch`` / ``after_cancel_epoch`` /
``after_cancel_train``, and carries on from the level above; ``after_batch`` and ``after_fit`` run
whatever happens (the notebook's ``finally``). Here the three levels run through one helper, as in
fastai v2, and one table checks every exception at every event against the contract. The Runner's
``__call__`` also changed: the version the notebook exported, ``res = cb(name) and res`` starting
from False, could never return True; the intent, and the fix here, is "True if any callback
returned True". With cancelling in place, the LR
finder (``LR_Find``) is a few lines: raise the lr exponentially batch by batch, record the loss, and
cancel training once the loss exceeds 10x the best seen (or after ``max_iter`` batches); the
``Recorder.plot`` of loss against lr, on a log axis, is where one reads a good learning rate.
"""

from __future__ import annotations

import math
import sys

import pytest
import torch
import torch.nn.functional as F
from support import tiny_data
from torch import nn, optim
from torch.utils.data import DataLoader as TorchDataLoader

from minilib.callbacks import LR_Find, Recorder
from minilib.data import DataBunch, Dataset
from minilib.learner import (
    EVENTS,
    Callback,
    CancelBatchException,
    CancelEpochException,
    CancelTrainException,
    Learner,
    Runner,
    create_learner,
    get_model_func,
)

pytestmark = pytest.mark.lesson05b


def tiny_learner(data=None) -> Learner:
    return create_learner(get_model_func(0.1), F.cross_entropy, data or tiny_data())


class Tracer(Callback):
    """Records every event it receives, in order."""

    def __init__(self):
        self.trace = []


for _event in EVENTS:
    setattr(Tracer, _event, lambda self, _e=_event: self.trace.append(_e))


def raiser(exc: type[Exception], event: str) -> Callback:
    """A callback that raises ``exc`` the first time ``event`` fires in training."""

    def method(self):
        if self.in_train and not self.fired:
            self.fired = True
            raise exc()

    cls = type("RaiseCallback", (Callback,), {"_order": 1, "fired": False, event: method})
    return cls()


TRAIN_BATCH = ["begin_batch", "after_pred", "after_loss", "after_backward", "after_step", "after_batch"]
VALID = ["begin_validate", "begin_batch", "after_pred", "after_loss", "after_batch"]

# What runs after each exception, raised in the FIRST training batch of a one-epoch fit with two
# training batches and one validation batch.
CANCEL_TRACES = {
    "batch in after_pred: skip loss, backward, step; the next batch runs": (
        CancelBatchException,
        "after_pred",
        ["begin_fit", "begin_epoch", "begin_batch", "after_pred", "after_cancel_batch", "after_batch"]
        + TRAIN_BATCH
        + VALID
        + ["after_epoch", "after_fit"],
    ),
    "epoch in after_step: end the training pass; validation and after_epoch run": (
        CancelEpochException,
        "after_step",
        ["begin_fit", "begin_epoch"]
        + TRAIN_BATCH
        + ["after_cancel_epoch"]
        + VALID
        + ["after_epoch", "after_fit"],
    ),
    "train in after_loss: no backward; after_batch, after_cancel_train, after_fit run": (
        CancelTrainException,
        "after_loss",
        ["begin_fit", "begin_epoch", "begin_batch", "after_pred", "after_loss", "after_batch"]
        + ["after_cancel_train", "after_fit"],
    ),
}


@pytest.mark.parametrize("case", CANCEL_TRACES)
def test_a_cancel_exception_stops_its_own_level_and_the_loop_goes_on_above(case):
    """Each exception is caught at its level: a cancelled batch is followed by after_cancel_batch
    and, as always, after_batch, then the next batch; a cancelled epoch by after_cancel_epoch, then
    validation; a cancelled fit by after_cancel_train and, as always, after_fit."""
    exc, event, expected = CANCEL_TRACES[case]
    tracer = Tracer()
    Runner([tracer, raiser(exc, event)]).fit(1, tiny_learner())
    assert tracer.trace == expected, f"\ngot:      {tracer.trace}\nexpected: {expected}"


def test_cancel_train_from_begin_epoch_ends_the_fit_before_the_next_epoch():
    """Raised between epochs (here at the start of the second), CancelTrainException ends the fit:
    the first epoch is complete, the second never starts a batch, after_fit still runs."""

    class StopAtEpoch1(Callback):
        def begin_epoch(self):
            if self.epoch == 1:
                raise CancelTrainException()

    tracer = Tracer()
    run = Runner([tracer, StopAtEpoch1()])
    run.fit(5, tiny_learner())
    assert tracer.trace.count("after_epoch") == 1 and tracer.trace[-2:] == ["after_cancel_train", "after_fit"]
    assert run.n_iter == 2, f"{run.n_iter} training batches ran, expected the first epoch's 2"


# --- Every Cancel exception at every event -----------------------------------------------------------

# The uncancelled trace of the fit used below: one epoch, two training batches, one validation batch.
FULL = ["begin_fit", "begin_epoch"] + TRAIN_BATCH * 2 + VALID + ["after_epoch", "after_fit"]
MAIN_EVENTS = [e for e in EVENTS if not e.startswith("after_cancel_")]
# The contract (API.md, minilib.learner): where each exception is caught, and answered.
CAUGHT_AT = {
    CancelBatchException: set(TRAIN_BATCH),
    CancelEpochException: set(TRAIN_BATCH) | {"begin_epoch", "begin_validate"},
    CancelTrainException: set(MAIN_EVENTS),
}
ANSWER = {
    CancelBatchException: "after_cancel_batch",
    CancelEpochException: "after_cancel_epoch",
    CancelTrainException: "after_cancel_train",
}


def expected_trace(exc: type[Exception], event: str) -> list[str]:
    """The contract as a trace: ``exc`` raised the first time ``event`` fires in the fit above.

    The level the exception cancels stops where it is; the batch it was raised in (if any) still ends
    with after_batch; then after_cancel_<level> answers it, and the loop goes on from the level
    above: the next batch, the next pass (validation, or after_epoch), or after_fit. A Cancel exception
    raised where its level is not running is an ordinary error: the loop ends and after_fit runs.
    """
    k = FULL.index(event)
    done, rest = FULL[: k + 1], FULL[k + 1 :]
    batch_end = []
    if event in TRAIN_BATCH:  # the open batch ends with after_batch (which may be where it was raised)
        end = rest.index("after_batch") + 1 if event != "after_batch" else 0
        batch_end, rest = rest[end - 1 : end], rest[end:]  # the rest of the batch is skipped
    if event not in CAUGHT_AT[exc]:
        return done + batch_end + rest[-1:]  # ... then after_fit, unless it was after_fit that raised
    if exc is CancelBatchException:
        return done + ["after_cancel_batch"] + batch_end + rest
    if exc is CancelEpochException:
        resume = rest.index("begin_validate" if "begin_validate" in rest else "after_epoch")
        return done + batch_end + ["after_cancel_epoch"] + rest[resume:]
    return done + batch_end + ["after_cancel_train"] + rest[-1:]


def first_time(exc: type[Exception], event: str) -> Callback:
    """A callback that raises ``exc`` the first time ``event`` fires (training or not)."""

    def method(self):
        if not self.fired:
            self.fired = True
            raise exc()

    return type("FirstTimeCallback", (Callback,), {"_order": 1, "fired": False, event: method})()


@pytest.mark.parametrize("event", MAIN_EVENTS)
@pytest.mark.parametrize("exc", list(CAUGHT_AT), ids=lambda e: e.__name__)
def test_every_cancel_exception_at_every_event_does_what_the_contract_says(exc, event):
    """All 33 cases, events x exceptions. CancelBatchException from any batch event (after_batch
    included: it used to escape the fit), CancelEpochException from a batch event, begin_epoch or
    begin_validate, and CancelTrainException from any event (after_fit included) are caught at their
    level, answered by after_cancel_<level>, and never escape fit. Anywhere else a Cancel exception
    means nothing to cancel: it reaches the caller as any error does, after after_fit."""
    tracer, expected = Tracer(), expected_trace(exc, event)
    run = Runner([tracer, first_time(exc, event)])
    if event in CAUGHT_AT[exc]:
        run.fit(1, tiny_learner())
    else:
        with pytest.raises(exc):
            run.fit(1, tiny_learner())
    assert tracer.trace == expected, f"\ngot:      {tracer.trace}\nexpected: {expected}"


@pytest.mark.parametrize(
    "exc, event",
    [
        (CancelBatchException, "after_pred"),
        (CancelEpochException, "after_step"),
        (CancelTrainException, "after_loss"),
    ],
    ids=["batch", "epoch", "train"],
)
def test_cancelling_again_while_answering_a_cancel_changes_nothing(exc, event):
    """A second callback that raises the same exception from after_cancel_<level> (the level is being
    cancelled already) is not answered a second time and does not escape: the trace is that of the
    single cancel."""
    tracer = Tracer()
    Runner([tracer, first_time(exc, event), first_time(exc, ANSWER[exc])]).fit(1, tiny_learner())
    assert tracer.trace == expected_trace(exc, event), tracer.trace


def test_cancel_train_while_answering_a_cancelled_batch_ends_the_fit():
    """CancelTrainException from after_cancel_batch: the batch still ends with after_batch, then the
    fit ends with after_cancel_train and after_fit."""
    tracer = Tracer()
    cbs = [
        tracer,
        first_time(CancelBatchException, "after_pred"),
        first_time(CancelTrainException, "after_cancel_batch"),
    ]
    Runner(cbs).fit(1, tiny_learner())
    expected = FULL[:4] + ["after_cancel_batch", "after_batch", "after_cancel_train", "after_fit"]
    assert tracer.trace == expected, tracer.trace


def test_an_ordinary_error_reaches_the_caller_unchanged_even_if_a_callback_cancels_while_the_loop_ends():
    """The loop ends as always (after_batch, after_fit), but a Cancel raised by those events must not
    swallow the error in flight: the caller gets the very exception that was raised."""
    error = ZeroDivisionError("the real problem")

    class Fails(Callback):
        def after_pred(self):
            raise error

    cbs = [
        Fails(),
        first_time(CancelBatchException, "after_batch"),
        first_time(CancelTrainException, "after_fit"),
    ]
    with pytest.raises(ZeroDivisionError) as caught:
        Runner(cbs).fit(1, tiny_learner())
    assert caught.value is error


@pytest.mark.parametrize(
    ("exc", "event"),
    [
        (CancelTrainException, "after_batch"),
        (CancelEpochException, "after_batch"),
        (KeyError, "after_batch"),
        (KeyError, "after_fit"),
    ],
    ids=["CancelTrain in after_batch", "CancelEpoch in after_batch", "error in after_batch", "in after_fit"],
)
def test_an_ordinary_error_is_neither_swallowed_nor_replaced_by_what_the_ending_events_raise(exc, event):
    """A Cancel of a level ABOVE raised by after_batch while an error is in flight used to replace the
    error, and the level above then caught it: the fit returned as if cancelled, the error gone. An
    error raised by after_batch or after_fit replaced it too. The caller gets the very error that was
    raised; what the ending raised is one of its notes."""
    error = ZeroDivisionError("the real problem")

    class Fails(Callback):
        def after_pred(self):
            raise error

    with pytest.raises(ZeroDivisionError) as caught:
        Runner([Fails(), first_time(exc, event)]).fit(1, tiny_learner())
    assert caught.value is error
    if sys.version_info >= (3, 11):  # exceptions carry notes from Python 3.11
        assert any(exc.__name__ in note for note in getattr(error, "__notes__", [])), error


def test_a_batch_cancelled_after_backward_takes_no_step_and_leaves_no_gradient():
    """Cancelling after backward skips the optimizer step, so the weights do not move, and the
    gradients are cleared anyway: they must not be added into the next batch's."""
    learn = tiny_learner()
    before = [p.detach().clone() for p in learn.model.parameters()]
    grads = []

    class CancelEveryBatch(Callback):
        def after_backward(self):
            raise CancelBatchException()

        def after_batch(self):
            if self.in_train:
                grads.append([p.grad for p in self.model.parameters()])

    Runner([CancelEveryBatch()]).fit(2, learn)
    assert all(torch.equal(a, b) for a, b in zip(before, learn.model.parameters(), strict=True))
    assert len(grads) == 4 and all(g is None or not g.any() for gs in grads for g in gs), (
        "gradients left over"
    )


def test_after_batch_and_after_fit_run_even_when_a_callback_fails():
    """They run in finally blocks: a recorder's after_batch and a cleanup in after_fit happen even when
    some other error escapes the fit (and the error still reaches the caller)."""
    tracer = Tracer()
    with pytest.raises(ZeroDivisionError):
        Runner([tracer, raiser(ZeroDivisionError, "after_pred")]).fit(1, tiny_learner())
    assert tracer.trace[-3:] == ["after_pred", "after_batch", "after_fit"], tracer.trace


# --- The fixed __call__ --------------------------------------------------------------------------


def answering(i: int, answer, called: list) -> Callback:
    """A callback whose after_pred records that it was called and returns ``answer``."""

    def after_pred(self):
        called.append(i)
        return answer

    return type(f"Answer{i}Callback", (Callback,), {"after_pred": after_pred})()


def exported_call(cbs, event):
    """The Runner.__call__ the notebook exported: res starts False and ``False and x`` stays False."""
    res = False
    for cb in cbs:
        res = cb(event) and res
    return res


@pytest.mark.parametrize("answers", [[True, None], [None, True], [True, True], [None, None], [False, 0]])
def test_run_returns_true_if_any_callback_returns_true_and_asks_them_all(answers):
    """run(event) calls every callback in order, even after one has answered True, and returns True
    if any answer was truthy. The exported version answered False whatever the callbacks said."""
    called = []
    run = Runner([answering(i, a, called) for i, a in enumerate(answers)])
    expected = any(answers)
    assert run("after_pred") is expected, f"answers {answers}"
    assert called == [0, 1], f"answers {answers}: only callbacks {called} were called"
    assert not exported_call(run.cbs, "after_pred"), "the exported version said stop"


# --- The LR finder -------------------------------------------------------------------------------


def regression_learner(n=64, bs=8, n_in=10) -> Learner:
    """Least squares with SGD: it converges for small lrs and diverges geometrically once the lr
    passes 2 / (largest eigenvalue of a batch loss's Hessian): a few tenths for batches of 8."""
    x = torch.randn(n, n_in)
    y = x @ torch.randn(n_in, 1) + 0.1 * torch.randn(n, 1)
    data = DataBunch(
        TorchDataLoader(Dataset(x, y), batch_size=bs, shuffle=True),
        TorchDataLoader(Dataset(x, y), batch_size=2 * bs),
    )
    model = nn.Linear(n_in, 1)
    return Learner(model, optim.SGD(model.parameters(), lr=0.1), F.mse_loss, data)


def test_lr_finder_sweeps_the_lr_exponentially_and_stops_at_max_iter():
    """With a mild range the loss never explodes: the finder trains max_iter + 1 batches at
    min_lr * (max_lr / min_lr) ** (i / max_iter), i = 0..max_iter (from min_lr to max_lr exactly),
    crossing epochs as needed, then cancels the fit. It never validates."""
    tracer, rec = Tracer(), Recorder()
    run = Runner([LR_Find(max_iter=10, min_lr=1e-4, max_lr=1e-2), rec, tracer])
    run.fit(100, tiny_learner())
    expected = torch.logspace(-4, -2, 11, dtype=torch.float64).tolist()
    assert rec.lrs[0] == pytest.approx(expected, rel=1e-12), rec.lrs[0]
    assert tracer.trace.count("begin_batch") == 11, "validation batches ran, or the sweep did not stop"
    assert tracer.trace[-2:] == ["after_cancel_train", "after_fit"]


def test_lr_finder_stops_when_the_loss_explodes_and_plots_loss_against_lr_on_a_log_axis():
    """Least squares diverges once the lr is too large: the loss grows geometrically, exceeds 10x the
    best loss within a few batches, and the finder stops there, long before max_iter. Every loss but
    the last stayed within 10x of the best before it. Recorder.plot shows the sweep on a log x axis."""
    run = Runner([LR_Find(max_iter=100, min_lr=1e-4, max_lr=100), Recorder()])
    run.fit(100, regression_learner())
    lrs, losses = run.recorder.lrs[0], run.recorder.losses
    n = len(losses)
    assert 30 < n < 101, f"the finder ran {n} batches; expected it to stop on divergence before 101"
    best = [min(losses[: i + 1]) for i in range(n)]
    assert losses[-1] > 10 * best[-2], f"last loss {losses[-1]} is not 10x the best {best[-2]}"
    assert all(loss <= 10 * b for loss, b in zip(losses[:-1], best[:-1], strict=True)), "stopped late"
    assert lrs[-1] > 0.1, f"stopped at lr {lrs[-1]}, below where least squares can diverge"
    ax = run.recorder.plot().axes[0]
    assert ax.get_xscale() == "log"
    assert list(ax.lines[0].get_xdata()) == lrs and list(ax.lines[0].get_ydata()) == losses


def test_lr_finder_counts_nan_as_divergence():
    """A loss that has become NaN compares False with everything; the finder must still stop."""

    calls = []

    def nan_after_three(pred, target):
        calls.append(1)
        loss = F.mse_loss(pred, target)
        return loss * math.nan if len(calls) > 3 else loss

    learn = regression_learner()
    learn.loss_func = nan_after_three
    run = Runner([LR_Find(max_iter=50), Recorder()])
    run.fit(10, learn)
    assert len(run.recorder.losses) == 4 and math.isnan(run.recorder.losses[-1]), run.recorder.losses
