"""Lesson 11's opening (07a_lsuv): Layer-wise Sequential Unit-Variance init.

Instead of deriving each layer's scale (Kaiming), LSUV ("All you need is a good init") measures it: run
one real batch through the model and fix the layers in order, each until its output has mean 0 and
std 1. The notebook's ``ConvLayer`` is a conv and a GeneralRelu whose ``bias`` is minus the ReLU's
``sub`` and whose ``weight`` is the conv's; ``lsuv_module`` hooks a layer, loops subtracting the output
mean from ``bias``, then loops dividing ``weight`` by the output std. Afterwards every std is 1, but the
means are not 0, because the second loop undoes the first; running the loops the other way round (or
as one) fixes that. minilib's ``lsuv_module`` takes the model as an argument (the exported one read a
global and could not run) and bounds its loops. With LSUV the CNN trains better in its first epoch.
"""

from __future__ import annotations

from functools import partial

import pytest
import torch
from torch import nn

from minilib.callbacks import AvgStatsCallback
from minilib.cnn import BatchTransformXCallback, GeneralRelu, get_learn_run, mnist_view, normalize_to
from minilib.data import DataBunch, Dataset, get_dls
from minilib.figures import layer_stats_figure
from minilib.hooks import Hook, Hooks, append_stats
from minilib.loss import accuracy
from minilib.lsuv import ConvLayer, find_modules, get_batch, is_lin_layer, lsuv_init, lsuv_module

pytestmark = pytest.mark.lesson07a

NFS = [8, 16, 32, 64, 64]  # the notebook's


@pytest.fixture(scope="module")
def mnist(mnist_sample):
    """The MNIST sample, normalised with the training set's statistics."""
    x_train, y_train, x_valid, y_valid = mnist_sample
    x_train, x_valid = normalize_to(x_train, x_valid)
    return x_train, y_train, x_valid, y_valid


def learn_run(mnist, seed: int = 0, bs: int = 128, lr: float = 0.6):
    """The notebook's ``get_learn_run(nfs, data, 0.6, ConvLayer, cbs=cbfs)``: init_cnn, then the Runner."""
    x_train, y_train, x_valid, y_valid = mnist
    torch.manual_seed(seed)
    data = DataBunch(*get_dls(Dataset(x_train, y_train), Dataset(x_valid, y_valid), bs), c=10)
    cbs = [
        partial(BatchTransformXCallback, mnist_view),
        partial(AvgStatsCallback, [accuracy]),
    ]
    return get_learn_run(NFS, data, lr, ConvLayer, cbs=cbs)


def conv_layers(model):
    return find_modules(model, lambda o: isinstance(o, ConvLayer))


def output_stats(model, layers, xb):
    """(mean, std) of each layer's output on ``xb``, measured by fresh hooks."""
    with Hooks(layers, append_stats) as hooks:
        model(xb)
    return [(h.stats[0][-1], h.stats[1][-1]) for h in hooks]


# The notebook's two loops, written out so that their order can be changed.
def record(hook, mod, inp, outp):
    hook.mean, hook.std = outp.mean().item(), outp.std().item()


def mean_loop(model, m, xb, h):
    while model(xb) is not None and abs(h.mean) > 1e-3:
        m.bias -= h.mean


def std_loop(model, m, xb, h):
    while model(xb) is not None and abs(h.std - 1) > 1e-3:
        m.weight.data /= h.std


def both_at_once(model, m, xb, h):
    while model(xb) is not None and (abs(h.mean) > 1e-3 or abs(h.std - 1) > 1e-3):
        m.weight.data /= h.std
        model(xb)
        m.bias -= h.mean


# --- The pieces ------------------------------------------------------------------------------------


def test_conv_layers_bias_is_minus_the_relus_sub_and_its_weight_is_the_convs():
    """``ConvLayer(ni, nf, sub=0.4)``: ``weight`` is the conv's parameter; ``bias`` reads ``-sub`` and
    setting it sets ``sub``, the shift after the ReLU. The output is ``relu(conv(x)) - sub``."""
    m = ConvLayer(1, 4, sub=0.4)
    assert m.weight is m.conv.weight and m.bias == -0.4
    m.bias -= 0.1
    assert m.relu.sub == pytest.approx(0.5)
    x = torch.randn(2, 1, 8, 8)
    torch.testing.assert_close(m(x), torch.relu(m.conv(x)) - 0.5)


def test_get_batch_gives_a_batch_as_the_model_sees_it_after_the_runners_transforms(mnist):
    """``get_batch(dl, run)`` takes one batch and runs the callbacks' ``begin_batch`` on it: with
    ``mnist_view`` in the Runner the rows of 784 pixels come back as ``[bs, 1, 28, 28]`` images."""
    learn, run = learn_run(mnist)
    xb, yb = get_batch(learn.data.train_dl, run)
    assert xb.shape == (128, 1, 28, 28) and yb.shape == (128,)
    assert run.xb is xb and learn.model(xb).shape == (128, 10)


def test_find_modules_and_is_lin_layer_pick_the_notebooks_layers():
    """``find_modules`` searches the module tree and stops at a match; ``is_lin_layer`` is the notebook's
    list: Conv1d/2d/3d, Linear, and (oddly) ReLU."""
    model = nn.Sequential(ConvLayer(1, 4), nn.Sequential(nn.Conv1d(1, 1, 1), nn.ReLU()), nn.Linear(2, 2))
    assert [type(m) for m in find_modules(model, is_lin_layer)] == [nn.Conv2d, nn.Conv1d, nn.ReLU, nn.Linear]
    assert find_modules(model, lambda o: isinstance(o, ConvLayer)) == [model[0]]
    assert not is_lin_layer(GeneralRelu()) and not is_lin_layer(nn.BatchNorm2d(1))


def test_the_notebooks_exported_lsuv_module_cannot_run():
    """``nb_07a.py`` exported ``lsuv_module(m, xb)`` calling a global ``mdl`` and hooking with
    ``append_stat``, neither of which the exported module defines: it fails with a NameError. minilib's
    takes the model as its first argument."""
    source = (
        "def lsuv_module(m, xb):\n"
        "    h = Hook(m, append_stat)\n"
        "    while mdl(xb) is not None and abs(h.mean) > 1e-3: m.bias -= h.mean\n"
        "    while mdl(xb) is not None and abs(h.std-1) > 1e-3: m.weight.data /= h.std\n"
        "    h.remove()\n"
        "    return h.mean, h.std\n"
    )
    namespace = {"Hook": Hook}
    exec(source, namespace)
    with pytest.raises(NameError, match="append_stat"):
        namespace["lsuv_module"](ConvLayer(1, 4), torch.randn(2, 1, 8, 8))


# --- What LSUV does --------------------------------------------------------------------------------


def test_lsuv_brings_every_conv_layers_output_std_to_one(mnist):
    """``lsuv_init`` fixes the five ConvLayers in order on one batch; measured afterwards by fresh hooks,
    each output's std is 1 within the tolerance 1e-3 (init_cnn alone leaves them at 0.5-1.7). The figure
    shows each layer's mean and std before and after."""
    learn, run = learn_run(mnist)
    xb, _ = get_batch(learn.data.train_dl, run)
    layers = conv_layers(learn.model)
    before = output_stats(learn.model, layers, xb)
    returned = lsuv_init(learn.model, xb)
    after = output_stats(learn.model, layers, xb)
    assert max(abs(s - 1) for _, s in before) > 0.1, before
    for (mean, std), (m2, s2) in zip(returned, after, strict=True):
        assert (
            abs(std - 1) < 1e-3 and s2 == pytest.approx(std, abs=1e-5) and m2 == pytest.approx(mean, abs=1e-5)
        )
    fig = layer_stats_figure({"init_cnn": before, "after LSUV": after})  # the lesson's before and after
    stds_drawn = [bar.get_height() for bar in fig.axes[1].patches]
    assert stds_drawn == pytest.approx([s for _, s in before + after]), "the figure draws the measured stds"


def test_lsuv_leaves_the_means_off_zero_because_the_std_loop_rescales_what_the_mean_loop_centred(mnist):
    """Why are the means not 0 after LSUV (a learners' question)? The mean loop moves ``sub`` until the
    output mean is 0. The std loop then divides the conv's weight by the std: the ReLU's output is
    scaled by 1/std, but ``sub`` is not, so the mean moves away from 0 again. The notebook printed means
    of 0.09-0.31; here at least one layer ends more than 0.05 off, 50 times the tolerance."""
    learn, run = learn_run(mnist)
    xb, _ = get_batch(learn.data.train_dl, run)
    m = conv_layers(learn.model)[0]
    h = Hook(m, record)
    mean_loop(learn.model, m, xb, h)
    assert abs(h.mean) <= 1e-3
    std_loop(learn.model, m, xb, h)
    h.remove()
    assert abs(h.std - 1) <= 1e-3 and abs(h.mean) > 1e-2, (h.mean, h.std)
    learn, run = learn_run(mnist)
    results = lsuv_init(learn.model, get_batch(learn.data.train_dl, run)[0])
    assert max(abs(mean) for mean, _ in results) > 0.05, results


@pytest.mark.parametrize("order", ["std loop first", "both in one loop"])
def test_running_the_std_loop_first_or_both_in_one_loop_brings_the_means_to_zero_too(mnist, order):
    """Scaling first, then shifting (course issue 395), or alternating the two in one loop: the shift
    by ``sub`` does not change the std, so the last step leaves both right. Every layer then ends with
    |mean| and |std - 1| within the tolerance (the notebook's order leaves means off by ~0.1)."""
    learn, run = learn_run(mnist)
    xb, _ = get_batch(learn.data.train_dl, run)
    for m in conv_layers(learn.model):
        h = Hook(m, record)
        if order == "std loop first":
            std_loop(learn.model, m, xb, h)
            mean_loop(learn.model, m, xb, h)
        else:
            both_at_once(learn.model, m, xb, h)
        h.remove()
    for mean, std in output_stats(learn.model, conv_layers(learn.model), xb):
        assert abs(mean) < 1e-3 and abs(std - 1) < 1e-3, (mean, std)


def test_lsuv_moves_the_relus_sub_because_moving_the_conv_bias_cannot_centre_a_relu(mnist):
    """Why ``sub`` and not the conv's bias (a learners' question)? A ReLU's output is never negative, so
    its mean is 0 only when every unit is 0: pushing the conv bias down until the mean vanishes kills
    the layer. ``sub`` shifts the output after the ReLU by exactly as much: one step centres it, and no
    unit dies."""
    learn, run = learn_run(mnist)
    xb, _ = get_batch(learn.data.train_dl, run)
    m = conv_layers(learn.model)[0]
    h = Hook(m, record)
    learn.model(xb)
    m.bias -= h.mean  # one step on sub
    learn.model(xb)
    assert abs(h.mean) < 1e-5
    share_zero_before = (torch.relu(m.conv(xb)) == 0).float().mean().item()
    learn, run = learn_run(mnist)
    m = conv_layers(learn.model)[0]
    h.remove()
    h = Hook(m, record)
    with torch.no_grad():
        for _ in range(50):
            learn.model(xb)
            if abs(h.mean) < 1e-3:
                break
            m.conv.bias -= h.mean
        dead = (torch.relu(m.conv(xb)) == 0).float().mean().item()
    h.remove()
    assert dead > 0.9 and dead > share_zero_before + 0.3, f"zeros {share_zero_before:.2f} -> {dead:.2f}"


# --- The loops are bounded -------------------------------------------------------------------------


def test_a_loop_that_does_not_converge_is_a_runtime_error_naming_the_layer_the_loop_and_the_last_value():
    """The notebook's ``while`` loops could spin forever. With ``maxv=0.5`` the layer's output lies
    between ``-sub`` and 0.5, too narrow a range for a std of 1 (and the std loop leaves ``sub`` alone):
    after ``max_iters`` passes, a RuntimeError naming the layer (where it sits in the model), the std
    loop and the last std. And the hook is gone, as after every exit."""
    torch.manual_seed(0)
    m = ConvLayer(1, 8, maxv=0.5)
    model = nn.Sequential(m)
    with pytest.raises(
        RuntimeError,
        match=r"the std loop on ConvLayer model\.0 did not converge in 20 iterations \(last std 0\.\d+",
    ):
        lsuv_module(model, m, torch.randn(16, 1, 8, 8), max_iters=20)
    assert len(m._forward_hooks) == 0
    fresh = ConvLayer(1, 8)
    with pytest.raises(RuntimeError, match=r"the mean loop .* did not converge in 1 iterations"):
        lsuv_module(nn.Sequential(fresh), fresh, torch.randn(16, 1, 8, 8), max_iters=1)
    assert len(fresh._forward_hooks) == 0


def test_statistics_that_are_not_finite_or_a_std_of_zero_stop_lsuv_at_once():
    """Dividing the weight by a std of 0 gives inf, and a NaN mean never compares below the tolerance:
    both are a RuntimeError at the first pass, with the hook removed."""
    m = ConvLayer(1, 8)
    model = nn.Sequential(m)
    x = torch.randn(16, 1, 8, 8)
    x[0, 0, 0, 0] = float("nan")
    with pytest.raises(RuntimeError, match=r"mean nan"):
        lsuv_module(model, m, x)
    assert len(m._forward_hooks) == 0
    nn.init.zeros_(m.conv.weight)
    nn.init.zeros_(m.conv.bias)
    with pytest.raises(RuntimeError, match=r"std 0\.0"):
        lsuv_module(model, m, torch.randn(16, 1, 8, 8))
    assert len(m._forward_hooks) == 0


# --- And training -----------------------------------------------------------------------------------


def test_after_lsuv_the_cnn_trains_better_in_its_first_epoch(mnist):
    """The notebook: 2 epochs at lr 0.6 gave 0.9588 without LSUV and 0.9733 with it. On the sample, one
    epoch at bs 128 and lr 0.45, measured over seeds 0-5: 0.54-0.88 with init_cnn alone, 0.89-0.96
    after LSUV, better in every seed (by 0.05 to 0.35). Asserted: > 0.85 with LSUV, and better than
    without. (At the notebook's lr 0.6 LSUV's first epoch diverged for one seed in six on the sample:
    unit stds everywhere do not make every learning rate safe.)"""
    accs = {}
    for lsuv in (False, True):
        learn, run = learn_run(mnist, lr=0.45)
        if lsuv:
            lsuv_init(learn.model, get_batch(learn.data.train_dl, run)[0])
        run.fit(1, learn)
        accs[lsuv] = run.avg_stats.valid_stats.avg_stats[1]
    assert accs[True] > 0.85 and accs[True] > accs[False], accs
