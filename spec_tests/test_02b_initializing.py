"""Lesson 02b (02b_initializing): why deep stacks of matmuls explode or vanish, and what scale fixes it.

The notebook multiplies a random vector of 512 units by the same random 512x512 matrix 100 times.
Unscaled, the numbers grow ~22x per step and overflow to inf/nan near step 28; scaled by 0.01 they
shrink until they are exactly 0; scaled by 1/sqrt(512) they keep a std of order 1. The reason is
one line of statistics: each output of ``a @ x`` is a sum of 512 products of unit-variance numbers,
and the variance of a sum of independent terms is the sum of their variances (a product of two unit
normals has variance 1), so the variance is 512 unless each weight is divided by sqrt(512). A ReLU
then zeroes half of the values and halves the second moment, which is why Kaiming init uses
sqrt(2 / fan_in): it keeps the scale through any number of ReLU layers. Reading list named by the
lesson: Glorot & Bengio (Xavier), He et al. (Kaiming), LSUV, Saxe et al. (orthogonal), Fixup, SELU.
"""

from __future__ import annotations

import math

import pytest
import torch

from minilib.figures import LESSON_SCALINGS, activation_std_figure
from minilib.init import deep_matmul_stds

pytestmark = pytest.mark.lesson02b

N = 512


def _seeded(seed: int = 42) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_deep_matmul_stds_is_the_lessons_loop():
    """deep_matmul_stds(scale) is exactly the notebook's cell: x = randn(512); a = randn(512, 512) * scale;
    100 times x = a @ x, recording x.std()."""
    g = _seeded()
    x = torch.randn(N, generator=g)
    a = torch.randn(N, N, generator=g) * (1 / math.sqrt(N))
    expected = []
    for _ in range(100):
        x = a @ x
        expected.append(x.std().item())
    assert deep_matmul_stds(1 / math.sqrt(N), generator=_seeded()) == expected


def test_unscaled_matmul_stack_overflows_to_nan():
    """Unscaled, each step multiplies the std by about sqrt(512) = 22.6: float32 tops out near 3e38,
    so after ~28 steps x holds inf, and inf - inf in the next products gives nan."""
    stds = deep_matmul_stds(1.0, generator=_seeded())
    first_bad = next(i for i, s in enumerate(stds, start=1) if not math.isfinite(s))
    assert 20 <= first_bad <= 35, f"first non-finite std at step {first_bad}, notebook ~28"
    assert math.isnan(stds[-1]), f"after 100 steps the std is {stds[-1]}, expected nan"
    growth = stds[9] / stds[8]
    assert 10 < growth < 50, f"one step multiplied the std by {growth:.1f}, expected ~sqrt(512) = 22.6"


def test_scaling_by_0_01_makes_the_activations_vanish_to_exactly_0():
    """Scaled by 0.01, each step multiplies the std by about 0.01 * sqrt(512) = 0.23: after 100 steps
    every value has underflowed to 0. A network like that outputs nothing and learns nothing."""
    stds = deep_matmul_stds(0.01, generator=_seeded())
    assert stds[-1] == 0.0, f"after 100 steps the std is {stds[-1]}, expected exactly 0"
    assert all(math.isfinite(s) for s in stds)


def test_scaling_by_one_over_sqrt_512_keeps_the_std_of_order_1():
    """Divided by sqrt(512), each step keeps the variance: after 100 steps the std is still of order 1
    (notebook: 0.93). Because the SAME matrix is applied 100 times its largest eigenvalues make the std
    drift a little (here up to a few units): far from the 1e38 and the 0 of the other two scalings."""
    stds = deep_matmul_stds(1 / math.sqrt(N), generator=_seeded())
    assert all(0.1 < s < 10 for s in stds), f"std ranged over [{min(stds):.3g}, {max(stds):.3g}]"


def test_one_output_of_a_512_unit_matmul_has_variance_512():
    """Why: y = a @ x sums 512 products a_ij * x_j, each of variance 1, so var(y) = 512. The notebook
    averaged y's mean and mean of squares over 100 draws: 0.0094 and 516.8."""
    g = _seeded()
    means, sqrs = [], []
    for _ in range(100):
        x = torch.randn(N, generator=g)
        a = torch.randn(N, N, generator=g)
        y = a @ x
        means.append(y.mean().item())
        sqrs.append(y.pow(2).mean().item())
    mean, sqr = sum(means) / 100, sum(sqrs) / 100
    assert abs(mean) < 0.5, f"mean {mean:.3f}"
    assert sqr == pytest.approx(N, rel=0.05), f"mean of squares {sqr:.1f}, expected ~512"


def test_a_product_of_two_unit_normals_has_variance_1():
    """The building block: a * x for independent unit normals has mean 0 and mean of squares 1
    (notebook: 0.99), so summing 512 of them gives 512."""
    g = _seeded()
    a, x = (
        torch.randn(100_000, generator=g, dtype=torch.float64),
        torch.randn(100_000, generator=g, dtype=torch.float64),
    )
    y = a * x
    assert abs(y.mean().item()) < 0.02
    assert y.pow(2).mean().item() == pytest.approx(1.0, abs=0.05)


def _relu_second_moment(scale: float) -> float:
    g = _seeded()
    sqr = 0.0
    for _ in range(20):
        x = torch.randn(N, generator=g)
        a = torch.randn(N, N, generator=g) * scale
        sqr += (a @ x).clamp(min=0).pow(2).mean().item()
    return sqr / 20


def test_relu_halves_the_second_moment():
    """With weights scaled by 1/sqrt(512), a @ x has second moment 1; a ReLU zeroes the negative half,
    so the mean of squares drops to 0.5 (notebook: 0.49). Every ReLU layer would halve it again."""
    assert _relu_second_moment(1 / math.sqrt(N)) == pytest.approx(0.5, abs=0.05)


def test_kaiming_scale_sqrt_2_over_fan_in_restores_the_second_moment_after_relu():
    """Multiplying the weights by sqrt(2/fan_in) instead doubles the variance before the ReLU, which
    then halves it back to ~1 (notebook: 1.0). That is Kaiming He's init."""
    assert _relu_second_moment(math.sqrt(2 / N)) == pytest.approx(1.0, abs=0.1)


def test_through_30_relu_layers_only_kaiming_scaling_keeps_the_signal():
    """The consequence for a deep ReLU net (fresh weights per layer): with 1/sqrt(fan_in) the second
    moment halves at every layer, ~2**-30 = 1e-9 after 30 layers; with sqrt(2/fan_in) it stays ~1."""
    results = {}
    for name, scale in [("1/sqrt(n)", 1 / math.sqrt(N)), ("sqrt(2/n)", math.sqrt(2 / N))]:
        g = _seeded()
        x = torch.randn(N, generator=g)
        for _ in range(30):
            x = (torch.randn(N, N, generator=g) * scale @ x).clamp(min=0)
        results[name] = x.pow(2).mean().item()
    assert results["1/sqrt(n)"] < 1e-6, results
    assert 0.1 < results["sqrt(2/n)"] < 10, results


def test_activation_std_figure_plots_the_three_scalings():
    """The figure a learner would rather look at: one line per scaling, the std after each step on a
    log axis. Its data are the experiment's numbers: unscaled stops (nan) after overflowing, x0.01
    falls to the floor of the axis, /sqrt(512) stays near 1."""
    fig = activation_std_figure(generator=_seeded())
    ax = fig.axes[0]
    lines = [line for line in ax.lines if not line.get_label().startswith("_")]  # skip the y=1 guide
    assert [line.get_label() for line in lines] == list(LESSON_SCALINGS)
    assert ax.get_yscale() == "log"
    expected = {}
    g = _seeded()  # the figure drew its scalings in this order from one generator
    for name, scale in LESSON_SCALINGS.items():
        expected[name] = deep_matmul_stds(scale, generator=g)
    unscaled, small, sqrt_n = (line.get_ydata() for line in lines)
    finite = [s for s in expected["unscaled"] if math.isfinite(s)]
    assert list(unscaled[: len(finite)]) == finite
    assert all(math.isnan(v) for v in unscaled[len(finite) :])
    assert small[-1] < 1e-40 and small[-1] > 0, "an underflowed 0 is drawn at the bottom of the log axis"
    assert list(sqrt_n) == expected["/ sqrt(512)"]
    assert list(lines[0].get_xdata()) == list(range(1, 101))
