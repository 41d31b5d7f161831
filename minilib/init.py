"""Lessons 02a (02a_why_sqrt5) and 02b (02b_initializing): how a layer's init scales its activations.

PyTorch initialises Linear and Conv weights with ``kaiming_uniform_(w, a=sqrt(5))``. The ``a`` is
the negative slope of a leaky ReLU, and ``gain(sqrt(5)) = 1/sqrt(3)``: the weights' bound becomes
``1/sqrt(fan_in)`` and each default layer SHRINKS its activations' std (a conv layer on normalised
MNIST gives std ~0.6, a few layers stacked give almost nothing). The sqrt(5) came from old Torch/Lua
code; the course called it a "good bug" because measuring it taught everyone to check defaults, and
PyTorch opened an issue about its default inits within hours. ``kaiming2`` rebuilds the init by hand,
drawing exactly as ``torch.nn.init.kaiming_uniform_`` does, so the two can be compared tensor for tensor.

Lesson 02b's experiment, ``deep_matmul_stds``, multiplies a vector by 100 random 512x512 matrices:
unscaled it overflows to inf/nan, scaled by 0.01 it vanishes, scaled by 1/sqrt(512) it keeps std ~1.
"""

from __future__ import annotations

import math

import torch

from minilib import contract

__all__ = ["gain", "stats", "fan_in_fan_out", "kaiming2", "deep_matmul_stds"]


def gain(a: float) -> float:
    """sqrt(2 / (1 + a**2)): the factor that keeps a leaky ReLU of negative slope ``a`` from shrinking
    its input's second moment. gain(0) = sqrt(2) (plain ReLU), gain(1) = 1 (no non-linearity),
    gain(sqrt(5)) = 1/sqrt(3), PyTorch's accidental default."""
    return _gain("gain", a)


def _gain(fname: str, a) -> float:
    a = contract.finite_number(fname, a=a)  # in the message, the function the user called
    # The same expression as torch.nn.init.calculate_gain("leaky_relu", a), so kaiming2 draws the same bound.
    return math.sqrt(2.0 / (1 + a**2))


def stats(x: torch.Tensor) -> tuple[float, float]:
    """(mean, std) of all of ``x``'s elements as Python floats: the lesson's view of activations."""
    contract.float_tensor("stats", x=x)
    if x.numel() < 2:
        contract.fail("stats", "x", "a tensor of at least 2 elements (for a std)", x)
    return x.detach().mean().item(), x.detach().std().item()


def fan_in_fan_out(w: torch.Tensor) -> tuple[int, int]:
    """(fan_in, fan_out) of a weight stored as PyTorch stores it: ``[out, in, *kernel]``.

    Each output sums ``in * receptive_field`` products (the fan-in); each input feeds
    ``out * receptive_field`` outputs (the fan-out). For ``nn.Conv2d(1, 32, 5)``: 25 and 800.
    A bias (1-D) has no fan.
    """
    return _fans("fan_in_fan_out", w=w)


def _fans(fname: str, **named: torch.Tensor) -> tuple[int, int]:
    (w,) = named.values()
    contract.weight(fname, **named)  # in the message, the function the user called and its argument's name
    receptive_field = math.prod(w.shape[2:])
    return w.shape[1] * receptive_field, w.shape[0] * receptive_field


def kaiming2(x: torch.Tensor, a: float, use_fan_out: bool = False) -> torch.Tensor:
    """Fill ``x`` in place with U(-bound, bound), bound = sqrt(3) * gain(a) / sqrt(fan), and return it.

    sqrt(3) because U(-1, 1) has std 1/sqrt(3): to get std ``gain(a)/sqrt(fan)`` the bound must be
    sqrt(3) times that. The float arithmetic and the single ``uniform_`` call are the ones
    ``torch.nn.init.kaiming_uniform_(x, a=a)`` makes, so with the same seed both give the same tensor.
    """
    fan_in, fan_out = _fans("kaiming2", x=x)
    g = _gain("kaiming2", a)
    if x.numel() == 0:
        return x  # nothing to fill; PyTorch likewise draws nothing (it warns)
    std = g / math.sqrt(fan_out if use_fan_out else fan_in)
    bound = math.sqrt(3.0) * std
    with torch.no_grad():  # x is usually a Parameter: an in-place draw must not enter the autograd graph
        return x.uniform_(-bound, bound)


def deep_matmul_stds(
    scale: float, n_units: int = 512, n_steps: int = 100, generator: torch.Generator | None = None
) -> list[float]:
    """Lesson 02b: x = randn(n_units), a = randn(n_units, n_units) * scale; repeat ``x = a @ x``.

    Returns the std of x after each of the ``n_steps`` steps (inf or nan once it has overflowed).
    Each output of ``a @ x`` is a sum of ``n_units`` products of unit-variance numbers, so its
    variance is ``n_units`` times theirs: only ``scale = 1/sqrt(n_units)`` keeps it at 1.
    """
    scale = contract.finite_number("deep_matmul_stds", scale=scale)
    contract.positive_int("deep_matmul_stds", minimum=2, n_units=n_units)  # a std needs 2 numbers
    contract.positive_int("deep_matmul_stds", n_steps=n_steps)
    x = torch.randn(n_units, generator=generator)
    a = torch.randn(n_units, n_units, generator=generator) * scale
    stds = []
    for _ in range(n_steps):
        x = a @ x
        stds.append(x.std().item())
    return stds
