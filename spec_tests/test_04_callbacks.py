"""Lesson 04 (04_callbacks): the training loop, opened up with callbacks.

The notebook first stores everything one run needs in a plain ``Learner`` (model, optimizer, loss,
``DataBunch``). It then threads a ``CallbackHandler`` through ``fit``: at each step of the loop
(begin_fit, begin_epoch, begin_batch, after_loss, after_backward, after_step, begin_validate,
after_epoch, after_fit) every callback is asked whether to CONTINUE, and must answer True. A callback
that forgets ``return True`` answers None, and the loop quietly stops doing its work. So the lesson
rebuilds the loop as a ``Runner`` with the opposite convention: True means STOP/SKIP, and Python's
implicit None means "carry on". Callbacks become small classes with an ``_order`` and a snake_case
``name``, read what they lack from the runner (``self.model``, ``self.in_train``), and
``TrainEvalCallback`` keeps ``n_epochs`` as a float (epoch + fraction of its batches) so that later
schedules know where training is within an epoch. ``AvgStatsCallback`` averages loss and metrics over
samples (weighted by batch size), and with it the Runner trains MNIST past 90% accuracy. Beyond the
notebook: a ``ProgressCallback`` (a bar on a terminal, clean lines in logs) and a ``DeviceCallback``.
"""

from __future__ import annotations

import copy
import io
import math
import pickle
import sys

import pytest
import torch
import torch.nn.functional as F
from support import tiny_data
from torch import nn, optim

from minilib.callbacks import AvgStatsCallback, DeviceCallback, ProgressCallback, Recorder
from minilib.data import DataBunch, Dataset, get_dls
from minilib.learner import (
    EVENTS,
    Callback,
    CallbackHandler,
    CancelTrainException,
    HandlerCallback,
    Learner,
    Runner,
    TrainEvalCallback,
    camel2snake,
    create_learner,
    fit,
    get_model,
    get_model_func,
    listify,
)
from minilib.loss import accuracy

pytestmark = pytest.mark.lesson04


def tiny_learner(data: DataBunch | None = None, lr: float = 0.1) -> Learner:
    return create_learner(get_model_func(lr), F.cross_entropy, data or tiny_data())


def mnist_data(mnist_sample, bs: int = 64) -> DataBunch:
    x_train, y_train, x_valid, y_valid = mnist_sample
    return DataBunch(*get_dls(Dataset(x_train, y_train), Dataset(x_valid, y_valid), bs), c=10)


def params_copy(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def same_params(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


class Tracer(Callback):
    """Records every event it receives, in order (the lesson's loop as data)."""

    def __init__(self):
        self.trace = []


for _event in EVENTS:
    # One method per event, each appending its name: a complete trace with no typing mistakes.
    setattr(Tracer, _event, lambda self, _e=_event: self.trace.append(_e))


# --- The Learner and the first design ------------------------------------------------------------


def test_get_model_builds_the_lessons_mlp_and_its_sgd_optimizer():
    """get_model(data) is the notebook's Linear(m, nh) -> ReLU -> Linear(nh, c) with optim.SGD(lr):
    m comes from one training item, c from the DataBunch."""
    data = tiny_data(n_in=7, c=5)
    model, opt = get_model(data, lr=0.3, nh=11)
    kinds = [type(m) for m in model]
    assert kinds == [nn.Linear, nn.ReLU, nn.Linear], kinds
    assert (model[0].in_features, model[0].out_features) == (7, 11)
    assert (model[2].in_features, model[2].out_features) == (11, 5)
    assert isinstance(opt, optim.SGD) and opt.param_groups[0]["lr"] == 0.3
    assert [p for g in opt.param_groups for p in g["params"]] == list(model.parameters())


def test_callback_handler_stops_the_fit_when_learn_stop_is_set():
    """The lesson's TestCallback sets learn.stop after 10 batches; the handler ends the pass there
    (one epoch of 20 batches, as in the notebook)."""

    class TestCallback(HandlerCallback):
        def begin_fit(self, learn):
            super().begin_fit(learn)
            self.n_iters = 0
            return True

        def after_step(self):
            self.n_iters += 1
            if self.n_iters >= 10:
                self.learn.stop = True
            return True

    cb = TestCallback()
    fit(1, tiny_learner(tiny_data(n_train=40, bs=2)), CallbackHandler([cb]))
    assert cb.n_iters == 10, f"the fit took {cb.n_iters} steps, expected it to stop at 10"


def test_in_the_callback_handler_a_forgotten_return_silently_trains_nothing():
    """In the first design True means CONTINUE. A callback that counts batches but forgets
    ``return True`` answers None, so every batch is skipped: the fit 'runs' and the weights never
    move. Nothing fails, nothing warns. That is why the design was replaced."""

    class CountBatches(HandlerCallback):
        n = 0

        def begin_batch(self, xb, yb):
            self.n += 1  # ... and no return: Python returns None

    learn, cb = tiny_learner(), CountBatches()
    before = params_copy(learn.model)
    fit(2, learn, CallbackHandler([cb]))
    assert cb.n == 2 * (2 + 1), f"begin_batch ran {cb.n} times (2 epochs of 2 train + 1 valid batches)"
    assert same_params(before, params_copy(learn.model)), "the weights moved: some batch was trained"


def test_in_the_runner_a_callback_returning_none_carries_on():
    """The same forgotten return in the Runner: None means 'carry on', so training happens."""

    class CountBatches(Callback):
        n = 0

        def begin_batch(self):
            self.n += 1

    learn, cb = tiny_learner(), CountBatches()
    before = params_copy(learn.model)
    Runner([cb]).fit(2, learn)
    assert cb.n == 2 * (2 + 1), f"begin_batch ran {cb.n} times, expected 6"
    assert not same_params(before, params_copy(learn.model)), "the weights did not move: nothing trained"


def test_in_the_runner_true_from_begin_validate_skips_validation():
    """True means STOP/SKIP: a callback returning True from begin_validate skips the validation pass
    (and True from begin_epoch skips the training pass)."""

    class SkipValidation(Tracer):
        def begin_validate(self):
            super().begin_validate()
            return True

    cb = SkipValidation()
    Runner([cb]).fit(1, tiny_learner())
    assert cb.trace.count("begin_batch") == 2, f"{cb.trace.count('begin_batch')} batches ran, expected 2"
    assert cb.trace[-2:] == ["after_epoch", "after_fit"]


# --- The Runner's callbacks ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "camel, snake",
    [
        ("TrainEvalCallback", "train_eval_callback"),
        ("AvgStats", "avg_stats"),
        ("ParamScheduler", "param_scheduler"),
        ("Recorder", "recorder"),
        ("LR_Find", "lr_find"),
        ("HTTPServer", "http_server"),
        ("Cuda2Callback", "cuda2_callback"),
    ],
)
def test_camel2snake_turns_class_names_into_attribute_names(camel, snake):
    """A callback is reachable on the runner under its class name in snake_case (without 'Callback')."""
    assert camel2snake(camel) == snake, f"camel2snake({camel!r}) = {camel2snake(camel)!r}, expected {snake!r}"


def test_a_callbacks_name_drops_callback_and_is_snake_case():
    """TrainEvalCallback -> train_eval, AvgStatsCallback -> avg_stats, a bare Callback -> callback."""
    assert TrainEvalCallback().name == "train_eval"
    assert AvgStatsCallback([accuracy]).name == "avg_stats"
    assert Recorder().name == "recorder"
    assert Callback().name == "callback"


def test_every_callback_is_reachable_from_the_runner_by_its_name():
    """run.train_eval, run.avg_stats, run.recorder: callbacks can find each other through the runner.
    cb_funcs are called to build fresh callbacks, and the caller's list is left as it was."""
    stats, cbs = AvgStatsCallback([accuracy]), []
    cbs.append(stats)
    run = Runner(cbs, cb_funcs=[Recorder])
    assert run.avg_stats is stats and isinstance(run.recorder, Recorder)
    assert isinstance(run.train_eval, TrainEvalCallback)
    assert run.cbs[0] is run.train_eval and len(run.cbs) == 3
    assert cbs == [stats], "Runner appended to the caller's list"


def test_callbacks_run_in_their_order_and_ties_keep_the_given_order():
    """Sorting by _order is stable: callbacks of equal _order run in the order they were given."""
    calls = []

    def make(label, order):
        cls = type(f"{label}Callback", (Callback,), {"_order": order})
        cls.begin_fit = lambda self: calls.append(label)
        return cls()

    Runner([make("C", 5), make("A", 0), make("B", 0), make("Early", -1)]).fit(0, tiny_learner())
    assert calls == ["Early", "A", "B", "C"], calls


def test_a_callback_reads_what_it_lacks_from_its_runner():
    """Callback.__getattr__ forwards unknown attributes to the runner: inside a callback,
    ``self.in_train`` and ``self.epochs`` read like the loop's own variables."""
    seen = {}

    class Peek(Callback):
        def after_loss(self):
            seen.setdefault("in_train", self.in_train)
            seen["epochs"], seen["model"] = self.epochs, self.model

    learn, peek = tiny_learner(), Peek()
    Runner([peek]).fit(2, learn)
    assert seen == {"in_train": True, "epochs": 2, "model": learn.model}, seen
    with pytest.raises(AttributeError, match="neither has its runner"):
        peek.no_such_thing


def test_before_set_runner_a_missing_attribute_is_an_attribute_error_not_a_recursion():
    """With no runner yet, __getattr__ has nowhere to look. It must say so with a plain
    AttributeError, not recurse through ``self.run`` itself (which would be a RecursionError), and
    copy, deepcopy and pickle (which probe an empty instance) must work."""
    cb = AvgStatsCallback([accuracy])
    with pytest.raises(AttributeError, match="no runner"):
        cb.in_train
    assert getattr(cb, "anything", "default") == "default"
    assert not hasattr(cb, "run")
    for clone in (copy.copy(cb), copy.deepcopy(cb), pickle.loads(pickle.dumps(cb))):
        assert type(clone) is AvgStatsCallback and clone.train_stats.in_train is True


def test_unknown_event_names_are_rejected_with_the_list_of_events():
    """The events are a closed list: a typo in an event name fails loudly instead of never firing."""
    run = Runner()
    with pytest.raises(ValueError, match="begin_batch"):
        run("begin_bacth")

    class Typo(Callback):
        def after_bakcward(self):
            pass

    with pytest.raises(ValueError, match="after_bakcward"):
        Runner([Typo()])


def test_one_fit_fires_the_events_in_this_order():
    """One epoch, two training batches and one validation batch, recorded by a callback that logs
    every event. Training batches go through backward and step; validation stops after the loss."""
    tracer = Tracer()
    Runner([tracer]).fit(1, tiny_learner())
    train_batch = ["begin_batch", "after_pred", "after_loss", "after_backward", "after_step", "after_batch"]
    valid_batch = ["begin_batch", "after_pred", "after_loss", "after_batch"]
    expected = (
        ["begin_fit", "begin_epoch"]
        + train_batch * 2
        + ["begin_validate"]
        + valid_batch
        + ["after_epoch", "after_fit"]
    )
    assert tracer.trace == expected, f"\ngot:      {tracer.trace}\nexpected: {expected}"


def test_validation_runs_in_eval_mode_without_gradients():
    """TrainEvalCallback calls model.train() for the training pass and model.eval() for validation
    (dropout and batchnorm behave differently), and validation runs under torch.no_grad()."""
    seen = []

    class Mode(Callback):
        def after_pred(self):
            seen.append((self.in_train, self.model.training, torch.is_grad_enabled()))

    Runner([Mode()]).fit(1, tiny_learner())
    assert seen == [(True, True, True), (True, True, True), (False, False, False)], seen


def test_n_epochs_is_a_float_that_advances_within_the_epoch():
    """n_epochs = epoch + fraction of its batches done: 4 batches per epoch step it by 0.25. A
    schedule reads n_epochs / epochs before every batch; counted in whole epochs, the learning rate
    could only change once per epoch. n_iter counts training batches; validation moves neither."""
    seen = []

    class Progress(Callback):
        def begin_batch(self):
            seen.append((self.in_train, self.n_epochs, self.n_iter))

    run = Runner([Progress()])
    run.fit(2, tiny_learner(tiny_data(n_train=8, bs=2)))
    train = [(e, i) for t, e, i in seen if t]
    assert train == [(k / 4, k) for k in range(8)], train
    assert [(e, i) for t, e, i in seen if not t] == [(1.0, 4), (2.0, 8)], "validation moved n_epochs/n_iter"
    assert isinstance(run.n_epochs, float) and run.n_epochs == 2.0 and run.n_iter == 8


def test_listify_makes_a_list_of_anything():
    """None -> [], one item -> [item], a str is one item, a tuple or generator -> its items."""
    assert listify(None) == [] and listify(3) == [3] and listify("ab") == ["ab"]
    assert listify((1, 2)) == [1, 2] and listify(i for i in range(2)) == [0, 1]
    lst = [1]
    assert listify(lst) is lst


# --- The Runner's list of callbacks, changed during a fit ------------------------------------------


def test_a_callback_that_removes_itself_does_not_make_the_next_one_miss_the_event():
    """``run(event)`` calls every callback that was there when the event began. Iterating the live
    list, removing the current callback shifts the next one into its slot, and the loop skips it."""
    calls = []

    class Once(Callback):
        def begin_fit(self):
            calls.append("once")
            self.run.cbs.remove(self)

    class After(Callback):
        def begin_fit(self):
            calls.append("after")

    run = Runner([Once(), After()])
    run.fit(0, tiny_learner())
    assert calls == ["once", "after"], calls
    assert [type(cb).__name__ for cb in run.cbs] == ["TrainEvalCallback", "After"]


def test_a_callback_appended_during_a_fit_takes_its_place_in_the_order():
    """``run.cbs`` stays sorted by ``_order`` however it changes: a callback appended at begin_fit
    with ``_order = -1`` runs before the others from the next event on, as it would had it been
    given to the Runner. (Appended to a plain list it would run last, out of order.)"""
    calls = []

    def make(label, order):
        cls = type(f"{label}Callback", (Callback,), {"_order": order})
        cls.begin_epoch = lambda self: calls.append(label)
        return cls()

    class Adder(Callback):
        added = False

        def begin_fit(self):
            if self.added:  # once: a Runner iterating its live list would come back here
                return
            self.added = True
            self.run.cbs.append(make("Early", -1))
            self.run.cbs.insert(0, make("Late", 5))

    run = Runner([Adder(), make("Zero", 0)])
    run.fit(1, tiny_learner())
    assert calls == ["Early", "Zero", "Late"], calls
    assert run.early is run.cbs[0], "an appended callback is reachable by its name, as a given one"


@pytest.mark.parametrize("order", [math.nan, "late", None], ids=["nan", "a str", "None"])
def test_a_callbacks_order_must_be_a_real_number(order):
    """``_order`` is a sort key: NaN compares False with everything and silently scrambles the sort;
    a str or None fails inside ``sorted`` with a message naming neither ``_order`` nor the callback.
    Both are refused when the callback joins the Runner, with a TypeError naming both (appended
    later too)."""
    bad = type("OddCallback", (Callback,), {"_order": order})
    with pytest.raises(TypeError, match=r"OddCallback\._order"):
        Runner([bad()])
    run = Runner()
    with pytest.raises(TypeError, match=r"OddCallback\._order"):
        run.cbs.append(bad())
    assert len(run.cbs) == 1, "the refused callback was added anyway"


def test_fit_called_from_a_callback_is_refused_and_the_outer_fit_goes_on_training():
    """A fit inside a fit would end with ``in_train = False`` and leave the outer fit's remaining
    batches untrained. ``run.fit`` from a callback is a RuntimeError saying a fit is already running."""
    learn = tiny_learner()
    errors = []

    class Nested(Callback):
        tried = False

        def after_batch(self):
            if self.n_iter == 1 and not Nested.tried:  # once: a nested fit that ran would come here again
                Nested.tried = True
                try:
                    self.run.fit(1, learn)
                    errors.append("the nested fit ran")
                except RuntimeError as e:
                    errors.append(str(e))

    class CountSteps(Callback):
        steps = 0

        def after_step(self):
            self.steps += 1

    run = Runner([Nested(), CountSteps()])
    run.fit(2, learn)
    assert errors and "already running" in errors[0], errors
    assert run.count_steps.steps == 4, f"{run.count_steps.steps} steps, expected 2 epochs x 2 batches"


# --- AvgStats ------------------------------------------------------------------------------------


def test_avg_stats_on_uneven_batches_equals_the_loss_of_the_whole_set():
    """Validation batches of 999, 999 and 2: AvgStats weights each batch's loss and accuracy by its
    size, so the epoch's numbers are those of the whole set at once (F.cross_entropy, float64). The
    mean of the three batch means gives the 2-sample batch the weight of 999 samples, and is off."""
    data = tiny_data(n_train=64, bs=32, n_valid=2000, valid_bs=999, n_in=10, c=4, dtype=torch.float64)
    learn = tiny_learner(data)
    learn.model.double()
    batch_means = []

    class BatchMeans(Callback):
        def after_loss(self):
            if not self.in_train:
                batch_means.append(self.loss.item())

    run = Runner([AvgStatsCallback([accuracy], print_stats=False), BatchMeans()])
    run.fit(1, learn)
    x, y = data.valid_ds.x, data.valid_ds.y
    with torch.no_grad():
        pred = learn.model(x)
        whole_loss, whole_acc = F.cross_entropy(pred, y).item(), (pred.argmax(1) == y).double().mean().item()
    loss, acc = run.avg_stats.valid_stats.avg_stats
    assert run.avg_stats.valid_stats.count == 2000
    assert loss == pytest.approx(whole_loss, rel=1e-12), f"AvgStats {loss} vs whole set {whole_loss}"
    assert acc == pytest.approx(whole_acc, rel=1e-6), f"AvgStats accuracy {acc} vs whole set {whole_acc}"
    naive = sum(batch_means) / len(batch_means)
    assert abs(naive - whole_loss) > 1e-4, f"the plain mean of batch means {naive} happened to be right"


@pytest.mark.slow
def test_the_runner_trains_the_mnist_sample_past_90_percent_in_3_epochs(mnist_sample):
    """The lesson's run: get_model (lr 0.5, nh 50), cross-entropy, Runner + AvgStatsCallback([accuracy]).
    On the 8,000-image sample it reaches > 0.9 valid accuracy within 3 epochs (the notebook, on full
    MNIST: 0.959 after one epoch). The test stops the fit as soon as it gets there (lesson 05b's
    CancelTrainException)."""
    learn = create_learner(get_model_func(0.5), F.cross_entropy, mnist_data(mnist_sample))
    accs = []

    class History(Callback):
        _order = 1

        def after_epoch(self):
            accs.append(self.avg_stats.valid_stats.avg_stats[1])
            if accs[-1] > 0.9:
                raise CancelTrainException()  # reached: no need to spend the other epochs

    run = Runner([AvgStatsCallback([accuracy], print_stats=False), History()])
    run.fit(3, learn)
    assert len(accs) <= 3 and accs[-1] > 0.9, f"valid accuracy per epoch: {accs}"
    # The callback's number is the real accuracy of the model on the whole validation set.
    with torch.no_grad():
        x, y = mnist_sample[2], mnist_sample[3]
        assert accs[-1] == pytest.approx(accuracy(learn.model(x), y).item(), abs=1e-6)


# --- Beyond the notebook: progress and devices ---------------------------------------------------


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_callback_prints_one_clean_line_per_epoch_off_a_terminal(capsys):
    """In CI and in files there is no terminal: no bar, no carriage returns, just one line per epoch
    with the averaged stats (and AvgStatsCallback does not print them a second time)."""
    run = Runner([AvgStatsCallback([accuracy]), ProgressCallback()])
    run.fit(2, tiny_learner())
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert len(lines) == 2 and "\r" not in out and err == "", repr(out + err)
    for i, line in enumerate(lines, start=1):
        assert line.startswith(f"epoch {i}/2  train: loss ") and "valid: loss " in line, line
        assert "accuracy " in line, line
    valid = run.avg_stats.valid_stats.avg_stats
    assert f"valid: loss {valid[0]:.4f} accuracy {valid[1]:.4f}" in lines[-1], lines[-1]


def test_progress_callback_draws_a_bar_on_a_terminal(monkeypatch):
    """On a terminal the same fit draws tqdm bars (redrawn in place with carriage returns), with the
    running loss and metrics, and still leaves one summary line per epoch."""
    term = FakeTerminal()
    monkeypatch.setattr(sys, "stdout", term)
    Runner([AvgStatsCallback([accuracy]), ProgressCallback()]).fit(2, tiny_learner(tiny_data(n_train=8)))
    out = term.getvalue()
    assert "\r" in out and "%|" in out, repr(out)
    assert "loss=" in out and "accuracy=" in out, repr(out)
    assert "epoch 2/2  train: loss" in out, repr(out)


class BrokenPipe(io.StringIO):
    """An output whose reader has gone (``python train.py | head``): every write fails."""

    def __init__(self, tty: bool):
        super().__init__()
        self.tty, self.writes = tty, 0

    def isatty(self) -> bool:
        return self.tty

    def write(self, s):
        self.writes += 1
        raise BrokenPipeError(32, "Broken pipe")


def closed_stdout() -> io.StringIO:
    out = io.StringIO()
    out.close()  # even isatty() raises ValueError now
    return out


@pytest.mark.parametrize("progress", [True, False], ids=["progress bar", "AvgStats printing alone"])
@pytest.mark.parametrize(
    "make_out",
    [lambda: BrokenPipe(tty=False), lambda: BrokenPipe(tty=True), closed_stdout],
    ids=["broken pipe, log", "broken pipe, terminal", "closed stdout"],
)
def test_a_broken_or_closed_output_stops_the_display_but_never_the_training(monkeypatch, make_out, progress):
    """``python train.py | head`` closes the pipe after ten lines; a daemon may run with stdout closed.
    Either way writing fails (BrokenPipeError, or ValueError for a closed file). The progress display,
    and AvgStats' printed lines where there is no progress bar, are a convenience: they must stop
    displaying after one failed write and let the fit finish (the numbers stay in ``avg_stats``)."""
    out = make_out()
    monkeypatch.setattr(sys, "stdout", out)
    learn = tiny_learner()
    before = params_copy(learn.model)
    run = Runner([AvgStatsCallback([accuracy])] + ([ProgressCallback()] if progress else []))
    run.fit(2, learn)
    assert run.epoch == 1 and run.avg_stats.valid_stats.count == 2, "the fit did not finish"
    assert not same_params(before, params_copy(learn.model)), "nothing trained"
    assert getattr(out, "writes", 1) == 1, f"{out.writes} writes: it kept writing after the first failure"


def test_an_error_before_the_progress_bar_began_is_not_hidden_by_the_progress_bar():
    """If a callback that runs before it fails in begin_fit, ProgressCallback.begin_fit never runs, but
    its after_fit still does (after_fit always runs). It must then do nothing, so that the caller sees
    the real error rather than an AttributeError about a progress bar that never existed."""

    class FailsFirst(Callback):
        _order = -1

        def begin_fit(self):
            raise RuntimeError("the real problem")

    with pytest.raises(RuntimeError, match="the real problem"):
        Runner([FailsFirst(), ProgressCallback()]).fit(1, tiny_learner())


def test_device_callback_moves_the_model_and_every_batch():
    """DeviceCallback puts the model on the device at begin_fit and each batch at begin_batch, so one
    Runner trains anywhere. On 'cpu' it trains as usual; on PyTorch's 'meta' device (shapes without
    data) the prediction is made there, which shows that both the model and the batch moved."""
    learn = tiny_learner()
    before = params_copy(learn.model)
    Runner([DeviceCallback("cpu")]).fit(1, learn)
    assert not same_params(before, params_copy(learn.model))

    seen = []

    class Where(Callback):
        def after_pred(self):
            seen.append((self.xb.device.type, self.pred.device.type))
            raise CancelTrainException()  # a meta tensor has no value: stop before the loss

    learn = tiny_learner()
    Runner([DeviceCallback("meta"), Where()]).fit(1, learn)
    assert seen == [("meta", "meta")], seen
    assert all(p.device.type == "meta" for p in learn.model.parameters())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_device_callback_trains_on_the_gpu():
    """With DeviceCallback('cuda') the same Runner trains on the GPU, and AvgStats still averages."""
    learn = tiny_learner(tiny_data(n_train=64, bs=16, n_valid=32))
    run = Runner([DeviceCallback("cuda"), AvgStatsCallback([accuracy], print_stats=False)])
    run.fit(2, learn)
    assert all(p.device.type == "cuda" for p in learn.model.parameters())
    assert run.avg_stats.valid_stats.count == 32
