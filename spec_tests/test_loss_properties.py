"""Lesson 03 (03_minibatch_training), as properties: our cross-entropy pieces equal PyTorch's everywhere.

The spec file shows the lesson's examples; here hypothesis draws the shapes (one to three dims, up to
12 classes), the scale of the logits (1e-3 to 1e4) and an offset, and each property is checked
against PyTorch's own function: log_softmax against F.log_softmax, logsumexp against torch.logsumexp,
cross_entropy against F.cross_entropy (values and gradients), plus the facts the lesson relies on:
softmax rows sum to 1, and shifting every logit changes log_softmax not at all.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from minilib.loss import cross_entropy, log_softmax, logsumexp, softmax
from minilib.testing import test_close

pytestmark = pytest.mark.lesson03

SETTINGS = settings(max_examples=40, deadline=None)


@st.composite
def logits(draw, min_dims: int = 1, max_dims: int = 3, dtype=torch.float64):
    """A float tensor of random normal scores times a scale in [1e-3, 1e4], plus an offset."""
    shape = draw(st.lists(st.integers(1, 6), min_size=min_dims - 1, max_size=max_dims - 1))
    shape.append(draw(st.integers(1, 12)))  # the classes
    scale = 10 ** draw(st.floats(-3, 4))
    offset = draw(st.sampled_from([0.0, 50.0, -1e3]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale + offset).to(dtype)


@SETTINGS
@given(x=logits())
def test_log_softmax_equals_pytorchs_for_any_shape_and_scale(x):
    """Over the last dim, for any batch shape and any size of logits, in float64."""
    test_close(log_softmax(x), F.log_softmax(x, dim=-1))


@SETTINGS
@given(x=logits())
def test_logsumexp_equals_pytorchs_for_any_shape_and_scale(x):
    """The max trick gives torch.logsumexp's answer, never inf or nan for finite logits."""
    ours = logsumexp(x)
    assert bool(torch.isfinite(ours).all())
    test_close(ours, torch.logsumexp(x, dim=-1))


@SETTINGS
@given(x=logits())
def test_softmax_rows_are_probabilities_summing_to_1(x):
    """Whatever the scale, softmax is in [0, 1] and each row sums to 1."""
    p = softmax(x)
    assert bool(((p >= 0) & (p <= 1)).all())
    test_close(p.sum(-1), torch.ones(x.shape[:-1], dtype=x.dtype))


@SETTINGS
@given(x=logits(), shift=st.floats(-1e3, 1e3))
def test_shifting_every_logit_leaves_log_softmax_unchanged(x, shift):
    """Shift invariance, the reason the LogSumExp trick is allowed (up to the rounding of x + shift)."""
    tol = 1e-12 * (x.abs().max().item() + abs(shift)) + 1e-12
    test_close(log_softmax(x + shift), log_softmax(x), rtol=0, atol=tol * 10)


@SETTINGS
@given(
    x=logits(min_dims=2, max_dims=2), dtype=st.sampled_from([torch.float32, torch.float64]), data=st.data()
)
def test_cross_entropy_equals_pytorchs_values_and_gradients(x, dtype, data):
    """Random [N, C] logits and targets: our mean cross-entropy and its gradient (through autograd)
    equal F.cross_entropy's, in float32 (the course's tolerance) and in float64."""
    n, c = x.shape
    target = torch.tensor(
        data.draw(st.lists(st.integers(0, c - 1), min_size=n, max_size=n)), dtype=torch.int64
    )
    ours_x, theirs_x = x.to(dtype).clone().requires_grad_(), x.to(dtype).clone().requires_grad_()
    ours, theirs = cross_entropy(ours_x, target), F.cross_entropy(theirs_x, target)
    tol = {}  # float64: test_close's per-dtype defaults (assert_close's: rtol 1e-7)
    if dtype == torch.float32:
        # the course's tolerance, widened by the float32 spacing of the largest logit (1e-3 at 1e4)
        tol = {"rtol": 1e-3, "atol": 1e-5 + 1e-6 * x.abs().max().item()}
    test_close(ours, theirs, **tol)
    ours.backward()
    theirs.backward()
    test_close(ours_x.grad, theirs_x.grad, **tol)


@SETTINGS
@given(n=st.integers(1, 8), c=st.integers(1, 8), data=st.data())
def test_any_class_out_of_range_raises_index_error_naming_it(n, c, data):
    """Wherever a bad class sits and whatever it is (>= C or negative), the error names it and where."""
    target = data.draw(st.lists(st.integers(0, c - 1), min_size=n, max_size=n))
    pos = data.draw(st.integers(0, n - 1))
    target[pos] = data.draw(st.one_of(st.integers(c, c + 100), st.integers(-100, -1)))
    with pytest.raises(
        IndexError, match=f"holds class {target[pos]} at position {pos}, but input has only {c}"
    ):
        cross_entropy(torch.randn(n, c), torch.tensor(target))
