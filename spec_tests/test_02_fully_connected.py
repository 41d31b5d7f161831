"""Lesson 02 (notebook 02_fully_connected): a fully connected net's forward and backward pass by hand.

The lesson loads MNIST, normalises it with the TRAINING set's mean and std, and builds a toy model,
784 -> 50 -> ReLU -> 1, that regresses the digit's value with a mean squared error. Initialisation
comes first: weights drawn as ``randn(m, nh) / sqrt(m)`` keep a linear layer's output at std ~1, but a
ReLU throws away the negative half, so the signal shrinks layer after layer; Kaiming He's
``sqrt(2 / m)`` puts the lost factor 2 back (and PyTorch's ``kaiming_normal_`` needs ``mode='fan_out'``
for the lesson's [in, out] weights, since PyTorch stores a Linear's weight as [out, in]). Then the
backward pass, by the chain rule: `mse_grad`, `relu_grad`, `lin_grad` store each gradient in ``.g``,
and every one (x, w1, b1, w2, b2) must match PyTorch's autograd. Finally the same code refactored into
`Module`, `Lin`, `Relu`, `Mse` and `Model` must give the same gradients, and so must ``nn.Module``.
Tests use the MNIST sample (8,000/2,000) through the session fixture; seeds are fixed.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn import init

from minilib.backprop import (
    WEIGHT_GRADS,
    Lin,
    Model,
    Module,
    Mse,
    Relu,
    lin,
    lin_grad,
    mse,
    mse_grad,
    relu,
    relu_grad,
)
from minilib.data import normalize
from minilib.testing import test_close, test_eq, test_near, test_near_zero

pytestmark = pytest.mark.lesson02

NH = 50  # hidden units, as in the lesson
N_ROWS = 1000  # rows used for the gradient checks: plenty to exercise every path, fast on 2 cores
# Init statistics are measured on a wider layer than the model's 50 units: MNIST's pixels are strongly
# correlated, so each unit's output variance depends a lot on its own random weights, and 50 draws
# would leave the measurement at the mercy of a few of them.
NH_STATS = 500


def _between(value: float, low: float, high: float, what: str) -> None:
    assert low < value < high, f"{what}: {value:.4f} is outside ({low}, {high})"


@pytest.fixture(scope="module")
def normalized(mnist_sample):
    """x_train and x_valid normalised with the TRAINING mean and std, and the labels."""
    x_train, y_train, x_valid, y_valid = mnist_sample
    m, s = x_train.mean(), x_train.std()
    return normalize(x_train, m, s), y_train, normalize(x_valid, m, s), y_valid


# ------------------------------------------------------------------------------------ the data


def test_mnist_pixels_are_mostly_background(mnist_sample):
    """Raw pixels in [0, 1] have mean ~0.13 and std ~0.31 (the notebook: 0.1304 and 0.3073 on the
    full training set): most of each image is black. A net prefers inputs of mean 0 and std 1."""
    x_train = mnist_sample[0]
    _between(x_train.mean().item(), 0.12, 0.14, "train mean")
    _between(x_train.std().item(), 0.30, 0.32, "train std")


def test_normalising_with_the_training_stats_gives_mean_0_and_std_1(normalized):
    """``normalize(x, mean, std)`` with the training set's own statistics centres and scales it."""
    x_train = normalized[0]
    test_near_zero(x_train.mean())
    test_near_zero(1 - x_train.std())


def test_the_validation_set_is_normalised_with_the_training_stats_too(mnist_sample, normalized):
    """Both sets must go through the SAME transform, or a pixel value would mean different things in
    each. So the validation set is only roughly centred: its own mean and std differ a little."""
    x_train, x_valid = mnist_sample[0], mnist_sample[2]
    m, s = x_train.mean(), x_train.std()
    test_close(normalized[2], (x_valid - m) / s)
    _between(normalized[2].mean().item(), -0.1, 0.1, "normalised valid mean")
    assert abs(normalized[2].mean().item()) > 1e-3  # not exactly 0: these are not its own stats


# ------------------------------------------------------------------------------ initialisation


def _layer_stats(x, w):
    t = lin(x, w, torch.zeros(w.shape[1]))
    return t, relu(t)


def test_dividing_by_sqrt_m_keeps_a_linear_layers_output_at_std_1(normalized):
    """An output is a sum of m = 784 products of unit-variance numbers: variance ~m. Weights drawn as
    ``randn(m, nh) / sqrt(m)`` (Xavier-style) divide that back to ~1; plain ``randn`` gives ~sqrt(784)."""
    x_valid = normalized[2]
    m = x_valid.shape[1]
    t, _ = _layer_stats(x_valid, torch.randn(m, NH_STATS) / math.sqrt(m))
    _between(t.std().item(), 0.8, 1.25, "std of x @ (randn / sqrt(m))")
    t_raw, _ = _layer_stats(x_valid, torch.randn(m, NH_STATS))
    _between(t_raw.std().item(), 20, 36, "std of x @ randn")


def test_relu_after_xavier_init_loses_half_the_signal(normalized):
    """ReLU zeroes the negative half: for a unit normal the mean becomes 1/sqrt(2 pi) = 0.40 (the notebook
    measured 0.5) and the std ~0.58 (notebook 0.68); the mean of squares halves. Layer after layer the
    activations shrink, which is why this init drifts."""
    x_valid = normalized[2]
    m = x_valid.shape[1]
    t, r = _layer_stats(x_valid, torch.randn(m, NH_STATS) / math.sqrt(m))
    _between(r.mean().item(), 0.3, 0.65, "mean after ReLU")
    _between(r.std().item(), 0.5, 0.8, "std after ReLU")
    _between((r.pow(2).mean() / t.pow(2).mean()).item(), 0.4, 0.65, "mean square kept by ReLU")


def test_kaiming_init_puts_back_the_factor_two_relu_takes_away(normalized):
    """He et al.: weights ``randn * sqrt(2 / m)`` double the variance before the ReLU, so its output's
    mean of squares stays ~1 (std ~0.85 in the notebook)."""
    x_valid = normalized[2]
    m = x_valid.shape[1]
    _, r = _layer_stats(x_valid, torch.randn(m, NH_STATS) * math.sqrt(2 / m))
    _between(r.pow(2).mean().item(), 0.8, 1.4, "mean square after ReLU, Kaiming init")
    _between(r.std().item(), 0.75, 1.0, "std after ReLU, Kaiming init")


@pytest.mark.parametrize(("init_name", "gain", "expected"), [("xavier", 1.0, 2.0**-8), ("kaiming", 2.0, 1.0)])
def test_through_eight_relu_layers_only_kaiming_keeps_the_signal(normalized, init_name, gain, expected):
    """Why the drift matters: each ReLU layer with ``1/sqrt(m)`` weights halves the mean square, so
    after 8 layers ~1/256 of the signal is left; with ``sqrt(2/m)`` it stays ~1."""
    x = normalized[2][:1000]
    width = 256
    for _ in range(8):
        m = x.shape[1]
        x = relu(lin(x, torch.randn(m, width) * math.sqrt(gain / m), torch.zeros(width)))
    ms = x.pow(2).mean().item()
    _between(ms / expected, 1 / 3, 3, f"{init_name}: mean square after 8 layers / {expected:.4g}")


def test_a_shifted_relu_recentres_the_mean(normalized):
    """The lesson's own tweak: ``relu(x) - 0.5`` moves the post-ReLU mean (~0.5) back near 0 and leaves
    the spread alone."""
    x_valid = normalized[2]
    m = x_valid.shape[1]
    t = lin(x_valid, torch.randn(m, NH_STATS) * math.sqrt(2 / m), torch.zeros(NH_STATS))
    plain, shifted = relu(t), relu(t, shift=0.5)
    _between(plain.mean().item(), 0.35, 0.8, "mean after ReLU")
    assert abs(shifted.mean().item()) < 0.15 < plain.mean().item()
    test_near(shifted.std(), plain.std())


def test_kaiming_normal_needs_fan_out_for_the_lessons_in_out_weights():
    """PyTorch stores a Linear's weight as [out, in] (``nn.Linear(784, 50).weight`` is 50x784), and
    ``kaiming_normal_`` takes fan_in from dim 1. On the lesson's [in, out] = [784, 50] weight that dim
    is 50, giving std sqrt(2/50) = 0.2; ``mode='fan_out'`` reads dim 0, 784, and gives the intended
    sqrt(2/784) = 0.0505, the same as the default on PyTorch's own [50, 784] layout."""
    m = 784
    assert nn.Linear(m, NH).weight.shape == (NH, m)
    lesson_layout = init.kaiming_normal_(torch.zeros(m, NH), mode="fan_out")
    torch_layout = init.kaiming_normal_(torch.zeros(NH, m))
    wrong = init.kaiming_normal_(torch.zeros(m, NH))
    for w in (lesson_layout, torch_layout):
        _between(w.std().item() / math.sqrt(2 / m), 0.97, 1.03, "std / sqrt(2/784)")
    _between(wrong.std().item() / math.sqrt(2 / NH), 0.97, 1.03, "default mode's std / sqrt(2/50)")


# ------------------------------------------------------------------------------------- forward


def _weights(m: int, dtype=torch.float32, seed: int = 0):
    """Kaiming-initialised w1 [m, 50], b1, w2 [50, 1], b2, as the lesson makes them."""
    g = torch.Generator().manual_seed(seed)
    w1 = torch.randn(m, NH, generator=g, dtype=dtype) * math.sqrt(2 / m)
    w2 = torch.randn(NH, 1, generator=g, dtype=dtype) / math.sqrt(NH)
    return w1, torch.zeros(NH, dtype=dtype), w2, torch.zeros(1, dtype=dtype)


def test_the_model_maps_each_image_to_one_number(normalized):
    """784 -> 50 -> ReLU -> 1: one prediction (of the digit's value) per image, as a [N, 1] column."""
    x_valid = normalized[2]
    w1, b1, w2, b2 = _weights(x_valid.shape[1])
    out = lin(relu(lin(x_valid, w1, b1)), w2, b2)
    test_eq(out.shape, torch.Size([x_valid.shape[0], 1]))


def test_mse_squeezes_the_output_column_instead_of_broadcasting(normalized):
    """``out - targ`` with out [N, 1] and targ [N] broadcasts to [N, N]: every prediction minus every
    target, a loss that is silently wrong. `mse` squeezes the column first and equals ``F.mse_loss``."""
    x_valid, y_valid = normalized[2][:100], normalized[3][:100]
    w1, b1, w2, b2 = _weights(x_valid.shape[1])
    out = lin(relu(lin(x_valid, w1, b1)), w2, b2)
    test_eq((out - y_valid).shape, torch.Size([100, 100]))  # the trap
    test_near(mse(out, y_valid), F.mse_loss(out.squeeze(-1), y_valid.float()))
    assert not torch.isclose((out - y_valid).pow(2).mean(), mse(out, y_valid))


# ------------------------------------------------------------------------------------ backward


def _forward_and_backward(x, targ, w1, b1, w2, b2):
    """The lesson's hand-written pass: forward, keeping every intermediate, then the chain rule backwards."""
    l1 = lin(x, w1, b1)
    l2 = relu(l1)
    out = lin(l2, w2, b2)
    loss = mse(out, targ)
    mse_grad(out, targ)
    lin_grad(l2, out, w2, b2)
    relu_grad(l1, l2)
    lin_grad(x, l1, w1, b1)
    return loss


def _autograd(x, targ, w1, b1, w2, b2):
    """The reference: the same forward on clones that require grad, differentiated by PyTorch."""
    leaves = [t.clone().requires_grad_(True) for t in (x, w1, b1, w2, b2)]
    xc, w1c, b1c, w2c, b2c = leaves
    loss = F.mse_loss((F.relu(xc @ w1c + b1c) @ w2c + b2c).squeeze(-1), targ.to(xc.dtype))
    loss.backward()
    return loss.detach(), dict(zip(("x", "w1", "b1", "w2", "b2"), (t.grad for t in leaves), strict=True))


@pytest.fixture(scope="module", params=[torch.float64, torch.float32], ids=["float64", "float32"])
def gradients(request, normalized):
    """Manual and autograd gradients of the 784-50-1 MSE model on 1,000 training images."""
    dtype = request.param
    x = normalized[0][:N_ROWS].to(dtype)
    targ = normalized[1][:N_ROWS]
    params = _weights(x.shape[1], dtype, seed=1)
    loss = _forward_and_backward(x, targ, *params)
    manual = dict(zip(("x", "w1", "b1", "w2", "b2"), (t.g for t in (x, *params)), strict=True))
    ref_loss, ref = _autograd(x, targ, *params)
    return dtype, loss, manual, ref_loss, ref, (x, targ, params)


def _agree(dtype, got, want):
    """float64: tight (only the summation order differs); float32: the course's `near`."""
    if dtype == torch.float64:
        test_close(got, want)
    else:
        test_near(got, want)


def test_the_hand_written_loss_equals_pytorchs(gradients):
    """Before comparing gradients, the forward pass must agree: the hand-built 784-50-1 model's MSE is
    the loss PyTorch computes from the same weights, or every gradient check below would be moot."""
    dtype, loss, _, ref_loss, _, _ = gradients
    _agree(dtype, loss, ref_loss)


@pytest.mark.parametrize("name", ["x", "w1", "b1", "w2", "b2"])
def test_each_hand_written_gradient_matches_autograd(gradients, name):
    """mse_grad: 2 (out - targ) / N; relu_grad: out.g where the input was positive; lin_grad:
    inp.g = out.g @ w.T, w.g = inp.T @ out.g, b.g = out.g summed over the batch. Each ``.g`` must equal
    what autograd finds for the same tensor."""
    dtype, _, manual, _, ref, _ = gradients
    assert manual[name].shape == ref[name].shape and manual[name].dtype == dtype
    _agree(dtype, manual[name], ref[name])


@pytest.mark.parametrize("name", list(WEIGHT_GRADS))
def test_the_three_ways_to_write_w_g_agree(name):
    """w.g is a sum over the batch of outer products inp[b] x out.g[b]: the lesson writes it with
    broadcasting (an [N, in, out] intermediate), then einsum ``'bi,bj->ij'``, then ``inp.t() @ out.g``;
    the last two never build the intermediate (the notebook: 3.4 s vs 140 ms). Same numbers."""
    g = torch.Generator().manual_seed(3)
    inp, out_g = (
        torch.randn(64, 30, generator=g, dtype=torch.float64),
        torch.randn(64, 7, generator=g).double(),
    )
    w = torch.zeros(30, 7, dtype=torch.float64, requires_grad=True)
    (ref,) = torch.autograd.grad((inp @ w * out_g).sum(), w)
    test_close(WEIGHT_GRADS[name](inp, out_g), ref)


def test_gradients_are_plain_values_outside_any_graph(normalized):
    """The ``.g`` are computed under no_grad: even when the weights require grad (say, to compare with
    autograd on the same tensors), the hand-written backward builds no graph."""
    x = normalized[0][:10].clone()
    params = [p.requires_grad_(True) for p in _weights(784)]
    _forward_and_backward(x, normalized[1][:10], *params)
    assert all(t.g.grad_fn is None and not t.g.requires_grad for t in (x, *params))


# ----------------------------------------------------------------------------------- refactored


def test_the_module_refactor_gives_the_same_loss_and_gradients(gradients):
    """`Model` = Lin, Relu, Lin and Mse, each a `Module` that remembers its inputs and output when
    called, so ``backward()`` needs no arguments. It must reproduce the function version exactly."""
    dtype, loss, manual, ref_loss, ref, (x, targ, params) = gradients
    x2, params2 = x.clone(), [p.clone() for p in params]
    model = Model(*params2)
    loss2 = model(x2, targ)
    model.backward()
    test_close(loss2, loss)
    for name, t in zip(("x", "w1", "b1", "w2", "b2"), (x2, *params2), strict=True):
        test_close(t.g, manual[name])
        _agree(dtype, t.g, ref[name])


def test_a_module_keeps_its_arguments_and_output_when_called():
    """``module(*args)`` stores ``args`` and ``out``, which is all its ``bwd`` needs later."""
    layer = Lin(torch.eye(3), torch.zeros(3))
    x = torch.randn(2, 3)
    out = layer(x)
    assert layer.args == (x,) and layer.out is out
    test_eq(out, x)


def test_nn_module_with_transposed_weights_gives_the_same_gradients(gradients):
    """The lesson ends with ``nn.Module``: Linear layers hold [out, in] weights, i.e. w.T, so their
    gradients are our ``w.g`` transposed."""
    dtype, _, manual, _, _, (x, targ, (w1, b1, w2, b2)) = gradients
    net = nn.Sequential(nn.Linear(784, NH), nn.ReLU(), nn.Linear(NH, 1)).to(dtype)
    with torch.no_grad():
        for layer, w, b in ((net[0], w1, b1), (net[2], w2, b2)):
            layer.weight.copy_(w.t())
            layer.bias.copy_(b)
    F.mse_loss(net(x).squeeze(-1), targ.to(dtype)).backward()
    _agree(dtype, net[0].weight.grad, manual["w1"].t())
    _agree(dtype, net[0].bias.grad, manual["b1"])
    _agree(dtype, net[2].weight.grad, manual["w2"].t())
    _agree(dtype, net[2].bias.grad, manual["b2"])


# ------------------------------------------------------------------------- the order of the chain rule


def test_a_backward_step_run_out_of_order_says_what_is_missing():
    """Each step reads ``out.g``, set by the step after it; without it, say which step to run first."""
    inp = torch.randn(4, 3)
    with pytest.raises(
        ValueError, match=r"relu_grad: out.g must be d loss / d out .* run the next layer's backward"
    ):
        relu_grad(inp, relu(inp))
    with pytest.raises(RuntimeError, match="Relu.backward: the module has not been called yet"):
        Relu().backward()
    with pytest.raises(NotImplementedError, match="Module.forward"):
        Module()(inp)


def test_mse_module_starts_the_chain_without_an_incoming_gradient():
    """The loss is where the chain rule starts: `Mse.backward` needs no ``out.g``."""
    inp, targ = torch.randn(5, 1, dtype=torch.float64), torch.arange(5.0, dtype=torch.float64)
    loss = Mse()
    loss(inp, targ)
    loss.backward()
    test_close(inp.g, 2 * (inp - targ[:, None]) / 5)
