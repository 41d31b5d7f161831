"""Lesson 05 (05_anneal): schedules for hyper-parameters, and the one-cycle policy.

The notebook writes a schedule as a function of ``pos``, the fraction of training done, in [0, 1]:
``sched_lin(start, end)``, ``sched_cos``, ``sched_no`` and ``sched_exp`` are built by an ``annealer``
decorator from a plain ``f(start, end, pos)``, and ``combine_scheds(pcts, scheds)`` glues them end to
end, each over its fraction of training. A cosine warm-up to a high learning rate followed by a cosine
anneal is the one-cycle shape. A ``ParamScheduler`` callback sets ``pg['lr'] = f(n_epochs / epochs)``
for every param group before every training batch (that is what the float ``n_epochs`` of lesson 04
is for), one schedule per group if the groups should learn at different rates (discriminative
learning rates: e.g. weights and biases), and a ``Recorder`` logs the lr of each group and the loss
so they can be plotted. Checked here: the notebook's table of values, the two fixes to its
``combine_scheds`` (a tolerant sum, and pos = 1.0), PyTorch's ``OneCycleLR`` and ``LambdaLR`` as
references, and the lesson's finding that the one-cycle schedule trains better than a constant lr.
"""

from __future__ import annotations

import math

import matplotlib.pyplot as plt
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from matplotlib.figure import Figure
from support import tiny_data
from torch import optim
from torch.optim.lr_scheduler import LambdaLR, OneCycleLR

from minilib.callbacks import AvgStatsCallback, ParamScheduler, Recorder
from minilib.data import DataBunch, Dataset, get_dls
from minilib.learner import Callback, Learner, Runner, create_learner, get_model, get_model_func
from minilib.loss import accuracy
from minilib.schedules import (
    annealer,
    combine_scheds,
    cos_1cycle_anneal,
    sched_cos,
    sched_exp,
    sched_lin,
    sched_no,
)
from minilib.testing import test_close

pytestmark = pytest.mark.lesson05


# --- Schedules -----------------------------------------------------------------------------------


def test_annealer_turns_f_of_start_end_pos_into_a_schedule_builder():
    """``@annealer`` on ``f(start, end, pos)`` gives ``f(start, end)`` that returns ``pos -> value``:
    the notebook's ``sched_lin(1, 2)(0.3)`` is 1.3."""

    @annealer
    def halfway(start, end, pos):
        return (start + end) / 2

    assert halfway(1, 3)(0.7) == 2.0
    assert sched_lin(1, 2)(0.3) == pytest.approx(1.3, abs=1e-15)
    assert isinstance(sched_lin(1, 2)(torch.tensor(0.3)), float), "a schedule returns a Python float"


LESSON_TABLE = {  # the notebook's values for (start, end) = (2, 0.01) at pos 0, .25, .5, .75, 1
    "sched_lin": (sched_lin, [2, 1.5025, 1.005, 0.5075, 0.01]),
    "sched_cos": (sched_cos, [2, 1.708571, 1.005, 0.301429, 0.01]),
    "sched_exp": (sched_exp, [2, 0.53183, 0.141421, 0.037606, 0.01]),
    "sched_no": (sched_no, [2, 2, 2, 2, 2]),
}


@pytest.mark.parametrize("name", LESSON_TABLE)
def test_schedules_give_the_lessons_table_of_values(name):
    """sched_x(2, 0.01) at pos 0, 0.25, 0.5, 0.75, 1, against the values the notebook printed (to the
    digits it printed). cos is flat at the ends and steep in the middle; exp halves in equal steps."""
    sched, expected = LESSON_TABLE[name]
    got = [sched(2, 0.01)(p) for p in (0, 0.25, 0.5, 0.75, 1)]
    assert got == pytest.approx(expected, abs=1e-6), f"{name}: got {got}, notebook {expected}"


@settings(max_examples=40, deadline=None)
@given(
    start=st.floats(1e-3, 10),
    end=st.floats(1e-3, 10),
    pos=st.lists(st.floats(0, 1), min_size=2, max_size=2),
)
def test_lin_cos_and_exp_go_monotonically_from_start_to_end(start, end, pos):
    """Each schedule is exactly ``start`` at pos 0 and ``end`` at pos 1 (within rounding), and moves
    monotonically in between: a warm-up only goes up, an anneal only down."""
    lo, hi = sorted(pos)
    sign = 1 if end >= start else -1
    for sched in (sched_lin, sched_cos, sched_exp):
        f = sched(start, end)
        assert f(0) == pytest.approx(start, rel=1e-12) and f(1) == pytest.approx(end, rel=1e-12), f
        assert sign * (f(hi) - f(lo)) >= -1e-12 * max(start, end), (f, lo, hi, f(lo), f(hi))


# The notebook's own formulas, written as it writes them.
NOTEBOOK_FORMULAS = {
    sched_lin: lambda start, end, pos: start + pos * (end - start),
    sched_cos: lambda start, end, pos: start + (1 + math.cos(math.pi * (1 - pos))) * (end - start) / 2,
    sched_no: lambda start, end, pos: start,
    sched_exp: lambda start, end, pos: start * (end / start) ** pos,
}
MAGNITUDE = st.floats(1e-6, 1e6)


@settings(max_examples=200, deadline=None)
@given(
    magnitudes=st.tuples(MAGNITUDE, MAGNITUDE),
    signs=st.tuples(st.sampled_from([1.0, -1.0]), st.sampled_from([1.0, -1.0])),
    pos=st.floats(0, 1),
)
def test_every_schedule_equals_the_notebooks_formula_up_to_rounding(magnitudes, signs, pos):
    """minilib writes the schedules so that they cannot overflow (see below), which must not change
    what they compute: each equals the notebook's formula to 1e-9 of the larger end, for ends of either
    sign. ``sched_exp`` takes any two ends of one sign, two negatives too (``sched_exp(-1, -3)`` is
    ``-1 * 3 ** pos`` in the notebook); it used to refuse them."""
    start, end = magnitudes[0] * signs[0], magnitudes[1] * signs[1]
    for sched, formula in NOTEBOOK_FORMULAS.items():
        if sched is sched_exp and signs[0] != signs[1]:
            continue  # the notebook's ratio is negative: a complex power, refused (see test_contracts)
        got, want = sched(start, end)(pos), formula(start, end, pos)
        scale = max(abs(start), abs(end))
        assert abs(got - want) <= 1e-9 * scale, (sched, start, end, pos, got, want, abs(got - want) / scale)


FINITE = st.floats(allow_nan=False, allow_infinity=False)
POSITIVE = st.floats(min_value=0, exclude_min=True, allow_infinity=False)


@settings(max_examples=100, deadline=None)
@given(start=FINITE, end=FINITE, small=POSITIVE, large=POSITIVE, pos=st.floats(0, 1))
def test_schedule_values_stay_finite_and_between_start_and_end_for_any_finite_ends(
    start, end, small, large, pos
):
    """The lesson writes ``start + pos * (end - start)``, and ``end - start`` overflows to inf for finite
    ends of opposite signs: written so, ``sched_lin(1e308, -1e308)(0.5)`` was -inf, a learning rate no
    optimizer survives. As ``start * (1 - pos) + end * pos`` (and sched_exp's ratio taken in logs),
    every value lies between start and end, so it is finite whenever they are."""
    assert sched_lin(1e308, -1e308)(0.5) == 0.0
    sign = -1.0 if start < 0 else 1.0
    for sched in (sched_lin, sched_cos, sched_no, sched_exp):
        a, b = (sign * small, sign * large) if sched is sched_exp else (start, end)  # ends of one sign
        value = sched(a, b)(pos)
        assert math.isfinite(value) and min(a, b) <= value <= max(a, b), (sched, a, b, pos, value)


# --- combine_scheds and the one-cycle shape ------------------------------------------------------


def test_combine_scheds_runs_each_schedule_over_its_fraction_of_training():
    """With pcts [0.3, 0.7], the first schedule covers pos 0..0.3 (seeing its own 0..1) and the
    second 0.3..1: halfway through the warm-up is sched_cos(0.3, 0.6)(0.5)."""
    first, second = cos_1cycle_anneal(0.3, 0.6, 0.2)
    f = combine_scheds([0.3, 0.7], [first, second])
    assert f(0.0) == 0.3 and f(0.3) == pytest.approx(0.6) and f(1.0) == pytest.approx(0.2)
    assert f(0.15) == pytest.approx(first(0.5), rel=1e-12)
    assert f(0.65) == pytest.approx(second(0.5), rel=1e-12)


def test_combine_scheds_is_defined_at_pos_1_and_returns_a_float():
    """The notebook's version indexed past its list at pos = 1.0 (the last batch of a schedule that
    is evaluated after training ends). Here pos 1 is the end of the last piece, as a Python float."""
    f = combine_scheds([0.5, 0.5], [sched_lin(0, 1), sched_lin(1, 3)])
    assert f(1.0) == 3.0 and type(f(1.0)) is float
    g = combine_scheds([0.6, 0.4, 0.0], [sched_lin(0, 1), sched_lin(1, 2), sched_lin(7, 9)])
    assert g(1.0) == 2.0, "an empty last piece must not be the one that ends the schedule"


def test_combine_scheds_accepts_pcts_that_sum_to_1_in_floating_point():
    """0.7 + 0.2 + 0.1 is 0.9999999999999999 in floating point: the notebook's ``== 1`` rejected it.
    Within 1e-6 of 1 is accepted, and pos = 1.0 still lands on the last piece."""
    assert 0.7 + 0.2 + 0.1 != 1
    f = combine_scheds([0.7, 0.2, 0.1], [sched_no(1, 1), sched_no(2, 2), sched_no(3, 3)])
    assert [f(p) for p in (0.35, 0.8, 0.95, 1.0)] == [1, 2, 3, 3]


@settings(max_examples=40, deadline=None)
@given(
    widths=st.lists(st.floats(0.01, 1), min_size=1, max_size=5),
    values=st.lists(st.floats(-5, 5), min_size=6, max_size=6),
    pos=st.floats(0, 1),
)
def test_combined_linear_pieces_are_the_piecewise_linear_interpolation(widths, values, pos):
    """Chaining sched_lin(v0, v1), sched_lin(v1, v2)... over fractions that sum to 1 gives the
    piecewise-linear curve through (bound_i, v_i): at any pos, including 0 and 1, it equals numpy's
    interpolation."""
    import numpy as np

    pcts = [w / sum(widths) for w in widths]
    bounds = np.concatenate([[0.0], np.cumsum(pcts)])
    bounds[-1] = 1.0
    vals = values[: len(pcts) + 1]
    f = combine_scheds(pcts, [sched_lin(a, b) for a, b in zip(vals, vals[1:], strict=False)])
    for p in (0.0, pos, 1.0):
        assert f(p) == pytest.approx(float(np.interp(p, bounds, vals)), abs=1e-9), (pcts, vals, p)


def test_one_cycle_rises_to_its_peak_at_pct_then_falls():
    """combine_scheds([0.3, 0.7], cos_1cycle_anneal(0.3, 0.6, 0.2)): the lr climbs for the first 30%
    of training, peaks at 0.6 exactly there, then anneals to 0.2: never flat, never back up."""
    f = combine_scheds([0.3, 0.7], cos_1cycle_anneal(0.3, 0.6, 0.2))
    pos = torch.linspace(0, 1, 1001, dtype=torch.float64)
    lrs = torch.tensor([f(p) for p in pos], dtype=torch.float64)
    peak = int(lrs.argmax())
    assert pos[peak].item() == pytest.approx(0.3) and lrs[peak].item() == pytest.approx(0.6)
    assert bool((lrs[1 : peak + 1] > lrs[:peak]).all()), "the warm-up is not strictly rising"
    assert bool((lrs[peak + 1 :] < lrs[peak:-1]).all()), "the anneal is not strictly falling"


def test_cosine_one_cycle_matches_pytorchs_onecycle_lr():
    """PyTorch's OneCycleLR (anneal_strategy='cos', two phases) is the same cosine warm-up then
    anneal, from max_lr / div_factor up to max_lr and down to that / final_div_factor. Its step k of
    T runs phase 1 over steps 0..pct*T - 1 and phase 2 over the rest up to T - 1, so with
    pos = k / (T - 1) the warm-up's share is q = (pct*T - 1) / (T - 1), not pct. With that, our
    combine_scheds of two sched_cos gives its lrs step for step."""
    T, pct, max_lr, div, final_div = 100, 0.25, 0.8, 25.0, 1e4
    opt = optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    torch_sched = OneCycleLR(
        opt,
        max_lr=max_lr,
        total_steps=T,
        pct_start=pct,
        anneal_strategy="cos",
        cycle_momentum=False,
        div_factor=div,
        final_div_factor=final_div,
        three_phase=False,
    )
    torch_lrs = []
    for _ in range(T):
        torch_lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        torch_sched.step()
    q = (pct * T - 1) / (T - 1)
    ours = combine_scheds([q, 1 - q], cos_1cycle_anneal(max_lr / div, max_lr, max_lr / div / final_div))
    our_lrs = [ours(k / (T - 1)) for k in range(T)]
    diff = max(abs(a - b) for a, b in zip(our_lrs, torch_lrs, strict=True))
    assert diff < 1e-12, f"max |ours - OneCycleLR| = {diff}"


# --- ParamScheduler and Recorder -----------------------------------------------------------------


def test_param_scheduler_sets_the_lr_from_n_epochs_over_epochs_before_each_batch():
    """2 epochs of 4 batches: batch k trains at sched(k / 8), as the Recorder logs it (and the
    Recorder logs training batches only)."""
    sched = sched_lin(0.5, 0.1)
    run = Runner([ParamScheduler("lr", sched), Recorder()])
    run.fit(2, create_learner(get_model_func(), F.cross_entropy, tiny_data(n_train=16, n_valid=4, bs=4)))
    expected = [sched(k / 8) for k in range(8)]
    assert run.recorder.lrs == [expected], f"\nrecorded {run.recorder.lrs}\nexpected [{expected}]"
    assert len(run.recorder.losses) == 8 and all(isinstance(v, float) for v in run.recorder.losses)


def test_param_scheduler_drives_sgd_exactly_like_pytorchs_lambda_lr():
    """The same model, data order and one-cycle schedule, trained once by our Runner with a
    ParamScheduler and once by a plain PyTorch loop with LambdaLR(opt, step -> sched(step / T)):
    the same lr at every step, and the same weights at the end."""
    data, epochs, sched = (
        tiny_data(n_train=16, n_valid=4, bs=4),
        3,
        combine_scheds([0.3, 0.7], cos_1cycle_anneal(0.1, 0.5, 0.01)),
    )
    torch.manual_seed(0)
    learn = create_learner(get_model_func(1.0), F.cross_entropy, data)
    run = Runner([ParamScheduler("lr", sched), Recorder()])
    run.fit(epochs, learn)

    torch.manual_seed(0)
    model, opt = get_model(data, lr=1.0)  # base lr 1: LambdaLR's lr = 1.0 * lambda, exactly
    total = epochs * len(data.train_dl)
    lambda_lr = LambdaLR(opt, lambda step: sched(step / total))
    torch_lrs = []
    for _ in range(epochs):
        for xb, yb in data.train_dl:
            torch_lrs.append(opt.param_groups[0]["lr"])
            F.cross_entropy(model(xb), yb).backward()
            opt.step()
            opt.zero_grad()
            lambda_lr.step()
    assert run.recorder.lrs[0] == torch_lrs, f"\nours   {run.recorder.lrs[0]}\nLambdaLR {torch_lrs}"
    for p, q in zip(learn.model.parameters(), model.parameters(), strict=True):
        test_close(p, q, rtol=0, atol=1e-6)


def test_discriminative_learning_rates_one_schedule_per_param_group():
    """Weights and biases in two param groups, each with its own schedule: the Recorder logs one lr
    list per group, and the groups really train at their own rates (biases at lr 0 stay put while
    the weights learn)."""
    data = tiny_data(n_train=16, n_valid=4, bs=4)
    model, _ = get_model(data)
    weights = [p for n, p in model.named_parameters() if n.endswith("weight")]
    biases = [p for n, p in model.named_parameters() if n.endswith("bias")]
    opt = optim.SGD([{"params": weights}, {"params": biases}], lr=0.1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    w_sched, b_sched = sched_cos(0.5, 0.05), sched_no(0.0, 0.0)
    run = Runner([ParamScheduler("lr", [w_sched, b_sched]), Recorder()])
    run.fit(2, Learner(model, opt, F.cross_entropy, data))
    assert run.recorder.lrs == [[w_sched(k / 8) for k in range(8)], [0.0] * 8], run.recorder.lrs
    for n, p in model.named_parameters():
        moved = not torch.equal(p, before[n])
        assert moved == n.endswith("weight"), f"{n} {'moved' if moved else 'did not move'}"


def test_param_scheduler_needs_one_schedule_or_one_per_param_group():
    """Three schedules for two param groups is ambiguous: a ValueError naming both counts."""
    data = tiny_data(n_train=16, n_valid=4, bs=4)
    model, _ = get_model(data)
    opt = optim.SGD([{"params": model[0].parameters()}, {"params": model[2].parameters()}], lr=0.1)
    run = Runner([ParamScheduler("lr", [sched_no(1, 1)] * 3)])
    with pytest.raises(ValueError, match="3 schedules for 2 param group"):
        run.fit(1, Learner(model, opt, F.cross_entropy, data))


def bad_from_half(value: float):
    """A schedule that gives 0.1 for the first half of training and ``value`` from pos 0.5 on."""

    def bad_from_half(pos):
        return 0.1 if pos < 0.5 else value

    return bad_from_half


@pytest.mark.parametrize("value", [math.nan, math.inf, -0.1], ids=["nan", "inf", "negative"])
def test_a_schedule_that_gives_a_nan_inf_or_negative_lr_stops_the_fit_before_the_step(value):
    """One NaN lr makes every weight NaN at the next step; a negative lr makes SGD climb the loss.
    A scheduled value that is not finite, or a negative lr, stops the fit with a ValueError that names
    the schedule, the position and the value, and no parameter is ever updated with it: the weights
    are those after the last good step (2 epochs of 4 batches: pos 0.5 is the fifth batch)."""
    learn = create_learner(get_model_func(), F.cross_entropy, tiny_data(n_train=16, n_valid=4, bs=4))
    snapshots = []

    class Snapshot(Callback):
        def after_step(self):
            snapshots.append([p.detach().clone() for p in self.model.parameters()])

    run = Runner([ParamScheduler("lr", bad_from_half(value)), Recorder(), Snapshot()])
    with pytest.raises(ValueError, match=rf"bad_from_half.*pos 0\.5.*{value}"):
        run.fit(2, learn)
    assert len(snapshots) == 4, f"{len(snapshots)} steps ran, expected the 4 before pos 0.5"
    now = list(learn.model.parameters())
    diff = max((p - q).abs().max().item() for p, q in zip(now, snapshots[-1], strict=True))
    assert diff == 0, f"a parameter moved after the last good step (max difference {diff})"
    assert all(lr == 0.1 for lr in run.recorder.lrs[0]), run.recorder.lrs


def test_recorder_plots_carry_the_recorded_data_and_show_nothing():
    """plot_lr, plot_loss and plot return matplotlib Figures whose lines hold exactly the recorded
    lrs and losses (skip_last drops the last points; plot is loss against lr on a log x axis), and
    they are built without pyplot: no window, no global figure left behind."""
    figures_before = plt.get_fignums()
    run = Runner([ParamScheduler("lr", sched_exp(0.01, 1.0)), Recorder()])
    run.fit(2, create_learner(get_model_func(), F.cross_entropy, tiny_data(n_train=16, n_valid=4, bs=4)))
    rec = run.recorder
    figs = rec.plot_lr(), rec.plot_loss(skip_last=2), rec.plot(skip_last=1)
    assert all(isinstance(f, Figure) for f in figs)
    lr_line, loss_line, lr_loss_line = (f.axes[0].lines[0] for f in figs)
    assert list(lr_line.get_ydata()) == rec.lrs[-1]
    assert list(loss_line.get_ydata()) == rec.losses[:-2]
    assert list(lr_loss_line.get_xdata()) == rec.lrs[-1][:-1]
    assert list(lr_loss_line.get_ydata()) == rec.losses[:-1]
    assert figs[2].axes[0].get_xscale() == "log"
    assert plt.get_fignums() == figures_before


@pytest.mark.slow
def test_one_cycle_trains_better_than_a_constant_lr_from_the_same_start(mnist_sample):
    """The notebook's comparison (bs 512, 3 epochs): a cosine one-cycle 0.3 -> 0.6 -> 0.2 beat a
    constant lr of 0.3. To know the schedule did it, not the luck of a re-run, each pair of runs
    starts from the same seed (same weights, same batches), for three seeds."""
    x_train, y_train, x_valid, y_valid = mnist_sample
    data = DataBunch(*get_dls(Dataset(x_train, y_train), Dataset(x_valid, y_valid), 512), c=10)
    one_cycle = combine_scheds([0.3, 0.7], cos_1cycle_anneal(0.3, 0.6, 0.2))
    results = {}
    for seed in range(3):
        for name, sched in (("constant", sched_no(0.3, 0.3)), ("one_cycle", one_cycle)):
            torch.manual_seed(seed)
            learn = create_learner(get_model_func(), F.cross_entropy, data)
            run = Runner([AvgStatsCallback([accuracy], print_stats=False), ParamScheduler("lr", sched)])
            run.fit(3, learn)
            results[seed, name] = run.avg_stats.valid_stats.avg_stats[0]
    for seed in range(3):
        const, cyc = results[seed, "constant"], results[seed, "one_cycle"]
        assert math.isfinite(cyc) and cyc < const, f"seed {seed}: one-cycle loss {cyc} vs constant {const}"


def test_recorder_gives_a_param_group_added_during_the_fit_its_own_list():
    """Fine-tuning often unfreezes a layer mid-fit by adding a param group to the optimizer. The
    Recorder then keeps a list for the new group too, NaN for the batches before the group existed, so
    every list still has one entry per recorded batch (and lines up with ``losses``)."""
    data = tiny_data(n_train=16, n_valid=4, bs=4)
    model, _ = get_model(data)
    opt = optim.SGD(model[0].parameters(), lr=0.1)

    class Unfreeze(Callback):
        def after_batch(self):
            if self.n_iter == 2:
                self.opt.add_param_group({"params": model[2].parameters(), "lr": 0.01})

    run = Runner([Recorder(), Unfreeze()])
    run.fit(1, Learner(model, opt, F.cross_entropy, data))
    first, second = run.recorder.lrs
    assert first == [0.1] * 4, first
    assert all(math.isnan(v) for v in second[:2]) and second[2:] == [0.01] * 2, second
    assert len(run.recorder.losses) == 4


def _unfreeze_at_batch_2(model):
    """A callback that adds model[2]'s parameters as a new param group after the second training batch."""

    class Unfreeze(Callback):
        def after_batch(self):
            if self.n_iter == 2:
                self.opt.add_param_group({"params": model[2].parameters(), "lr": 0.01})

    return Unfreeze()


def test_param_scheduler_schedules_a_param_group_added_during_the_fit():
    """A param group added mid-fit (a layer unfrozen) follows the one schedule every group follows,
    from the next batch on; a list of one schedule per group no longer matches the groups, and stops
    the fit with a ValueError naming ``sched_funcs`` and both counts (it used to be zip()'s own error,
    naming nothing)."""
    data = tiny_data(n_train=16, n_valid=4, bs=4)
    model, _ = get_model(data)
    sched = sched_lin(0.4, 0.1)
    run = Runner([ParamScheduler("lr", sched), Recorder(), _unfreeze_at_batch_2(model)])
    run.fit(1, Learner(model, optim.SGD(model[0].parameters(), lr=0.1), F.cross_entropy, data))
    first, second = run.recorder.lrs
    assert first == [sched(k / 4) for k in range(4)], first
    assert second[2:] == [sched(k / 4) for k in (2, 3)], second

    model, _ = get_model(data)
    run = Runner([ParamScheduler("lr", [sched]), _unfreeze_at_batch_2(model)])
    with pytest.raises(ValueError, match=r"ParamScheduler: sched_funcs .*1 schedules for 2 param groups"):
        run.fit(1, Learner(model, optim.SGD(model[0].parameters(), lr=0.1), F.cross_entropy, data))
