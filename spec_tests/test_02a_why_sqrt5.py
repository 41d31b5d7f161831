"""Lesson 02a (02a_why_sqrt5): why PyTorch's default init shrinks activations, and what fixes it.

The notebook puts real images (100 normalised MNIST digits) through ``nn.Conv2d(1, 32, 5)`` and
measures: with PyTorch's default init the output's std is well below 1. The default is
``kaiming_uniform_(w, a=sqrt(5))``, and ``gain(sqrt(5)) = 1/sqrt(3)``, so every default layer
multiplies the std by roughly 1/sqrt(3) (and ReLU halves the second moment on top). Rebuilding the
init by hand as ``kaiming2`` (same draws as PyTorch's) shows that ``a=0`` restores a std near 1 after
the ReLU. Stacked four deep, the default init leaves an output std of ~0.007 and tiny gradients;
Kaiming init gives outputs tens of times larger and first-layer gradients over ten times larger.
The sqrt(5) was inherited from old Torch/Lua code: a "good bug", because measuring it taught the
lesson "don't trust defaults, measure" (PyTorch opened an issue to revisit its default inits within
hours of the lesson).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn import init

from minilib.data import normalize
from minilib.init import fan_in_fan_out, gain, kaiming2, stats

pytestmark = pytest.mark.lesson02a


@pytest.fixture(scope="module")
def images(mnist_sample):
    """100 training digits, normalised with the training set's mean and std, as 100x1x28x28."""
    x_train = mnist_sample[0]
    x = normalize(x_train, x_train.mean(), x_train.std())
    return x[:100].view(-1, 1, 28, 28)


@pytest.fixture(scope="module")
def valid_batch(mnist_sample):
    """100 validation digits (normalised with the TRAINING stats) and their labels as float targets."""
    x_train, _, x_valid, y_valid = mnist_sample
    x = normalize(x_valid[:100], x_train.mean(), x_train.std())
    return x.view(-1, 1, 28, 28), y_valid[:100].float()


def test_normalised_images_have_mean_0_and_std_1(images):
    """The experiment only means something if its input has std 1: then any change of scale is the layer's."""
    mean, std = stats(images)
    assert abs(mean) < 0.1 and abs(std - 1) < 0.1, f"images: mean {mean:.3f}, std {std:.3f}"


def test_conv_weight_shape_gives_fan_in_25_and_fan_out_800():
    """A Conv2d(1, 32, 5) weight is [out=32, in=1, 5, 5]; the receptive field is 25, so each output sums
    1*25 products (fan-in 25) and each input feeds 32*25 outputs (fan-out 800). PyTorch agrees."""
    w = nn.Conv2d(1, 32, 5).weight
    assert tuple(w.shape) == (32, 1, 5, 5)
    assert fan_in_fan_out(w) == (25, 800)
    assert fan_in_fan_out(w) == init._calculate_fan_in_and_fan_out(w)


def test_pytorch_default_conv_init_shrinks_the_activations(images):
    """With the default init, the conv output's std is well below the input's 1 (the notebook: 0.60),
    and after ReLU it drops further (0.37). Each further layer would shrink it again."""
    conv = nn.Conv2d(1, 32, 5)
    _, std = stats(conv(images))
    _, std_relu = stats(F.relu(conv(images)))
    assert 0.3 < std < 0.85, f"default conv output std {std:.3f}, expected well below 1 (notebook: 0.60)"
    assert std_relu < std < 1, f"after relu {std_relu:.3f}, before {std:.3f}"


@pytest.mark.parametrize(
    "a, expected",
    [(1, 1.0), (0, 1.41421), (0.01, 1.41414), (0.1, 1.40720), (math.sqrt(5), 0.57735)],
    ids=["1", "0", "0.01", "0.1", "sqrt5"],
)
def test_gain_table_of_the_lesson(a, expected):
    """gain(a) = sqrt(2 / (1 + a^2)): the lesson's table, and PyTorch's calculate_gain('leaky_relu', a)."""
    assert gain(a) == pytest.approx(expected, abs=1e-5)
    assert gain(a) == pytest.approx(init.calculate_gain("leaky_relu", a), rel=1e-12)


def test_gain_of_sqrt5_is_one_over_sqrt3_so_the_default_bound_is_one_over_sqrt_fan_in():
    """This is the whole mystery: bound = sqrt(3) * gain(sqrt(5)) / sqrt(fan_in) = 1/sqrt(fan_in).
    A uniform U(-b, b) has std b/sqrt(3), so the weights' std is 1/sqrt(3 * fan_in): a third of the
    variance that would keep the activations' scale (and a sixth of what a ReLU layer needs)."""
    assert gain(math.sqrt(5)) == pytest.approx(1 / math.sqrt(3), rel=1e-12)
    w = nn.Conv2d(1, 32, 5).weight  # default init: its values must lie within 1/sqrt(25) = 0.2
    assert w.abs().max().item() <= 1 / math.sqrt(25)
    assert w.abs().max().item() > 0.9 / math.sqrt(25), "the draws should reach close to the bound"


def test_pytorch_default_conv_weight_is_kaiming2_with_a_sqrt5():
    """Not a guess about PyTorch's source: with the same seed, the weight of a freshly built
    nn.Conv2d (and nn.Linear) is exactly kaiming2(w, a=sqrt(5)). The sqrt(5) really is the default."""
    for make in (lambda: nn.Conv2d(1, 32, 5), lambda: nn.Linear(784, 50)):
        torch.manual_seed(11)
        default = make().weight.detach()
        torch.manual_seed(11)
        ours = kaiming2(torch.empty(default.shape), a=math.sqrt(5))
        assert torch.equal(ours, default), f"max diff {(ours - default).abs().max().item():.3g}"


def test_uniform_minus_1_to_1_has_std_one_over_sqrt3():
    """Why kaiming2 multiplies the wanted std by sqrt(3) to get the bound: U(-1, 1) has std 1/sqrt(3)."""
    _, std = stats(torch.empty(1_000_000, dtype=torch.float64).uniform_(-1, 1))
    assert std == pytest.approx(1 / math.sqrt(3), rel=3e-3)


def test_kaiming2_draws_exactly_what_kaiming_uniform_draws():
    """Same formula, same float arithmetic, same single uniform_ call: with the same seed, our
    hand-made init and PyTorch's produce the same tensor, bit for bit, for a conv and a linear weight."""
    for shape, a in [
        ((32, 1, 5, 5), 0.0),
        ((32, 1, 5, 5), math.sqrt(5)),
        ((50, 784), 0.1),
        ((8, 16, 3, 3), 1),
    ]:
        ours, theirs = torch.empty(shape), torch.empty(shape)
        torch.manual_seed(7)
        kaiming2(ours, a=a)
        torch.manual_seed(7)
        init.kaiming_uniform_(theirs, a=a)
        assert torch.equal(ours, theirs), f"{shape}, a={a}: max diff {(ours - theirs).abs().max().item():.3g}"


def test_kaiming2_fan_out_draws_exactly_what_kaiming_uniform_fan_out_draws():
    """use_fan_out=True is PyTorch's mode='fan_out' (preserves the scale of the gradients instead)."""
    ours, theirs = torch.empty(32, 1, 5, 5), torch.empty(32, 1, 5, 5)
    torch.manual_seed(3)
    kaiming2(ours, a=0, use_fan_out=True)
    torch.manual_seed(3)
    init.kaiming_uniform_(theirs, a=0, mode="fan_out")
    assert torch.equal(ours, theirs)


def test_kaiming2_fills_in_place_and_returns_its_argument():
    """Like PyTorch's init functions, kaiming2 changes the weight it is given (a Parameter, under
    no_grad) and returns it, so it can be chained or applied to a layer's weight directly."""
    conv = nn.Conv2d(1, 32, 5)
    before = conv.weight.detach().clone()
    out = kaiming2(conv.weight, a=0)
    assert out is conv.weight
    assert not torch.equal(before, conv.weight.detach())
    assert conv.weight.requires_grad and conv.weight.grad_fn is None  # still a leaf parameter


def test_kaiming2_keeps_the_weights_dtype_and_device():
    """An init works on whatever float tensor it is handed."""
    w = torch.empty(16, 8, 3, 3, dtype=torch.float64)
    kaiming2(w, a=0)
    assert w.dtype == torch.float64 and w.device.type == "cpu"
    assert w.abs().max().item() <= math.sqrt(3) * gain(0) / math.sqrt(8 * 9)


def test_kaiming2_with_a_0_restores_std_near_1_after_relu(images):
    """Kaiming init for a ReLU (a=0, gain sqrt 2) keeps the second moment: after conv + relu the std is
    near 1 (notebook: 1.09; kaiming_normal_ 1.02), where the default init gave ~0.37."""
    conv = nn.Conv2d(1, 32, 5)
    _, default_std = stats(F.relu(conv(images)))
    kaiming2(conv.weight, a=0)
    _, kaiming_std = stats(F.relu(conv(images)))
    assert 0.7 < kaiming_std < 1.4, f"after kaiming2(a=0) + relu: std {kaiming_std:.3f}, expected near 1"
    assert kaiming_std > 2 * default_std, f"kaiming {kaiming_std:.3f} vs default {default_std:.3f}"


def test_kaiming2_with_a_sqrt5_reproduces_the_default_shrinking(images):
    """Our own init with PyTorch's a=sqrt(5) shrinks the activations as the default does (notebook:
    0.34 after relu): the shrinking IS the sqrt(5), nothing else."""
    conv = nn.Conv2d(1, 32, 5)
    kaiming2(conv.weight, a=math.sqrt(5))
    _, std = stats(F.relu(conv(images)))
    assert 0.2 < std < 0.55, f"after kaiming2(a=sqrt5) + relu: std {std:.3f} (notebook 0.34)"


def _four_conv_net() -> nn.Sequential:
    """The notebook's net: 1 -> 8 -> 16 -> 32 -> 1 channels, stride 2, then average pool and flatten."""
    return nn.Sequential(
        nn.Conv2d(1, 8, 5, stride=2, padding=2),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(32, 1, 3, stride=2, padding=1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    )


def _output_and_first_grad_std(net: nn.Sequential, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    out = net(x)
    loss = (out.squeeze(-1) - y).pow(2).mean()  # the notebook's MSE against the digit's value
    loss.backward()
    return stats(out)[1], stats(net[0].weight.grad)[1]


@pytest.fixture(scope="module")
def four_conv_stds(valid_batch):
    """(output std, first-layer weight-gradient std) with the default init, then with Kaiming init."""
    x, y = valid_batch
    torch.manual_seed(42)
    net = _four_conv_net()
    default = _output_and_first_grad_std(net, x, y)
    for layer in net:
        if isinstance(layer, nn.Conv2d):
            kaiming2(layer.weight, a=0)
            with torch.no_grad():
                layer.bias.zero_()
    net.zero_grad()
    kaiming = _output_and_first_grad_std(net, x, y)
    return default, kaiming


def test_four_default_conv_layers_leave_almost_no_output(four_conv_stds):
    """Four default layers shrink the signal layer after layer: the output std is ~0.007 (notebook
    0.0065) for inputs of std 1. A network that outputs nearly a constant cannot start learning well."""
    (out_std, _), _ = four_conv_stds
    assert out_std < 0.05, f"default-init output std {out_std:.4f}, expected tiny (notebook 0.0065)"


def test_kaiming_init_gives_outputs_and_gradients_an_order_of_magnitude_larger(four_conv_stds):
    """With Kaiming init (zero bias) the same net's output std is ~0.4 (notebook 0.40) and its first
    layer's gradient std ~0.5 (notebook 0.42), against 0.007 and 0.033 by default: the gradient that
    reaches the first layer is what lets it learn, and the default init starves it."""
    (d_out, d_grad), (k_out, k_grad) = four_conv_stds
    assert k_out > 10 * d_out, f"output std: kaiming {k_out:.4f} vs default {d_out:.4f}"
    assert k_grad > 5 * d_grad, f"first-layer grad std: kaiming {k_grad:.4f} vs default {d_grad:.4f}"
    assert 0.1 < k_out < 2, f"kaiming output std {k_out:.3f} should be of order 1 (notebook 0.40)"
