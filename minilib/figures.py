"""Lessons 02b, 03 and 07a as pictures: figures a learner would rather look at than read.

Every function returns a ``matplotlib.figure.Figure`` built directly (no pyplot): nothing is shown,
no global backend is chosen and no figure is left registered with pyplot, so they are safe in tests
and scripts. Show one in a notebook by leaving it as a cell's value, or save it with
``fig.savefig(path)``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from matplotlib.figure import Figure

from minilib.init import deep_matmul_stds
from minilib.loss import softmax

__all__ = ["LESSON_SCALINGS", "activation_std_figure", "softmax_nll_figure", "layer_stats_figure"]

# Lesson 02b's three scalings of a 512x512 random matrix, in the order the lesson tries them.
LESSON_SCALINGS: dict[str, float] = {
    "unscaled": 1.0,
    "x 0.01": 0.01,
    "/ sqrt(512)": 1 / math.sqrt(512),
}


def activation_std_figure(
    stds_by_name: Mapping[str, Sequence[float]] | None = None, generator: torch.Generator | None = None
) -> Figure:
    """Std of x after each step of ``x = a @ x``, one line per scaling, on a log axis.

    By default runs lesson 02b's experiment (``deep_matmul_stds``) for ``LESSON_SCALINGS``. The
    unscaled line climbs ~22x per step until it overflows (the line stops: inf and nan are not
    drawn); x0.01 falls until it underflows to 0; /sqrt(512) stays near 1.
    """
    if stds_by_name is None:
        stds_by_name = {
            name: deep_matmul_stds(scale, generator=generator) for name, scale in LESSON_SCALINGS.items()
        }
    if len(stds_by_name) == 0:
        raise ValueError("activation_std_figure: stds_by_name must name at least one scaling, got none")
    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    tiny = 1e-45  # a std that underflowed to 0 cannot sit on a log axis: draw it at the bottom instead
    for name, stds in stds_by_name.items():
        steps = list(range(1, len(stds) + 1))
        ys = [s if not (math.isfinite(s) and s == 0.0) else tiny for s in stds]
        ax.plot(steps, [y if math.isfinite(y) else math.nan for y in ys], label=name)
    ax.set_yscale("log")
    ax.set_xlabel("step (x = a @ x)")
    ax.set_ylabel("std of x")
    ax.set_title("Activations explode, vanish, or keep their scale")
    ax.axhline(1.0, color="grey", linewidth=0.5)
    ax.legend()
    return fig


def softmax_nll_figure(n_classes: int = 10, logits=None) -> Figure:
    """Two panels for lesson 03's loss.

    Left: the softmax probability of one class as its logit sweeps ``logits`` while the other
    ``n_classes - 1`` logits stay at 0: an S-curve from 0 to 1, at 1/n_classes when all are equal.
    Right: -log(p) for p in (0, 1]: 0 at p = 1 and without bound as p -> 0, so minimising it is
    maximising the likelihood of the right class.
    """
    if isinstance(n_classes, bool) or not isinstance(n_classes, int) or n_classes < 2:
        raise ValueError(f"softmax_nll_figure: n_classes must be an int >= 2, got {n_classes!r}")
    z = torch.linspace(-10, 10, 201, dtype=torch.float64) if logits is None else torch.as_tensor(logits)
    if z.dim() != 1 or not z.is_floating_point():
        raise ValueError(f"softmax_nll_figure: logits must be a 1-D float sequence, got {tuple(z.shape)}")
    rows = torch.zeros(len(z), n_classes, dtype=z.dtype)
    rows[:, 0] = z
    p_class = softmax(rows)[:, 0]
    p = torch.linspace(0.01, 1.0, 100, dtype=torch.float64)

    fig = Figure(figsize=(9, 3.5))
    left, right = fig.subplots(1, 2)
    left.plot(z.tolist(), p_class.tolist())
    left.axhline(1 / n_classes, color="grey", linewidth=0.5)
    left.set_xlabel(f"logit of class 0 (the other {n_classes - 1} at 0)")
    left.set_ylabel("softmax probability of class 0")
    left.set_title("softmax")
    right.plot(p.tolist(), (-p.log()).tolist())
    right.set_xlabel("p (probability given to the right class)")
    right.set_ylabel("-log(p)")
    right.set_title("negative log likelihood")
    fig.tight_layout()
    return fig


def layer_stats_figure(stats_by_stage: Mapping[str, Sequence[tuple[float, float]]]) -> Figure:
    """Lesson 07a's before and after: each layer's output mean (left) and std (right), one group of bars
    per layer, one bar per stage (``{"init_cnn": [(mean, std), ...], "after LSUV": [...]}``). LSUV's
    goal is drawn as lines: std 1, mean 0."""
    if len(stats_by_stage) == 0:
        raise ValueError("layer_stats_figure: stats_by_stage must name at least one stage, got none")
    fig = Figure(figsize=(9, 3.5))
    axes = fig.subplots(1, 2)
    width = 0.8 / len(stats_by_stage)
    for k, (stage, stats) in enumerate(stats_by_stage.items()):
        xs = [i + (k - (len(stats_by_stage) - 1) / 2) * width for i in range(len(stats))]
        for ax, values in zip(axes, zip(*stats, strict=True), strict=True):
            ax.bar(xs, values, width, label=stage)
    for ax, what, goal in zip(axes, ("mean", "std"), (0.0, 1.0), strict=True):
        ax.axhline(goal, color="grey", linewidth=0.5)
        ax.set_xlabel("layer")
        ax.set_title(f"output {what} of each layer")
    axes[0].legend()
    fig.tight_layout()
    return fig
